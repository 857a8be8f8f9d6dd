"""Time of the stage-1 loss networks on this machine (random weights: the speed does not depend on them).

Per training step the generator pays one LPIPS forward + backward to the input, one PatchGAN forward + backward and
one DINOv2 ViT-B/14 teacher forward (no gradient); the discriminator step adds two PatchGAN passes.

    python bench/bench_losses.py --batch 2 --size 256 --repeats 3      # the defaults: every option may be left out
"""
import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import losses  # noqa: E402


def timed(fn, repeats):
    fn()                                              # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    B, S = args.batch, args.size
    x = torch.rand(B, 3, S, S) * 2 - 1
    y = torch.rand(B, 3, S, S) * 2 - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lpips = losses.LPIPS()
    disc = losses.NLayerDiscriminator()
    teacher = losses.DINOv2().eval().requires_grad_(False)

    def lpips_step():
        xg = x.clone().requires_grad_(True)
        lpips(xg, y).sum().backward()

    def disc_step():
        xg = x.clone().requires_grad_(True)
        losses.hinge_g_loss(disc(xg)).backward()

    def teacher_step():
        with torch.no_grad():
            teacher(losses.dinov2_preprocess(x))

    print(f"{torch.get_num_threads()} threads, batch {B} x 3 x {S} x {S} ({args.repeats} repeats)")
    for name, fn in [("LPIPS-VGG forward + backward", lpips_step), ("PatchGAN forward + backward", disc_step),
                     ("DINOv2 ViT-B/14 forward at 224 (no grad)", teacher_step)]:
        t = timed(fn, args.repeats)
        print(f"  {name:<44s} {1000 * t:8.1f} ms/batch   {1000 * t / B:8.1f} ms/image")


if __name__ == "__main__":
    main()
