// `innerq info`'s longest-context search: the largest count that fits, at the edges too.
import { strictEqual as assertEquals } from "node:assert";
import { longestContext } from "../src/commands/info.ts";

Deno.test("longestContext finds the largest n whose bytes fit", () => {
  const fitsIn = (free: number) => (n: number) => 100 + 7 * n <= free;
  assertEquals(longestContext(fitsIn(1000)), 128); // 100 + 7 * 128 = 996
  assertEquals(longestContext(fitsIn(1003)), 129); // exactly full
  assertEquals(longestContext(fitsIn(106)), 0); // not even one token
  assertEquals(longestContext(fitsIn(107)), 1);
  assertEquals(longestContext(() => true, 5000), 5000);
});
