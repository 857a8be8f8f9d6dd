"""The FID Inception network and the scores computed from its features (the metrics of paper Sec. 4, Tables 2-5).

The network: a from-scratch port of pytorch-fid's InceptionV3, itself a port of the TF graph
`inception-2015-12-05` that the original FID code (Heusel et al. 2017) and the ADM evaluation suite use.
`InceptionV3` has pytorch-fid's modules under the same names, so its state dict matches the published weight file
`pt_inception-2015-12-05-6726825d.pth` key for key and shape for shape, and loads it strictly:

  - torchvision's InceptionV3 layout and names, without the auxiliary classifier; fc is 2048 -> 1008 (the TF
    graph's 1008 classes),
  - the FID graph's two differences: the pooling branches average WITHOUT the zero padding (TF's avg_pool), and
    Mixed_7c's pooling branch is a max-pool,
  - forward(images in [0, 1]) -> (pool3 (B, 2048), the FID features; logits (B, 1008) without fc.bias, for the
    Inception Score), after a bilinear resize to 299 x 299.

The weights cannot be downloaded in a sandbox: `build_inception` takes a local copy of the file or "download"
(torch.hub), and refuses to run with random weights unless asked to, which it then says loudly. A weight file or
an .npz that cannot be used (missing, empty, truncated, junk, the wrong arrays) raises one line naming the file.

The scores: `frechet_distance` (FID), `inception_score` (IS), and the FID statistics (mu, sigma) from features
(`feature_stats`, or streamed batch by batch with `FeatureMoments`) and in the ADM reference file format
(`save_stats`, `load_stats`). evaluate.py feeds images through all of it (fid, stats, recon's rFID).

    python inception.py WEIGHTS.pth     # load the file strictly and print the features of a grey image
"""
import hashlib
import math
import os
import sys
import warnings
import zipfile
import zlib

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import _first_line, download_weights, load_strict, read_checkpoint

# ----------------------------------------------------------------------------------------------------------------
# Official weight file
# ----------------------------------------------------------------------------------------------------------------

# pytorch-fid's port of the TF Inception graph used by the original FID code (inception-2015-12-05.tgz)
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_SHA256_PREFIX = "6726825d"        # torch.hub's convention: the file name carries its hash's prefix
RANDOM_MARK = "RANDOM INCEPTION - NOT A REAL FID"
INCEPTION_SIZE = 299


def _warn_loudly(message):
    """A warning that cannot be missed: through `warnings` (tests, log filters) and on stderr; rank 0 only."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        warnings.warn(message, stacklevel=3)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# FID Inception (pytorch-fid's port of TF inception-2015-12-05)
# ----------------------------------------------------------------------------------------------------------------
# Torchvision's InceptionV3 layout and names, with the FID graph's differences:
#   - the pooling branch of Mixed_5b/5c/5d, Mixed_6b..6e and Mixed_7b averages without the zero padding
#     (TF's avg_pool: count_include_pad=False),
#   - Mixed_7c's pooling branch is a max-pool (a quirk of that TF graph, kept for comparable numbers),
#   - no auxiliary classifier; fc is 2048 -> 1008 (the TF graph's 1008 classes).

class BasicConv2d(nn.Module):
    """conv (no bias) + BatchNorm(eps=1e-3) + ReLU; keys `conv.weight`, `bn.{weight,bias,running_mean,running_var}`."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    """3x3 stride-1 average that ignores the zero padding, as TF's avg_pool (the FID graph)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg-pool-1x1 -> 224 + pool_features."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], dim=1)                      # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2 -> 384 + 96 + c_in."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)                         # (B, 480 + c_in, H', W')


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with factorised 7x7 convs and the TF avg-pool branch -> 768 channels."""

    def __init__(self, c_in, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)                     # (B, 768, H, W)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2 -> 320 + 192 + c_in."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)                          # (B, 512 + c_in, H', W')


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b: TF avg-pool branch, Mixed_7c: max-pool branch) with split 1x3 / 3x1 convs -> 2048."""

    def __init__(self, c_in, pool):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)               # (B, 768, H, W)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)      # (B, 768, H, W)
        if self.pool == "avg":
            bp = _avg_pool_tf(x)
        else:
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(bp)
        return torch.cat([b1, b3, b3d, bp], dim=1)                     # (B, 2048, H, W)


class InceptionV3(nn.Module):
    """The FID Inception network. forward(x in [0, 1], (B, 3, H, W)) -> (pool3 (B, 2048), logits (B, 1008)).

    The input is bilinearly resized to 299x299 (align_corners=False, as pytorch-fid) and mapped to [-1, 1]. pool3
    is the global average of Mixed_7c (the FID features); logits = pool3 @ fc.weight^T WITHOUT fc.bias (what the
    Inception Score of the original TF code and torch-fidelity uses). Always float32 (autocast is switched off
    inside) and always in eval mode: the BatchNorms use their running statistics.

    Builds with random weights; `load_inception` / `build_inception` load the official file.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)
        for m in self.modules():              # random init that keeps activations O(1) (BN stats are identity)
            if isinstance(m, nn.Conv2d):      # so that a smoke test without weights is not degenerate
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        self.is_random = True                 # set to False by load_inception
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """The metric network never trains: it stays in eval mode (running BatchNorm statistics) whatever is asked."""
        return super().train(False)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"InceptionV3 expects images (B, 3, H, W) in [0, 1], got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                              align_corners=False)                     # (B, 3, 299, 299)
            x = 2 * x - 1                                              # [0, 1] -> [-1, 1]
            if x.device.type == "cpu":                                 # oneDNN convs: ~1.5x faster in NHWC
                x = x.contiguous(memory_format=torch.channels_last)
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))              # (B, 64, 147, 147)
            x = F.max_pool2d(x, kernel_size=3, stride=2)                                  # (B, 64, 73, 73)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                                 # (B, 192, 71, 71)
            x = F.max_pool2d(x, kernel_size=3, stride=2)                                  # (B, 192, 35, 35)
            x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                            # (B, 288, 35, 35)
            x = self.Mixed_6a(x)                                                          # (B, 768, 17, 17)
            x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))             # (B, 768, 17, 17)
            x = self.Mixed_7a(x)                                                          # (B, 1280, 8, 8)
            x = self.Mixed_7c(self.Mixed_7b(x))                                           # (B, 2048, 8, 8)
            pool3 = x.mean(dim=(2, 3))                                                    # (B, 2048)
            logits = pool3 @ self.fc.weight.t()                                           # (B, 1008), no bias
        return pool3, logits


# ----------------------------------------------------------------------------------------------------------------
# Loading the official weights (strict key checks)
# ----------------------------------------------------------------------------------------------------------------

def _sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_inception_state_dict(weights):
    """weights: a state dict, a local path, or "download" (the official URL, cached by torch.hub) -> (state dict,
    name). One-line errors: a missing / empty / truncated / junk file, a failed download. A local copy named like
    the official file is also checked against its published SHA-256 prefix."""
    if isinstance(weights, dict):
        return weights, "(a state dict)"
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"FID Inception weights must be a path, a state dict or 'download', got "
                        f"{type(weights).__name__}")
    path = (download_weights(FID_WEIGHTS_URL, "FID Inception weights", hash_prefix=FID_WEIGHTS_SHA256_PREFIX)
            if os.fspath(weights) == "download" else os.fspath(weights))
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID Inception weights {path} does not exist: pass a local copy of "
                                f"{FID_WEIGHTS_URL} or 'download'")
    if os.path.isfile(path) and os.path.basename(path) == os.path.basename(FID_WEIGHTS_URL):
        digest = _sha256(path)
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            _warn_loudly(f"'{path}' has SHA-256 {digest[:8]}..., the official file starts with "
                         f"{FID_WEIGHTS_SHA256_PREFIX}: is the download complete?")
    return read_checkpoint(path, "FID Inception weights"), path


def load_inception(model, weights):
    """Load the official FID weights (a path, a state dict, or "download") into `model` with strict key checks.

    The published file predates BatchNorm's `num_batches_tracked` buffer: those (unused in eval) may be missing.
    Any other missing, unexpected or misshapen key is one line naming the file.
    """
    state_dict, name = _resolve_inception_state_dict(weights)
    state_dict = dict(state_dict)
    for k, v in model.state_dict().items():             # tolerate only the missing BatchNorm step counters
        if k.endswith("num_batches_tracked") and k not in state_dict:
            state_dict[k] = v
    load_strict(model, state_dict, f"FID Inception weights {name}")
    model.is_random = False
    return model


def build_inception(weights=None, allow_random=False, device="cpu"):
    """The FID Inception network with the official weights, in eval mode on `device`.

    Without weights this raises, unless allow_random (smoke tests): then it warns loudly, and the model's
    `is_random` flag makes every printed result carry "RANDOM INCEPTION - NOT A REAL FID".
    """
    with torch.random.fork_rng(devices=[]):  # the same random network on every rank and every run
        torch.manual_seed(0)
        model = InceptionV3()
    if weights is None:
        if not allow_random:
            raise ValueError(
                "FID / IS need the official Inception weights (pt_inception-2015-12-05-6726825d.pth, pytorch-fid's "
                "port of the TF graph); a random network gives numbers that are not an FID. Pass "
                "--inception-weights PATH (a local copy of " + FID_WEIGHTS_URL + ") or --inception-weights download."
                " For a smoke test only, --allow-random-inception runs with random weights.")
        _warn_loudly(f"{RANDOM_MARK}: the Inception network has RANDOM weights. Every FID / IS printed in this run "
                     f"is meaningless (smoke test only). Pass --inception-weights PATH or download.")
    else:
        load_inception(model, weights)
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance and Inception Score
# ----------------------------------------------------------------------------------------------------------------

def _clip_roundoff(lam):
    """Eigenvalues of a PSD matrix: those below the roundoff level D * eps * max|lambda| (negative ones included)
    are zeros that floating point smeared; set them to 0 (their square roots would otherwise add up to ~1e-6)."""
    tol = lam.shape[0] * np.finfo(np.float64).eps * max(np.abs(lam).max(), np.finfo(np.float64).tiny)
    return np.where(lam > tol, lam, 0.0)


def _psd_sqrt(S):
    """Symmetric square root of a covariance through its eigendecomposition."""
    w, V = np.linalg.eigh((S + S.T) / 2)
    return (V * np.sqrt(_clip_roundoff(w))) @ V.T


def _trace_sqrt_product_eigh(sigma1, sigma2):
    """tr sqrtm(S1 S2) = sum_i sqrt(lambda_i(sqrt(S1) S2 sqrt(S1))): S1 S2 is similar to that PSD matrix."""
    root1 = _psd_sqrt(sigma1)
    M = root1 @ sigma2 @ root1
    lam = np.linalg.eigvalsh((M + M.T) / 2)
    return float(np.sqrt(_clip_roundoff(lam)).sum())


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    """pytorch-fid / ADM: scipy's sqrtm of the product, eps I on the diagonals if it is not finite."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: sqrtm(S1 S2) is singular; adding {eps} I to both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm(S1 S2) has a large imaginary component ({imag:.3g}); the "
                             f"covariances are badly conditioned (too few samples?). Try method='eigh'.")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="eigh"):
    """FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), in float64, as a python float.

    method "eigh" (default): tr sqrtm(S1 S2) from the eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric PSD, so
    always real; eigenvalues at the roundoff level are zeroed). Exact for covariances and stable for
    rank-deficient ones. method "sqrtm": scipy.linalg.sqrtm of the product as pytorch-fid / ADM do (eps I added if
    not finite, small imaginary parts dropped, large ones an error). Both agree to ~1e-6 on full-rank inputs.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    D = mu1.shape[0]
    if mu1.shape != (D,) or mu2.shape != (D,) or sigma1.shape != (D, D) or sigma2.shape != (D, D):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape} (expected (D,), (D, D) twice)")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    diff = mu1 - mu2
    if method == "eigh":
        try:
            tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        except np.linalg.LinAlgError:          # eigh did not converge: regularise, as the sqrtm route does
            offset = np.eye(D) * eps
            tr_covmean = _trace_sqrt_product_eigh(sigma1 + offset, sigma2 + offset)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    else:
        raise ValueError(f"frechet_distance: method must be 'eigh' or 'sqrtm', got {method!r}")
    fid = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean        # FID (Heusel et al.)
    return float(fid)


def inception_score(logits, splits=10, shuffle_seed=None):
    """IS = exp(E_x KL(p(y|x) || p(y))) per split -> (mean, population std) over `splits` splits.

    torch-fidelity's / the original TF code's semantics: p(y|x) = softmax(logits) in float64, the N rows cut IN
    ORDER into contiguous chunks [i N // splits, (i + 1) N // splits), p(y) the mean of p(y|x) over the chunk.
    torch-fidelity shuffles the rows first by default (np.random.RandomState(2020).permutation): pass
    shuffle_seed=2020 for exactly that.
    """
    logits = torch.as_tensor(np.asarray(logits) if not torch.is_tensor(logits) else logits).detach().cpu().double()
    if logits.dim() != 2:
        raise ValueError(f"inception_score: logits must be (N, classes), got shape {tuple(logits.shape)}")
    N = logits.shape[0]
    if N < splits:
        raise ValueError(f"inception_score: {N} samples cannot be cut into {splits} splits")
    if shuffle_seed is not None:
        logits = logits[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(N))]
    log_p = torch.log_softmax(logits, dim=1)                           # (N, C) log p(y|x)
    p = log_p.exp()
    scores = []
    for i in range(splits):
        lo, hi = i * N // splits, (i + 1) * N // splits
        log_py = torch.logsumexp(log_p[lo:hi], dim=0) - math.log(hi - lo)           # (C,) log of mean p(y|x)
        kl = (p[lo:hi] * (log_p[lo:hi] - log_py)).sum(dim=1).mean()                  # E_x KL(p(y|x) || p(y))
        scores.append(math.exp(kl.item()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------
# FID statistics: from features, streamed, and the ADM reference file format (mu, sigma)
# ----------------------------------------------------------------------------------------------------------------

def feature_stats(features):
    """(N, D) features -> (mu (D,), sigma (D, D)) in float64; sigma = np.cov(rowvar=False) (unbiased, N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature_stats: need (N >= 2, D) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def save_stats(path, mu, sigma):
    """Write an ADM-style reference statistics file: an .npz with `mu` (D,) and `sigma` (D, D)."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"                                  # np.savez would add it anyway
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"                        # a rename when complete: never half a file
    try:
        np.savez(tmp, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def open_npz(path, what):
    """np.load of an .npz archive the user passed, with one-line errors: missing, empty, truncated or corrupt, junk,
    or a single .npy array. Returns the open NpzFile (a context manager).

    allow_pickle stays False: an .npz of plain arrays never needs it, and numpy's hint to turn it on for a junk file
    ("This file contains pickled (object) data ...") would mislead."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): an interrupted copy or write?")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
        reason = "" if "pickle" in str(e) else f" ({type(e).__name__}: {_first_line(e)})"
        raise ValueError(f"{what} {path} cannot be read as an .npz archive: truncated, corrupt or not an .npz "
                         f"file{reason}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} {path} holds a single .npy array {data.shape}, not an .npz archive of named arrays")
    return data


def read_npz(path, what, keys, expected):
    """{key: array} of the arrays `keys` of an .npz file; one-line errors (see open_npz), also for a missing key
    (`expected` says what such a file holds) and for an array that cannot be read (a corrupt member)."""
    with open_npz(path, what) as data:
        if any(k not in data.files for k in keys):
            raise ValueError(f"{what} {path} holds {data.files}, expected {expected}")
        try:
            return {k: data[k] for k in keys}
        except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{what} {path}: its arrays cannot be read, the file is truncated or corrupt "
                             f"({type(e).__name__}: {_first_line(e)})") from None


def load_stats(path):
    """Read `mu`, `sigma` from a stats .npz (ours or an ADM reference batch such as VIRTUAL_imagenet256_labeled)."""
    arrays = read_npz(path, "statistics file", ("mu", "sigma"),
                      "'mu' and 'sigma' (the ADM reference batch format; make one with `python evaluate.py stats`)")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"statistics file {os.fspath(path)}: mu {mu.shape} and sigma {sigma.shape} do not fit "
                         f"together")
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():                            # a Frechet distance of them would be NaN
            raise ValueError(f"statistics file {os.fspath(path)}: its {name} holds {(~np.isfinite(a)).sum()} NaN or "
                             f"infinite values: statistics of a failed run? (`python evaluate.py stats` remakes them)")
    return mu, sigma


def is_stats_file(path, what=".npz file"):
    """True for an .npz holding `mu` and `sigma` (a statistics file rather than images); an .npz that cannot be
    read raises one line naming it as `what`."""
    path = os.fspath(path)
    if not (os.path.isfile(path) and path.endswith(".npz")):
        return False
    with open_npz(path, what) as data:
        return "mu" in data.files and "sigma" in data.files


class FeatureMoments:
    """FID statistics streamed over batches: the count, sum f and sum f f^T in float64 (O(D^2) memory whatever the
    number of images). stats() equals feature_stats of all the features; merge processes by all-reducing (SUM)
    every tensor of tensors().
    """

    def __init__(self, dim=2048):
        self.count = torch.zeros((), dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats):
        f = torch.as_tensor(feats).detach().double().cpu()                        # (B, D)
        if f.dim() != 2 or f.shape[1] != self.sum.shape[0]:
            raise ValueError(f"FeatureMoments: expected (B, {self.sum.shape[0]}) features, got {tuple(f.shape)}")
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f
        return self

    def tensors(self):
        """The running sums (count, sum f, sum f f^T), in place: what an all-reduce merges."""
        return [self.count, self.sum, self.outer]

    def stats(self):
        """(mu (D,), sigma (D, D)) as numpy float64; sigma unbiased (N - 1), as np.cov."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"FeatureMoments: need at least 2 features for a covariance, got {n:.0f}")
        mu = self.sum / n
        return mu.numpy(), ((self.outer - n * torch.outer(mu, mu)) / (n - 1)).numpy()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python inception.py WEIGHTS.pth   (pt_inception-2015-12-05-6726825d.pth, or 'download')")
    net = build_inception(sys.argv[1])
    with torch.inference_mode():
        pool3, logits = net(torch.full((1, 3, 64, 64), 0.5))
    print(f"loaded {sys.argv[1]}: pool3 {tuple(pool3.shape)} mean {pool3.mean():.4f}, logits {tuple(logits.shape)} "
          f"argmax {int(logits.argmax())}")
