"""Evaluation of MergeVQ (paper Sec. 4, Tables 1-5).

  - FID (Heusel et al. 2017) and Inception Score (Salimans et al. 2016) with the FID Inception network (pytorch-fid's
    port of TF `inception-2015-12-05`). inception.py holds the network, the scores and the statistics files.
  - Statistics files in the ADM format (`mu`, `sigma`) and ADM sample batches (`arr_0`, uint8 N x H x W x 3), so
    gFID is computed against the ADM ImageNet reference batch like the paper (Table 3).
  - Reconstruction metrics of a stage-1 tokenizer at several K (Tables 2, 4, 5): PSNR, SSIM, LPIPS, rFID, codebook
    usage, the Source Recovery Model's accuracy, and a thumbnail baseline at the same bit budget.
  - The linear probe of Appendix A.4 (Table 1): frozen tokenizer features with all N tokens kept (A.4 probes the
    tokenizers without merging), parameter-free BatchNorm + a linear layer, AdamW, cosine schedule.

FID needs the official Inception weights, which cannot be downloaded in a sandbox: pass a local copy or let
torch.hub fetch it. A random network gives numbers that are NOT an FID; `--allow-random-inception` (smoke tests
only) says so on every line it prints.

    # gFID / IS of 50k samples (ADM .npz or a folder) against the ADM reference batch statistics
    python evaluate.py fid samples.npz VIRTUAL_imagenet256_labeled.npz --inception-weights download
    # FID between two image folders (each resized to 256 + centre crop), 2 processes, results as JSON
    torchrun --nproc_per_node=2 evaluate.py fid gen/ real/ --image-size 256 \
        --inception-weights pt_inception-2015-12-05-6726825d.pth --json fid.json
    # reference statistics of a folder (or of an ADM .npz batch), saved as an ADM-style stats .npz
    python evaluate.py stats /data/imagenet/val ref_stats.npz --image-size 256 --inception-weights download
    # a tokenizer's reconstructions on the held-out split: a K sweep (Table 4), true and predicted source (Table 5)
    python evaluate.py recon --ckpt runs/stage1-g-tiny/last.pt --keep 16 36 64 100 256 --source both
    # linear probe of the encoder's frozen CLS feature at K = N (Appendix A.4: 90 epochs, batch 1024)
    python evaluate.py probe --ckpt runs/stage1-g-tiny/last.pt
    # generation on the embedded shapes without Inception weights: a small classifier's accuracy on the samples and
    # the Frechet distance of its features to held-out images; a tokenizer's reconstructions as the ceiling row
    python evaluate.py shapes samples.npz --reconstructions runs/stage1-g-tiny/last.pt
    # training curves (plots.py): every logged term against step, several runs overlaid
    python evaluate.py curves runs/stage2-mergear-tiny runs/stage2-llamagen-tiny --out curves.png

Every subcommand runs on one process or under torchrun (each rank takes a strided share of the images; features
are gathered in the original order), on any device (`--device`, default cuda:LOCAL_RANK if available else cpu).
Rank 0 alone prints and writes; a progress bar shows on a terminal only (none in a log). Bad input (a missing,
empty, truncated or junk checkpoint, weight file or .npz, an unreachable K, a failed download) stops with one line
on stderr naming the file and the problem, and exit code 1.
"""
import argparse
import json
import math
import os
import shlex
import signal
import sys
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data as data_lib
import losses
import plots
from common import (Stopped, all_gather_rows, check_device, check_output_file, dist_info, loader_workers,
                    progress_bar, read_checkpoint, refuse_output_over_inputs, run_distributed, signals_raise,
                    teardown_distributed)
from inception import (RANDOM_MARK, FeatureMoments, build_inception, feature_stats, frechet_distance,
                       inception_score, is_stats_file, load_stats, open_npz, read_npz, save_stats)
from lfq import CodebookUsage
from merge import anchors
from shapes_score import load_shapes_classifier, shapes_images, shapes_reconstructions, shapes_score
from tokenizer import load_tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Image inputs: ADM sample batches and image folders
# ----------------------------------------------------------------------------------------------------------------

def read_sample_array(path, what="sample batch"):
    """The uint8 (N, H, W, 3) array `arr_0` of an ADM sample .npz, checked (one-line errors naming the file)."""
    arr = read_npz(path, what, ("arr_0",), "'arr_0' (an ADM sample batch: uint8 N x H x W x 3)")["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{what} {os.fspath(path)}: arr_0 must be uint8 N x H x W x 3 (ADM format), got "
                         f"{arr.dtype} {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{what} {os.fspath(path)} holds no images (arr_0 is {arr.shape}): nothing to score")
    return arr


def load_sample_batch(path):
    """ADM sample .npz (`arr_0`, uint8 N x H x W x 3) -> float tensor (N, 3, H, W) in [0, 1].

    (50k images of 256^2 are 39 GB as float: the CLI streams them through `ImageArray` instead.)
    """
    arr = read_sample_array(path)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)       # (N, 3, H, W)


class ImageArray:
    """Indexable view of a uint8 (N, H, W, 3) array or a float (N, 3, H, W) tensor: [i] -> (3, H, W) in [0, 1]."""

    def __init__(self, images):
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"ImageArray: numpy images must be uint8 (N, H, W, 3), got {images.dtype} "
                                 f"{images.shape}")
        elif torch.is_tensor(images):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"ImageArray: tensor images must be (N, 3, H, W) in [0, 1], got "
                                 f"{tuple(images.shape)}")
        else:
            raise TypeError(f"ImageArray: expected a numpy array or a tensor, got {type(images).__name__}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).float().div(255.0)   # (3, H, W)
        return x.float()


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _resize_center_crop(img, size):
    """Scale the shorter side to `size` (bicubic, PIL's antialiased resampling), then crop the centre size x size."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


class ImageFiles(torch.utils.data.Dataset):
    """Every .png/.jpg/.jpeg/.webp/.bmp (any case) under `folder`, recursively, in sorted order.

    [i] -> float (3, H, W) in [0, 1] (RGB; resized + centre-cropped to image_size if given), or None when the
    file cannot be decoded. Iterating yields only the readable images and warns once with the number skipped;
    `extract_features` does the same count across processes.
    """

    def __init__(self, folder, image_size=None):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder '{folder}' does not exist")
        self.files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder, followlinks=True)
                            for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise ValueError(f"image folder '{folder}' holds no image file ({', '.join(IMAGE_EXTENSIONS)}, "
                             f"searched recursively)")
        self.folder = folder
        self.image_size = image_size
        self.skipped = []                     # files that could not be read (in this process)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                if self.image_size is not None:
                    img = _resize_center_crop(img, self.image_size)
                arr = np.asarray(img, dtype=np.uint8)                  # (H, W, 3)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            self.skipped.append(path)
            return None
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)    # (3, H, W)

    @property
    def num_skipped(self):
        return len(self.skipped)

    def __iter__(self):
        before = self.num_skipped
        for i in range(len(self)):
            x = self[i]
            if x is not None:
                yield x
        if self.num_skipped > before:
            warnings.warn(f"ImageFiles('{self.folder}'): skipped {self.num_skipped - before} unreadable file(s) of "
                          f"{len(self)} (first: {self.skipped[before]})")


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction (1 or N processes)
# ----------------------------------------------------------------------------------------------------------------

class _Share(torch.utils.data.Dataset):
    """The strided share of one rank: local j -> global index rank + j * world."""

    def __init__(self, images, indices):
        self.images, self.indices = images, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        return j, self.images[self.indices[j]]


def _shard_loader(dataset, max_images, batch_size, num_workers=0, collate_fn=None, pad=False):
    """This rank's strided share of a dataset's first max_images items -> (loader of (j, item), n, rows per rank R).
    pad: item 0 fills every share up to R items (local j >= len(range(rank, n, world)) is padding), so all ranks run
    the same number of batches and gather buffers of one size (R rows each)."""
    rank, world = dist_info()
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n < 1:
        raise ValueError(f"no images to evaluate: the dataset holds {len(dataset)}, max_images is {max_images}")
    R, indices = math.ceil(n / world), list(range(rank, n, world))
    indices += [0] * (R - len(indices)) if pad else []
    loader = torch.utils.data.DataLoader(_Share(dataset, indices), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=collate_fn)
    return loader, n, R


def _collate(items):
    """[(j, image or None)] -> local positions (b,), valid mask (b,), stacked readable images (b_valid, 3, H, W)."""
    pos = torch.tensor([j for j, _ in items], dtype=torch.long)
    valid = torch.tensor([x is not None for _, x in items], dtype=torch.bool)
    imgs = [x for _, x in items if x is not None]
    if imgs and any(x.shape != imgs[0].shape for x in imgs):
        shapes = sorted({tuple(x.shape) for x in imgs})
        raise ValueError(f"images of different sizes in one batch ({shapes[:3]} ...): pass --image-size S "
                         f"(resize + centre crop) or ImageFiles(folder, image_size=S)")
    return pos, valid, (torch.stack(imgs) if imgs else None)


@torch.inference_mode()
def extract_features(model, images, batch_size=50, device=None, num_workers=0):
    """Inception features of a set of images -> (pool3 float64 (N', 2048), logits float64 (N', 1008)).

    images: a float tensor (N, 3, H, W) in [0, 1], a uint8 numpy array (N, H, W, 3), or any indexable sequence
    whose [i] is a (3, H, W) tensor in [0, 1] or None (an unreadable file, e.g. `ImageFiles`), which is skipped
    (N' = number of readable images; one warning gives the count). Under torchrun each rank takes indices
    rank, rank + world, ...; the features are all-gathered and returned on every rank in the original order.
    """
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        images = ImageArray(images)
    N = len(images)
    if N == 0:
        raise ValueError("extract_features: no images")
    rank, world = dist_info()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    loader, N, R = _shard_loader(images, None, batch_size, num_workers, _collate)
    pool3 = torch.zeros(R, 2048, dtype=torch.float32)
    logits = torch.zeros(R, 1008, dtype=torch.float32)
    valid = torch.zeros(R, dtype=torch.bool)
    bar = progress_bar(N, desc="inception features")
    for pos, ok, x in loader:
        if x is not None:
            f, l = model(x.to(device, non_blocking=True))
            pool3[pos[ok]] = f.float().cpu()
            logits[pos[ok]] = l.float().cpu()
            valid[pos[ok]] = True
        bar.update(min(len(pos) * world, N - bar.n))
    bar.close()
    # index rank + j * world sits at row j of rank `rank`: stacking the ranks along dim 1 restores the order
    pool3 = all_gather_rows(pool3).reshape(R * world, 2048)[:N]        # (N, 2048)
    logits = all_gather_rows(logits).reshape(R * world, 1008)[:N]      # (N, 1008)
    valid = all_gather_rows(valid.to(torch.uint8)).reshape(R * world)[:N].bool()    # (N,)
    skipped = int((~valid).sum())
    if skipped and rank == 0:
        warnings.warn(f"extract_features: skipped {skipped} unreadable image(s) of {N}")
    if skipped == N:
        raise ValueError(f"extract_features: none of the {N} images could be read")
    return pool3[valid].double().numpy(), logits[valid].double().numpy()


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction metrics (PSNR, SSIM, the thumbnail baseline)
# ----------------------------------------------------------------------------------------------------------------

def _check_pair(x, y, name):
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"{name}: expected two (B, C, H, W) batches of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")


def psnr(x, y, data_range=1.0):
    """Per-image PSNR (B,) in dB: 10 log10(data_range^2 / MSE), MSE over C, H, W in float64 (inf if equal)."""
    _check_pair(x, y, "psnr")
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))       # (B,)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(win_size, sigma, dtype, device):
    r = (win_size - 1) / 2
    t = torch.arange(win_size, dtype=dtype, device=device) - r
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return g / g.sum()                                                 # (win_size,)


def ssim(x, y, data_range=1.0, win_size=11, sigma=1.5, K1=0.01, K2=0.03):
    """Per-image SSIM (B,) of Wang et al. 2004, on every channel separately (RGB) then averaged.

    Follows skimage's `structural_similarity(..., channel_axis, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)`: an 11-tap normalised Gaussian window (sigma 1.5), local moments as
    Gaussian-weighted averages (no N/(N-1) correction), C1 = (K1 L)^2, C2 = (K2 L)^2, and the SSIM map averaged over
    the VALID positions only (no padding; skimage filters with padding and then crops the border of width 5).
    Computed in float32 at least, autocast off.
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < win_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {win_size}x{win_size} window")
    with torch.autocast(device_type=x.device.type, enabled=False):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, y = x.to(dtype), y.to(dtype)
        C = x.shape[1]
        g = _gaussian_window(win_size, sigma, dtype, x.device)
        gh = g.view(1, 1, 1, win_size).expand(C, 1, 1, win_size)     # (C, 1, 1, win) horizontal pass
        gv = g.view(1, 1, win_size, 1).expand(C, 1, win_size, 1)     # (C, 1, win, 1) vertical pass

        def blur(t):                                                   # separable valid Gaussian, per channel
            return F.conv2d(F.conv2d(t, gh, groups=C), gv, groups=C)   # (B, C, H - win + 1, W - win + 1)

        C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x ** 2
        var_y = blur(y * y) - mu_y ** 2
        cov_xy = blur(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + C1) * (2 * cov_xy + C2)) / \
                   ((mu_x ** 2 + mu_y ** 2 + C1) * (var_x + var_y + C2))   # SSIM (Wang et al. 2004, Eq. 13)
        return ssim_map.mean(dim=(1, 2, 3))                            # (B,): channel means, then their average


def thumbnail_side(bits, size):
    """Side of the largest square 8-bit RGB thumbnail within `bits` bits: floor(sqrt(bits / 24)), at most `size`."""
    side = math.isqrt(int(bits) // 24)                                 # isqrt(floor(y)) = floor(sqrt(y))
    if side < 1:
        raise ValueError(f"thumbnail_baseline: {bits} bits cannot hold one 8-bit RGB pixel (24 bits)")
    return min(side, size)


def thumbnail_baseline(x, bits):
    """The naive codec at a tokenizer's bit budget: x (B, 3, S, S) in [-1, 1] -> (B, 3, S, S) in [-1, 1].

    Area-average the image down to an s x s thumbnail, s = floor(sqrt(bits / 24)) (8-bit RGB: 24 bits a pixel),
    round it to 8 bits per channel, and upsample it bilinearly back to S x S. For K merged tokens of d LFQ bits,
    bits = K * d: a tokenizer's reconstruction should beat this thumbnail's PSNR at the same number of bits.
    """
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"thumbnail_baseline: expected square images (B, 3, S, S) in [-1, 1], got {tuple(x.shape)}")
    S = x.shape[-1]
    side = thumbnail_side(bits, S)
    with torch.autocast(device_type=x.device.type, enabled=False):
        t = F.adaptive_avg_pool2d((x.float() + 1) / 2, side)          # (B, 3, s, s) area averages in [0, 1]
        t = (t * 255).round().clamp(0, 255) / 255                      # 8 bits per channel
        up = F.interpolate(t, size=(S, S), mode="bilinear", align_corners=False)      # (B, 3, S, S)
    return up * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction evaluation (recon): Tables 2, 4, 5
# ----------------------------------------------------------------------------------------------------------------

RECON_SOURCES = ("true", "predicted")


def _sum_over_ranks(t):
    """The sum of a tensor over all ranks (t itself in one process), as a new tensor on t's device."""
    return all_gather_rows(t.unsqueeze(0))[0].sum(dim=0)                   # (1, world, ...) -> (...)


@torch.no_grad()
def evaluate_reconstruction(model, dataset_or_loader, Ks, sources=("true",), device=None, inception=None,
                            lpips=None, max_images=None, batch_size=50, num_workers=0):
    """Reconstruction metrics of a tokenizer: one row dict per (K in Ks, source in sources), on every rank.

    dataset_or_loader: a Dataset of (image (3, S, S) in [-1, 1], label) or of images, its first max_images items
    shared out between the ranks; or a DataLoader, used as given up to max_images (under torchrun, every rank's must
    yield as many batches). Sources: "true" (the encoder's source), "predicted" (the Source Recovery Model's,
    Table 5). Row keys: K, source, bits (K x d), num_images, psnr, ssim (on [0, 1]), lpips, rfid (vs the originals;
    None without `lpips` / `inception`), rfid_random_inception, codebook_usage (of the 2^d codes),
    recovery_accuracy (predicted source: original positions given the right merged token), thumb_psnr / thumb_side.
    MergeTok (a model with decode_latent, mergetok.py): every row also has `branch`, "discrete" for the rows above,
    and each K gets a "continuous" row, the merged posterior means decoded with the true source (its bits, usage
    and thumbnail are None: its latents are not bits).
    """
    Ks = list(dict.fromkeys(model.check_K(K) for K in Ks))                          # each K checked, in order
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    if not Ks or not sources or any(s not in RECON_SOURCES for s in sources):
        raise ValueError(f"evaluate_reconstruction needs one K or more and sources among {RECON_SOURCES}, got "
                         f"Ks={Ks}, sources={sources}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = dist_info()
    model.eval()
    d, S = model.cfg.z_channels, model.cfg.image_size
    if isinstance(dataset_or_loader, torch.utils.data.DataLoader):           # this rank's loader, as given
        batches, limit, step = ((b, None) for b in dataset_or_loader), max_images, 1
        total = max_images or len(dataset_or_loader.dataset)
    else:                                                                    # every local image stands for world
        loader, total, _ = _shard_loader(dataset_or_loader, max_images, batch_size, num_workers, pad=True)
        real = len(range(rank, total, world))
        batches, limit, step = ((item, pos < real) for pos, item in loader), None, world
    continuous = hasattr(model, "decode_latent")                            # MergeTok's second branch
    rows = [(K, s, "discrete") for K in Ks for s in sources]
    rows += [(K, "true", "continuous") for K in Ks] if continuous else []
    # per row: images, psnr, ssim, lpips, thumbnail psnr (sums over images), right / all source positions
    sums = {row: torch.zeros(7, dtype=torch.float64) for row in rows}
    usage = {K: CodebookUsage(2 ** d, device) for K in Ks}
    moments = {key: FeatureMoments() for key in rows + ["originals"]} if inception is not None else {}
    bar = progress_bar(total, desc="recon")
    seen = 0
    for batch, ok in batches:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch                 # (B, 3, S, S) in [-1, 1]
        x = (x if limit is None else x[:max(0, limit - seen)]).to(device, torch.float32)
        if len(x) == 0:
            break
        ok = (torch.ones(len(x), dtype=torch.bool) if ok is None else ok).to(device)   # (B,) False: padding rows
        x01 = (x + 1) / 2
        if inception is not None and ok.any():
            moments["originals"].update(inception(x01[ok])[0])
        for K in Ks:
            enc = model.encode(x, K=K)                                              # indices (B, K), source (B, N)
            usage[K].update(enc.indices[ok])
            thumb = psnr((thumbnail_baseline(x, K * d) + 1) / 2, x01)[ok].sum().item()
            for row in [r for r in rows if r[0] == K]:
                _, s, branch = row
                source = (enc.source if s == "true" else                                # (B, N)
                          model.recovery.predict_source(enc.z_q, anchors(enc.source, K)))
                if branch == "discrete":
                    rec = model.decode(enc.indices, source)                        # (B, 3, S, S)
                else:
                    rec = model.decode_latent(enc.latent, source)                  # MergeTok: the merged means
                rec = rec.float().clamp(-1, 1)
                r01 = (rec + 1) / 2
                sums[row] += torch.tensor([ok.sum(), psnr(r01, x01)[ok].sum(), ssim(r01, x01)[ok].sum(),
                                           lpips(rec, x)[ok].sum() if lpips is not None else 0.0, thumb,
                                           (source == enc.source)[ok].sum(), enc.source[ok].numel()],
                                          dtype=torch.float64)
                if inception is not None and ok.any():
                    moments[row].update(inception(r01[ok])[0])
        seen += len(x)
        bar.update(min(len(x) * step, bar.total - bar.n))
    bar.close()
    if world > 1:                                          # every rank's sums (padding rows were left out)
        for t in [sums[row] for row in rows] + [t for m in moments.values() for t in m.tensors()]:
            t.copy_(_sum_over_ranks(t))
    n = int(sums[rows[0]][0])
    if n == 0:
        raise ValueError("evaluate_reconstruction: no image was evaluated")
    fid = inception is not None and n >= 2
    ref = moments["originals"].stats() if fid else None
    out = []
    for row in rows:
        K, s, branch = row
        _, p, ss, lp, th, hits, positions = sums[row].tolist()
        bits = branch == "discrete"
        out.append({"K": K, "source": s, "bits": K * d if bits else None, "num_images": n, "psnr": p / n,
                    "ssim": ss / n, "lpips": lp / n if lpips is not None else None,
                    "rfid": frechet_distance(*moments[row].stats(), *ref) if fid else None,
                    "rfid_random_inception": fid and bool(getattr(inception, "is_random", False)),
                    "codebook_usage": usage[K].gather().fraction if bits else None,
                    "recovery_accuracy": hits / positions if s == "predicted" else None,
                    "thumb_psnr": th / n if bits else None, "thumb_side": thumbnail_side(K * d, S) if bits else None,
                    **({"branch": branch} if continuous else {})})
    return out


def format_recon_table(rows):
    """The rows of `evaluate_reconstruction` as a text table, one line per (K, source), with footnotes."""
    random = any(r["rfid_random_inception"] for r in rows)
    branches = any("branch" in r for r in rows)                          # MergeTok: a branch column
    lines = [f"{'K':>5} {'source':>9} " + (f"{'branch':>10} " if branches else "") + f"{'bits':>6} {'PSNR':>7} "
             f"{'SSIM':>6} {'LPIPS':>6} {'rFID*' if random else 'rFID':>8} {'usage':>8} {'rec.acc':>7} "
             f"{'thumb PSNR':>15}"]
    for r in rows:
        lp, fid, acc = (("-" if r[k] is None else format(r[k], f)) for k, f in
                        (("lpips", ".4f"), ("rfid", ".2f"), ("recovery_accuracy", ".4f")))
        if r["bits"] is None:                                              # MergeTok's continuous branch
            bits, usage, thumb = "-", f"{'-':>8}", f"{'-':>15}"
        else:
            bits, usage = r["bits"], f"{100 * r['codebook_usage']:>7.3f}%"
            thumb = f"{r['thumb_psnr']:>7.2f} {'(%dx%d)' % (r['thumb_side'], r['thumb_side']):>7}"
        lines.append(f"{r['K']:>5} {r['source']:>9} " + (f"{r.get('branch', ''):>10} " if branches else "")
                     + f"{bits:>6} {r['psnr']:>7.2f} {r['ssim']:>6.4f} {lp:>6} {fid:>8} {usage} {acc:>7} {thumb}")
    lines.append(f"{rows[0]['num_images']} images. PSNR, SSIM on [0, 1]; usage: codes used / 2^d; rec.acc: positions "
                 "the predicted source assigns right;\nthumb: an 8-bit RGB thumbnail of K x d bits (the indices' "
                 "budget; a true source is side information on top), upsampled")
    if random:
        lines.append(f"* random Inception: NOT a real FID ({RANDOM_MARK})")
    return "\n".join(lines)


def _write_json(path, result):
    """Through a temporary file and a rename: a signal or a full disk never leaves half a JSON file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _check_outputs(outputs, inputs, overwrite=False):
    """Before any work: no output path {flag: path} is one of the inputs {flag: path}, each can be written, none is
    a training run's file, and none holds a checkpoint, codes or samples unless --overwrite (check_output_file)."""
    refuse_output_over_inputs(outputs, inputs)
    for flag, path in outputs.items():
        if path is not None:
            check_output_file(path, flag, overwrite)


def _default_out(ckpt, prefix):                          # <prefix>_<checkpoint name>.json next to the checkpoint
    name = os.path.splitext(os.path.basename(ckpt))[0]
    return os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"{prefix}_{name}.json")


def add_recon_args(p):
    p.add_argument("--ckpt", required=True, help="a stage-1 checkpoint of train_stage1.py")
    p.add_argument("--data", default=None, help="ImageFolder root (DIR/<split> if present); default: the embedded "
                                                "shapes (shapes, or shapes-rich)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--keep", dest="K", metavar="K", type=int, nargs="+", default=None,
                   help="kept counts K (default: the checkpoint's target K)")
    p.add_argument("--source", default="true", choices=["true", "predicted", "both"],
                   help="decode with the encoder's source, the Source Recovery Model's, or both (Table 5)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA weights")
    p.add_argument("--lpips-vgg-weights", default=None, help="torchvision vgg16-397923af.pth path or 'download'")
    p.add_argument("--lpips-lin-weights", default=None, help="LPIPS v0.1 vgg.pth path or 'download'")
    p.add_argument("--out", default=None, help="JSON results (default: recon_<ckpt name>.json next to the ckpt)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data-loader workers decoding images (default: 0 on the CPU, up to 8 with a GPU; with workers "
                        "an unreadable file is reported by its warning only)")
    _add_inception_args(p, image_folders=False)


def run_recon(args):
    rank = dist_info()[0]
    _check_outputs({"--out": args.out or _default_out(args.ckpt, "recon")}, {"--ckpt": args.ckpt}, args.overwrite)
    model, ckpt = load_tokenizer(args.ckpt, ema=not args.raw, device=args.device, return_checkpoint=True)
    Ks = [model.check_K(K) for K in (args.K or [model.cfg.K])]                 # fail before the slow parts
    notes, inception, lpips = [], None, None
    if args.inception_weights or args.allow_random_inception:
        inception = build_inception(args.inception_weights, args.allow_random_inception, device=args.device)
    else:
        notes.append("rFID skipped: no Inception weights (--inception-weights PATH or download); a random network "
                     "gives numbers that are not an FID (--allow-random-inception: smoke tests only)")
    if args.lpips_vgg_weights and args.lpips_lin_weights:
        lpips = losses.LPIPS(args.lpips_vgg_weights, args.lpips_lin_weights).to(args.device)
    elif args.lpips_vgg_weights or args.lpips_lin_weights:
        raise ValueError("LPIPS needs both --lpips-vgg-weights and --lpips-lin-weights")
    else:
        notes.append("LPIPS skipped: no --lpips-vgg-weights / --lpips-lin-weights (a random VGG is no metric)")
    dataset = data_lib.build_dataset(args.data, split=args.split, size=model.cfg.image_size)
    rows = evaluate_reconstruction(model, dataset, Ks, RECON_SOURCES if args.source == "both" else args.source,
                                   args.device, inception, lpips, args.max_images, args.batch_size,
                                   loader_workers(args.num_workers, args.device))
    if rank == 0:
        print("\n".join([f"note: {note}" for note in notes] + [format_recon_table(rows)]))
        out, skipped = args.out or _default_out(args.ckpt, "recon"), dataset.num_skipped   # unreadable: next file used
        _write_json(out, {"checkpoint": os.path.abspath(args.ckpt), "step": ckpt.get("step"),
                          "weights": "raw" if args.raw else "ema", "data": args.data or "embedded shapes",
                          "split": args.split, "num_images": rows[0]["num_images"], "num_skipped_rank0": skipped,
                          "random_inception": bool(inception is not None and inception.is_random), "rows": rows})
        print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Linear probe (probe): Appendix A.4, Table 1
# ----------------------------------------------------------------------------------------------------------------

def linear_probe(train_x, train_y, val_x, val_y, num_classes, epochs=90, batch_size=1024, lr=1e-3,
                 weight_decay=0.0, seed=0, device=None):
    """Top-1 accuracy (in percent) of a linear classifier on frozen features (Appendix A.4).

    The head is a parameter-free BatchNorm1d(affine=False) (it standardises the features with batch statistics
    while training, running statistics at evaluation) followed by a Linear layer, trained with AdamW for `epochs`
    epochs at batch `batch_size` with a cosine schedule over all steps (no warm-up). The paper gives AdamW, 90
    epochs, batch 1024 and the cosine schedule; the learning rate (1e-3 here) is our choice. Deterministic for a
    given seed (the global RNG is left untouched). A batch of one sample (BatchNorm cannot train on it) is skipped.
    """
    train_x, val_x = torch.as_tensor(train_x), torch.as_tensor(val_x)
    train_y, val_y = torch.as_tensor(train_y).long(), torch.as_tensor(val_y).long()
    if train_x.dim() != 2 or val_x.dim() != 2 or train_x.shape[1] != val_x.shape[1]:
        raise ValueError(f"linear_probe: features must be (N, D) with the same D, got {tuple(train_x.shape)} and "
                         f"{tuple(val_x.shape)}")
    if train_y.shape != (train_x.shape[0],) or val_y.shape != (val_x.shape[0],):
        raise ValueError("linear_probe: one integer label per feature row is needed")
    for y in (train_y, val_y):
        if y.numel() and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"linear_probe: labels must be in [0, {num_classes})")
    device = torch.device(device) if device is not None else train_x.device
    N, D = train_x.shape
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(D, affine=False), nn.Linear(D, num_classes)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(N / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    head.train()
    bar = progress_bar(epochs, desc="linear probe")
    for _ in range(epochs):
        perm = torch.randperm(N, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            if len(idx) > 1:
                xb = train_x[idx].to(device, torch.float32)
                loss = F.cross_entropy(head(xb), train_y[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        bar.update()
    bar.close()
    head.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, val_x.shape[0], batch_size):
            pred = head(val_x[s:s + batch_size].to(device, torch.float32)).argmax(dim=1)
            correct += int((pred.cpu() == val_y[s:s + batch_size]).sum())
    return 100.0 * correct / max(1, val_x.shape[0])


PROBE_FEATURES = ("cls", "mean")


@torch.no_grad()
def tokenizer_features(model, dataset, K=None, feature="cls", batch_size=50, device=None, max_images=None,
                       num_workers=0):
    """Frozen features of a labelled dataset's first max_images items -> (float32 (n, F), int64 labels (n,)).

    K: the encoder's kept count; default N, no merging (Appendix A.4 probes the tokenizers with all tokens).
    "cls": the encoder's CLS output after the attention blocks (B, D), the token the alignment head (Eq. 10) reads.
    "mean": the quantized code averaged over the N original positions, i.e. the K merged z_q weighted by how many
    positions each holds (B, d): what the discrete tokens carry. All ranks share the work and get all rows, in
    dataset order.
    """
    if feature not in PROBE_FEATURES:
        raise ValueError(f"feature must be one of {PROBE_FEATURES}, got {feature!r}")
    N = model.cfg.num_tokens
    K = model.check_K(N if K is None else K)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = dist_info()
    model.eval()
    loader, n, R = _shard_loader(dataset, max_images, batch_size, num_workers, pad=True)   # padding: [:n] drops
    dim = model.cfg.embed_dim if feature == "cls" else model.cfg.z_channels
    feats, labels = torch.zeros(R, dim), torch.zeros(R, dtype=torch.long)
    bar = progress_bar(len(loader), desc="probe features")
    for pos, (x, y) in loader:
        enc = model.encode(x.to(device, torch.float32), K=K)                    # z_q (B, K, d), source (B, N)
        if feature == "cls":
            f = enc.cls                                                             # (B, D)
        else:                                                                       # count the source map:
            ones = torch.ones(enc.source.shape, device=device)                      # (B, N)
            size = torch.zeros(len(x), K, device=device).scatter_add_(1, enc.source, ones)   # (B, K) positions held
            f = (enc.z_q.float() * size[..., None]).sum(dim=1) / N                  # (B, d)
        feats[pos], labels[pos] = f.float().cpu(), y
        bar.update()
    bar.close()
    feats = all_gather_rows(feats).reshape(R * world, dim)[:n]                     # (n, F) in dataset order
    return feats, all_gather_rows(labels).reshape(R * world)[:n]                   # (n,)


def add_probe_args(p):
    p.add_argument("--ckpt", required=True, help="a stage-1 checkpoint of train_stage1.py (its EMA weights)")
    p.add_argument("--data", default=None, help="ImageFolder root: train/ fits, val/ scores; default: the embedded "
                                                "shapes (shapes, or shapes-rich)")
    p.add_argument("--keep", dest="K", metavar="K", type=int, default=None,
                   help="kept count K of the encoder (default: N, all tokens, no merging: Appendix A.4)")
    p.add_argument("--feature", choices=PROBE_FEATURES, default="cls",
                   help="cls: the encoder's CLS output; mean: the size-weighted mean of the merged codes")
    p.add_argument("--epochs", type=int, default=90, help="paper: 90")
    p.add_argument("--batch-size", type=int, default=1024, help="probe batch (paper: 1024)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-images", type=int, default=None, help="at most this many images of each split")
    p.add_argument("--extract-batch-size", type=int, default=50, help="batch of the frozen feature extraction")
    p.add_argument("--num-workers", type=int, default=None,
                   help="data-loader workers decoding images (default: 0 on the CPU, up to 8 with a GPU; with workers "
                        "an unreadable file is reported by its warning only)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--out", default=None, help="JSON results (default: probe_<ckpt name>.json next to the ckpt)")


def run_probe(args):
    rank = dist_info()[0]
    _check_outputs({"--out": args.out or _default_out(args.ckpt, "probe")}, {"--ckpt": args.ckpt}, args.overwrite)
    model, ckpt = load_tokenizer(args.ckpt, ema=True, device=args.device, return_checkpoint=True)
    K = model.check_K(args.K if args.K is not None else model.cfg.num_tokens)     # Appendix A.4: all N tokens
    feats, classes = {}, 0
    for split in ("train", "val"):
        dataset = data_lib.build_dataset(args.data, split=split, size=model.cfg.image_size)
        classes = max(classes, len(dataset.classes))
        feats[split] = tokenizer_features(model, dataset, K, args.feature, args.extract_batch_size, args.device,
                                          args.max_images, loader_workers(args.num_workers, args.device))
    # the collective part is over: every rank meets and ends its process group here, so that no rank waits in a
    # barrier while rank 0 trains (nccl's watchdog would kill a wait that long)
    world = dist_info()[1]
    teardown_distributed()
    if rank != 0:
        return 0
    if world > 1:
        print(f"linear probe: features gathered from {world} processes; rank 0 trains the probe alone", flush=True)
    top1 = linear_probe(*feats["train"], *feats["val"], classes, epochs=args.epochs, batch_size=args.batch_size,
                        lr=args.lr, device=args.device)
    n_train, n_val, dim = len(feats["train"][1]), len(feats["val"][1]), feats["val"][0].shape[1]
    print(f"linear probe ({args.feature} feature, {dim}-d, K={K} of N={model.cfg.num_tokens}): top-1 {top1:.2f}% "
          f"on {n_val} held-out images ({n_train} train images, {classes} classes, {args.epochs} epochs)")
    out = args.out or _default_out(args.ckpt, "probe")
    _write_json(out, {"checkpoint": os.path.abspath(args.ckpt), "step": ckpt.get("step"), "K": K,
                      "N": model.cfg.num_tokens, "feature": args.feature, "feature_dim": dim, "num_train": n_train,
                      "num_val": n_val, "num_classes": classes, "epochs": args.epochs, "batch_size": args.batch_size,
                      "lr": args.lr, "data": args.data or "embedded shapes", "top1": top1})
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Shapes score (shapes): generation quality on the embedded shapes, without pretrained weights (shapes_score.py)
# ----------------------------------------------------------------------------------------------------------------

def _folder_labels(files):
    """Labels of image files from their folder names (an integer, or a name in data.CLASSES), else None."""
    labels = []
    for path in files:
        name = os.path.basename(os.path.dirname(path))
        if name.isdigit():
            labels.append(int(name))
        elif name in data_lib.CLASSES:
            labels.append(data_lib.CLASSES.index(name))
        else:
            return None
    return labels


def _class_labels(labels, path):
    """Labels of samples -> int64 class numbers, or one line: not whole numbers (a float label would be truncated)
    or outside 0..9 (the embedded shapes' classes; a wrong class would be scored as a miss)."""
    if labels is None:
        return None
    labels, n = np.asarray(labels), len(data_lib.CLASSES)
    if labels.dtype.kind == "f":
        bad = labels[~np.isfinite(labels) | (labels != np.round(labels))]
        if bad.size:
            raise ValueError(f"samples {path}: labels must be class numbers 0..{n - 1}, found {bad.size} that are not "
                             f"whole numbers (e.g. {bad.flat[0]})")
    elif labels.dtype.kind not in "iub":
        raise ValueError(f"samples {path}: labels of dtype {labels.dtype} are not class numbers 0..{n - 1}")
    if labels.size and (labels.min() < 0 or labels.max() >= n):
        raise ValueError(f"samples {path}: labels must lie in 0..{n - 1} (the {n} classes of the embedded shapes), "
                         f"found {labels.min():g}..{labels.max():g}")
    return labels.astype(np.int64)


def _shapes_inputs(path):
    """An ADM .npz (`arr_0`, optional `labels`) or a folder (labels from class folders) -> (images, labels)."""
    if os.path.isdir(path):
        files = ImageFiles(path)
        return files, _class_labels(_folder_labels(files.files), path)
    images = _open_images(path, None, "samples")
    with open_npz(path, "samples") as f:
        labels = f["labels"] if "labels" in f.files else None
    if labels is not None and labels.shape != (len(images),):
        raise ValueError(f"samples {path}: labels {labels.shape} do not fit {len(images)} images")
    return images, _class_labels(labels, path)


def add_shapes_args(p):
    p.add_argument("samples", nargs="?", default=None,
                   help="an ADM .npz (arr_0 uint8 N x H x W x 3, labels) or a folder (labels from class folders)")
    p.add_argument("--reconstructions", metavar="CKPT", default=None,
                   help="also score this stage-1 tokenizer's reconstructions of held-out shapes (the ceiling row)")
    p.add_argument("--keep", dest="K", metavar="K", type=int, default=None, help="K of the reconstructions")
    p.add_argument("--source", choices=["true", "predicted", "both"], default="true",
                   help="reconstructions decoded with the true source, the predicted one (RandAR's ceiling) or both")
    p.add_argument("--branch", choices=["discrete", "continuous", "both"], default="discrete",
                   help="a mergetok tokenizer's reconstructions from its codes (discrete), its continuous latents "
                        "(true source: a DiT's ceiling) or both")
    p.add_argument("--num-images", type=int, default=500, help="held-out images of the real and reconstruction rows")
    p.add_argument("--seed", type=int, default=0, help="the classifier's seed")
    p.add_argument("--data", choices=sorted(data_lib.SHAPES_DATA), default="shapes",
                   help="the style of the embedded shapes the images show (the tokenizer's --data)")
    p.add_argument("--classifier", default=None,
                   help="the cached classifier (default runs/shapes_classifier_seed<seed>.pt, shapes-rich: "
                        "runs/shapes_classifier_rich_seed<seed>.pt; trained if missing)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")


def reconstruction_rows(args):
    """The (source, branch) pairs of `shapes --reconstructions`: the discrete branch at each --source, then the
    continuous one (true source only)."""
    sources = ["true", "predicted"] if args.source == "both" else [args.source]
    if args.branch == "continuous" and args.source != "true":
        raise ValueError(f"--branch continuous --source {args.source}: the continuous branch decodes with the true "
                         f"source only (the Source Recovery Model reads discrete codes)")
    rows = [(s, "discrete") for s in sources] if args.branch != "continuous" else []
    return rows + ([("true", "continuous")] if args.branch != "discrete" else [])


def run_shapes(args):
    if args.num_images < 2:
        raise ValueError(f"--num-images must be at least 2, got {args.num_images}")
    style = data_lib.SHAPES_DATA[args.data]
    path = args.classifier or os.path.join(
        "runs", f"shapes_classifier{'_' + style if style != 'simple' else ''}_seed{args.seed}.pt")
    sources = {"samples": args.samples, "--reconstructions": args.reconstructions}
    _check_outputs({"--json": args.json}, {**sources, "--classifier": path}, args.overwrite)
    if not os.path.exists(path):                                    # trained now and cached there
        _check_outputs({"--classifier": path}, sources)
    inputs = _shapes_inputs(args.samples) if args.samples else None               # a bad file stops at once
    recon_rows = reconstruction_rows(args) if args.reconstructions else []
    if args.branch != "discrete" and args.reconstructions:
        variant = read_checkpoint(args.reconstructions, "stage-1 checkpoint", required=("tokenizer_config",),
                                  mmap=True)["tokenizer_config"].get("variant")
        if variant != "mergetok":
            raise ValueError(f"--branch {args.branch}: {args.reconstructions} is a {variant} tokenizer, which has no "
                             f"continuous branch (only --variant mergetok has one)")
    rank = dist_info()[0]
    teardown_distributed()                 # rank 0 alone from here: no rank waits in a barrier while it trains
    if rank != 0:
        return 0
    model, info, trained = load_shapes_classifier(path, args.seed, args.device, style=style)
    print(f"shapes classifier {path} ({'trained now' if trained else 'cached'}; seed {info['seed']}, "
          f"{info['num_train']} training images, {info['epochs']} epochs): held-out accuracy "
          f"{100 * info['val_accuracy']:.1f}% on {info['num_ref']} images (chance 10%)")
    start = info["num_ref"]                                       # held-out images outside the reference set
    rows = {}
    if inputs is not None:
        rows[f"samples {args.samples}"] = shapes_score(model, info, *inputs)
    for source, branch in recon_rows:
        rec, y, K = shapes_reconstructions(args.reconstructions, start, args.num_images, args.K, args.device,
                                           source=source, style=style, branch=branch)
        name = f"reconstructions K={K} {source} source{' continuous' if branch == 'continuous' else ''}"
        rows[f"{name} {args.reconstructions}"] = shapes_score(model, info, rec, y)
    real, y = shapes_images("val", start, args.num_images, style=style)
    rows["held-out real images"] = shapes_score(model, info, real, y)
    print(f"{'accuracy':>9} {'FD':>9} {'images':>7}  set")
    for name, r in rows.items():
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        print(f"{acc:>9} {r['fd']:>9.3f} {r['num_images']:>7}  {name}")
        if r["per_class"] is not None:                                  # the accuracy of each class, in %
            print(" " * 29 + "per class: " + ", ".join(
                f"{c} {'-' if a is None else round(100 * a)}" for c, a in zip(data_lib.CLASSES, r["per_class"])))
    print(f"FD: Frechet distance of the classifier's {info['mu'].shape[0]}-d features to {info['num_ref']} held-out "
          f"real images (not an Inception FID)")
    if args.json:
        _write_json(args.json, {"classifier": os.path.abspath(path), "seed": info["seed"],
                                "classifier_accuracy": info["val_accuracy"], "rows": rows})
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Command line: fid, stats (Inception statistics), recon, probe
# ----------------------------------------------------------------------------------------------------------------

def _open_images(path, image_size, what):
    """A folder -> ImageFiles; an ADM sample .npz -> its uint8 array (one-line errors naming the file as `what`)."""
    if os.path.isdir(path):
        return ImageFiles(path, image_size=image_size)
    if path.endswith(".npz"):
        return ImageArray(read_sample_array(path, what))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    raise ValueError(f"{what} {path} is neither an image folder nor an .npz file")


def _add_inception_args(p, image_folders=True):
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth: a local path, or 'download' (official URL)")
    p.add_argument("--allow-random-inception", action="store_true",
                   help="smoke test only: run with RANDOM weights (results are marked as not an FID)")
    p.add_argument("--batch-size", type=int, default=50)
    if image_folders:
        p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
        p.add_argument("--image-size", type=int, default=None,
                       help="resize (shorter side, bicubic) + centre crop FOLDER images to this size (needed when a "
                            "folder mixes sizes; ADM .npz batches are used as stored)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")


def run_fid(args):
    rank = dist_info()[0]
    _check_outputs({"--json": args.json}, {"samples": args.samples, "reference": args.reference}, args.overwrite)
    # both inputs are opened before the network is built and the slow part starts: a bad file stops the run at once
    samples = _open_images(args.samples, args.image_size, "samples")
    if len(samples) < args.is_splits:
        raise ValueError(f"{len(samples)} samples cannot be cut into {args.is_splits} Inception Score splits "
                         f"(--is-splits)")
    ref_stats = load_stats(args.reference) if is_stats_file(args.reference, "reference") else None   # (mu, sigma)
    reference = _open_images(args.reference, args.image_size, "reference") if ref_stats is None else None
    model = build_inception(args.inception_weights, args.allow_random_inception, device=args.device)
    mark = f"[{RANDOM_MARK}] " if model.is_random else ""
    pool3, logits = extract_features(model, samples, args.batch_size, args.device, num_workers=args.num_workers)
    mu_s, sigma_s = feature_stats(pool3)                                        # (2048,), (2048, 2048)
    if ref_stats is not None:
        (mu_r, sigma_r), n_ref = ref_stats, None
    else:
        ref_pool3, _ = extract_features(model, reference, args.batch_size, args.device, num_workers=args.num_workers)
        (mu_r, sigma_r), n_ref = feature_stats(ref_pool3), len(ref_pool3)
    if mu_r.shape != mu_s.shape:
        raise ValueError(f"reference {args.reference}: its statistics are {mu_r.shape[0]}-d, the Inception pool3 "
                         f"features 2048-d")
    fid = frechet_distance(mu_s, sigma_s, mu_r, sigma_r)
    is_mean, is_std = inception_score(logits, splits=args.is_splits)
    if rank == 0:
        print(f"{mark}FID: {fid:.4f}")
        print(f"{mark}IS: {is_mean:.2f} +- {is_std:.2f}  ({len(pool3)} samples, {args.is_splits} splits)")
        if args.json:
            out = {"fid": fid, "is_mean": is_mean, "is_std": is_std, "num_samples": len(pool3),
                   "num_reference": n_ref, "samples": args.samples, "reference": args.reference,
                   "random_inception": model.is_random}
            if model.is_random:
                out["warning"] = RANDOM_MARK
            _write_json(args.json, out)
            print(f"{mark}wrote {args.json}")
    return 0


def run_stats(args):
    rank = dist_info()[0]
    _check_outputs({"out": args.out if args.out.endswith(".npz") else args.out + ".npz"}, {"images": args.images},
                   args.overwrite)
    images = _open_images(args.images, args.image_size, "images")
    model = build_inception(args.inception_weights, args.allow_random_inception, device=args.device)
    pool3, _ = extract_features(model, images, args.batch_size, args.device, num_workers=args.num_workers)
    mu, sigma = feature_stats(pool3)
    if rank == 0:
        path = save_stats(args.out, mu, sigma)
        mark = f"[{RANDOM_MARK}] " if model.is_random else ""
        print(f"{mark}wrote {path}: mu {mu.shape}, sigma {sigma.shape} from {len(pool3)} images")
    return 0


def run_curves(args):
    """Training curves of one or more runs (plots.py): one panel per logged quantity, one colour per run."""
    _check_outputs({"--out": args.out}, {f"run {i + 1}": run for i, run in enumerate(args.runs)}, args.overwrite)
    width, height = plots.plot_runs(args.runs, args.out)
    print(f"wrote {args.out} ({width} x {height}): {len(args.runs)} run(s)", flush=True)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fid", help="FID (+ IS) of samples against a reference")
    p.add_argument("samples", help="a folder of images or an ADM sample .npz (arr_0)")
    p.add_argument("reference", help="a folder of images, an ADM sample .npz, or a stats .npz (mu, sigma)")
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    _add_inception_args(p)
    p.set_defaults(func=run_fid)

    p = sub.add_parser("stats", help="Inception statistics (mu, sigma) of a folder / ADM .npz -> stats .npz")
    p.add_argument("images", help="a folder of images or an ADM sample .npz (arr_0)")
    p.add_argument("out", help="output .npz (mu, sigma), the ADM reference format")
    _add_inception_args(p)
    p.set_defaults(func=run_stats)

    p = sub.add_parser("recon", help="reconstruction metrics of a tokenizer at several K (Tables 2, 4, 5)")
    add_recon_args(p)
    p.set_defaults(func=run_recon)

    p = sub.add_parser("probe", help="linear probe of a tokenizer's frozen features (Appendix A.4, Table 1)")
    add_probe_args(p)
    p.set_defaults(func=run_probe)

    p = sub.add_parser("shapes", help="class accuracy + Frechet distance of samples of the embedded shapes, with a "
                                      "small classifier trained here (no pretrained weights)")
    add_shapes_args(p)
    p.set_defaults(func=run_shapes)

    p = sub.add_parser("curves", help="training curves: every term of runs' log.jsonl against step, overlaid -> PNG")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run folder (its log.jsonl) or a log .jsonl file")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    p.set_defaults(func=run_curves, device="cpu")
    for p in sub.choices.values():                           # every subcommand writes a file
        p.add_argument("--overwrite", action="store_true",
                       help="replace an output file that holds a checkpoint, codes or samples (never a training "
                            "run's own files)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    where = f" (rank {os.environ.get('RANK')})" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    try:
        def work(rank, world, device):                       # device None: cuda:LOCAL_RANK if available, else the CPU
            args.device = device
            return args.func(args)
        check_device(args.device)
        with signals_raise():                                # a signal leaves no partial output file
            return run_distributed(work, args.device)          # a failing rank ends its group at once, no barrier
    except (ValueError, OSError) as e:                       # bad input: one line on stderr, no traceback
        print(f"evaluate.py {args.command}{where}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    except Stopped as e:
        print(f"evaluate.py {args.command}{where}: stopped by {e.signal}: nothing written; rerun: python evaluate.py "
              f"{shlex.join(argv)}", file=sys.stderr, flush=True)
        return 128 + int(getattr(signal, e.signal))


if __name__ == "__main__":
    sys.exit(main())
