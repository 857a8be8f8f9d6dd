"""MergeAR's compacted cache (paper Sec. 4.1, Fig. 6) against the plain KV cache of part 1: decoding speed and
attention entries per step, same weights, same code sequences.

Both decoders replay the same codes through `mergear.decode_mergear` (teacher forcing through the cache,
codes=...), so they take the same N steps and run the same matmuls per token; they differ only in the keys each
step's attention reads: every earlier position (plain: 2 + t keys at step t) or the prefix, the first member of
every group so far and the window (MergeAR: at most K + W + 3, padded to the batch's largest count).

Model: a small LlamaGen-style GPT (width 128, 4 blocks, 4 heads, vocab 4096), W = one grid row (the default).
Codes: synthetic recovered codes with a realistic duplicate pattern: the sqrt(N) x sqrt(N) grid is cut into
K 2D blobs (the Voronoi cells of K random seed cells; ToMe's merged groups are such contiguous-ish regions, so
in raster order a group shows up as short runs on several rows), each blob one distinct code. Grid sizes as in
Table 3: N = 256 with K = 64 and 144 (G+R), N = 1024 with K = 256 (G); batch 1 and 16.

Columns:
  entries/step  mean number of keys the attention computes per step (MergeAR: padding included; plain: 2 + t)
  last          the same at the last step
  tok/s         codes decoded per second, batch x N / wall time (one thread by default, loaded 2-core CPU)
  speed-up      plain time / MergeAR time, measured
  FLOP pred.    the speed-up FLOP counting predicts from the per-step entries: sum_t (F + A L_plain(t)) /
                sum_t (F + A L_merge(t)), F the matmul FLOPs per token outside attention (projections, SwiGLU,
                head), A = 4 D n_layer per key (q.k and the weighted sum of v). "here" is this model; "GPT-L" is
                MergeVQ's generator (width 1024, 24 blocks, the factorized 2^18 head with its 2 intra blocks).
Reading the numbers: at this width attention is about a quarter of the FLOPs at N = 1024; at GPT-L it is a few
percent, so FLOP counting predicts a few percent for GPT-L. Measured times differ from FLOPs both ways: at
batch 1 the Python and bookkeeping cost of a step (the same for both caches, plus MergeAR's duplicate test and
slot plan) dominates; at batch 16 the masked CPU attention is memory-bound (it streams L keys, L values and the
mask for every query), so shorter contexts save more time than their FLOPs. In the first W + 1 steps MergeAR
reads more keys than the plain cache: its W + 1 ring slots are always read, masked while empty. The PNG plots
the entries per step of batch 1, plain vs. MergeAR (the README shows it: bench/mergear_entries.png). Timings are
the best of --repeats runs.

Last, the training-step time of both (forward + backward, about 4096 codes per step): the plain model runs the
fused causal attention, MergeAR an explicit Eq. (12) mask, which the fused causal kernels cannot take.

    python bench/bench_mergear.py --threads 1 --repeats 3 --png bench/mergear_entries.png   # the defaults
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt import build_gpt, ffn_hidden_size  # noqa: E402
from mergear import (decode_mergear, merge_window, mergear_logits,  # noqa: E402
                     mergear_loss, rep_from_codes)

CONFIGS = [(256, 64), (256, 144), (1024, 256)]                  # (N, K)
BATCHES = [1, 16]
WIDTH = dict(dim=128, n_layer=4, n_head=4, vocab_size=4096)


def blob_codes(N, K, batch, vocab, gen):
    """(batch, N) codes: the grid cut into K Voronoi cells of K distinct random seed cells, one code per cell."""
    g = math.isqrt(N)
    yx = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(N, 2).float()
    rows = []
    for _ in range(batch):
        seeds = torch.randperm(N, generator=gen)[:K]                        # (K,) distinct cells
        source = torch.cdist(yx, yx[seeds]).argmin(1)                       # (N,) nearest seed: the merged group
        rows.append(torch.randperm(vocab, generator=gen)[:K][source])       # one distinct code per group
    return torch.stack(rows)                                                # (batch, N)


def dense_flops(dim, n_layer, vocab=None, factorized_bits=None, n_intra=2):
    """Matmul FLOPs per decoded token outside attention: qkv, wo and SwiGLU in every block, then the head."""
    block = 2 * (4 * dim * dim + 3 * dim * ffn_hidden_size(dim))
    if factorized_bits is None:
        return n_layer * block + 2 * dim * vocab
    pre, post = factorized_bits
    return n_layer * block + 2 * n_intra * block + 2 * dim * (2 ** pre + 2 ** post)   # intra blocks on 2 slots


def predicted_speedup(L_plain, L_merge, F, A):
    return float((F + A * L_plain.double()).sum() / (F + A * L_merge.double()).sum())


def timed(fn, repeats=1):
    """fn's result and its best wall time over `repeats` runs."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def plot(curves, path):
    """Attention entries per decoding step, one panel per N: plain (gray) vs. MergeAR (one colour per K)."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=12)                              # Pillow >= 10.1: a scalable font
    except TypeError:
        font = ImageFont.load_default()
    W_, H_, pad = 520, 360, 50
    panels = sorted({N for N, _ in curves})
    img = Image.new("RGB", (W_ * len(panels), H_), "white")
    d = ImageDraw.Draw(img)
    colours = {64: (31, 119, 180), 144: (214, 39, 40), 256: (44, 160, 44)}
    for p, N in enumerate(panels):
        x0, y0, x1, y1 = p * W_ + pad, pad - 20, (p + 1) * W_ - 20, H_ - pad     # plot box
        ymax = N + 2
        sx = lambda t: x0 + (x1 - x0) * t / (N - 1)                         # noqa: E731
        sy = lambda v: y1 - (y1 - y0) * v / ymax                            # noqa: E731
        d.rectangle([x0, y0, x1, y1], outline="black")
        for frac in (0, 0.25, 0.5, 0.75, 1.0):
            v, t = int(ymax * frac), int((N - 1) * frac)
            d.line([x0 - 4, sy(v), x0, sy(v)], fill="black")
            d.text((x0 - 40, sy(v) - 6), str(v), fill="black", font=font)
            d.line([sx(t), y1, sx(t), y1 + 4], fill="black")
            d.text((sx(t) - 10, y1 + 8), str(t), fill="black", font=font)
        d.text((x0 + 5, y1 + 24), f"decoding step (N = {N})", fill="black", font=font)
        d.text((x0 + 5, y0 + 5), "attention entries per step", fill="black", font=font)
        legend = [("plain KV cache", (128, 128, 128))]
        for (n, K), (plain, merge) in curves.items():
            if n != N:
                continue
            d.line([(sx(t), sy(v)) for t, v in enumerate(plain.tolist())], fill=(128, 128, 128), width=2)
            d.line([(sx(t), sy(v)) for t, v in enumerate(merge.tolist())], fill=colours[K], width=2)
            legend.append((f"MergeAR K = {K}", colours[K]))
        for i, (name, col) in enumerate(legend):
            d.line([x0 + 10, y0 + 30 + 14 * i, x0 + 30, y0 + 30 + 14 * i], fill=col, width=3)
            d.text((x0 + 36, y0 + 23 + 14 * i), name, fill="black", font=font)
    img.save(path)


TRAIN_CONFIGS = [(256, 64, 16), (1024, 256, 4)]                # (N, K, batch): about 4096 codes per step


def train_step_times(threads, repeats):
    """One training step (forward + backward) of the plain causal model (fused causal attention) and of MergeAR
    (the Eq. (12) mask as an explicit (B, N + 2, N + 2) mask), same width, same codes; best of `repeats`."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    with torch.enable_grad():
        for N, K, B in TRAIN_CONFIGS:
            torch.manual_seed(0)
            plain = build_gpt("tiny", block_size=N, num_classes=1000, **WIDTH)
            merge = build_gpt("tiny", block_size=N, num_classes=1000, merge_counts=(K,), **WIDTH)
            codes = blob_codes(N, K, B, WIDTH["vocab_size"], gen)
            cond = torch.randint(0, 1000, (B,), generator=gen)
            rep = rep_from_codes(codes)

            def step_plain():
                plain.zero_grad(set_to_none=True)
                plain(codes[:, :-1], cond, targets=codes).loss.backward()

            def step_merge():
                merge.zero_grad(set_to_none=True)
                mergear_loss(merge, codes, cond, K, rep).backward()

            step_plain(), step_merge()                                      # warm-up
            times = {"plain": math.inf, "merge": math.inf}
            for _ in range(repeats):                                        # interleaved: plain, merge, plain, ...
                for name, fn in (("plain", step_plain), ("merge", step_merge)):
                    times[name] = min(times[name], timed(fn)[1])
            rows.append((N, K, B, times["plain"], times["merge"]))
    print(f"\ntraining step (forward + backward), {threads} thread(s), best of {repeats}, interleaved:")
    print(f"{'N':>5} {'K':>4} {'B':>3} | {'plain causal (fused) ms':>23} | {'MergeAR Eq. (12) mask ms':>24} | "
          f"{'MergeAR / plain':>15}")
    for N, K, B, tp, tm in rows:
        print(f"{N:5d} {K:4d} {B:3d} | {tp * 1e3:23.1f} | {tm * 1e3:24.1f} | {tm / tp:14.2f}x")


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mergear_entries.png"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for N in sorted({N for N, _ in CONFIGS}):                               # one RoPE grid per N, same weights
        torch.manual_seed(0)
        models[N] = build_gpt("tiny", block_size=N, num_classes=1000, merge_counts=tuple(K for _, K in CONFIGS),
                              **WIDTH).eval()
        models[N].output.weight.normal_(0, 0.02)
    F_here = dense_flops(WIDTH["dim"], WIDTH["n_layer"], WIDTH["vocab_size"])
    A_here = 4 * WIDTH["dim"] * WIDTH["n_layer"]
    F_L, A_L = dense_flops(1024, 24, factorized_bits=(6, 12)), 4 * 1024 * 24
    print(f"GPT width {WIDTH['dim']}, {WIDTH['n_layer']} blocks, {WIDTH['n_head']} heads, vocab "
          f"{WIDTH['vocab_size']}; {args.threads} thread(s); W = one grid row; codes replayed (teacher forcing)")
    print(f"{'N':>5} {'K':>4} {'W':>3} {'B':>3} | {'entries/step':>12} {'last':>5} {'tok/s':>8} | "
          f"{'entries/step':>12} {'last':>5} {'tok/s':>8} | {'speed-up':>8} {'FLOP pred. here':>15} {'GPT-L':>6}")
    print(f"{'':>19}| {'plain KV cache':^27} | {'MergeAR compacted cache':^27} |")
    gen = torch.Generator().manual_seed(0)
    curves = {}
    for N, K in CONFIGS:
        model = models[N]
        W = merge_window(model)
        for B in BATCHES:
            codes = blob_codes(N, K, B, WIDTH["vocab_size"], gen)
            cond = torch.randint(0, 1000, (B,), generator=gen)
            decode_mergear(model, cond, K, 16, codes=codes[:, :16])        # warm-up
            plain, tp = timed(lambda: decode_mergear(model, cond, K, N, codes=codes, compact=False), args.repeats)
            merge, tm = timed(lambda: decode_mergear(model, cond, K, N, codes=codes), args.repeats)
            assert torch.equal(plain.codes, merge.codes) and (merge.stored <= K + W + 2).all()
            Lp, Lm = plain.computed, merge.computed
            print(f"{N:5d} {K:4d} {W:3d} {B:3d} | {Lp.float().mean():12.1f} {int(Lp[-1]):5d} {B * N / tp:8.0f} | "
                  f"{Lm.float().mean():12.1f} {int(Lm[-1]):5d} {B * N / tm:8.0f} | {tp / tm:7.2f}x "
                  f"{predicted_speedup(Lp, Lm, F_here, A_here):14.2f}x {predicted_speedup(Lp, Lm, F_L, A_L):5.2f}x")
            if B == 1:
                curves[(N, K)] = (Lp, Lm)
                if N == 256:                                                # the cache is the masked forward
                    full = mergear_logits(model, codes, cond, K, rep_from_codes(codes))
                    err = (full - merge.logits).abs().max().item()
                    print(f"{'':>19}  (N = {N}, K = {K}: compacted-cache logits vs. Eq. (12) masked forward, "
                          f"max |diff| {err:.1e})")
    plot(curves, args.png)
    print(f"entries per step plotted to {args.png}")
    train_step_times(args.threads, args.repeats)


if __name__ == "__main__":
    main()
