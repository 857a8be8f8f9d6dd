"""Tokenizer figures: paper-preset parameter counts next to Table A1, encoder FLOPs at 256x256 next to Table A1's
97.5G / 46.4G / 9.5G (torch.utils.flop_counter, batch 1, at the target K), and tiny-preset forward times on the CPU.

    python bench/bench_tokenizer.py            # all of it (the FLOP count runs the paper encoders once on the CPU)
    python bench/bench_tokenizer.py --no-flops
"""
import argparse
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tokenizer import TABLE_A1, VARIANTS, build_tokenizer, count_parameters  # noqa: E402

TABLE_A1_GFLOPS = {"g": 97.5, "gr": 46.4, "r": 9.5}   # the paper's encoder cost (its unit is not stated)


def params():
    print("paper presets: parameters (M)")
    print(f"  {'variant':7s} {'encoder':>8s} {'A1':>6s} {'decoder':>8s} {'A1':>6s} {'recovery':>9s} {'align head':>11s}")
    for v in VARIANTS:
        with torch.device("meta"):
            m = build_tokenizer(v)
        e, d = count_parameters(m.encoder) / 1e6, count_parameters(m.decoder) / 1e6
        print(f"  {v:7s} {e:8.2f} {TABLE_A1[v][0]:6.1f} {d:8.2f} {TABLE_A1[v][1]:6.1f} "
              f"{count_parameters(m.recovery) / 1e6:9.2f} {count_parameters(m.align_head) / 1e6:11.2f}")


@torch.no_grad()
def flops():
    print("paper presets: encoder cost at 256x256, batch 1, K = target, GMACs (= FLOPs / 2; fvcore, which the")
    print("authors use, counts one multiply-add as one 'flop')")
    for v in VARIANTS:
        row = []
        for schedule in ("square", "linear"):
            m = build_tokenizer(v, merge_schedule=schedule).eval()
            counter = FlopCounterMode(display=False)
            with counter:
                m.encoder(torch.zeros(1, 3, 256, 256), m.cfg.K)
            row.append(counter.get_total_flops() / 2e9)
        with counter:
            m.encoder(torch.zeros(1, 3, 256, 256), m.cfg.num_tokens)
        print(f"  {v:3s} K={m.cfg.K:4d}: square (paper) {row[0]:6.1f}  linear (release) {row[1]:6.1f}  "
              f"no merging {counter.get_total_flops() / 2e9:6.1f}   Table A1: {TABLE_A1_GFLOPS[v]}")
        del m


@torch.no_grad()
def tiny_times(batch=16, repeats=5):
    print(f"tiny presets: forward time on the CPU ({torch.get_num_threads()} threads), batch {batch}, each at its "
          f"image size (G 32 px, G+R and R 64 px)")
    for v in VARIANTS:
        torch.manual_seed(0)
        m = build_tokenizer(v, "tiny").eval()
        S = m.cfg.image_size
        x = torch.rand(batch, 3, S, S) * 2 - 1                                # (B, 3, S, S)
        m(x)                                                            # warm-up
        t = time.perf_counter()
        for _ in range(repeats):
            m(x)
        dt = (time.perf_counter() - t) / repeats
        print(f"  {v:3s} N={m.cfg.num_tokens:4d} K={m.cfg.K:3d}: {dt * 1e3:7.1f} ms per batch "
              f"({batch / dt:6.1f} images/s), {count_parameters(m) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-flops", action="store_true")
    args = ap.parse_args()
    params()
    tiny_times()
    if not args.no_flops:
        flops()
