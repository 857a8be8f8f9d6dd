"""Stage-1 loss building blocks of MergeVQ (paper Sec. 3.1 and Eq. (10), Table A1).

  - LPIPS-VGG (v0.1): the perceptual loss and metric, VGG16 features + the learned 1x1 "lin" layers
    (Zhang et al. 2018). Loads torchvision's `vgg16-397923af.pth` and LPIPS' `v0.1/vgg.pth` with strict key checks.
  - NLayerDiscriminator: taming-transformers' PatchGAN (ndf 64, 3 layers, BatchNorm; 2.77M parameters).
  - GAN losses: the hinge discriminator loss, hinge / non-saturating generator losses, the LeCam regulariser with
    EMA logit anchors, and taming's adaptive generator weight.
  - DINOv2 ViT-B/14: the frozen teacher of the global alignment (Eq. (10)); its state dict matches
    `dinov2_vitb14_pretrain.pth` key for key.
  - The global alignment losses: the paper's DINO-style cross-entropy (Eq. (10)) and the authors' release's
    temperature-scaled KL.
  - The stage-1 objective: `generator_loss` (the tokenizer's named terms and their weighted sum) and
    `discriminator_loss` (hinge + LeCam), the weights read from the training configuration in one place. MergeTok
    (the fourth variant) adds its own terms through generator_loss's one hook, `extra` (mergetok.MergeTokObjective).

No pretrained weight can be downloaded in a sandbox: every network here builds with random weights, says so loudly,
and loads the published files (local path, state dict, or "download" from the official URL) with strict checks.

    python losses.py         # build every piece with random weights and print a breakdown on random images
"""
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import all_reduce_mean, all_reduce_sum_differentiable, load_strict, resolve_weights
from vit import Block, PatchEmbed

# ----------------------------------------------------------------------------------------------------------------
# Official weight files
# ----------------------------------------------------------------------------------------------------------------

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"            # torchvision ImageNet VGG16
# LPIPS v0.1 linear layers (richzhang/PerceptualSimilarity; the same file is also served from
# https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth)
LPIPS_VGG_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
DINOV2_VITB14_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _warn_loudly(message):
    """A warning that cannot be missed: through `warnings` (tests, log filters) and on stdout."""
    warnings.warn(message, stacklevel=3)
    print(f"WARNING: {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# LPIPS-VGG (v0.1)
# ----------------------------------------------------------------------------------------------------------------

# torchvision's VGG16 ("D"): numbers are conv widths (3x3 conv + ReLU), "M" a 2x2 max-pool. Laid out as a flat
# nn.Sequential this puts the convs at indices 0,2,5,7,10,12,14,17,19,21,24,26,28 (keys features.{i}.weight).
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG16_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]   # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = [64, 128, 256, 512, 512]
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` (31 layers), returning the five LPIPS taps relu1_2 .. relu5_3."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        for m in self.features:                       # torchvision's init (only matters without weights)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        taps = []
        for start, stop in VGG16_SLICES:
            for i in range(start, stop):
                x = self.features[i](x)
            taps.append(x)                            # (B, C_k, H / 2^k, W / 2^k)
        return taps


class NetLinLayer(nn.Module):
    """LPIPS' 1x1 conv from C_k channels to one, no bias: key `model.1.weight` of shape (1, C_k, 1, 1).

    Position 0 holds a Dropout in the official code. It has no parameters and the metric is always used with
    eval semantics, so it is an Identity here: the distance is deterministic in train mode too.
    """

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, stride=1, padding=0,
                                                            bias=False))
        # without the published weights: non-negative (as the trained ones), mean over channels at init
        nn.init.uniform_(self.model[1].weight, 0.0, 2.0 / channels)

    def forward(self, x):
        return self.model(x)


class LPIPSLinears(nn.Module):
    """The five lin layers; its state dict is exactly the published `v0.1/vgg.pth` (lin0 .. lin4)."""

    def __init__(self):
        super().__init__()
        for k, c in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{k}", NetLinLayer(c))

    def __getitem__(self, k):
        return getattr(self, f"lin{k}")


def normalize_channels(x, eps=1e-10):
    """Unit-normalise every feature vector over channels: x / (||x||_2 + eps). (B, C, H, W) -> same."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance between images in [-1, 1]: forward(x, y) -> (B,) float32.

    d(x, y) = sum_k mean_{h,w} w_k . (f_k(x) / |f_k(x)| - f_k(y) / |f_k(y)|)^2 over the five VGG16 taps.

    vgg_weights / lin_weights: a path, a state dict, or "download" each (torchvision `vgg16-397923af.pth`,
    LPIPS `v0.1/vgg.pth`). Without both, the network is random, `self.pretrained` is False and a loud warning is
    printed: a random VGG is not a perceptual metric, so the training script drops the term.
    All parameters are frozen; gradients flow to the inputs. Always computed in float32 (autocast disabled).
    """

    def __init__(self, vgg_weights=None, lin_weights=None):
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = VGG16Features()
        self.lins = LPIPSLinears()
        if vgg_weights is not None:
            sd = resolve_weights(vgg_weights, VGG16_URL, "LPIPS VGG16 weights", hash_prefix="397923af")
            # torchvision's file also holds the classifier: keep features.* only, and check those strictly
            sd = {k: v for k, v in sd.items() if k.startswith("features.")}
            load_strict(self.net, sd, "LPIPS VGG16 features (torchvision vgg16-397923af.pth)")
        if lin_weights is not None:
            sd = resolve_weights(lin_weights, LPIPS_VGG_LIN_URL, "LPIPS lin layers",
                                     file_name="lpips_v0.1_vgg.pth")
            load_strict(self.lins, sd, "LPIPS lin layers (v0.1/vgg.pth)")
        self.pretrained = vgg_weights is not None and lin_weights is not None
        if not self.pretrained:
            _warn_loudly("LPIPS is built WITHOUT pretrained weights (VGG16 given: "
                         f"{vgg_weights is not None}, lin layers given: {lin_weights is not None}): it is a random "
                         "network, NOT a perceptual metric. Pass vgg_weights= and lin_weights= (paths or 'download').")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """A fixed metric: always in eval mode, whatever the caller asks."""
        return super().train(False)

    def forward(self, x, y):
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS expects two (B, 3, H, W) images of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            B = x.shape[0]
            xy = torch.cat([x.float(), y.float()], dim=0)           # (2B, 3, H, W): one VGG pass for both
            xy = (xy - self.shift) / self.scale
            d = x.new_zeros(B, dtype=torch.float32)
            for k, f in enumerate(self.net(xy)):
                f = normalize_channels(f)
                diff = (f[:B] - f[B:]) ** 2                        # (B, C_k, H_k, W_k)
                d = d + self.lins[k](diff).mean(dim=(1, 2, 3))     # 1x1 conv -> (B, 1, H_k, W_k) -> (B,)
        return d


# ----------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator (taming-transformers' NLayerDiscriminator)
# ----------------------------------------------------------------------------------------------------------------


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode batch statistics cover the whole global batch under torchrun, so the
    discriminator computes what one process with the whole batch computes (torch's SyncBatchNorm is GPU-only).
    Same parameters, buffers and key names as nn.BatchNorm2d; one process: exactly nn.BatchNorm2d."""

    def forward(self, x):
        if not self.training or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        sums = torch.stack([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3))])   # (2, C)
        sums = all_reduce_sum_differentiable(sums)                                   # over every rank's images
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        dist.all_reduce(count)
        mean = sums[0] / count                                                       # (C,)
        var = (sums[1] / count - mean * mean).clamp_min(0.0)                         # biased, as BatchNorm
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            unbiased = var * count / (count - 1).clamp_min(1.0)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming): (B, input_nc, H, W) -> (B, 1, H', W') logits; 256 -> 30 with n_layers = 3.

    conv k4 s2 + LeakyReLU(0.2); (n_layers - 1) x [conv k4 s2, BN, LReLU]; conv k4 s1, BN, LReLU; conv k4 s1 -> 1.
    Widths ndf * min(2^n, 8). Key names follow taming (`main.{i}.*`).
    """

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        self.input_nc = input_nc
        layers = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=False),
                       SyncBatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():                      # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"the discriminator expects (B, {self.input_nc}, H, W) images, got {tuple(x.shape)}")
        return self.main(x)


# ----------------------------------------------------------------------------------------------------------------
# GAN losses, LeCam, adaptive weight
# ----------------------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real, logits_fake):
    """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake):
    """-mean D(x_hat)."""
    return -logits_fake.float().mean()


def non_saturating_g_loss(logits_fake):
    """The authors' release (Open-MAGVIT2's non-saturating generator loss): average each image's PatchGAN logits
    first, then mean softplus(-mean D(x_hat)) = -log sigmoid(.) over the batch. (B, 1, H', W') -> scalar."""
    per_image = logits_fake.float().flatten(1).mean(dim=1)                     # (B, 1, H', W') -> (B,)
    return F.softplus(-per_image).mean()


class LeCam(nn.Module):
    """LeCam regularisation (Tseng et al. 2021) of the discriminator, weight 0.01 in MergeVQ.

    Keeps EMAs (decay 0.999) of the mean real and fake logits as buffers (saved with the state dict) and penalises
    logits that move past the other side's anchor:
        R = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_hat))^2).
    Under torchrun `update` averages the batch means over ranks, so every rank keeps the same anchors.
    """

    def __init__(self, decay=0.999, init=0.0):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.tensor(float(init)))
        self.register_buffer("ema_fake", torch.tensor(float(init)))

    @torch.no_grad()
    def update(self, logits_real, logits_fake):
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])  # (2,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means = means / dist.get_world_size()
        means = means.to(self.ema_real)
        self.ema_real.mul_(self.decay).add_((1.0 - self.decay) * means[0])
        self.ema_fake.mul_(self.decay).add_((1.0 - self.decay) * means[1])

    def penalty(self, logits_real, logits_fake):
        return (F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - logits_fake.float()).pow(2).mean())


def adaptive_weight(nll_loss, g_loss, last_layer, eps=1e-4, max_weight=1e4):
    """taming's adaptive GAN weight: ||grad_w nll|| / (||grad_w g|| + 1e-4), clamped to [0, 1e4], detached.

    last_layer: the decoder's last weight tensor w. Both graphs are retained for the real backward. Under torchrun
    the two gradients are averaged over the ranks before their norms are taken: they are then the gradients of the
    global batch's loss, and the weight is the one a single process with the whole batch computes.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0].float()
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].float()
    grads = all_reduce_mean(torch.stack([nll_grad, g_grad]))                   # (2, *w.shape)
    w = torch.linalg.vector_norm(grads[0]) / (torch.linalg.vector_norm(grads[1]) + eps)
    return torch.clamp(w, 0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------------------------
# DINOv2 ViT-B/14 teacher (facebookresearch/dinov2, key-compatible with dinov2_vitb14_pretrain.pth)
# ----------------------------------------------------------------------------------------------------------------


class DINOv2(nn.Module):
    """DINOv2 ViT-B/14 (defaults): width 768, depth 12, 12 heads, MLP 3072, LayerNorm eps 1e-6, LayerScale.

    forward(x): x (B, 3, H, W) already normalised with IMAGENET_MEAN / IMAGENET_STD, H and W multiples of 14
    -> the final-norm CLS feature (B, D) (DINOv2's `x_norm_clstoken`). Builds with random weights: load the
    official ones with `load_dinov2`. `mask_token` is unused here; it exists so that the published file loads.
    """

    def __init__(self, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=14, img_size=518):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.grid = img_size // patch_size                                  # 37 for the published models
        self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))  # (1, 1370, 768)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        # DINOv2's init (only matters without the published weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, h, w):
        """Position embeddings for an (h, w) patch grid -> (1, 1 + h*w, D), as DINOv2 does it.

        At the native square grid (37 x 37) the stored table is returned unchanged. Otherwise the patch part is
        resized bicubically (no antialias) with scale factors ((h + 0.1) / 37, (w + 0.1) / 37): DINOv2's
        `interpolate_offset = 0.1`, a historical kludge against floor() rounding (dino issue #8). Because
        PyTorch uses the given scale factor (not the output size) to map coordinates, this is not the same as
        interpolate(size=(h, w)); we follow DINOv2 so the teacher sees exactly what it saw in its evaluations.
        """
        M = self.grid
        if h == M and w == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]                                 # (1, 1, D), (1, M*M, D)
        patch_pos = patch_pos.reshape(1, M, M, -1).permute(0, 3, 1, 2)              # (1, D, M, M)
        patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic",
                                  align_corners=False, antialias=False)              # (1, D, h, w)
        if patch_pos.shape[-2:] != (h, w):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, "
                               f"expected {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)             # (1, h*w, D)
        return torch.cat([cls_pos, patch_pos], dim=1).to(self.pos_embed.dtype)      # (1, 1 + h*w, D)

    def forward_features(self, x):
        """x as in forward -> all final-norm tokens (B, 1 + h*w, D): CLS first, then the patches row by row."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DINOv2 expects (B, 3, H, W) images, got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"DINOv2 needs H and W to be multiples of {P}, got {H} x {W} (use dinov2_preprocess)")
        tokens = self.patch_embed(x)                                                # (B, h*w, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                             # (B, 1, D)
        tokens = torch.cat([cls, tokens], dim=1)                                    # (B, 1 + h*w, D)
        tokens = tokens + self.interpolate_pos_encoding(H // P, W // P)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward(self, x):
        return self.forward_features(x)[:, 0]                                       # (B, D)

    def patch_grid(self, x, grid):
        """DINOv2's patch features resampled to a tokenizer's grid x grid tokens (area average, or bilinear when
        the grid is finer): x as in forward -> (B, grid * grid, D), row by row (MergeTok's --sem-target dinov2)."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = self.forward_features(x)[:, 1:]                                   # (B, h*w, D)
        patches = patches.transpose(1, 2).reshape(x.shape[0], -1, h, w)             # (B, D, h, w)
        if grid <= min(h, w):
            patches = F.adaptive_avg_pool2d(patches, grid)                          # (B, D, grid, grid)
        else:
            patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
        return patches.flatten(2).transpose(1, 2)                                   # (B, grid * grid, D)


def load_dinov2(model, weights):
    """Load DINOv2 weights (a path, a state dict, or "download") into `model` with strict key/shape checks."""
    if weights is None:
        raise ValueError("load_dinov2: no weights given. Pass the path of dinov2_vitb14_pretrain.pth or 'download' "
                         f"({DINOV2_VITB14_URL}).")
    sd = resolve_weights(weights, DINOV2_VITB14_URL, "DINOv2 ViT-B/14 weights")
    load_strict(model, sd, "DINOv2 ViT-B/14 (dinov2_vitb14_pretrain.pth)")
    return model


def dinov2_preprocess(x, size=224):
    """Images in [-1, 1] (B, 3, H, W) -> the teacher's input: resize the shorter side to `size` (bicubic,
    antialiased), centre crop size x size, map to [0, 1], normalise with the ImageNet mean / std."""
    if size % 14:
        raise ValueError(f"dinov2_preprocess: size must be a multiple of the patch size 14, got {size}")
    x = (x.float() + 1.0) / 2.0
    H, W = x.shape[-2:]
    if (H, W) != (size, size):
        s = size / min(H, W)
        h, w = max(size, round(H * s)), max(size, round(W * s))
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (h - size) // 2, (w - size) // 2
        x = x[:, :, top:top + size, left:left + size]                              # (B, 3, size, size)
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Global alignment losses (Eq. 10)
# ----------------------------------------------------------------------------------------------------------------


def _check_pair(student, teacher, name):
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"{name}: student and teacher must both be (B, D), got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")


def alignment_loss_ce(student, teacher, student_temp=0.1, teacher_temp=0.04):
    """The paper's global alignment (Eq. (10)): DINO-style cross-entropy H(P_t, P_s), averaged over the batch.

    P_t = softmax(teacher / teacher_temp) (no gradient), log P_s = log_softmax(student / student_temp), over the
    768 feature dimensions. The paper does not give the temperatures; these are DINO's defaults (0.1 student,
    0.04 teacher). DINO's teacher centering is not used (the DINOv2 teacher is frozen). Computed in float32.
    """
    _check_pair(student, teacher, "alignment_loss_ce")
    with torch.autocast(device_type=student.device.type, enabled=False):
        p_t = F.softmax(teacher.detach().float() / teacher_temp, dim=-1)            # (B, D)
        log_p_s = F.log_softmax(student.float() / student_temp, dim=-1)             # (B, D)
        return -(p_t * log_p_s).sum(dim=-1).mean()                                  # Eq. (10)


def alignment_loss_kl(student, teacher, tau=4.0):
    """The authors' release: KL(softmax(t / tau) || softmax(s / tau)) * tau^2, summed over features, averaged over
    the batch (Hinton-style distillation on the raw 768-d CLS features). Computed in float32."""
    _check_pair(student, teacher, "alignment_loss_kl")
    with torch.autocast(device_type=student.device.type, enabled=False):
        log_p_t = F.log_softmax(teacher.detach().float() / tau, dim=-1)             # (B, D)
        log_p_s = F.log_softmax(student.float() / tau, dim=-1)                      # (B, D)
        kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        return kl * tau * tau


# ----------------------------------------------------------------------------------------------------------------
# The stage-1 objective (Sec. 3, Table A1)
# ----------------------------------------------------------------------------------------------------------------
# `cfg` is the training configuration (train_stage1.TrainConfig): the one place where every weight is set.
#   w_recon, w_perceptual, w_gan, w_lecam, w_commit, w_entropy, w_recovery, w_align   (Table A1)
#   recon_loss ("l2" | "l1"), gan_loss ("hinge" | "non-saturating"), adaptive_gan_weight, align_loss ("ce" | "kl")


def generator_loss(x, out, cfg, lpips=None, disc=None, align_pair=None, last_layer=None, extra=None):
    """The tokenizer's loss of one step. Returns (total, terms): the weighted sum and the unweighted terms by name.

      total = w_recon L_rec + w_perceptual LPIPS                                           (reconstruction, "nll")
            + w_commit ||z - sg(q)||^2                                 (LFQ, Eq. (4); commitment: Appendix A.1)
            + w_entropy (E[H(p(c|z))] - H(E[p(c|z)]))      (MAGVIT-v2's entropy penalty, Yu et al. 2024, Sec. 3.1)
            + w_recovery CE(recovery logits, source)                                       (Eq. (9))
            + w_align H(P_teacher, P_student)                                              (Eq. (10))
            + lambda w_gan L_G                 lambda = 1, or taming's adaptive weight (then logged as gan_lambda)
    x: images; out: the tokenizer's TokenizerOutput; lpips: the perceptual metric or None (term dropped); disc: the
    discriminator for a step with the GAN on, else None; align_pair: (student, teacher) CLS features or None;
    last_layer: the decoder weight the adaptive weight differentiates against.
    extra: None for MergeVQ; for MergeTok its mergetok.MergeTokObjective, called once after the terms above: its
    named terms join `terms`, its reconstruction loss the "nll", its weighted sum the total, and L_G judges its
    second reconstruction beside out.recon.
    """
    recon, lfq = out.recon.float(), out.enc.lfq
    terms = {"recon": F.mse_loss(recon, x) if cfg.recon_loss == "l2" else F.l1_loss(recon, x)}
    if lpips is not None:
        terms["perceptual"] = lpips(recon, x).mean()
    terms["commit"] = lfq.commitment
    terms["entropy"] = lfq.per_sample_entropy - lfq.codebook_entropy                   # MAGVIT-v2's penalty
    terms["recovery"] = out.recovery_loss                                               # Eq. (9)
    if align_pair is not None:
        align = alignment_loss_ce if cfg.align_loss == "ce" else alignment_loss_kl
        terms["align"] = align(*align_pair)                                             # Eq. (10)
    nll = cfg.w_recon * terms["recon"] + cfg.w_perceptual * terms.get("perceptual", 0.0)
    total = (nll + cfg.w_commit * terms["commit"] + cfg.w_entropy * terms["entropy"]
             + cfg.w_recovery * terms["recovery"] + cfg.w_align * terms.get("align", 0.0))
    fakes = recon
    if extra is not None:                                           # MergeTok's own terms (mergetok.py)
        extra_terms, extra_nll, extra_total, extra_recon = extra(x, out, lpips)
        terms.update(extra_terms)
        nll, total = nll + extra_nll, total + extra_total
        fakes = torch.cat([recon, extra_recon])                                        # (2B, 3, H, W)
    if disc is not None:
        logits_fake = disc(fakes)
        terms["gan_g"] = hinge_g_loss(logits_fake) if cfg.gan_loss == "hinge" else non_saturating_g_loss(logits_fake)
        lam = 1.0
        if cfg.adaptive_gan_weight:
            lam = terms["gan_lambda"] = adaptive_weight(nll, terms["gan_g"], last_layer)
        total = total + lam * cfg.w_gan * terms["gan_g"]
    return total, terms


def discriminator_loss(disc, x, recon, lecam, cfg):
    """The discriminator's loss of one step: hinge (paper and release) + w_lecam LeCam. recon must be detached, so
    nothing of it reaches the tokenizer. Returns (total, terms); call lecam.update after the step."""
    logits_real, logits_fake = disc(x).float(), disc(recon).float()
    terms = {"disc": hinge_d_loss(logits_real, logits_fake), "lecam": lecam.penalty(logits_real, logits_fake)}
    return terms["disc"] + cfg.w_lecam * terms["lecam"], terms, (logits_real.detach(), logits_fake.detach())


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    y = (x + 0.2 * torch.randn_like(x)).clamp(-1, 1)
    lpips = LPIPS()
    print(f"LPIPS (random weights, pretrained={lpips.pretrained}): {lpips(x, y).tolist()}")
    disc = NLayerDiscriminator()
    n = sum(p.numel() for p in disc.parameters())
    lr, lf = disc(x), disc(y)
    print(f"PatchGAN: {n / 1e6:.3f}M parameters, logits {tuple(lr.shape)}; hinge D {hinge_d_loss(lr, lf).item():.4f}"
          f", hinge G {hinge_g_loss(lf).item():.4f}")
    lecam = LeCam()
    lecam.update(lr, lf)
    print(f"LeCam: ema_real {lecam.ema_real.item():.5f} ema_fake {lecam.ema_fake.item():.5f} "
          f"penalty {lecam.penalty(lr, lf).item():.4f}")
    teacher = DINOv2(embed_dim=96, depth=2, num_heads=4)   # a small random stand-in; the real one is DINOv2()
    t = teacher(dinov2_preprocess(x, size=56))
    s = torch.randn_like(t)
    print(f"DINOv2 (small, random) CLS {tuple(t.shape)}; align CE {alignment_loss_ce(s, t).item():.4f}, "
          f"KL {alignment_loss_kl(s, t).item():.4f}")
