"""MergeAR's compacted cache (paper Sec. 4.1, Fig. 6) against a plain KV cache: decoding speed, attention entries
per step, a memory-traffic model of GPT-L's step, and the caches' memory; same weights, same code sequences.

Both decoders replay the same codes through `mergear.decode_mergear` (teacher forcing through the cache,
codes=...), so they take the same N steps and run the same matmuls per token, through the same cache code
(mergear.CacheSlots and CompactKVCache: in-place writes, an additive mask); they differ only in the keys each
step's attention reads: every earlier position (plain: the window W = N evicts nothing, 2 + t keys at step t) or
the prefix, the first member of every group so far and the window (MergeAR: at most K + W + 3, padded to the
batch's largest count). gpt.py's `generate` has its own KVCache, which attends over all N positions (masked) at
every step: it is not the baseline here.

Model: a small LlamaGen-style GPT (width 128, 4 blocks, 4 heads, vocab 4096), W = one grid row (the default).
Codes: synthetic recovered codes with a realistic duplicate pattern: the sqrt(N) x sqrt(N) grid is cut into
K 2D blobs (the Voronoi cells of K random seed cells; ToMe's merged groups are such contiguous-ish regions, so
in raster order a group shows up as short runs on several rows), each blob one distinct code. Grid sizes as in
Table 3: N = 256 with K = 64 and 144 (G+R), N = 1024 with K = 256 (G); batch 1 and 16.

Timing: the decoders run interleaved, plain, MergeAR, attention-free, plain, MergeAR, ... for --repeats rounds on
the same sequences; each round gives one ratio (plain time / MergeAR time, the runs seconds apart under about the
same load), and the table prints the median ratio and its min-max spread. tok/s are from the median times. The
attention-free decoder (the same step, its attention over at most 4 keys: W = 0 on a sequence of one repeated
code, so every row reads C, M, the first code and itself) bounds what any shorter context can gain.

Columns:
  entries/step  mean number of keys the attention computes per step (MergeAR: padding included; plain: 2 + t)
  last          the same at the last step
  tok/s         codes decoded per second, batch x N / median wall time (one thread by default)
  speed-up      plain time / MergeAR time per round: median (min-max)
  bound         plain time / attention-free time per round (median): the same step with a 4-key attention,
                the most any shorter context can save here
  of bound      MergeAR's saving as a share of that most: (plain - MergeAR) / (plain - attention-free), median
                ("-" where the bound is within 5% of 1: the saving there is in the timing noise)
  FLOP pred.    the speed-up FLOP counting predicts from the per-step entries: sum_t (F + A L_plain(t)) /
                sum_t (F + A L_merge(t)), F the matmul FLOPs per token outside attention (projections, SwiGLU,
                head), A = 4 D n_layer per key (q.k and the weighted sum of v). "here" is this model; "GPT-L" is
                MergeVQ's generator (width 1024, 24 blocks, the factorized 2^18 head with its 2 intra blocks).
Reading the numbers: at this width attention is about a quarter of the FLOPs at N = 1024; at GPT-L it is a few
percent, so FLOP counting predicts a few percent for GPT-L. At batch 1 the step is the matmuls and a thousand
small framework operations, the same for both caches, and attention a few percent of it: shorter contexts
cannot save more than that. At batch 16 the CPU attention streams L keys and values for every row and is a
large share of the step, so shorter contexts save more than their FLOPs. The PNG plots the entries per step of
batch 1, plain vs. MergeAR (docs/mergear_decoding.md shows it: bench/mergear_entries.png).

Then what a GPU would see: a memory-traffic model of one decoding step (the weights read once, K and V of every
key read for every row, bf16) for GPT-L at N = 1024, K = 256 and batch 1 to 256, its crossover batch and a check
against this CPU at batch 16; and the KV-cache memory of GPT-L at batch 64: the slots the decoder's CacheSlots
holds on these codes, times the bytes of a slot.

Last, the training-step time of both (forward + backward, about 4096 codes per step): the plain model runs the
fused causal attention, MergeAR an explicit Eq. (12) mask, which the fused causal kernels cannot take.

    python bench/bench_mergear.py --threads 1 --repeats 7 --png bench/mergear_entries.png   # the defaults
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt import build_gpt, ffn_hidden_size, gpt_config  # noqa: E402
from mergear import (CacheSlots, build_mergear, decode_mergear, merge_window, mergear_loss,  # noqa: E402
                     rep_from_codes)

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


def interleaved(fns, repeats):
    """Run the callables in turn, A, B, A, B, ..., `repeats` rounds: the wall times (repeats,) of each and its last
    result. A round's two runs see about the same machine load, so their ratio holds still where the times drift."""
    times, results = [[] for _ in fns], [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [torch.tensor(t, dtype=torch.float64) for t in times], results


def live_entries(codes, window):
    """The keys Eq. (12) lets each row read, counted from the codes (rep_from_codes' reading): (B, N) -> (B, N),
    entry t = C, M, the first members among positions 0 .. t and the other positions among t - W .. t (itself
    included). Two running sums, no (N, N) mask."""
    B, N = codes.shape
    first = (rep_from_codes(codes) == torch.arange(N, device=codes.device)).long()   # (B, N)
    zero = first.new_zeros(B, 1)
    n_first = first.cumsum(1)                                               # (B, N) first members in 0 .. t
    n_dup = torch.cat([zero, (1 - first).cumsum(1)], dim=1)                 # (B, N + 1) others before t
    start = (torch.arange(N, device=codes.device) - window).clamp(min=0)   # (N,) t - W, clipped
    return 2 + n_first + n_dup[:, 1:] - n_dup[:, start]                     # (B, N)


def read_lengths(codes, window, K):
    """What the batched compacted cache does on codes (B, N), from mergear's CacheSlots driven by the codes alone
    (no model), as decode_mergear drives it: the keys each step's attention computes (N,) (step 0: C, M; step t:
    row t - 1's read, padded to the batch's largest), and the slots it holds at the end (its capacity)."""
    B, N = codes.shape
    slots = CacheSlots(B, window, min(2 + K + (window + 1) + 1, 2 + N), torch.float32, codes.device)
    for p in range(2):                                                      # C, M
        slots.add(p - 2, torch.full((B,), -1), torch.ones(B, dtype=torch.bool))
    lengths = [2]
    for t in range(1, N):
        x = codes[:, t - 1]
        slots.add(t - 1, x, slots.is_new(x))
        lengths.append(slots.length)
        slots.evict(t)
    return torch.tensor(lengths), slots.capacity


def streamed_weight_bytes(model, bytes_per_param):
    """Bytes of the weights a decoding step reads: every parameter but the embedding tables (one row each)."""
    return bytes_per_param * sum(p.numel() for m in model.modules() if not isinstance(m, torch.nn.Embedding)
                                 for p in m.parameters(recurse=False))


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
            merge = build_mergear("tiny", block_size=N, num_classes=1000, merge_counts=(K,), **WIDTH)
            codes = blob_codes(N, K, B, WIDTH["vocab_size"], gen)
            cond = torch.randint(0, 1000, (B,), generator=gen)
            rep = rep_from_codes(codes)

            def step_plain():
                plain.zero_grad(set_to_none=True)
                plain(codes, cond, targets=codes).loss.backward()

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


TRAFFIC_BATCHES = [1, 16, 64, 256]


def step_bytes(weights, kv_per_key, batch, L):
    """The memory-traffic model of a decoding step: the weights once, K and V of L keys for each of batch rows."""
    return weights + batch * kv_per_key * L.double()


def traffic_model(check, gen, N=1024, K=256):
    """What a GPU whose decoding step is bound by memory bandwidth would see: GPT-L (factorized 2^18 head) at
    N = 1024, K = 256, bf16. check: (weights, kv_per_key, L_plain, L_merge, measured ratios) of this bench's model
    at batch 16, where the CPU measurement tests the model."""
    with torch.device("meta"):
        gpt_l = build_gpt("L", factorized=True, block_size=N)
    cfg = gpt_l.cfg
    weights = streamed_weight_bytes(gpt_l, 2)                               # bf16
    kv_per_key = 2 * cfg.n_layer * cfg.dim * 2                              # K and V, every layer, bf16
    W = math.isqrt(N)
    codes = blob_codes(N, K, max(TRAFFIC_BATCHES), 4096, gen)
    L_plain = torch.arange(2, N + 2)                                        # 2 + t keys at step t
    print(f"\nmemory-traffic model of one decoding step (GPU bound by memory bandwidth): GPT-L, factorized 2^18 "
          f"head, N = {N}, K = {K}, W = {W}, bf16")
    print(f"  assumptions: the weights are read once per step ({weights / 1e6:.0f} MB: {cfg.n_layer} blocks, "
          f"{cfg.n_intra_layer} intra-token blocks, heads; embedding tables read one row); K and V of every key the "
          f"attention computes are read for every row ({kv_per_key / 1e3:.1f} kB per key: 2 x {cfg.n_layer} layers x "
          f"{cfg.dim} x 2 B); the compacted attention reads the batch-padded slots (mergear.CacheSlots' length); "
          f"activations, the intra-token blocks' 2-slot attention and launch "
          f"latency ignored; time ~ bytes. Batch = rows of the forward (CFG's [cond; null] doubles the images). "
          f"Codes: Voronoi blobs as below.")
    print(f"  {'batch':>5} | {'keys/step plain':>15} | {'MergeAR padded (live)':>21} | {'KV MB/step plain':>16} | "
          f"{'MergeAR':>7} | {'predicted speed-up':>18}")
    for b in TRAFFIC_BATCHES:
        L_merge = read_lengths(codes[:b], W, K)[0]
        live = reads(codes[:b], W).double().mean()
        ratio = step_bytes(weights, kv_per_key, b, L_plain).sum() / step_bytes(weights, kv_per_key, b, L_merge).sum()
        print(f"  {b:5d} | {L_plain.double().mean():15.1f} | {L_merge.double().mean():12.1f} ({live:6.1f}) | "
              f"{b * kv_per_key * L_plain.double().mean() / 1e6:16.0f} | "
              f"{b * kv_per_key * L_merge.double().mean() / 1e6:7.0f} | {ratio:17.2f}x")
    L_merge = read_lengths(codes[:16], W, K)[0]
    cross_p = weights / (kv_per_key * L_plain.double().mean())
    cross_m = weights / (kv_per_key * L_merge.double().mean())
    print(f"  crossover (the KV reads equal the weight reads, averaged over the N steps): batch {cross_p:.1f} for "
          f"the plain cache, {cross_m:.1f} for MergeAR's; above it the KV reads dominate and the speed-up tends "
          f"to the ratio of keys read, {L_plain.double().mean() / L_merge.double().mean():.2f}x at batch 16")
    w, kv, Lp, Lm, measured = check
    pred = step_bytes(w, kv, 16, Lp).sum() / step_bytes(w, kv, 16, Lm).sum()
    med = measured.median().item()
    print(f"  check on this CPU (this bench's model, float32: {w / 1e6:.1f} MB of weights, {kv / 1e3:.1f} kB per key; "
          f"N = {N}, K = {K}, batch 16): the model predicts {pred:.2f}x, measured {med:.2f}x (median), "
          f"the model {100 * (pred / med - 1):+.0f}% off: this CPU's step is not bound by memory bandwidth (the "
          f"matmuls' arithmetic and a thousand small framework operations per step take most of it)")


def cache_memory(gen, N=1024, K=256, batch=64):
    """KV-cache bytes of GPT-L, plain and compacted: the slots the decoder's CacheSlots holds at the end of these
    codes (window N: every position; window one grid row: MergeAR), times the bytes of a slot (K and V, every
    layer, bf16)."""
    cfg = gpt_config("L", factorized=True, block_size=N)
    H, D_h, W = cfg.n_head, cfg.dim // cfg.n_head, math.isqrt(N)
    codes = blob_codes(N, K, batch, 4096, gen)
    per_slot = 2 * cfg.n_layer * batch * H * D_h * 2                       # bytes of one slot of every row
    cp, cm = read_lengths(codes, N, K)[1], read_lengths(codes, W, K)[1]
    print(f"\nKV-cache memory, GPT-L ({cfg.n_layer} layers, {H} heads x {D_h}), N = {N}, K = {K}, W = {W}, "
          f"batch {batch}, bf16, the slots CacheSlots holds on Voronoi-blob codes:")
    print(f"  plain   {cp:5d} slots per row: {cp * per_slot / 2 ** 30:6.2f} GiB of K/V")
    print(f"  MergeAR {cm:5d} slots per row: {cm * per_slot / 2 ** 30:6.2f} GiB of K/V, {cp / cm:.2f}x less (grows "
          f"only if sampling yields more than K distinct codes)")


def reads(codes, window):
    """The live keys each decoding step's attention reads, per sample (B, N): C, M at step 0, then Eq. (12)'s row
    of the fed position (itself included)."""
    return torch.cat([torch.full_like(codes[:, :1], 2), live_entries(codes, window)[:, :-1]], dim=1)


def decode_rows(models, repeats, gen):
    """The decoding table: per (N, K, batch) the three decoders interleaved on the same replayed codes. Returns the
    entry curves of batch 1 (for the PNG) and the N = 1024, batch 16 measurement the traffic model is checked on."""
    F_here = dense_flops(WIDTH["dim"], WIDTH["n_layer"], WIDTH["vocab_size"])
    A_here = 4 * WIDTH["dim"] * WIDTH["n_layer"]
    F_L, A_L = dense_flops(1024, 24, factorized_bits=(6, 12)), 4 * 1024 * 24
    print(f"{'N':>5} {'K':>4} {'W':>3} {'B':>3} | {'entries/step':>12} {'last':>5} {'tok/s':>7} | "
          f"{'entries/step':>12} {'last':>5} {'tok/s':>7} | {'speed-up, median (min-max)':>26} | "
          f"{'bound':>6} {'of bound':>8} | {'FLOP pred. here':>15} {'GPT-L':>6}")
    print(f"{'':>19}| {'plain KV cache':^26} | {'MergeAR compacted cache':^26} |")
    curves, check = {}, None
    for N, K in CONFIGS:
        model = models[N]
        W = merge_window(model)
        for B in BATCHES:
            codes = blob_codes(N, K, B, WIDTH["vocab_size"], gen)
            cond = torch.randint(0, 1000, (B,), generator=gen)
            one = codes[:, :1].expand(B, N)                                 # the bound: one repeated code, W = 0
            decoders = [lambda w=N, c=codes: decode_mergear(model, cond, K, N, w, codes=c, return_logits=False),
                        lambda w=W, c=codes: decode_mergear(model, cond, K, N, w, codes=c, return_logits=False),
                        lambda w=0, c=one: decode_mergear(model, cond, K, N, w, codes=c, return_logits=False)]
            for decode in decoders:                                         # warm-up
                decode()
            (tp, tm, tb), (plain, merge, _) = interleaved(decoders, repeats)
            assert torch.equal(plain.codes, merge.codes) and (live_entries(codes, W) <= K + W + 3).all()
            Lp, Lm = read_lengths(codes, N, K)[0], read_lengths(codes, W, K)[0]
            assert torch.equal(Lp, torch.arange(2, N + 2))                  # W = N: the plain cache, 2 + t keys
            ratio = tp / tm                                                 # (repeats,) paired
            bound = (tp / tb).median()
            share = f"{100 * ((tp - tm) / (tp - tb)).median():7.0f}%" if bound > 1.05 else f"{'-':>8}"  # in the noise
            print(f"{N:5d} {K:4d} {W:3d} {B:3d} | {Lp.float().mean():12.1f} {int(Lp[-1]):5d} "
                  f"{B * N / tp.median():7.0f} | {Lm.float().mean():12.1f} {int(Lm[-1]):5d} "
                  f"{B * N / tm.median():7.0f} | {ratio.median():8.2f}x ({ratio.min():.2f}-{ratio.max():.2f}x)"
                  f"{'':>4} | {bound:5.2f}x {share} | "
                  f"{predicted_speedup(Lp, Lm, F_here, A_here):14.2f}x "
                  f"{predicted_speedup(Lp, Lm, F_L, A_L):5.2f}x")
            if B == 1:
                curves[(N, K)] = (Lp, Lm)
                if N == 256 and K == 64:                                    # the cache is the masked forward
                    d = decode_mergear(model, cond, K, N, codes=codes)
                    full = model(codes, cond, K, rep_from_codes(codes))
                    print(f"{'':>19}  (N = {N}, K = {K}: compacted-cache logits vs. Eq. (12) masked forward, "
                          f"max |diff| {(full - d.logits).abs().max().item():.1e})")
            if N == 1024 and B == 16:
                check = (streamed_weight_bytes(model, 4), 2 * WIDTH["n_layer"] * WIDTH["dim"] * 4, Lp, Lm, ratio)
    return curves, check


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mergear_entries.png"))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1:
        ap.error(f"--repeats and --threads must be >= 1, got {args.repeats} and {args.threads}")
    torch.set_num_threads(args.threads)
    models = {}
    for N in sorted({N for N, _ in CONFIGS}):                               # one RoPE grid per N, same weights
        torch.manual_seed(0)
        models[N] = build_mergear("tiny", block_size=N, num_classes=1000, merge_counts=[K for _, K in CONFIGS],
                                  **WIDTH).eval()
        models[N].output.weight.normal_(0, 0.02)
    print(f"GPT width {WIDTH['dim']}, {WIDTH['n_layer']} blocks, {WIDTH['n_head']} heads, vocab "
          f"{WIDTH['vocab_size']}; {args.threads} thread(s); W = one grid row; codes replayed (teacher forcing); "
          f"plain, MergeAR and attention-free interleaved, {args.repeats} rounds")
    gen = torch.Generator().manual_seed(0)
    curves, check = decode_rows(models, args.repeats, gen)
    plot(curves, args.png)
    print(f"entries per step plotted to {args.png}")
    traffic_model(check, gen)
    cache_memory(gen)
    train_step_times(args.threads, args.repeats)


if __name__ == "__main__":
    main()
