"""Throughput of the FID Inception port (inception.InceptionV3) on the CPU: images per second at batch 50.

64x64 inputs (bilinearly resized to 299 inside the network, as for FID), random weights (the speed does not
depend on them), a warm-up batch then a few timed batches. Also reports how long 50k images (one FID) would take.

    python bench/bench_inception.py                   # defaults: batch 50, 3 timed batches, all CPU threads
    python bench/bench_inception.py --threads 2 --batches 5
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from inception import InceptionV3  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up batch")
    parser.add_argument("--size", type=int, default=64, help="input resolution before the resize to 299")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = InceptionV3()                          # random weights: fine for timing, not for any metric
    x = torch.rand(args.batch_size, 3, args.size, args.size)
    with torch.inference_mode():
        model(x)                                   # warm-up (oneDNN kernel selection, allocations)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            model(x)
        dt = time.perf_counter() - t0
    ips = args.batches * args.batch_size / dt
    print(f"InceptionV3 (FID) on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"batch {args.batch_size}, {args.size}x{args.size} -> 299x299, {args.batches} batches in {dt:.2f} s")
    print(f"  {ips:.1f} images/s  ({1000 / ips:.1f} ms/image; 50k images, one FID: {50000 / ips / 60:.1f} min)")


if __name__ == "__main__":
    main()
