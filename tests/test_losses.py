"""Tests for losses.py: LPIPS-VGG, the PatchGAN, GAN / LeCam losses, the DINOv2 teacher, the alignment losses.

Every pretrained network is checked against the published key layout (written out here from the official files'
structure, not read from losses.py) with random weights of the same shapes, and every formula against a brute-force
or closed-form computation written independently below.

    python -m pytest tests/test_losses.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F

import losses

# ----------------------------------------------------------------------------------------------------------------
# Official layouts, written out independently of losses.py
# ----------------------------------------------------------------------------------------------------------------

# torchvision vgg16 features: conv index -> (out, in) channels
VGG_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256),
             14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512),
             28: (512, 512)}
VGG_POOL_BEFORE = {5, 10, 17, 24}                    # a 2x2 max-pool sits at index 4, 9, 16, 23
VGG_TAPS = {2: 0, 7: 1, 14: 2, 21: 3, 28: 4}          # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LIN_CHANNELS = [64, 128, 256, 512, 512]


def random_vgg_state_dict(seed=0, with_classifier=True):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (c_out, c_in) in VGG_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * math.sqrt(2.0 / (9 * c_in))
        sd[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.01
    if with_classifier:   # the torchvision file also holds the classifier (tiny stand-ins here: it is ignored)
        sd["classifier.0.weight"] = torch.randn(4, 4, generator=g)
        sd["classifier.0.bias"] = torch.randn(4, generator=g)
    return sd


def random_lin_state_dict(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1 for k, c in enumerate(LIN_CHANNELS)}


def lpips_brute_force(x, y, vgg_sd, lin_sd):
    """LPIPS v0.1 written out: explicit VGG16 conv loop, per-sample, per-layer sums."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(h):
        out = [None] * 5
        for i in sorted(VGG_CONVS):
            if i in VGG_POOL_BEFORE:
                h = F.max_pool2d(h, 2)
            h = F.relu(F.conv2d(h, vgg_sd[f"features.{i}.weight"], vgg_sd[f"features.{i}.bias"], padding=1))
            if i in VGG_TAPS:
                out[VGG_TAPS[i]] = h
        return out

    fx, fy = taps((x - shift) / scale), taps((y - shift) / scale)
    d = torch.zeros(x.shape[0])
    for b in range(x.shape[0]):
        for k in range(5):
            a, c = fx[k][b], fy[k][b]                                    # (C, H, W)
            a = a / (torch.sqrt((a ** 2).sum(dim=0, keepdim=True)) + 1e-10)
            c = c / (torch.sqrt((c ** 2).sum(dim=0, keepdim=True)) + 1e-10)
            w = lin_sd[f"lin{k}.model.1.weight"].view(-1)                # (C,)
            per_pixel = (w.view(-1, 1, 1) * (a - c) ** 2).sum(dim=0)     # (H, W)
            d[b] += per_pixel.mean()
    return d


def dinov2_expected_shapes(D=768, depth=12, mlp=3072, patch=14, grid=37):
    """The key layout of dinov2_vitb14_pretrain.pth (facebookresearch/dinov2, block_chunks=0, LayerScale)."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + grid * grid, D), "mask_token": (1, D),
              "patch_embed.proj.weight": (D, 3, patch, patch), "patch_embed.proj.bias": (D,),
              "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (D,), p + "norm1.bias": (D,),
                       p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
                       p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
                       p + "ls1.gamma": (D,),
                       p + "norm2.weight": (D,), p + "norm2.bias": (D,),
                       p + "mlp.fc1.weight": (mlp, D), p + "mlp.fc1.bias": (mlp,),
                       p + "mlp.fc2.weight": (D, mlp), p + "mlp.fc2.bias": (D,),
                       p + "ls2.gamma": (D,)})
    return shapes


SMALL = dict(embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0, patch_size=14, img_size=518)


def small_dinov2_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * 0.1 for k, s in dinov2_expected_shapes(D=32, depth=2, mlp=128).items()}


@pytest.fixture(scope="module")
def lpips_pair():
    vgg_sd, lin_sd = random_vgg_state_dict(), random_lin_state_dict()
    return losses.LPIPS(vgg_weights=vgg_sd, lin_weights=lin_sd), vgg_sd, lin_sd


def images(B=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, size, size, generator=g) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------------------------


def test_lpips_loads_official_layout_strictly(lpips_pair):
    lp, vgg_sd, lin_sd = lpips_pair
    assert lp.pretrained
    net_sd = lp.net.state_dict()
    assert set(net_sd) == {k for k in vgg_sd if k.startswith("features.")}
    for k in net_sd:
        assert torch.equal(net_sd[k], vgg_sd[k])
    lin = lp.lins.state_dict()
    assert set(lin) == set(lin_sd)
    for k in lin:
        assert torch.equal(lin[k], lin_sd[k])
    assert all(not p.requires_grad for p in lp.parameters())


def test_lpips_loads_from_paths(tmp_path):
    vgg_sd, lin_sd = random_vgg_state_dict(seed=3), random_lin_state_dict(seed=4)
    torch.save(vgg_sd, tmp_path / "vgg16.pth")
    torch.save(lin_sd, tmp_path / "vgg.pth")
    lp = losses.LPIPS(vgg_weights=str(tmp_path / "vgg16.pth"), lin_weights=str(tmp_path / "vgg.pth"))
    assert torch.equal(lp.net.features[28].bias, vgg_sd["features.28.bias"])
    assert torch.equal(lp.lins.lin4.model[1].weight, lin_sd["lin4.model.1.weight"])


def test_lpips_bad_weights_give_clear_errors(tmp_path):
    vgg_sd = random_vgg_state_dict()
    del vgg_sd["features.28.bias"]
    with pytest.raises(ValueError, match="missing keys features.28.bias"):
        losses.LPIPS(vgg_weights=vgg_sd, lin_weights=random_lin_state_dict())
    lin_sd = random_lin_state_dict()
    lin_sd["lin5.model.1.weight"] = torch.zeros(1, 8, 1, 1)
    with pytest.raises(ValueError, match="unexpected keys lin5.model.1.weight"):
        losses.LPIPS(vgg_weights=random_vgg_state_dict(), lin_weights=lin_sd)
    lin_sd = random_lin_state_dict()
    lin_sd["lin0.model.1.weight"] = torch.zeros(1, 32, 1, 1)
    with pytest.raises(ValueError, match="wrong shapes"):
        losses.LPIPS(vgg_weights=random_vgg_state_dict(), lin_weights=lin_sd)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        losses.LPIPS(vgg_weights=str(tmp_path / "nope.pth"), lin_weights=random_lin_state_dict())
    (tmp_path / "junk.pth").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ValueError, match="junk.pth is not a PyTorch file") as err:
        losses.LPIPS(vgg_weights=str(tmp_path / "junk.pth"), lin_weights=random_lin_state_dict())
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_weight_download_failure_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))   # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ValueError, match="download of .*dinov2_vitb14_pretrain.pth failed") as err:
        losses.load_dinov2(losses.DINOv2(**SMALL), "download")
    assert "\n" not in str(err.value) and "pass its local path" in str(err.value)


def test_lpips_without_weights_is_flagged_and_warns():
    with pytest.warns(UserWarning, match="WITHOUT pretrained weights"):
        lp = losses.LPIPS()
    assert lp.pretrained is False
    with pytest.warns(UserWarning):
        assert losses.LPIPS(vgg_weights=random_vgg_state_dict()).pretrained is False


def test_lpips_equals_brute_force(lpips_pair):
    lp, vgg_sd, lin_sd = lpips_pair
    x, y = images(seed=0), images(seed=1)
    d = lp(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32
    torch.testing.assert_close(d, lpips_brute_force(x, y, vgg_sd, lin_sd), rtol=1e-4, atol=1e-6)


def test_lpips_metric_properties(lpips_pair):
    lp, _, _ = lpips_pair
    x, y = images(seed=0), images(seed=1)
    assert torch.equal(lp(x, x), torch.zeros(2))                   # identical images: exactly 0
    torch.testing.assert_close(lp(x, y), lp(y, x))                 # symmetric
    assert (lp(x, y) > 0).all()                                    # non-negative, positive for different images
    lp.train()                                                     # train mode changes nothing (no dropout)
    assert not lp.training
    assert torch.equal(lp(x, y), lp(x, y))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        lp(x, y[:, :, :16])


def test_lpips_gradient_reaches_input_and_autocast_is_float32(lpips_pair):
    lp, _, _ = lpips_pair
    x, y = images(seed=0).requires_grad_(True), images(seed=1)
    lp(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lp.parameters())
    with torch.no_grad():
        ref = lp(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d = lp(x.bfloat16(), y.bfloat16())
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, ref, rtol=0.05, atol=1e-4)      # only the bf16 rounding of the inputs


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN
# ----------------------------------------------------------------------------------------------------------------


def test_patchgan_layout_params_and_output():
    torch.manual_seed(0)
    D = losses.NLayerDiscriminator()
    n = sum(p.numel() for p in D.parameters())
    assert abs(n - 2.77e6) / 2.77e6 < 0.01
    # conv 3->64 (+bias) + 3 convs without bias + 3 BN + conv 512->1 (+bias): 2,765,633
    assert n == (3 * 64 * 16 + 64) + 64 * 128 * 16 + 128 * 256 * 16 + 256 * 512 * 16 + 2 * (128 + 256 + 512) \
        + 512 * 16 + 1
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = (["main.0.weight", "main.0.bias", "main.2.weight"] + [f"main.3.{s}" for s in bn] + ["main.5.weight"]
                + [f"main.6.{s}" for s in bn] + ["main.8.weight"] + [f"main.9.{s}" for s in bn]
                + ["main.11.weight", "main.11.bias"])
    assert list(D.state_dict()) == expected
    assert D(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    with torch.no_grad():
        assert D(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    w = D.main[8].weight                                                     # 2M draws of N(0, 0.02)
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    assert abs(D.main[9].weight.mean().item() - 1.0) < 0.01 and torch.equal(D.main[9].bias, torch.zeros(512))
    with pytest.raises(ValueError, match="expects"):
        D(torch.randn(2, 1, 64, 64))


# ----------------------------------------------------------------------------------------------------------------
# GAN losses, LeCam, adaptive weight
# ----------------------------------------------------------------------------------------------------------------

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_gan_losses_on_hand_made_logits():
    # relu(1 - real) = [0, .5, 2] (mean 5/6), relu(1 + fake) = [0, 1, 2.5] (mean 7/6): 0.5 (5/6 + 7/6) = 1
    assert losses.hinge_d_loss(REAL, FAKE).item() == pytest.approx(1.0)
    assert losses.hinge_g_loss(FAKE).item() == pytest.approx(1.0 / 6.0)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    # the release's non-saturating loss averages each image's patch logits first: image means -1 and 1
    logits = torch.tensor([[[[1.0, -3.0]]], [[[2.0, 0.0]]]])                 # (2, 1, 1, 2)
    assert losses.non_saturating_g_loss(logits).item() == pytest.approx(0.5 * (sp(1.0) + sp(-1.0)), rel=1e-6)
    per_patch = sum(sp(-v) for v in [1.0, -3.0, 2.0, 0.0]) / 4               # what it must NOT be
    assert abs(losses.non_saturating_g_loss(logits).item() - per_patch) > 0.1


class _Cfg:
    """Distinct weights, so every term's contribution is visible in the total."""
    w_recon, w_perceptual, w_commit, w_entropy, w_recovery, w_align, w_gan = 2.0, 17.0, 3.0, 5.0, 7.0, 11.0, 13.0
    recon_loss, gan_loss, adaptive_gan_weight, align_loss = "l2", "hinge", False, "ce"


def _fake_output():
    from collections import namedtuple
    LFQ = namedtuple("LFQ", "commitment per_sample_entropy codebook_entropy")
    Enc = namedtuple("Enc", "lfq")
    Out = namedtuple("Out", "recon enc recovery_loss")
    recon = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)               # vs x = 0: mse 0.25, l1 0.5
    return Out(recon, Enc(LFQ(torch.tensor(0.1), torch.tensor(2.0), torch.tensor(1.5))), torch.tensor(0.3))


def test_generator_loss_composition_closed_form():
    x, out = torch.zeros(2, 3, 4, 4), _fake_output()
    # teacher and student constant over D = 4 features: both softmaxes uniform, the cross-entropy is ln 4
    pair = (torch.zeros(2, 4), torch.zeros(2, 4))
    disc = lambda img: torch.full((img.shape[0], 1, 3, 3), -0.2)           # noqa: E731  hinge G loss 0.2
    total, terms = losses.generator_loss(x, out, _Cfg, disc=disc, align_pair=pair)
    # 2 * 0.25 + 3 * 0.1 + 5 * (2.0 - 1.5) + 7 * 0.3 + 11 * ln 4 + 13 * 0.2
    assert total.item() == pytest.approx(0.5 + 0.3 + 2.5 + 2.1 + 11 * math.log(4) + 2.6, rel=1e-6)
    assert {k: round(v.item(), 6) for k, v in terms.items()} == {
        "recon": 0.25, "commit": 0.1, "entropy": 0.5, "recovery": 0.3, "align": round(math.log(4), 6), "gan_g": 0.2}
    # without the discriminator (GAN off) and the teacher, those terms are absent from the sum
    total, terms = losses.generator_loss(x, out, _Cfg)
    assert total.item() == pytest.approx(0.5 + 0.3 + 2.5 + 2.1, rel=1e-6) and set(terms) == {
        "recon", "commit", "entropy", "recovery"}


def test_generator_loss_l1_non_saturating_and_adaptive_weight():
    class Cfg(_Cfg):
        recon_loss, gan_loss, adaptive_gan_weight = "l1", "non-saturating", True
    x, out = torch.zeros(2, 3, 4, 4), _fake_output()
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    # a "decoder" whose last layer w scales the reconstruction: d recon_loss / d w and d gan / d w are known
    recon = out.recon * w[0] + 0 * w[1]
    out = out._replace(recon=recon)
    disc = lambda img: img.mean(dim=(1, 2, 3), keepdim=True)               # noqa: E731  each image's mean
    total, terms = losses.generator_loss(x, out, Cfg, disc=disc, last_layer=w)
    sp = lambda v: math.log1p(math.exp(v))                                  # noqa: E731
    assert terms["recon"].item() == pytest.approx(0.5)                      # L1 of 0.5 everywhere
    assert terms["gan_g"].item() == pytest.approx(sp(-0.5), rel=1e-6)      # image mean logit 0.5
    # d(w_recon * L1)/dw0 = 2 * 0.5 = 1; d(gan)/dw0 = -sigmoid(-0.5) * 0.5: lambda = 1 / (that + 1e-4)
    g = 0.5 / (1 + math.exp(0.5))
    assert terms["gan_lambda"].item() == pytest.approx(1.0 / (g + 1e-4), rel=1e-5)
    expected = 2 * 0.5 + 0.3 + 2.5 + 2.1 + terms["gan_lambda"].item() * 13 * sp(-0.5)
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_discriminator_loss_is_hinge_plus_lecam():
    class Cfg:
        w_lecam = 0.01
    lecam = losses.LeCam()
    lecam.ema_real.fill_(0.5)
    lecam.ema_fake.fill_(-0.5)
    disc = lambda img: img[:, :1]                                           # noqa: E731  logits = the first channel
    x, recon = torch.full((1, 3, 1, 3), 2.0), torch.full((1, 3, 1, 3), -1.5)
    x[0, 0, 0] = torch.tensor([2.0, 0.5, -1.0])
    recon[0, 0, 0] = torch.tensor([-2.0, 0.0, 1.5])
    total, terms, _ = losses.discriminator_loss(disc, x, recon, lecam, Cfg)
    # hinge: 1.0 (REAL / FAKE above); LeCam: relu(real + 0.5)^2 = [6.25, 1, 0] (mean 7.25/3),
    # relu(0.5 - fake)^2 = [6.25, 0.25, 0] (mean 6.5/3)
    assert terms["disc"].item() == pytest.approx(1.0)
    assert terms["lecam"].item() == pytest.approx(7.25 / 3 + 6.5 / 3)
    assert total.item() == pytest.approx(1.0 + 0.01 * (7.25 / 3 + 6.5 / 3))


def test_sync_batch_norm_is_batch_norm_in_one_process():
    torch.manual_seed(0)
    ours, ref = losses.SyncBatchNorm2d(5), torch.nn.BatchNorm2d(5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_lecam_update_and_penalty_closed_form():
    lecam = losses.LeCam()
    assert set(lecam.state_dict()) == {"ema_real", "ema_fake"}
    lecam.update(REAL, FAKE)
    ema_real, ema_fake = 0.001 * REAL.mean().item(), 0.001 * FAKE.mean().item()   # from 0, decay 0.999
    assert lecam.ema_real.item() == pytest.approx(ema_real, rel=1e-5)
    assert lecam.ema_fake.item() == pytest.approx(ema_fake, rel=1e-5)
    real2, fake2 = torch.tensor([0.3, -0.2, 1.0, 0.0]), torch.tensor([0.5, -1.0])
    expected = (sum(max(r - ema_fake, 0.0) ** 2 for r in real2.tolist()) / 4
                + sum(max(ema_real - f, 0.0) ** 2 for f in fake2.tolist()) / 2)
    assert lecam.penalty(real2, fake2).item() == pytest.approx(expected, rel=1e-5)


def test_lecam_ema_math_and_checkpoint():
    lecam = losses.LeCam(decay=0.9)
    means = [(1.0, -1.0), (3.0, 0.5), (-2.0, 4.0)]
    for r, f in means:
        lecam.update(torch.full((2, 1, 3, 3), r), torch.full((5,), f))
    # ema_n = sum_i (1 - d) d^(n - 1 - i) m_i, starting from 0
    exp_r = sum(0.1 * 0.9 ** (2 - i) * m[0] for i, m in enumerate(means))
    exp_f = sum(0.1 * 0.9 ** (2 - i) * m[1] for i, m in enumerate(means))
    assert lecam.ema_real.item() == pytest.approx(exp_r, rel=1e-6)
    assert lecam.ema_fake.item() == pytest.approx(exp_f, rel=1e-6)
    other = losses.LeCam(decay=0.9)
    other.load_state_dict(lecam.state_dict())
    assert other.ema_real.item() == lecam.ema_real.item() and other.ema_fake.item() == lecam.ema_fake.item()


def test_adaptive_weight_closed_form():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 2.0])
    weight = losses.adaptive_weight((a * w).sum(), (b * w).sum(), w)        # grads a and b: 5 / (2 + 1e-4)
    assert weight.item() == pytest.approx(5.0 / (2.0 + 1e-4), rel=1e-6)
    assert not weight.requires_grad
    weight = losses.adaptive_weight((a * w).sum(), (0.0 * w).sum(), w)      # 5 / 1e-4 = 5e4 -> clamped
    assert weight.item() == pytest.approx(1e4)


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 teacher
# ----------------------------------------------------------------------------------------------------------------


def test_dinov2_full_layout_loads_strictly():
    model = losses.DINOv2()
    expected = dinov2_expected_shapes()
    assert len(expected) == 175
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    sd = {k: torch.zeros(s) for k, s in expected.items()}
    sd["blocks.11.ls2.gamma"] = torch.full((768,), 0.5)
    losses.load_dinov2(model, sd)
    assert torch.equal(model.blocks[11].ls2.gamma, sd["blocks.11.ls2.gamma"])
    assert torch.equal(model.pos_embed, sd["pos_embed"])


def test_dinov2_load_errors_and_paths(tmp_path):
    model = losses.DINOv2(**SMALL)
    sd = small_dinov2_state_dict()
    torch.save(sd, tmp_path / "small.pth")
    losses.load_dinov2(model, str(tmp_path / "small.pth"))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    bad = dict(sd)
    del bad["blocks.1.attn.qkv.bias"]
    bad["register_tokens"] = torch.zeros(1, 4, 32)
    with pytest.raises(ValueError, match="missing keys blocks.1.attn.qkv.bias"):
        losses.load_dinov2(model, bad)
    with pytest.raises(ValueError, match="unexpected keys register_tokens"):
        losses.load_dinov2(model, bad)
    with pytest.raises(FileNotFoundError):
        losses.load_dinov2(model, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="no weights"):
        losses.load_dinov2(model, None)


def test_dinov2_position_embedding_interpolation():
    model = losses.DINOv2(**SMALL)
    losses.load_dinov2(model, small_dinov2_state_dict())
    assert torch.equal(model.interpolate_pos_encoding(37, 37), model.pos_embed)   # identity at the native grid
    pos = model.interpolate_pos_encoding(16, 16)                                  # 224 px
    assert pos.shape == (1, 257, 32)
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])                          # the CLS entry is untouched
    assert model.interpolate_pos_encoding(16, 20).shape == (1, 1 + 320, 32)
    # DINOv2's convention: bicubic with scale factors (16 + 0.1) / 37, which is not interpolate(size=(16, 16))
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)    # (1, D, 37, 37)
    ref = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], ref.flatten(2).transpose(1, 2))       # (1, 256, D)
    by_size = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False)
    assert not torch.allclose(pos[:, 1:], by_size.flatten(2).transpose(1, 2))
    with torch.no_grad():                                                         # bicubic keeps constants
        model.pos_embed[:, 1:] = 0.7
    torch.testing.assert_close(model.interpolate_pos_encoding(16, 16)[:, 1:], torch.full((1, 256, 32), 0.7))


def dinov2_brute_force(x, sd, heads, patch=14):
    """A ViT-B/14 forward written out with explicit ops from the state dict (native grid: no interpolation)."""
    D = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)  # (B, D, h, w)
    t = t.flatten(2).transpose(1, 2)                                                           # (B, h*w, D)
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], dim=1) + sd["pos_embed"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = F.layer_norm(t, (D,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        outs = []
        for j in range(heads):
            sl = slice(j * D // heads, (j + 1) * D // heads)
            att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(D // heads), dim=-1)
            outs.append(att @ v[..., sl])
        a = torch.cat(outs, dim=-1) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        t = t + sd[p + "ls1.gamma"] * a
        h = F.layer_norm(t, (D,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        t = t + sd[p + "ls2.gamma"] * (h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"])
        i += 1
    return F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 0]


def test_dinov2_forward_matches_brute_force_and_shapes():
    model = losses.DINOv2(**SMALL).eval()
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    sd = small_dinov2_state_dict()
    losses.load_dinov2(model, sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 518, 518, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dinov2_brute_force(x, sd, heads=4), rtol=1e-4, atol=1e-4)
        out = model(losses.dinov2_preprocess(images(B=2, size=256)))
    assert out.shape == (2, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.randn(1, 3, 225, 224))


def test_dinov2_preprocess():
    x = torch.full((2, 3, 256, 256), 0.5)                                         # 0.75 in [0, 1]
    out = losses.dinov2_preprocess(x)
    assert out.shape == (2, 3, 224, 224)
    mean, std = torch.tensor(losses.IMAGENET_MEAN), torch.tensor(losses.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 100, 100], (0.75 - mean) / std)
    assert losses.dinov2_preprocess(images(B=1, size=300)).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        losses.dinov2_preprocess(x, size=225)


# ----------------------------------------------------------------------------------------------------------------
# Global alignment (Eq. 10)
# ----------------------------------------------------------------------------------------------------------------


def test_alignment_ce_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    # small scales so that neither softmax is one-hot and both temperatures matter
    s, t = 0.2 * torch.randn(3, 16, generator=g), 0.05 * torch.randn(3, 16, generator=g)
    expected = 0.0
    for b in range(3):
        zt = [math.exp(v / 0.04) for v in t[b].tolist()]
        zs = [v / 0.1 for v in s[b].tolist()]
        lse = math.log(sum(math.exp(v) for v in zs))
        expected += -sum(p / sum(zt) * (v - lse) for p, v in zip(zt, zs)) / 3
    assert losses.alignment_loss_ce(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert losses.alignment_loss_ce(s, t, teacher_temp=0.1).item() != pytest.approx(expected, rel=1e-3)


def test_normalize_channels_eps():
    x = torch.tensor([3e-10, 4e-10]).view(1, 2, 1, 1)                             # norm 5e-10, eps 1e-10
    torch.testing.assert_close(losses.normalize_channels(x).flatten(), torch.tensor([0.5, 4e-10 / 6e-10]))


def test_alignment_kl_and_gradients():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 768, generator=g), torch.randn(4, 768, generator=g)
    assert abs(losses.alignment_loss_kl(t.clone(), t).item()) < 1e-6
    kl = losses.alignment_loss_kl(s, t)
    assert kl.item() > 0
    p, q = torch.softmax(t / 4, -1), torch.softmax(s / 4, -1)                    # brute-force KL(p || q) * 16
    assert kl.item() == pytest.approx((16 * (p * (p.log() - q.log())).sum(-1).mean()).item(), rel=1e-4)
    s.requires_grad_(True)
    t.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.alignment_loss_ce(s, t) + losses.alignment_loss_kl(s, t)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and t.grad is None                                # the teacher gets no gradient
    with pytest.raises(ValueError, match="student and teacher"):
        losses.alignment_loss_ce(s[:, :10], t)


def test_under_bf16_autocast():
    D = losses.NLayerDiscriminator()
    teacher = losses.DINOv2(**SMALL).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = D(images(B=2, size=64)).float()
        feats = teacher(losses.dinov2_preprocess(images(B=2, size=64), size=56)).float()
        lecam = losses.LeCam()
        lecam.update(logits, -logits)
        terms = [losses.hinge_d_loss(logits, -logits), lecam.penalty(logits, -logits)]
    assert feats.shape == (2, 32) and torch.isfinite(feats).all()
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms)
    assert lecam.ema_real.dtype == torch.float32
