"""What autograd keeps for backward, measured: the figures behind resources.py's constants.

One training forward runs under torch.autograd.graph.saved_tensors_hooks, which sees every tensor saved for the
backward pass; the bytes of their distinct storages are summed (a view shares its base's storage; weights saved by
a matmul count once). Two batch sizes are measured and their difference divided by the samples added, so the
weights and anything else per step, not per sample, cancel. CPU, random weights, no optimizer.

  stage 1   the paper presets' tokenizer forward (G, MergeTok; reconstruction, recovery loss, MergeTok's two
            branches), 1 and 2 images at --sizes px, float32 and bf16 autocast: bytes per input pixel of one image,
            and the ratios resources.py uses (bf16 / float32 and MergeTok / G, at the largest size)
  stage 2   GPT-L's width: one and two transformer blocks on 2 and 4 sequences at 64 and 144 positions (bytes per
            unit of width and position of one block), and the heads per predicted position (plain at 16384 codes,
            factorized at 2^18), float32 and bf16 autocast

    python bench/bench_memory.py --stage all --sizes 64 128 --threads 2      # the defaults: every option may be left out
"""
import argparse
import contextlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import resources  # noqa: E402
from gpt import build_gpt  # noqa: E402
from tokenizer import build_tokenizer  # noqa: E402


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while fn() runs."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def autocast(amp):
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()


def per_sample(fn, small, large):
    """(saved bytes at `large` - at `small`) / (large - small): what one more sample adds."""
    return (saved_bytes(lambda: fn(large)) - saved_bytes(lambda: fn(small))) / (large - small)


def stage1(sizes):
    print("stage 1: saved bytes per input pixel of one training image (paper presets, random weights)")
    figures = {}
    for variant in ["g", "mergetok"]:
        for size in sizes:
            torch.manual_seed(0)
            tok = build_tokenizer(variant, "paper", image_size=size).train()
            K = tok.cfg.K * size ** 2 // 256 ** 2                          # the target K's share of N at this size
            K = tok.check_K(max(1, round(K ** 0.5)) ** 2)
            for amp in ["none", "bf16"]:
                def forward(B):
                    x = torch.rand(B, 3, size, size) * 2 - 1
                    with autocast(amp):
                        out = tok(x, K=K)
                        return out.recon.float().mean() + out.recovery_loss
                figures[variant, size, amp] = per_sample(forward, 1, 2) / size ** 2
                print(f"  {variant:8s} {size:4d} px  K={K:4d}  {amp:4s}  {figures[variant, size, amp] / 1e3:7.1f} KB")
    top = max(sizes)
    print(f"  at {top} px: bf16 / float32 (G) {figures['g', top, 'bf16'] / figures['g', top, 'none']:.2f} "
          f"(resources.BF16_ACTIVATION_FACTOR {resources.BF16_ACTIVATION_FACTOR}); MergeTok / G (float32) "
          f"{figures['mergetok', top, 'none'] / figures['g', top, 'none']:.2f} "
          f"(resources.MERGETOK_ACTIVATION_FACTOR {resources.MERGETOK_ACTIVATION_FACTOR}); "
          f"resources.ACTIVATION_BYTES_PER_PIXEL {resources.ACTIVATION_BYTES_PER_PIXEL / 1e3:.1f} KB")


def stage2():
    print("stage 2: GPT-L's width (D = 1024), saved bytes (random weights)")
    D = 1024
    for amp in ["none", "bf16"]:
        for T in [64, 144]:
            def stack(n_layer):
                torch.manual_seed(0)
                model = build_gpt("L", n_layer=n_layer, block_size=T, vocab_size=16384).train()

                def forward(B):
                    codes = torch.randint(0, 16384, (B, T))
                    labels = torch.randint(0, 1000, (B,))
                    with autocast(amp):
                        model(codes, labels, targets=codes, label_smoothing=0.1)
                return per_sample(forward, 2, 4)
            block = stack(2) - stack(1)                                      # one block, one sequence
            print(f"  block {amp:4s} T={T:4d}: {block / (T * D):6.1f} bytes per unit of width and position "
                  f"(resources.BLOCK_BYTES_PER_WIDTH {resources.BLOCK_BYTES_PER_WIDTH[amp]})")
        T = 64
        for factorized, vocab in [(False, 16384), (True, 2 ** 18)]:
            def heads(n_layer, vocab=vocab, factorized=factorized):           # noqa: B023
                torch.manual_seed(0)
                model = build_gpt("L", n_layer=n_layer, block_size=T, vocab_size=vocab,
                                  factorized=factorized).train()

                def forward(B):
                    codes = torch.randint(0, vocab, (B, T))
                    labels = torch.randint(0, 1000, (B,))
                    with autocast(amp):                                  # logits and the loss, as training
                        model(codes, labels, targets=codes, label_smoothing=0.1)
                return per_sample(forward, 2, 4)
            head = heads(1) - (stack(2) - stack(1))                            # one block's share taken off
            per_position = head / T
            logits = 2 ** 6 + vocab // 2 ** 6 if factorized else vocab
            extra = 4 * resources.BLOCK_BYTES_PER_WIDTH[amp] * D if factorized else 0
            print(f"  head {'factorized' if factorized else 'plain':10s} {amp:4s}: {per_position / 1e3:6.1f} KB per "
                  f"predicted position, {(per_position - extra) / logits:5.1f} bytes per logit beyond "
                  f"{'4 blocks of width' if factorized else 'nothing'} (resources.HEAD_BYTES_PER_LOGIT "
                  f"{resources.HEAD_BYTES_PER_LOGIT[factorized]})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["1", "2", "all"], default="all")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="stage-1 image sizes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.stage in ("1", "all"):
        stage1(args.sizes)
    if args.stage in ("2", "all"):
        stage2()


if __name__ == "__main__":
    main()
