"""Decoding speed of gpt.generate (KV cache) against recomputing the whole prefix for every code (no cache).

A small GPT (width 256, 4 blocks, 8 heads, vocab 16384) greedily decodes 256 codes (a 16 x 16 grid) for 4 class
labels, with and without classifier-free guidance. Both paths must produce the same codes; the table gives
codes/s and the speed-up. CPU, one thread by default.

    python bench/bench_gpt.py --threads 1 --tokens 256      # the defaults: every option may be left out
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt import build_gpt, generate, guide  # noqa: E402


@torch.no_grad()
def generate_without_cache(model, cond, num_tokens, cfg_scale=1.0):
    """Greedy decoding that runs the full teacher-forced forward on the prefix at every step."""
    B = cond.shape[0]
    use_cfg = cfg_scale != 1.0
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if use_cfg else cond
    codes = torch.zeros(labels.shape[0], 0, dtype=torch.long)
    for _ in range(num_tokens):
        # the forward takes the codes it predicts, the last one never read: a placeholder for the code to come
        logits = model(F.pad(codes, (0, 1)), labels).logits[:, -1]       # (B', vocab) at the newest position
        logits = guide(logits, cfg_scale) if use_cfg else logits
        nxt = logits.argmax(-1)                                          # (B,)
        codes = torch.cat([codes, nxt.repeat(labels.shape[0] // B)[:, None]], dim=1)
    return codes[:B]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_gpt("tiny", dim=256, n_layer=4, n_head=8, block_size=args.tokens).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.02)                              # zero heads would give ties everywhere
    cond = torch.tensor([1, 207, 360, 980])
    print(f"GPT width 256, 4 blocks, vocab 16384; {len(cond)} labels x {args.tokens} codes, greedy, "
          f"{args.threads} thread(s)")
    print(f"{'cfg':>5} {'cached codes/s':>15} {'no-cache codes/s':>17} {'speed-up':>9} {'same codes':>11}")
    for cfg in (1.0, 2.0):
        n = len(cond) * args.tokens
        a, ta = timed(lambda: generate(model, cond, args.tokens, cfg_scale=cfg, top_k=1))
        b, tb = timed(lambda: generate_without_cache(model, cond, args.tokens, cfg_scale=cfg))
        print(f"{cfg:5.1f} {n / ta:15.1f} {n / tb:17.1f} {tb / ta:8.1f}x {str(torch.equal(a, b)):>11}")


if __name__ == "__main__":
    main()
