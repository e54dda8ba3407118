"""The PyTorch figure for `innerq bench`'s model rows, measured in the same device call: Hugging Face
transformers on the same model directory (bf16, SDPA attention, its default dynamic cache, no
compile), prompt processing of N tokens and greedy generation of 128. A measuring instrument run on
the GPU machine, not part of the tool:
    python3 bench/torch_reference.py MODEL_DIR [PROMPT_LENGTHS...]
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def seconds(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(model_dir, lengths):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    vocab = model.config.vocab_size
    for n in lengths:
        ids = (torch.arange(n, device="cuda") * 7919 + 13) % vocab
        with torch.no_grad():
            t = seconds(lambda: model(ids[None], use_cache=False, logits_to_keep=1))
        print(json.dumps({"test": f"pp{n}", "tokens_per_second": [n / s for s in t]}), flush=True)
    ids = ((torch.arange(16, device="cuda") * 7919 + 13) % vocab)[None]
    gen = 128

    def generate():
        model.generate(ids, max_new_tokens=gen, min_new_tokens=gen, do_sample=False)

    with torch.no_grad():
        t = seconds(generate)
    print(json.dumps({"test": f"tg{gen} (incl. a 16-token prefill)",
                      "tokens_per_second": [gen / s for s in t]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]] or [512, 4096])
