"""Tests of evaluate.py and inception.py: FID / IS against closed forms and scipy, the FID Inception port's exact
state-dict layout, SSIM / PSNR against brute force and known values, the thumbnail baseline, the linear probe, the
file formats, and the recon / probe commands on a tiny random-weight tokenizer (1 and 2 processes)."""
import dataclasses
import json
import math
import os
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import data as data_lib
from merge import anchors
import evaluate as E
import inception
import lfq
from tokenizer import build_tokenizer, get_config, load_tokenizer

# ----------------------------------------------------------------------------------------------------------------
# The published layout of pt_inception-2015-12-05-6726825d.pth
# ----------------------------------------------------------------------------------------------------------------
# Written from pytorch-fid's fid_inception_v3() (torchvision Inception3(num_classes=1008, aux_logits=False) with
# Mixed_5b..7c replaced by the FID blocks) and torchvision's InceptionA..E: every BasicConv2d as
# (name, in_channels, out_channels, kernel_h, kernel_w). NOT derived from evaluate.py.
CONVS = [
    ("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 32, 64, 3, 3),
    ("Conv2d_3b_1x1", 64, 80, 1, 1), ("Conv2d_4a_3x3", 80, 192, 3, 3),
    # Mixed_5b = InceptionA(192, pool_features=32)
    ("Mixed_5b.branch1x1", 192, 64, 1, 1), ("Mixed_5b.branch5x5_1", 192, 48, 1, 1),
    ("Mixed_5b.branch5x5_2", 48, 64, 5, 5), ("Mixed_5b.branch3x3dbl_1", 192, 64, 1, 1),
    ("Mixed_5b.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_5b.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5b.branch_pool", 192, 32, 1, 1),
    # Mixed_5c = InceptionA(256, pool_features=64)
    ("Mixed_5c.branch1x1", 256, 64, 1, 1), ("Mixed_5c.branch5x5_1", 256, 48, 1, 1),
    ("Mixed_5c.branch5x5_2", 48, 64, 5, 5), ("Mixed_5c.branch3x3dbl_1", 256, 64, 1, 1),
    ("Mixed_5c.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_5c.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5c.branch_pool", 256, 64, 1, 1),
    # Mixed_5d = InceptionA(288, pool_features=64)
    ("Mixed_5d.branch1x1", 288, 64, 1, 1), ("Mixed_5d.branch5x5_1", 288, 48, 1, 1),
    ("Mixed_5d.branch5x5_2", 48, 64, 5, 5), ("Mixed_5d.branch3x3dbl_1", 288, 64, 1, 1),
    ("Mixed_5d.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_5d.branch3x3dbl_3", 96, 96, 3, 3),
    ("Mixed_5d.branch_pool", 288, 64, 1, 1),
    # Mixed_6a = InceptionB(288)
    ("Mixed_6a.branch3x3", 288, 384, 3, 3), ("Mixed_6a.branch3x3dbl_1", 288, 64, 1, 1),
    ("Mixed_6a.branch3x3dbl_2", 64, 96, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3),
    # Mixed_6b = InceptionC(768, channels_7x7=128)
    ("Mixed_6b.branch1x1", 768, 192, 1, 1), ("Mixed_6b.branch7x7_1", 768, 128, 1, 1),
    ("Mixed_6b.branch7x7_2", 128, 128, 1, 7), ("Mixed_6b.branch7x7_3", 128, 192, 7, 1),
    ("Mixed_6b.branch7x7dbl_1", 768, 128, 1, 1), ("Mixed_6b.branch7x7dbl_2", 128, 128, 7, 1),
    ("Mixed_6b.branch7x7dbl_3", 128, 128, 1, 7), ("Mixed_6b.branch7x7dbl_4", 128, 128, 7, 1),
    ("Mixed_6b.branch7x7dbl_5", 128, 192, 1, 7), ("Mixed_6b.branch_pool", 768, 192, 1, 1),
    # Mixed_6c = InceptionC(768, channels_7x7=160)
    ("Mixed_6c.branch1x1", 768, 192, 1, 1), ("Mixed_6c.branch7x7_1", 768, 160, 1, 1),
    ("Mixed_6c.branch7x7_2", 160, 160, 1, 7), ("Mixed_6c.branch7x7_3", 160, 192, 7, 1),
    ("Mixed_6c.branch7x7dbl_1", 768, 160, 1, 1), ("Mixed_6c.branch7x7dbl_2", 160, 160, 7, 1),
    ("Mixed_6c.branch7x7dbl_3", 160, 160, 1, 7), ("Mixed_6c.branch7x7dbl_4", 160, 160, 7, 1),
    ("Mixed_6c.branch7x7dbl_5", 160, 192, 1, 7), ("Mixed_6c.branch_pool", 768, 192, 1, 1),
    # Mixed_6d = InceptionC(768, channels_7x7=160)
    ("Mixed_6d.branch1x1", 768, 192, 1, 1), ("Mixed_6d.branch7x7_1", 768, 160, 1, 1),
    ("Mixed_6d.branch7x7_2", 160, 160, 1, 7), ("Mixed_6d.branch7x7_3", 160, 192, 7, 1),
    ("Mixed_6d.branch7x7dbl_1", 768, 160, 1, 1), ("Mixed_6d.branch7x7dbl_2", 160, 160, 7, 1),
    ("Mixed_6d.branch7x7dbl_3", 160, 160, 1, 7), ("Mixed_6d.branch7x7dbl_4", 160, 160, 7, 1),
    ("Mixed_6d.branch7x7dbl_5", 160, 192, 1, 7), ("Mixed_6d.branch_pool", 768, 192, 1, 1),
    # Mixed_6e = InceptionC(768, channels_7x7=192)
    ("Mixed_6e.branch1x1", 768, 192, 1, 1), ("Mixed_6e.branch7x7_1", 768, 192, 1, 1),
    ("Mixed_6e.branch7x7_2", 192, 192, 1, 7), ("Mixed_6e.branch7x7_3", 192, 192, 7, 1),
    ("Mixed_6e.branch7x7dbl_1", 768, 192, 1, 1), ("Mixed_6e.branch7x7dbl_2", 192, 192, 7, 1),
    ("Mixed_6e.branch7x7dbl_3", 192, 192, 1, 7), ("Mixed_6e.branch7x7dbl_4", 192, 192, 7, 1),
    ("Mixed_6e.branch7x7dbl_5", 192, 192, 1, 7), ("Mixed_6e.branch_pool", 768, 192, 1, 1),
    # Mixed_7a = InceptionD(768)
    ("Mixed_7a.branch3x3_1", 768, 192, 1, 1), ("Mixed_7a.branch3x3_2", 192, 320, 3, 3),
    ("Mixed_7a.branch7x7x3_1", 768, 192, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
    ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3),
    # Mixed_7b = InceptionE(1280)
    ("Mixed_7b.branch1x1", 1280, 320, 1, 1), ("Mixed_7b.branch3x3_1", 1280, 384, 1, 1),
    ("Mixed_7b.branch3x3_2a", 384, 384, 1, 3), ("Mixed_7b.branch3x3_2b", 384, 384, 3, 1),
    ("Mixed_7b.branch3x3dbl_1", 1280, 448, 1, 1), ("Mixed_7b.branch3x3dbl_2", 448, 384, 3, 3),
    ("Mixed_7b.branch3x3dbl_3a", 384, 384, 1, 3), ("Mixed_7b.branch3x3dbl_3b", 384, 384, 3, 1),
    ("Mixed_7b.branch_pool", 1280, 192, 1, 1),
    # Mixed_7c = InceptionE(2048)
    ("Mixed_7c.branch1x1", 2048, 320, 1, 1), ("Mixed_7c.branch3x3_1", 2048, 384, 1, 1),
    ("Mixed_7c.branch3x3_2a", 384, 384, 1, 3), ("Mixed_7c.branch3x3_2b", 384, 384, 3, 1),
    ("Mixed_7c.branch3x3dbl_1", 2048, 448, 1, 1), ("Mixed_7c.branch3x3dbl_2", 448, 384, 3, 3),
    ("Mixed_7c.branch3x3dbl_3a", 384, 384, 1, 3), ("Mixed_7c.branch3x3dbl_3b", 384, 384, 3, 1),
    ("Mixed_7c.branch_pool", 2048, 192, 1, 1),
]
FC = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def published_layout():
    """{key: shape} of the published file (which has no num_batches_tracked buffers)."""
    shapes = {}
    for name, c_in, c_out, kh, kw in CONVS:
        shapes[f"{name}.conv.weight"] = (c_out, c_in, kh, kw)
        for buf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{buf}"] = (c_out,)
    shapes.update(FC)
    return shapes


def random_published_state_dict(seed=0):
    """A state dict with the published keys and shapes and random values (BN statistics kept sane)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in published_layout().items():
        if k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def inception_net():
    model = inception.InceptionV3()
    inception.load_inception(model, random_published_state_dict())
    return model


# ----------------------------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------------------------

def random_cov(rng, d, n=None):
    n = n or 3 * d
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    return np.cov(a, rowvar=False)


def test_fid_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=32), random_cov(rng, 32)
    assert abs(inception.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    assert abs(inception.frechet_distance(mu, sigma, mu, sigma, method="sqrtm")) < 1e-6


def test_fid_closed_form_diagonal():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.1, 3, size=16), rng.uniform(0.1, 3, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    for method in ("eigh", "sqrtm"):
        got = inception.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_symmetric_and_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    d = 40
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    fid12 = inception.frechet_distance(mu1, s1, mu2, s2)
    fid21 = inception.frechet_distance(mu2, s2, mu1, s1)
    assert fid12 == pytest.approx(fid21, rel=1e-9)
    # direct computation, as pytorch-fid does it
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean))
    assert fid12 == pytest.approx(direct, rel=1e-7)
    assert inception.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(direct, rel=1e-9)


def test_fid_rank_deficient_stays_finite_and_real():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.3   # rank 9 covariances in 64-d
    (m1, s1), (m2, s2) = inception.feature_stats(f1), inception.feature_stats(f2)
    fid = inception.frechet_distance(m1, s1, m2, s2)
    assert isinstance(fid, float) and math.isfinite(fid) and fid > 0
    assert abs(inception.frechet_distance(m1, s1, m1, s1)) < 1e-6
    # two covariances sharing no direction: tr sqrtm(S1 S2) = 0, so FID = |dmu|^2 + tr S1 + tr S2
    s_a, s_b = np.diag([1.0, 2.0, 0.0, 0.0]), np.diag([0.0, 0.0, 3.0, 4.0])
    assert inception.frechet_distance(np.zeros(4), s_a, np.zeros(4), s_b) == pytest.approx(10.0, abs=1e-6)


def test_fid_bad_input():
    with pytest.raises(ValueError, match="shapes"):
        inception.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        inception.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("C", [1, 7, 50])
def test_is_one_hot_evenly_spread_gives_C(C):
    labels = torch.arange(10 * C * 2) % C                # every split holds each class twice
    logits = 100.0 * F.one_hot(labels, C).double()
    mean, std = inception.inception_score(logits, splits=10)
    assert mean == pytest.approx(C, rel=1e-6)
    assert std == pytest.approx(0.0, abs=1e-6)


def test_is_identical_rows_give_one():
    logits = torch.randn(1, 1008).repeat(40, 1)
    mean, std = inception.inception_score(logits, splits=10)
    assert mean == pytest.approx(1.0, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_is_splits_take_rows_in_order():
    ordered = 100.0 * F.one_hot(torch.tensor([0] * 10 + [1] * 10), 2).double()        # split 1: all 0, split 2: 1
    interleaved = 100.0 * F.one_hot(torch.tensor([0, 1] * 10), 2).double()
    assert inception.inception_score(ordered, splits=2) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert inception.inception_score(interleaved, splits=2) == pytest.approx((2.0, 0.0), abs=1e-9)
    # unequal chunk sizes follow [i N // s, (i + 1) N // s): N=5, s=2 -> rows [0, 2) and [2, 5)
    rows = 100.0 * F.one_hot(torch.tensor([0, 0, 0, 1, 1]), 2).double()
    # chunk 2 = {0, 1, 1}: p(y) = (1/3, 2/3), IS = exp(1/3 log 3 + 2/3 log 3/2)
    s2 = math.exp(math.log(3) / 3 + 2 / 3 * math.log(1.5))
    mean, std = inception.inception_score(rows, splits=2)
    assert mean == pytest.approx((1.0 + s2) / 2, rel=1e-9)
    assert std == pytest.approx(abs(s2 - 1.0) / 2, rel=1e-9)              # population std of two values


def test_is_matches_brute_force_on_random_logits():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(30, 6)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for chunk in np.split(p, 3):
        py = chunk.mean(0)
        scores.append(np.exp(np.mean([np.sum(r * np.log(r / py)) for r in chunk])))
    assert inception.inception_score(logits, splits=3) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# The Inception port
# ----------------------------------------------------------------------------------------------------------------

def test_inception_state_dict_matches_published_layout():
    assert len(CONVS) == 94
    expected = published_layout()
    assert len(expected) == 94 * 5 + 2
    got = {k: tuple(v.shape) for k, v in inception.InceptionV3().state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    for k, shape in expected.items():
        assert got[k] == shape, k


def test_inception_loads_published_keys_strictly_and_rejects_others(tmp_path):
    sd = random_published_state_dict(1)
    path = tmp_path / "inception.pth"
    torch.save(sd, path)
    model = inception.InceptionV3()
    assert model.is_random
    inception.load_inception(model, str(path))
    assert not model.is_random
    assert torch.equal(model.Mixed_7c.branch_pool.conv.weight, sd["Mixed_7c.branch_pool.conv.weight"])
    bad = dict(sd)
    bad["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    with pytest.raises(ValueError, match="unexpected keys AuxLogits"):
        inception.load_inception(inception.InceptionV3(), bad)
    bad = dict(sd)
    bad["fc.weight"] = torch.zeros(1000, 2048)
    with pytest.raises(ValueError, match="wrong shapes fc.weight"):
        inception.load_inception(inception.InceptionV3(), bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception.load_inception(inception.InceptionV3(), str(tmp_path / "missing.pth"))


def test_inception_outputs(inception_net):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    pool3, logits = inception_net(x)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool3.dtype == torch.float32 and torch.isfinite(pool3).all()
    assert torch.allclose(logits, pool3 @ inception_net.fc.weight.t(), rtol=1e-5, atol=1e-6)    # no bias
    assert not torch.allclose(logits, inception_net.fc(pool3), atol=1e-3)
    # a 64x64 input is the bilinear resize of itself to 299: same features as feeding that resize
    x299 = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    pool3_299, _ = inception_net(x299)
    assert torch.allclose(pool3, pool3_299, rtol=1e-4, atol=1e-5)
    # float32 inside autocast, deterministic (eval-mode BatchNorm, even after .train())
    inception_net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pool3_ac, _ = inception_net(x)
    assert pool3_ac.dtype == torch.float32
    assert torch.allclose(pool3_ac, pool3, rtol=1e-5, atol=1e-6)


def test_fid_specific_pooling_branches(inception_net):
    """Mixed_5b's pool branch averages without the zero padding; Mixed_7c's is a max-pool."""
    torch.manual_seed(1)
    x = torch.rand(1, 192, 9, 9) * 2
    out = inception_net.Mixed_5b(x)
    want = inception_net.Mixed_5b.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
    assert torch.allclose(out[:, -32:], want, atol=1e-6)
    wrong = inception_net.Mixed_5b.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=True))
    assert not torch.allclose(out[:, -32:], wrong, atol=1e-4)
    x = torch.rand(1, 2048, 5, 5) * 2
    out = inception_net.Mixed_7c(x)
    want = inception_net.Mixed_7c.branch_pool(F.max_pool2d(x, 3, 1, 1))
    assert torch.allclose(out[:, -192:], want, atol=1e-6)
    out = inception_net.Mixed_7b(x[:, :1280])
    want = inception_net.Mixed_7b.branch_pool(F.avg_pool2d(x[:, :1280], 3, 1, 1, count_include_pad=False))
    assert torch.allclose(out[:, -192:], want, atol=1e-6)


def test_build_inception_without_weights():
    with pytest.raises(ValueError, match="--inception-weights"):
        inception.build_inception(None)
    with pytest.warns(UserWarning, match="RANDOM INCEPTION - NOT A REAL FID"):
        model = inception.build_inception(None, allow_random=True)
    assert model.is_random


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction and file formats
# ----------------------------------------------------------------------------------------------------------------

def test_extract_features_order_and_skipping(inception_net):
    torch.manual_seed(2)
    imgs = torch.rand(5, 3, 32, 32)
    pool3, logits = E.extract_features(inception_net, imgs, batch_size=2)
    assert pool3.shape == (5, 2048) and logits.shape == (5, 1008) and pool3.dtype == np.float64
    direct, _ = inception_net(imgs)
    np.testing.assert_allclose(pool3, direct.double().numpy(), rtol=1e-4, atol=1e-6)
    seq = [imgs[0], None, imgs[2], imgs[3], None]       # an unreadable file is dropped, the order kept
    with pytest.warns(UserWarning, match="skipped 2"):
        p_seq, _ = E.extract_features(inception_net, seq, batch_size=3)
    np.testing.assert_allclose(p_seq, pool3[[0, 2, 3]], rtol=1e-4, atol=1e-6)


def test_stats_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(20, 8))
    mu, sigma = inception.feature_stats(feats)
    np.testing.assert_allclose(sigma, np.cov(feats.T))
    path = inception.save_stats(tmp_path / "ref", mu, sigma)
    assert path.endswith(".npz")
    mu2, sigma2 = inception.load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    np.savez(tmp_path / "other.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        inception.load_stats(tmp_path / "other.npz")


def test_adm_sample_batch(tmp_path):
    arr = np.random.default_rng(6).integers(0, 256, size=(3, 8, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr)                 # np.savez names a positional array arr_0
    x = E.load_sample_batch(tmp_path / "samples.npz")
    assert x.shape == (3, 3, 8, 6) and x.dtype == torch.float32
    assert x[1, 2, 4, 5].item() == pytest.approx(arr[1, 4, 5, 2] / 255.0, rel=1e-6)
    assert torch.equal(E.ImageArray(arr)[1], x[1])
    np.savez(tmp_path / "float.npz", arr.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        E.load_sample_batch(tmp_path / "float.npz")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ValueError, match="arr_0"):
        E.load_sample_batch(tmp_path / "stats.npz")


def test_image_files(tmp_path):
    rng = np.random.default_rng(7)
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(tmp_path / "sub" / "b.JPG")   # grey
    (tmp_path / "x.jpg").write_bytes(b"this is not a jpeg" * 10)
    (tmp_path / "notes.txt").write_text("ignored")
    files = E.ImageFiles(tmp_path, image_size=16)
    assert len(files) == 3
    with pytest.warns(UserWarning, match="skipped 1"):
        imgs = list(files)
    assert files.num_skipped == 1 and files.skipped[0].endswith("x.jpg")
    assert len(imgs) == 2 and all(x.shape == (3, 16, 16) for x in imgs)
    assert 0.0 <= min(float(x.min()) for x in imgs) and max(float(x.max()) for x in imgs) <= 1.0
    raw = E.ImageFiles(tmp_path)                           # no resize: native sizes
    assert raw[0].shape == (3, 20, 30)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image file"):
        E.ImageFiles(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        E.ImageFiles(tmp_path / "nope")


def test_cli_fid_with_random_inception(tmp_path, capsys):
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "samples.npz", rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    assert E.main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"]) == 1
    assert "--inception-weights" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = E.main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--allow-random-inception",
                     "--device", "cpu", "--batch-size", "6", "--is-splits", "2", "--json",
                     str(tmp_path / "out.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert all(line.startswith("[RANDOM INCEPTION - NOT A REAL FID]") for line in out.strip().splitlines())
    import json
    res = json.loads((tmp_path / "out.json").read_text())
    assert res["random_inception"] and math.isfinite(res["fid"]) and res["num_samples"] == 12


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction metrics
# ----------------------------------------------------------------------------------------------------------------

def test_psnr_known_values():
    x = torch.rand(3, 3, 16, 16) * 0.8
    assert torch.allclose(E.psnr(x, x + 0.1), torch.full((3,), 20.0, dtype=torch.float64), atol=1e-5)
    twenty = torch.full((3,), 20.0, dtype=torch.float64)
    assert torch.allclose(E.psnr(x * 255, x * 255 + 25.5, data_range=255.0), twenty, atol=1e-5)
    assert torch.isinf(E.psnr(x, x)).all()


def test_ssim_identity_and_noise():
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(E.ssim(x, x), torch.ones(2), atol=1e-6)
    s = [E.ssim(x, (x + sd * torch.randn_like(x)).clamp(0, 1)).mean().item() for sd in (0.01, 0.05, 0.2)]
    assert 1 > s[0] > s[1] > s[2]


def test_ssim_matches_brute_force_single_window():
    """On an 11x11 image the valid map is a single position: the Gaussian-weighted moments by hand."""
    rng = np.random.default_rng(9)
    x, y = rng.uniform(size=(3, 11, 11)), rng.uniform(size=(3, 11, 11))
    t = np.arange(11) - 5
    g = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for c in range(3):
        mx, my = (w * x[c]).sum(), (w * y[c]).sum()
        vx, vy = (w * (x[c] - mx) ** 2).sum(), (w * (y[c] - my) ** 2).sum()
        cxy = (w * (x[c] - mx) * (y[c] - my)).sum()
        vals.append((2 * mx * my + C1) * (2 * cxy + C2) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2)))
    got = E.ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None])
    assert got.item() == pytest.approx(np.mean(vals), rel=1e-9)
    # larger images: the mean over the valid positions of per-position values (check one shifted window)
    xx, yy = torch.rand(1, 3, 14, 13, dtype=torch.float64), torch.rand(1, 3, 14, 13, dtype=torch.float64)
    windows = [E.ssim(xx[..., i:i + 11, j:j + 11], yy[..., i:i + 11, j:j + 11]) for i in range(4) for j in range(3)]
    assert E.ssim(xx, yy).item() == pytest.approx(torch.stack(windows).mean().item(), rel=1e-9)


def test_codebook_usage_is_lfqs():
    assert E.CodebookUsage is lfq.CodebookUsage
    usage = E.CodebookUsage(10)
    usage.update(torch.tensor([[1, 2], [2, 3]]))
    usage.update(torch.tensor([9, 1]))
    assert usage.fraction == pytest.approx(0.4)            # a property
    assert usage.gather().fraction == pytest.approx(0.4)   # single process: unchanged


def test_feature_moments_match_feature_stats():
    rng = np.random.default_rng(10)
    feats = rng.normal(size=(30, 6)) * 3 + 5
    moments = inception.FeatureMoments(dim=6)
    for chunk in np.split(feats, [7, 19]):                 # any split into batches
        moments.update(torch.from_numpy(chunk))
    mu, sigma = moments.stats()
    mu_ref, sigma_ref = inception.feature_stats(feats)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        inception.FeatureMoments(dim=6).update(torch.zeros(1, 6)).stats()
    with pytest.raises(ValueError, match=r"\(B, 6\)"):
        moments.update(torch.zeros(2, 5))


# ----------------------------------------------------------------------------------------------------------------
# Thumbnail baseline (same bit budget as K tokens of d bits)
# ----------------------------------------------------------------------------------------------------------------

def smooth_image(size=64):
    """A smooth RGB image in [-1, 1]: low-frequency sinusoids, different per channel. (1, 3, size, size)"""
    u = torch.linspace(0, 1, size, dtype=torch.float64)
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    chans = [torch.sin(2 * math.pi * xx) * torch.cos(math.pi * yy), torch.cos(math.pi * (xx + yy)),
             torch.sin(math.pi * xx * yy + 0.5)]
    return (0.8 * torch.stack(chans)).float()[None]


def test_thumbnail_baseline_constant_image_is_kept():
    for v in (-1.0, -0.37, 0.2, 1.0):
        x = torch.full((2, 3, 64, 64), v)
        for bits in (24, 16 * 18, 256 * 18):
            y = E.thumbnail_baseline(x, bits)
            assert y.shape == x.shape
            assert (y - x).abs().max().item() <= 1 / 255 + 1e-6      # half an 8-bit step, in [-1, 1] units
    level = 2 * 100 / 255 - 1                                            # an exact 8-bit level: no rounding at all
    assert torch.allclose(E.thumbnail_baseline(torch.full((1, 3, 32, 32), level), 100), torch.full(
        (1, 3, 32, 32), level), atol=1e-6)


def test_thumbnail_baseline_more_bits_never_hurt_a_smooth_image():
    x = smooth_image()
    x01 = (x + 1) / 2
    keeps = [2, 4, 16, 36, 64, 100, 144, 256, 576, 1024]
    sides = [E.thumbnail_side(K * 18, 64) for K in keeps]               # floor(sqrt(K * 18 / 24))
    assert sides == [1, 1, 3, 5, 6, 8, 10, 13, 20, 27]                  # K=64: 1152 bits = 48 pixels -> 6 x 6
    psnrs = [E.psnr((E.thumbnail_baseline(x, K * 18) + 1) / 2, x01).item() for K in keeps]
    assert all(b >= a for a, b in zip(psnrs, psnrs[1:])), psnrs
    assert psnrs[-1] > psnrs[0] + 15
    # a budget that holds the whole image: the image itself, rounded to 8 bits
    full = E.thumbnail_baseline(x, 64 * 64 * 24)
    assert (full - x).abs().max().item() <= 1 / 255 + 1e-6
    # area downsampling: a 2 x 2 thumbnail of a 4 x 4 image holds the block means (upsampled bilinearly, the
    # corner pixels are exactly those means)
    img = torch.rand(1, 3, 4, 4) * 2 - 1
    t = E.thumbnail_baseline(img, 4 * 24)
    block = ((img[..., :2, :2].mean(dim=(-2, -1)) + 1) / 2 * 255).round() / 255 * 2 - 1
    assert torch.allclose(t[..., 0, 0], block, atol=1e-6)
    with pytest.raises(ValueError, match="24 bits"):
        E.thumbnail_baseline(x, 23)
    with pytest.raises(ValueError, match="square images"):
        E.thumbnail_baseline(torch.zeros(1, 3, 8, 9), 100)


# ----------------------------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------------------------

def test_linear_probe_separable_toy_problem():
    g = torch.Generator().manual_seed(0)
    num_classes, D = 4, 16
    centers = 4.0 * torch.randn(num_classes, D, generator=g)
    W = torch.randn(D, D, generator=g)                   # an arbitrary linear mix of the features

    def sample(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = (centers[y] + torch.randn(n, D, generator=g)) @ W + 10.0    # offset: the BatchNorm's job
        return x, y

    (tx, ty), (vx, vy) = sample(800), sample(400)
    rng_before = torch.get_rng_state()
    top1 = E.linear_probe(tx, ty, vx, vy, num_classes, epochs=30, batch_size=128, lr=1e-2)
    assert torch.equal(torch.get_rng_state(), rng_before)                  # global RNG untouched
    assert top1 > 95.0
    assert E.linear_probe(tx, ty, vx, vy, num_classes, epochs=30, batch_size=128, lr=1e-2) == top1   # deterministic
    # random labels cannot be learnt for the held-out set
    chance = E.linear_probe(tx, torch.randint(0, 4, (800,), generator=g), vx, vy, num_classes, epochs=5,
                            batch_size=128, lr=1e-2)
    assert chance < 60.0


# ----------------------------------------------------------------------------------------------------------------
# The recon and probe commands on a tiny tokenizer with random weights
# ----------------------------------------------------------------------------------------------------------------

ROW_KEYS = {"K", "source", "bits", "num_images", "psnr", "ssim", "lpips", "rfid", "rfid_random_inception",
            "codebook_usage", "recovery_accuracy", "thumb_psnr", "thumb_side"}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A stage-1 checkpoint of the tiny G tokenizer (64x64, N=256, target K=64), untrained: random weights."""
    cfg = get_config("g", "tiny", z_channels=18, image_size=64, K=64, K_high=4)   # the paper's d: 18 bits a token
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_tokenizer("g", config=cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "tokenizer_config": dataclasses.asdict(cfg),
                "step": 7}, path)
    return str(path)


def test_evaluate_reconstruction_rows(tiny_ckpt):
    model = load_tokenizer(tiny_ckpt)
    dataset = data_lib.build_dataset(None, split="val", size=64)
    rows = E.evaluate_reconstruction(model, dataset, [16, 64, 256], ("true", "predicted"), device="cpu",
                                     max_images=6, batch_size=6)
    assert [(r["K"], r["source"]) for r in rows] == [(K, s) for K in (16, 64, 256) for s in ("true", "predicted")]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["num_images"] == 6 and r["bits"] == 18 * r["K"]
        assert math.isfinite(r["psnr"]) and 0 < r["psnr"] < 60 and -1 <= r["ssim"] <= 1
        assert r["lpips"] is None and r["rfid"] is None and not r["rfid_random_inception"]
        assert 0 < r["codebook_usage"] <= 6 * r["K"] / 2 ** 18                   # at most one new code per token
        assert (r["recovery_accuracy"] is None) == (r["source"] == "true")
        assert r["source"] == "true" or 0 <= r["recovery_accuracy"] <= 1
        assert r["thumb_side"] == math.isqrt(18 * r["K"] // 24)
    x = torch.stack([dataset[i][0] for i in range(6)])
    x01 = (x + 1) / 2
    for r in rows[::2]:                       # the thumbnail column: the mean PSNR of thumbnail_baseline at K x d
        want = E.psnr((E.thumbnail_baseline(x, 18 * r["K"]) + 1) / 2, x01).mean().item()
        assert r["thumb_psnr"] == pytest.approx(want, rel=1e-6)
    # the true source decodes deterministically: the same images through a DataLoader give the same numbers, which
    # are the mean per-image PSNR / SSIM of decode(indices, source) clamped to [-1, 1]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(6)), batch_size=6)
    again = E.evaluate_reconstruction(model, loader, [16], "true")
    assert again[0]["psnr"] == rows[0]["psnr"] and again[0]["ssim"] == rows[0]["ssim"]
    assert again[0]["codebook_usage"] == rows[0]["codebook_usage"]
    with torch.no_grad():
        enc = model.encode(x, K=16)                                             # source (6, 256)
        rec01 = (model.decode(enc.indices, enc.source).clamp(-1, 1) + 1) / 2
        predicted = model.recovery.predict_source(enc.z_q, anchors(enc.source, 16))   # (6, 256)
    assert rows[0]["psnr"] == pytest.approx(E.psnr(rec01, x01).mean().item(), rel=1e-5)
    assert rows[0]["ssim"] == pytest.approx(E.ssim(rec01, x01).mean().item(), rel=1e-5, abs=1e-6)
    # recovery accuracy: the positions j whose predicted merged token is the true one, counted one by one
    hits = sum(int(predicted[b, j]) == int(enc.source[b, j]) for b in range(6) for j in range(256))
    assert rows[1]["recovery_accuracy"] == pytest.approx(hits / (6 * 256), abs=1e-12)
    with pytest.raises(ValueError, match="K=8 is not allowed.*fewest reachable is 16"):     # 4 merging layers
        E.evaluate_reconstruction(model, dataset, [8], max_images=2)
    with pytest.raises(ValueError, match="sources among"):
        E.evaluate_reconstruction(model, dataset, [16], sources=("oracle",), max_images=2)
    with pytest.raises(ValueError, match="no images"):
        E.evaluate_reconstruction(model, dataset, [16], max_images=0)


def test_format_recon_table_marks_random_inception():
    row = {"K": 64, "source": "predicted", "bits": 1152, "num_images": 3, "psnr": 21.5, "ssim": 0.61, "lpips": None,
           "rfid": 12.3, "rfid_random_inception": True, "codebook_usage": 0.5, "recovery_accuracy": 0.75,
           "thumb_psnr": 19.0, "thumb_side": 6}
    table = E.format_recon_table([row])
    assert "rFID*" in table and "random Inception: NOT a real FID" in table
    assert "   64 predicted   1152   21.50 0.6100      -    12.30  50.000%  0.7500   19.00   (6x6)" in table
    assert "random Inception" not in E.format_recon_table([dict(row, rfid=None, rfid_random_inception=False)])


def test_cli_recon_writes_json_and_skips_rfid_without_inception_weights(tiny_ckpt, capsys):
    assert E.main(["recon", "--ckpt", tiny_ckpt, "--max-images", "8", "--keep", "16", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "rFID skipped" in out and "LPIPS skipped" in out and "random Inception" not in out
    assert "   16      true    288" in out and "   64      true   1152" in out
    res = json.loads(open(os.path.join(os.path.dirname(tiny_ckpt), "recon_tiny.json")).read())   # the default
    assert res["checkpoint"] == os.path.abspath(tiny_ckpt) and res["step"] == 7 and res["weights"] == "ema"
    assert res["num_images"] == 8 and res["split"] == "val" and res["random_inception"] is False
    assert res["num_skipped_rank0"] == 0
    assert [(r["K"], r["source"]) for r in res["rows"]] == [(16, "true"), (64, "true")]
    assert all(set(r) == ROW_KEYS and r["rfid"] is None and r["num_images"] == 8 for r in res["rows"])


def test_cli_recon_random_inception_and_errors(tiny_ckpt, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = E.main(["recon", "--ckpt", tiny_ckpt, "--max-images", "2", "--keep", "16", "--source", "predicted",
                     "--allow-random-inception", "--raw", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "rFID*" in out and "random Inception: NOT a real FID" in out and "rFID skipped" not in out
    res = json.loads((tmp_path / "r.json").read_text())
    row, = res["rows"]
    assert res["random_inception"] and res["weights"] == "raw" and row["rfid_random_inception"]
    assert math.isfinite(row["rfid"]) and row["rfid"] >= 0 and 0 <= row["recovery_accuracy"] <= 1
    assert E.main(["recon", "--ckpt", tiny_ckpt, "--keep", "64", "300", "--device", "cpu"]) == 1
    assert "K=300 is not allowed" in error_line(capsys)
    missing = str(tmp_path / "missing.pt")
    assert E.main(["recon", "--ckpt", missing, "--device", "cpu"]) == 1
    assert f"stage-1 checkpoint {missing} does not exist" in error_line(capsys)
    assert E.main(["recon", "--ckpt", tiny_ckpt, "--lpips-vgg-weights", "vgg.pth", "--device", "cpu"]) == 1
    assert "both --lpips-vgg-weights and --lpips-lin-weights" in error_line(capsys)


def test_tokenizer_features_cls_and_mean(tiny_ckpt):
    model = load_tokenizer(tiny_ckpt)
    dataset = data_lib.build_dataset(None, split="train", size=64)
    cls, labels = E.tokenizer_features(model, dataset, K=36, feature="cls", max_images=3)
    mean, labels2 = E.tokenizer_features(model, dataset, K=36, feature="mean", max_images=3, batch_size=2)
    assert cls.shape == (3, 128) and mean.shape == (3, 18) and labels.tolist() == labels2.tolist() == [0, 1, 2]
    x = torch.stack([dataset[i][0] for i in range(3)])
    with torch.no_grad():
        enc = model.encode(x, K=36)                                             # z_q (3, 36, 18), source (3, 256)
        full = model.encode(x, K=256)                                           # K = N: nothing merged
    assert torch.allclose(cls, enc.cls, atol=1e-5)
    # "mean" is the code averaged over the N = 256 original positions; position j holds merged token source[b, j]
    brute = torch.stack([sum(enc.z_q[b, int(enc.source[b, j])] for j in range(256)) / 256 for b in range(3)])
    assert torch.allclose(mean, brute, atol=1e-6)
    # the default K is N (Appendix A.4: all tokens, no merging): the CLS and the plain mean of the N codes of
    # encode(K=256), not the merged ones (an untrained CLS barely moves, the codes do)
    cls_default, _ = E.tokenizer_features(model, dataset, feature="cls", max_images=3)
    mean_default, _ = E.tokenizer_features(model, dataset, feature="mean", max_images=3)
    assert torch.allclose(cls_default, full.cls, atol=1e-5)
    assert torch.allclose(mean_default, full.z_q.mean(dim=1), atol=1e-6) and not torch.allclose(mean_default, mean)
    with pytest.raises(ValueError, match="feature must be one of"):
        E.tokenizer_features(model, dataset, feature="max", max_images=2)


def test_cli_probe_uses_all_tokens_by_default(tiny_ckpt, tmp_path, capsys):
    """Appendix A.4: the tokenizers are probed with all tokens (no merging): K = N = 256, not the target K = 64."""
    out_path = tmp_path / "probe.json"
    args = ["probe", "--ckpt", tiny_ckpt, "--max-images", "20", "--epochs", "3", "--batch-size", "8",
            "--extract-batch-size", "10", "--device", "cpu", "--out", str(out_path)]
    assert E.main(args) == 0
    assert "K=256 of N=256" in capsys.readouterr().out
    res = json.loads(out_path.read_text())
    assert 0 <= res["top1"] <= 100 and res["step"] == 7 and res["feature"] == "cls"
    assert res["K"] == 256 and res["N"] == 256
    assert res["num_train"] == res["num_val"] == 20 and res["num_classes"] == 10 and res["feature_dim"] == 128
    assert E.main(args + ["--keep", "64", "--epochs", "1"]) == 0                   # --keep still chooses K
    assert "K=64 of N=256" in capsys.readouterr().out
    assert json.loads(out_path.read_text())["K"] == 64



def test_recon_and_probe_take_loader_workers(tiny_ckpt, tmp_path, monkeypatch):
    """--num-workers reaches the data loaders of recon and probe (default 0 on the CPU), and two workers give the
    rows of none."""
    used, shard_loader = [], E._shard_loader
    monkeypatch.setattr(E, "_shard_loader", lambda *a, **k: used.append(a[3] if len(a) > 3 else k.get("num_workers"))
                        or shard_loader(*a, **k))
    rows = {}
    for workers in ([], ["--num-workers", "2"]):
        out = tmp_path / f"recon{len(workers)}.json"
        assert E.main(["recon", "--ckpt", tiny_ckpt, "--max-images", "6", "--keep", "16", "--device", "cpu",
                       "--out", str(out), *workers]) == 0
        rows[len(workers)] = json.loads(out.read_text())["rows"]
    assert used == [0, 2] and rows[0] == rows[2]
    assert E.main(["probe", "--ckpt", tiny_ckpt, "--max-images", "4", "--epochs", "1", "--batch-size", "4",
                   "--device", "cpu", "--out", str(tmp_path / "probe.json"), "--num-workers", "1"]) == 0
    assert used[2:] == [1, 1]                                                    # train and val features

# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr that names the file and the problem, exit code 1, never a traceback
# ----------------------------------------------------------------------------------------------------------------

JUNK = bytes(range(256)) * 8              # neither a zip archive nor a pickle nor text


def error_line(capsys):
    """The stderr of a failed command, which must be exactly one line."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def first_half(path):
    data = open(path, "rb").read()
    return data[:len(data) // 2]


@pytest.mark.parametrize("command", ["recon", "probe"])
@pytest.mark.parametrize("kind, problem", [("empty", "is empty (0 bytes)"), ("truncated", "truncated"),
                                           ("junk", "is not a PyTorch file"), ("text", "is not a PyTorch file"),
                                           ("foreign", "lacks the entries model, ema, tokenizer_config")])
def test_cli_bad_checkpoint_is_one_line(tiny_ckpt, tmp_path, capsys, command, kind, problem):
    path = tmp_path / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(first_half(tiny_ckpt))
    elif kind == "junk":
        path.write_bytes(JUNK)
    elif kind == "text":
        path.write_text("this is not a checkpoint\n" * 20)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    assert E.main([command, "--ckpt", str(path), "--device", "cpu"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"evaluate.py {command}: error: stage-1 checkpoint {path} ") and problem in line
    assert "weights_only" not in line and "PyTorch 2.6" not in line            # torch's hint would mislead


@pytest.mark.parametrize("kind, problem", [("empty", "is empty (0 bytes)"), ("truncated", "truncated"),
                                           ("junk", "is not a PyTorch file"),
                                           ("foreign", "does not match the model")])
def test_cli_bad_inception_weights_is_one_line(tmp_path, capsys, kind, problem):
    np.savez(tmp_path / "samples.npz", np.zeros((4, 8, 8, 3), dtype=np.uint8))
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "whole.pth")
        path.write_bytes(first_half(tmp_path / "whole.pth"))
    elif kind == "junk":
        path.write_bytes(JUNK)
    else:
        torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)             # a file, but not the Inception's
    samples = str(tmp_path / "samples.npz")
    argv = ["fid", samples, samples, "--inception-weights", str(path), "--is-splits", "2", "--device", "cpu"]
    assert E.main(argv) == 1
    line = error_line(capsys)
    assert line.startswith(f"evaluate.py fid: error: FID Inception weights {path}") and problem in line
    assert "weights_only" not in line


def test_cli_inception_download_offline_is_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):                                               # what urllib raises without DNS
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))   # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    np.savez(tmp_path / "samples.npz", np.zeros((4, 8, 8, 3), dtype=np.uint8))
    samples = str(tmp_path / "samples.npz")
    for argv in (["fid", samples, samples, "--is-splits", "2"], ["recon", "--ckpt", tiny_ckpt]):
        assert E.main(argv + ["--inception-weights", "download", "--device", "cpu"]) == 1
        line = error_line(capsys)
        assert inception.FID_WEIGHTS_URL in line and "download" in line and "failed" in line
        assert "pass its local path" in line


@pytest.mark.parametrize("role", ["samples", "reference"])
@pytest.mark.parametrize("kind, problem", [("empty", "is empty (0 bytes)"), ("truncated", "truncated"),
                                           ("junk", "cannot be read as an .npz archive"),
                                           ("npy", "single .npy array"), ("arrays", "expected")])
def test_cli_bad_npz_is_one_line(tmp_path, capsys, role, kind, problem):
    images = np.random.default_rng(11).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, images)
    if kind == "empty":
        bad.write_bytes(b"")
    elif kind == "truncated":
        bad.write_bytes(first_half(good))
    elif kind == "junk":
        bad.write_bytes(JUNK)
    elif kind == "npy":
        with open(bad, "wb") as f:                                              # an .npy under an .npz name
            np.save(f, images)
    else:
        np.savez(bad, pictures=images)
    argv = [str(bad), str(good)] if role == "samples" else [str(good), str(bad)]
    # the inputs are opened before the network is built: no random-Inception warning comes first
    assert E.main(["fid", *argv, "--allow-random-inception", "--device", "cpu", "--is-splits", "2"]) == 1
    line = error_line(capsys)
    assert line.startswith("evaluate.py fid: error: ") and str(bad) in line and problem in line
    assert "pickle" not in line                                                 # numpy's hint would mislead


def test_bad_stats_file_is_one_error(tmp_path):
    """load_stats: truncated and junk files raise a ValueError naming the file (not numpy's errors)."""
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    (tmp_path / "cut.npz").write_bytes(first_half(tmp_path / "stats.npz"))
    (tmp_path / "junk.npz").write_bytes(JUNK)
    for name in ("cut.npz", "junk.npz"):
        with pytest.raises(ValueError, match=f"statistics file {tmp_path / name} cannot be read"):
            inception.load_stats(tmp_path / name)


# ----------------------------------------------------------------------------------------------------------------
# Two processes (gloo): strided shares gathered back in order, codebook usage merged
# ----------------------------------------------------------------------------------------------------------------

class _FakeInception(torch.nn.Module):
    """Features that identify the image: pool3 = its mean value in every dim, logits = its max value."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))                                           # (B,)
        return m[:, None].expand(-1, 2048), x.amax(dim=(1, 2, 3))[:, None].expand(-1, 1008)


def _dist_worker(rank, world, init_file, images, result_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool3, logits = E.extract_features(_FakeInception(), images, batch_size=2, device="cpu")
    usage = E.CodebookUsage(8)
    usage.update(torch.tensor([rank, 4 + rank]))
    usage.gather()
    if rank == 0:
        torch.save({"pool3": pool3, "logits": logits, "used": usage.used}, result_file)
    dist.destroy_process_group()


def _recon_worker(rank, world, init_file, ckpt, result_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = load_tokenizer(ckpt)
    dataset = data_lib.build_dataset(None, split="val", size=64)
    rows = E.evaluate_reconstruction(model, dataset, [16], ("true", "predicted"), max_images=5, batch_size=2)
    feats, labels = E.tokenizer_features(model, dataset, K=16, max_images=5, batch_size=2)
    torch.save((rows, feats, labels), f"{result_file}.{rank}")
    dist.destroy_process_group()


def test_evaluate_reconstruction_two_processes_matches_one(tiny_ckpt, tmp_path):
    """Rank 0 takes images 0, 2, 4 and rank 1 images 1, 3: the summed rows equal the one-process rows, and the
    probe features come back in dataset order."""
    torch.multiprocessing.spawn(_recon_worker, args=(2, str(tmp_path / "init"), tiny_ckpt, str(tmp_path / "rows")),
                                nprocs=2, join=True)
    (rows0, feats0, labels0), (rows1, feats1, _) = [torch.load(f"{tmp_path / 'rows'}.{r}") for r in (0, 1)]
    assert rows0 == rows1 and torch.equal(feats0, feats1)                   # every rank returns the same
    model = load_tokenizer(tiny_ckpt)
    dataset = data_lib.build_dataset(None, split="val", size=64)
    single = E.evaluate_reconstruction(model, dataset, [16], ("true", "predicted"), max_images=5, batch_size=5)
    with torch.no_grad():
        cls = model.encode(torch.stack([dataset[i][0] for i in range(5)]), K=16).cls    # (5, 128)
    assert torch.allclose(feats0, cls, atol=1e-5) and labels0.tolist() == [dataset[i][1] for i in range(5)]
    for got, want in zip(rows0, single):
        assert got["num_images"] == 5
        assert got["codebook_usage"] == pytest.approx(want["codebook_usage"], abs=1.5 / 2 ** 18)   # a code at most
        for k in ("psnr", "ssim", "thumb_psnr"):
            assert got[k] == pytest.approx(want[k], rel=1e-5), k
        assert got["recovery_accuracy"] == pytest.approx(want["recovery_accuracy"], abs=1e-3)


def test_extract_features_two_processes(tmp_path):
    torch.manual_seed(4)
    imgs = [torch.full((3, 4, 4), v) for v in torch.rand(7).tolist()]
    imgs[3] = None                                                          # an unreadable file on rank 1
    torch.multiprocessing.spawn(_dist_worker, args=(2, str(tmp_path / "init"), imgs, str(tmp_path / "res.pt")),
                                nprocs=2, join=True)
    res = torch.load(tmp_path / "res.pt", weights_only=False)
    expected = [float(x.mean()) for x in imgs if x is not None]
    np.testing.assert_allclose(res["pool3"][:, 0], expected, rtol=1e-6)
    assert res["pool3"].shape == (6, 2048) and res["logits"].shape == (6, 1008)
    assert res["used"].tolist() == [True, True, False, False, True, True, False, False]


# ----------------------------------------------------------------------------------------------------------------
# Nothing lost, nothing scored wrong: outputs never replace inputs, labels the shapes score cannot read
# ----------------------------------------------------------------------------------------------------------------


def test_cli_an_output_that_is_an_input_is_one_line_and_the_input_stays(tiny_ckpt, tmp_path, capsys):
    images = np.random.default_rng(3).integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=images, labels=np.arange(12) % 10)
    before = [open(p, "rb").read() for p in (tiny_ckpt, samples)]
    for argv, flag in [(["recon", "--ckpt", tiny_ckpt, "--out", tiny_ckpt], "--ckpt"),
                       (["probe", "--ckpt", tiny_ckpt, "--out", tiny_ckpt], "--ckpt"),
                       (["shapes", str(samples), "--json", str(samples)], "samples"),
                       (["fid", str(samples), str(samples), "--json", str(samples), "--allow-random-inception"],
                        "samples"),
                       (["stats", str(samples), str(tmp_path / "s"), "--allow-random-inception"], "images")]:
        assert E.main([*argv, "--device", "cpu"]) == 1, argv
        line = error_line(capsys)
        assert f"is the same file as {flag}" in line, (argv, line)
    assert [open(p, "rb").read() for p in (tiny_ckpt, samples)] == before


@pytest.mark.parametrize("labels, problem", [(np.array([0, 3, 12, 1]), "0..9"), (np.array([-1, 0, 1, 2]), "0..9"),
                                             (np.array([0.0, 2.5, 1.0, 3.0]), "whole numbers")])
def test_cli_shapes_refuses_labels_outside_its_classes(tmp_path, capsys, labels, problem):
    """A label of 12 used to score as a miss (0% accuracy, exit 0), 2.5 was truncated to 2."""
    path = tmp_path / "s.npz"
    np.savez(path, arr_0=np.zeros((4, 16, 16, 3), np.uint8), labels=labels)
    assert E.main(["shapes", str(path), "--device", "cpu", "--classifier", str(tmp_path / "never.pt")]) == 1
    line = error_line(capsys)
    assert str(path) in line and problem in line, line
    assert not os.path.exists(tmp_path / "never.pt")                          # refused before any training
