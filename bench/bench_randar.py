"""RandAR's parallel decoding against raster decoding: forward passes and wall time per image (the figures for
Sec. 4.2 / Table 3's step counts).

One transformer width (default 256, 4 blocks, 8 heads, factorized 2^18 codes as in MergeVQ), L = 256 tokens:
  raster   gpt.generate: one token per forward pass, L passes (LlamaGen, and MergeAR's step count);
  RandAR   randar.generate_randar with T = 88 (Table 3's G setting) and T = L = 256 steps (one token per step).
A RandAR step feeds more positions than a raster step (it rewrites the previous step's queries as [X, P] pairs and
appends the next queries: about 2 n_j + n_{j+1} positions) and its cache holds 1 + 2L entries, not L: fewer passes,
each a little wider. Both without CFG and with CFG (the batch doubles). Interleaved, best of --repeats, one process.

    python bench/bench_randar.py --threads 1 --batch 8 --repeats 3     # the defaults: every option may be left out
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt import build_gpt, generate  # noqa: E402
from randar import build_randar, generate_randar  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L = 256
    size = dict(dim=args.dim, n_layer=args.layers, n_head=8, block_size=L, factorized=True, num_classes=1000)
    torch.manual_seed(0)
    raster = build_gpt("tiny", **size).eval()
    torch.manual_seed(0)
    randar = build_randar("tiny", **size).eval()
    cond = torch.arange(args.batch) * 97 % 1000
    cells = torch.arange(L).expand(args.batch, L)                         # all L grid cells, in a random order
    runs = {"raster (gpt.generate)": (L, lambda cfg: generate(raster, cond, L, cfg_scale=cfg)),
            "RandAR T = 88": (88, lambda cfg: generate_randar(randar, cond, L, 88, cfg_scale=cfg, cells=cells)),
            "RandAR T = 256": (256, lambda cfg: generate_randar(randar, cond, L, 256, cfg_scale=cfg, cells=cells))}
    print(f"width {args.dim}, {args.layers} blocks, factorized 2^18 codes, L = {L} tokens, batch {args.batch}, "
          f"{args.threads} thread(s), best of {args.repeats} interleaved runs")
    for cfg in (1.0, 3.0):
        best = {name: float("inf") for name in runs}
        for name, (_, fn) in runs.items():
            fn(cfg)                                                           # warm-up
        for _ in range(args.repeats):
            for name, (_, fn) in runs.items():
                best[name] = min(best[name], timed(lambda: fn(cfg)))
        base = best["raster (gpt.generate)"]
        print(f"\ncfg {cfg:g}{' (linear for RandAR, constant for raster)' if cfg != 1 else ''}:")
        print(f"{'decoder':<24} {'forward passes':>14} {'ms per image':>13} {'vs raster':>10}")
        for name, (passes, _) in runs.items():
            print(f"{name:<24} {passes:>14d} {1e3 * best[name] / args.batch:>13.1f} {base / best[name]:>9.2f}x")


if __name__ == "__main__":
    main()
