// Runs the command line as users do (deno run cli.ts ...), for the tests of each command.

/** cli.ts, for tests that spawn it themselves (e.g. to interrupt it). */
export const CLI = new URL("../cli.ts", import.meta.url).pathname;

/** Runs `innerq args` with stdin (none if undefined) and returns its exit code and output. */
export async function innerq(args: string[], stdin?: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "--quiet", CLI, ...args],
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(stdin));
    await writer.close();
  }
  const { code, stdout, stderr } = await child.output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code, stdout: decode(stdout), stderr: decode(stderr) };
}
