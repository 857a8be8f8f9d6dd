"""Why the predicted source loses at tiny scale (docs/predicted_source.md): what the source of a tiny tokenizer holds.

At the tiny preset, decoding with the Source Recovery Model's predicted source (Table 5, Eq. (8)-(9)) loses several
dB against the encoder's true source. This script measures, on held-out images of the embedded shapes at one kept
count K, how much of the image the source itself carries and which recovery errors the decoder tolerates:

  true / predicted    PSNR of the reconstruction with the true and the predicted source, and recovery accuracy
  group-mean fill     every pixel gets the mean colour of its true merged group: no codes at all, only the partition
  fixed-cell fill     the same with a sqrt(K) x sqrt(K) grid of fixed cells instead of the merged groups
  recovery bits       the recovery model's cross-entropy against the true source, in bits per image (sum over the
                      N positions), beside the K x d bits the codes hold
  neighbour moves     --move-fraction of the positions drawn at random, each moved to the group of one of its
                      4-neighbours that lies in another group (positions inside their group stay), decoded with the
                      true codes; and, for comparison, as many positions moved to a group drawn uniformly (distant)
  adjacent errors     of the positions the predicted source gets wrong, the fraction whose predicted group holds one
                      of their 4-neighbours
  nearest centre      every position assigned to the true group whose centre (mean grid position) is nearest
  disconnected        the fraction of true merged groups that are not 4-connected on the token grid

    python experiments/predicted_source.py --ckpt runs/stage1-g-tiny/last.pt --keep 64 --num-images 300

EMA weights; PSNR on [0, 1] as `evaluate.py recon`; the moves are drawn from --seed.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as data_lib                                                      # noqa: E402
from tokenizer import load_tokenizer                                         # noqa: E402


def psnr(x, y):
    """Per-image PSNR (B,) in dB of images in [0, 1]: 10 log10(1 / MSE), as `evaluate.py recon` reports it."""
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))                     # (B,)
    return 10.0 * torch.log10(1.0 / mse)


def grid_neighbours(g):
    """(N, 4) index of each grid position's 4-neighbours on a g x g grid (raster order), -1 outside the grid."""
    r, c = torch.div(torch.arange(g * g), g, rounding_mode="floor"), torch.arange(g * g) % g
    out = []
    for dr, dc in [(-1, 0), (1, 0), (0, -1), (0, 1)]:
        rr, cc = r + dr, c + dc
        inside = (rr >= 0) & (rr < g) & (cc >= 0) & (cc < g)
        out.append(torch.where(inside, rr * g + cc, torch.full_like(rr, -1)))
    return torch.stack(out, dim=1)                                                  # (N, 4)


def neighbour_groups(source, nbr):
    """(B, N, 4) the group of each position's 4-neighbours, -1 outside the grid."""
    idx = nbr.clamp(min=0).expand(source.shape[0], -1, -1)                           # (B, N, 4)
    groups = source.gather(1, idx.reshape(source.shape[0], -1)).reshape(idx.shape)   # (B, N, 4)
    return torch.where(nbr >= 0, groups, torch.full_like(groups, -1))


def fill_groups(x, source, K, g):
    """Every pixel takes the mean colour of the pixels of its group: x (B, 3, S, S), source (B, N) -> (B, 3, S, S)."""
    B, C, S, _ = x.shape
    p = S // g                                                                      # pixels per token side
    pix = source.reshape(B, g, g).repeat_interleave(p, 1).repeat_interleave(p, 2).reshape(B, 1, S * S)  # (B, 1, S^2)
    flat = x.reshape(B, C, S * S)                                                   # (B, 3, S^2)
    sums = torch.zeros(B, C, K, dtype=x.dtype).scatter_add_(2, pix.expand(-1, C, -1), flat)   # (B, 3, K)
    counts = torch.zeros(B, 1, K, dtype=x.dtype).scatter_add_(2, pix, torch.ones_like(flat[:, :1]))
    means = sums / counts.clamp(min=1)                                              # (B, 3, K)
    return means.gather(2, pix.expand(-1, C, -1)).reshape(B, C, S, S)


def fixed_cells(B, K, g):
    """The source of a sqrt(K) x sqrt(K) grid of fixed cells on the g x g token grid (B, N), or None."""
    k = math.isqrt(K)
    if k * k != K or g % k:
        return None
    r, c = torch.div(torch.arange(g * g), g, rounding_mode="floor"), torch.arange(g * g) % g
    return ((r // (g // k)) * k + c // (g // k)).expand(B, -1)                      # (B, N)


def nearest_centre(source, K, g):
    """Each position -> the true group whose centre (mean grid row, column) is nearest. (B, N)."""
    B, N = source.shape
    rc = torch.stack([torch.div(torch.arange(N), g, rounding_mode="floor"), torch.arange(N) % g], 1).float()  # (N, 2)
    sums = torch.zeros(B, K, 2).scatter_add_(1, source[..., None].expand(-1, -1, 2), rc.expand(B, -1, -1))
    counts = torch.zeros(B, K).scatter_add_(1, source, torch.ones(B, N))
    centres = sums / counts.clamp(min=1)[..., None]                                 # (B, K, 2)
    dist = torch.cdist(rc.expand(B, -1, -1), centres)                               # (B, N, K)
    dist = dist.masked_fill(counts[:, None, :] == 0, float("inf"))                  # empty groups never win
    return dist.argmin(dim=-1)


def disconnected(source, K, g):
    """(groups that are not 4-connected, groups) over the batch."""
    bad = total = 0
    for grid in source.reshape(-1, g, g).numpy():
        for k in np.unique(grid):
            total += 1
            bad += ndimage.label(grid == k)[1] > 1                                  # 4-connectivity: the default
    return bad, total


def move_to_neighbours(source, nbr, fraction, gen):
    """Each position, with probability `fraction`, takes the group of a random 4-neighbour in another group."""
    groups = neighbour_groups(source, nbr)                                          # (B, N, 4)
    other = (groups >= 0) & (groups != source[..., None])                           # (B, N, 4)
    pick = torch.rand(other.shape, generator=gen).masked_fill(~other, -1).argmax(-1, keepdim=True)   # (B, N, 1)
    chosen = (torch.rand(source.shape, generator=gen) < fraction) & other.any(-1)
    return torch.where(chosen, groups.gather(2, pick)[..., 0], source), chosen


def move_anywhere(source, chosen, K, gen):
    """The same positions as `chosen`, each moved to a group drawn uniformly among the other K - 1."""
    shift = torch.randint(1, K, source.shape, generator=gen)
    return torch.where(chosen, (source + shift) % K, source)


@torch.no_grad()
def measure(model, images, K, fraction, seed, batch_size):
    g, d = model.cfg.grid, model.cfg.z_channels
    nbr, gen = grid_neighbours(g), torch.Generator().manual_seed(seed)
    keys = ["true", "predicted", "group_fill", "cell_fill", "near", "far", "centre"]
    sums = dict.fromkeys(keys + ["hits", "positions", "ce_bits", "errors", "adjacent", "moved", "images"], 0.0)
    split, groups = [0, 0], [0, 0]
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]                                        # (B, 3, S, S) in [-1, 1]
        x01, B = (x + 1) / 2, len(x)
        enc = model.encode(x, K)
        logits = model.recovery.logits(enc.z_q).float()                             # (B, N, K)
        pred, true = logits.argmax(-1), enc.source                                  # (B, N)
        near, chosen = move_to_neighbours(true, nbr, fraction, gen)
        sources = {"true": true, "predicted": pred, "near": near, "far": move_anywhere(true, chosen, K, gen),
                   "centre": nearest_centre(true, K, g)}
        for name, source in sources.items():
            sums[name] += psnr((model.decode(enc.indices, source).float().clamp(-1, 1) + 1) / 2, x01).sum().item()
        sums["group_fill"] += psnr(fill_groups(x01, true, K, g), x01).sum().item()
        cells = fixed_cells(B, K, g)
        sums["cell_fill"] += psnr(fill_groups(x01, cells, K, g), x01).sum().item() if cells is not None else math.nan
        ce = F.cross_entropy(logits.reshape(-1, K), true.reshape(-1), reduction="sum")   # (B*N, K) vs (B*N,)
        sums["ce_bits"] += ce.item() / math.log(2)
        wrong = pred != true
        adjacent = (neighbour_groups(true, nbr) == pred[..., None]).any(-1)        # (B, N)
        sums["hits"] += (~wrong).sum().item()
        sums["positions"] += true.numel()
        sums["errors"] += wrong.sum().item()
        sums["adjacent"] += (wrong & adjacent).sum().item()
        sums["moved"] += chosen.float().mean().item() * B
        sums["images"] += B
        bad, total = disconnected(true, K, g)
        groups[0], groups[1] = groups[0] + bad, groups[1] + total
    n = sums["images"]
    return {"K": K, "bits": K * d, "num_images": int(n), **{k: sums[k] / n for k in keys},
            "recovery_accuracy": sums["hits"] / sums["positions"], "recovery_bits_per_image": sums["ce_bits"] / n,
            "adjacent_errors": sums["adjacent"] / max(sums["errors"], 1), "moved_fraction": sums["moved"] / n,
            "disconnected_groups": groups[0] / groups[1]}


def report(r, fraction):
    k = math.isqrt(r["K"])
    rows = [("PSNR, true source", f"{r['true']:6.2f} dB"),
            ("PSNR, predicted source", f"{r['predicted']:6.2f} dB   (recovery accuracy {r['recovery_accuracy']:.3f})"),
            ("group-mean fill, true groups, no codes", f"{r['group_fill']:6.2f} dB"),
            (f"fixed-cell fill, {k} x {k} cells", f"{r['cell_fill']:6.2f} dB"),
            ("recovery cross-entropy", f"{r['recovery_bits_per_image']:6.0f} bits per image (the codes: {r['bits']})"),
            (f"{r['moved_fraction']:.0%} of positions to a neighbour's group",
             f"{r['near']:6.2f} dB   (drawn {fraction:.0%}; positions inside their group stay)"),
            ("the same positions to any group", f"{r['far']:6.2f} dB"),
            ("recovery errors in an adjacent group", f"{r['adjacent_errors']:6.1%}"),
            ("nearest true group centre", f"{r['centre']:6.2f} dB"),
            ("true groups not 4-connected", f"{r['disconnected_groups']:6.1%}")]
    head = f"{r['num_images']} held-out images, K = {r['K']} ({r['bits']} bits of codes per image)"
    return "\n".join([head] + [f"  {label:<40} {value}" for label, value in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a stage-1 checkpoint (its EMA weights)")
    p.add_argument("--keep", type=int, default=None, metavar="K", help="the kept count K (default: the target K)")
    p.add_argument("--num-images", type=int, default=300, help="the first held-out images of the embedded shapes")
    p.add_argument("--move-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=50)
    args = p.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        sys.exit(f"predicted_source: --ckpt {args.ckpt}: no such file")
    if not 0 < args.move_fraction <= 1 or args.num_images < 1 or args.batch_size < 1:
        sys.exit("predicted_source: --move-fraction must lie in (0, 1], --num-images and --batch-size be positive")
    model = load_tokenizer(args.ckpt, ema=True).eval()
    K = model.check_K(model.cfg.K if args.keep is None else args.keep)
    dataset = data_lib.build_dataset(None, split="val", size=model.cfg.image_size)
    images = torch.stack([dataset[i][0] for i in range(min(args.num_images, len(dataset)))])   # (n, 3, S, S)
    print(report(measure(model, images, K, args.move_fraction, args.seed, args.batch_size), args.move_fraction))
    return 0


if __name__ == "__main__":
    sys.exit(main())
