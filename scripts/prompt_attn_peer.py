# Reference figures on the GPU machine (PyTorch is never a dependency of innerq): torch SDPA on a
# prompt of n queries at the end of a T-key fp16 context (a Llama-3-8B layer: 32 q heads, 8 kv
# heads, d=128), the causal mask aligned bottom-right, K and V repeated to the q heads beforehand
# (not timed). Median of CUDA events, in us; a backend that refuses a shape says so. Run by
# scripts/device_ab.sh with STEPS containing "prompts" and PEERS set.
import torch, torch.nn.functional as F, json
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
torch.manual_seed(0)
def bench(fn, iters=30, warm=5):
    for _ in range(warm): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(iters):
        s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    ts.sort(); return ts[len(ts) // 2]
H, KV, D = 32, 8, 128
for T in [32768, 131072]:
    k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.float16); v = torch.randn_like(k)
    kx, vx = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
    for n in [2, 16, 32, 64, 128, 256, 4096]:
        q = torch.randn(1, H, n, D, device="cuda", dtype=torch.float16)
        r = {"T": T, "n": n}
        for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
            try:
                mask = causal_lower_right(n, T)
                with sdpa_kernel(be):
                    r[name + "_us"] = round(bench(lambda: F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask)) * 1e3, 1)
            except Exception as ex:
                r[name] = "fail: " + str(ex).split("\n")[0][:60]
        print(json.dumps(r), flush=True)
    del k, v, kx, vx; torch.cuda.empty_cache()
print(torch.cuda.get_device_name(), torch.__version__)
