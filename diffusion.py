"""A class-conditional DiT trained as a rectified flow: the diffusion generator for MergeTok's continuous latents.

The MergeTok abstract claims its tokens are "compatible with both autoregressive and diffusion generators". The
autoregressive side is gpt.py; this file is the diffusion side, the smallest faithful latent diffusion model:

  the network   DiT (Peebles & Xie 2023, facebookresearch/DiT models.py): the latent grid (B, C, g, g) cut into
                p x p patches by a stride-p convolution (Sec. 3.2 "Patchify", Fig. 4), fixed 2D sin-cos positions,
                transformer blocks conditioned on c = t_emb + y_emb through adaLN-Zero (Sec. 3.2, Fig. 3), a final
                adaLN layer, and the tokens put back on the grid. Sizes as DiT's Table 1 (DIT_PRESETS).
  the objective rectified flow / flow matching (Liu et al. 2023, Sec. 2.1 Eq. (1); Lipman et al. 2023, Eq. (23)
                with sigma_min = 0; written with Esser et al. 2024's time direction, Sec. 3): a straight path from
                data x_0 (t = 0) to noise e (t = 1), x_t = (1 - t) x_0 + t e, and the network regresses its velocity
                v = dx_t/dt = e - x_0. Time t ~ logit-normal(0, 1) (Esser et al. 2024, Sec. 3.1; rf/lognorm(0.00, 1.00),
                the variant their Sec. 5.1 study ranks first), or uniform.
  the sampler   the probability-flow ODE dx/dt = v_theta(x, t) integrated by Euler from t = 1 (pure noise) to
                t = 0 in S steps, with classifier-free guidance v = v_u + s (v_c - v_u) (Ho & Salimans 2022, Eq. (6)
                with w = s - 1; DiT Sec. 3.1) on the batch [cond; null].
  EMA           common.update_ema / common.ema_decay (DiT keeps an EMA of the weights and samples from it).

Parts: presets / embeddings (2D positions, time) / the DiT (adaLN-Zero block, final layer, patchify) / the
flow-matching objective / the sampler / demo.

What differs from DiT's release: the network predicts a velocity, not noise and a variance (learn_sigma: DiT's
final layer has 2C output channels; here C); the time t in [0, 1] is scaled by 1000 before DiT's sinusoidal
embedding (DiT embeds integer steps 0 .. 999); the MLP's GELU is exact (vit.Mlp) where DiT uses the tanh
approximation (the same parameters); the position table is a buffer, not a frozen nn.Parameter (so it is not
counted as a parameter); guidance applies to all C channels (DiT's sample.py guides the first 3 only).

    python diffusion.py                          # DiT-B/2's parameter count, a tiny DiT trained on Gaussian blobs
    python -m pytest tests/test_diffusion.py     # closed forms: the loss minimum, the sampler, adaLN-Zero, CFG

    from diffusion import build_dit, flow_loss, sample
    model = build_dit("tiny", input_size=16, in_channels=18, num_classes=10)
    loss = flow_loss(model, latents, labels)                 # latents (B, 18, 16, 16), labels (B,)
    x0 = sample(ema.eval(), labels, num_steps=50, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
"""
import copy
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from common import ema_decay, update_ema
from gpt import LabelEmbedder, count_parameters
from vit import Attention, Mlp, PatchEmbed

# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DiTConfig:
    input_size: int = 32              # g: the latent grid is g x g (DiT: 256 px through SD's VAE, f = 8 -> 32)
    in_channels: int = 4              # C: latent channels (SD's VAE: 4; MergeTok: vae_channels)
    patch_size: int = 2               # p: tokens are p x p patches, T = (g / p)^2
    hidden_size: int = 768            # d
    depth: int = 12                   # N blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000           # the label embedding has one more row: the null class (index num_classes)
    class_dropout_prob: float = 0.1   # labels replaced by the null class in training, for guidance (DiT: 0.1)
    freq_dim: int = 256               # width of the sinusoidal time features fed to the time MLP (DiT: 256)
    time_scale: float = 1000.0        # t in [0, 1] is embedded as t * 1000, the range of DiT's integer steps


# DiT's Table 1 sizes (its models.py DiT_models), at patch 2, and a CPU toy. The defaults of DiTConfig are DiT-B/2 on
# ImageNet 256's 32 x 32 x 4 latents; build_dit's overrides set the grid, channels and classes of other data.
# tiny: MergeTok tiny's continuous latent (32 px images, f = 4 -> an 8 x 8 grid of C = 18), the 10 shape classes;
# patch 2 gives 4 x 4 = 16 tokens; 6 blocks of width 192 (the MNIST-scale DiTs' width 64 drew blobs on these
# latents: docs/mergetok.md, "Diffusion on the continuous latents").
DIT_PRESETS = {
    "tiny": dict(input_size=8, in_channels=18, patch_size=2, hidden_size=192, depth=6, num_heads=6, num_classes=10),
    "S/2": dict(hidden_size=384, depth=12, num_heads=6),
    "B/2": dict(hidden_size=768, depth=12, num_heads=12),
    "L/2": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL/2": dict(hidden_size=1152, depth=28, num_heads=16),
}


def dit_config(preset, **overrides):
    """The DiTConfig of a preset in DIT_PRESETS; overrides set fields (input_size, in_channels, num_classes, ...)."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}")
    cfg = replace(DiTConfig(**DIT_PRESETS[preset]), **overrides)
    if cfg.input_size % cfg.patch_size:
        raise ValueError(f"DiT: the latent grid {cfg.input_size} is not a multiple of the patch size {cfg.patch_size}")
    if cfg.hidden_size % cfg.num_heads or cfg.hidden_size % 4:
        raise ValueError(f"DiT: the width {cfg.hidden_size} must divide into {cfg.num_heads} heads and by 4 (the 2D "
                         f"sin-cos table gives each axis a sin and a cos half)")
    return cfg


def build_dit(preset, **overrides):
    """A DiT of a preset; see `dit_config`."""
    return DiT(dit_config(preset, **overrides))


# ----------------------------------------------------------------------------------------------------------------
# Embeddings: fixed 2D sin-cos positions, sinusoidal time features
# ----------------------------------------------------------------------------------------------------------------


def sincos_1d(pos, dim):
    """Transformer sin-cos features of positions pos (M,) -> (M, dim): [sin(pos w_k), cos(pos w_k)],
    w_k = 10000^(-k / (dim/2)), k = 0 .. dim/2 - 1 (Vaswani et al. 2017, Sec. 3.5; MAE's 1D helper)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))     # (dim/2,)
    angles = pos.double()[:, None] * omega[None]                                         # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)                                # (M, dim)


def sincos_2d(dim, grid):
    """DiT's fixed position table (from MAE's get_2d_sincos_pos_embed), (grid^2, dim) float32, raster order: token
    r * grid + c (row r, column c of the patch grid) is [sincos_1d(c) | sincos_1d(r)], the column in the first half
    of the channels, the row in the second (MAE's meshgrid puts w first)."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")          # (g, g) each
    return torch.cat([sincos_1d(c.flatten(), dim // 2),
                      sincos_1d(r.flatten(), dim // 2)], dim=1).float()                  # (g*g, dim)


def timestep_embedding(t, dim, max_period=10000):
    """GLIDE's and DiT's sinusoidal features of (fractional) times t (B,) -> (B, dim): [cos(t f_k), sin(t f_k)],
    f_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                              # (B, dim/2)
    return torch.cat([args.cos(), args.sin()], dim=-1)                                   # (B, dim)


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> t_emb (B, d): sinusoidal features of t * time_scale, then Linear - SiLU - Linear (DiT)."""

    def __init__(self, hidden_size, freq_dim=256, time_scale=1000.0):
        super().__init__()
        self.freq_dim, self.time_scale = freq_dim, time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t * self.time_scale, self.freq_dim))         # (B, d)


# ----------------------------------------------------------------------------------------------------------------
# The DiT: adaLN-Zero blocks, the final layer, patchify / unpatchify
# ----------------------------------------------------------------------------------------------------------------

# adaLN-Zero (DiT Sec. 3.2). A block's LayerNorms have no affine weights of their own; a Linear on SiLU(c) regresses,
# per sample, a shift beta, a scale gamma and a gate alpha for each of the two residual branches:
#
#     x <- x + alpha_1 * Attn(LN(x) (1 + gamma_1) + beta_1)
#     x <- x + alpha_2 * MLP (LN(x) (1 + gamma_2) + beta_2)
#
# That Linear starts at zero, so alpha = 0 and every block is the identity at initialisation; the final layer's
# modulation and output Linear start at zero too, so a fresh DiT predicts v = 0 everywhere (tests/test_diffusion.py).


def modulate(x, shift, scale):
    """x (B, T, d) * (1 + scale) + shift, scale and shift (B, d) per sample."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning on c (B, d); attention is vit.py's (fused qkv, SDPA)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        beta1, gamma1, alpha1, beta2, gamma2, alpha2 = self.adaLN_modulation(c).chunk(6, dim=1)   # 6 x (B, d)
        x = x + alpha1.unsqueeze(1) * self.attn(modulate(self.norm1(x), beta1, gamma1))
        return x + alpha2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), beta2, gamma2))


class FinalLayer(nn.Module):
    """LN modulated by c (shift, scale), then a Linear to p * p * C numbers per token; both start at zero."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)                          # 2 x (B, d)
        return self.linear(modulate(self.norm_final(x), shift, scale))                   # (B, T, p*p*C)


def patchify(x, p):
    """(B, C, H, W) -> (B, T, p*p*C), T = (H/p)(W/p) in raster order, each token's numbers in (i, j, channel) order
    for its cell (i, j) of the patch: the layout of the final layer's output, undone by `unpatchify`."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)                                            # (B, C, h, i, w, j)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)       # (B, h*w, p*p*C)


def unpatchify(x, p, C):
    """(B, T, p*p*C) -> (B, C, h p, w p) with h = w = sqrt(T): DiT's unpatchify, the inverse of `patchify`."""
    B, T, _ = x.shape
    h = math.isqrt(T)
    x = x.reshape(B, h, h, p, p, C)                                                      # (B, h, w, i, j, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, h * p)                      # (B, C, h, i, w, j) -> grid


class DiT(nn.Module):
    """DiT (Peebles & Xie 2023) predicting the rectified flow's velocity: forward(x_t (B, C, g, g), t (B,) in [0, 1],
    y (B,) labels in [0, num_classes], num_classes = the null class) -> v (B, C, g, g).

    In training mode labels are replaced by the null class with probability class_dropout_prob (the label
    embedding, gpt.LabelEmbedder), so the same network also learns the unconditional velocity for guidance.
    Key names follow DiT's (x_embedder, t_embedder, y_embedder, blocks.{i}.adaLN_modulation, final_layer).
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        self.x_embedder = PatchEmbed(p, C, d)                                            # conv of stride p
        self.t_embedder = TimestepEmbedder(d, cfg.freq_dim, cfg.time_scale)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)    # num_classes + 1 rows
        self.register_buffer("pos_embed", sincos_2d(d, cfg.input_size // p)[None])      # (1, T, d), fixed
        self.blocks = nn.ModuleList([DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, p, C)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's: Xavier-uniform Linears with zero biases (the patch conv as a Linear), N(0, 0.02) for the label
        table and the time MLP, and zero for every adaLN modulation and the final Linear (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def check_inputs(self, x, t, y):
        """One line for inputs of the wrong shape or kind (shapes only: no device sync in the training step)."""
        c = self.cfg
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, c.input_size, c.input_size):
            raise ValueError(f"DiT: x must be (B, {c.in_channels}, {c.input_size}, {c.input_size}) latents, got "
                             f"{tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"DiT: t and y must be ({x.shape[0]},), one per latent, got {tuple(t.shape)} and "
                             f"{tuple(y.shape)}")
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"DiT: y must hold integer class labels, got {y.dtype}")

    def forward(self, x, t, y):
        self.check_inputs(x, t, y)
        h = self.x_embedder(x) + self.pos_embed                                          # (B, T, d)
        c = self.t_embedder(t) + self.y_embedder(y, self.training)[:, 0]                 # (B, d): c = t_emb + y_emb
        for block in self.blocks:
            h = block(h, c)                                                              # (B, T, d)
        out = self.final_layer(h, c)                                                     # (B, T, p*p*C)
        return unpatchify(out, self.cfg.patch_size, self.cfg.in_channels)                # (B, C, g, g)


# ----------------------------------------------------------------------------------------------------------------
# The flow-matching objective
# ----------------------------------------------------------------------------------------------------------------

T_SAMPLING = ("logit_normal", "uniform")


def sample_t(B, how="logit_normal", generator=None, device=None):
    """Training times t (B,) in (0, 1): logit-normal(0, 1), t = sigmoid(n) with n ~ N(0, 1), density
    pi_ln(t) = 1 / (sqrt(2 pi) t (1 - t)) exp(-logit(t)^2 / 2) (Esser et al. 2024, Sec. 3.1: it weights the
    middle of the path, where the velocity is hardest to predict, over both ends); or uniform on [0, 1)."""
    if how == "logit_normal":
        return torch.sigmoid(torch.randn(B, generator=generator, device=device))
    if how == "uniform":
        return torch.rand(B, generator=generator, device=device)
    raise ValueError(f"unknown t sampling {how!r}; choose one of {', '.join(T_SAMPLING)}")


def flow_loss(model, x0, y, t_sampling="logit_normal", generator=None):
    """The rectified-flow loss of a batch of data x0 (B, ...) with labels y (B,): a scalar, the mean over the batch
    and every element of ||v_theta(x_t, t, y) - (e - x_0)||^2.

    model: any callable (x_t, t, y) -> v of x0's shape (the DiT, or a closed-form field in the tests). The times
    and the noise come from `generator` (None: the global RNG); label dropout is the model's own (training mode).
    """
    B = x0.shape[0]
    t = sample_t(B, t_sampling, generator, x0.device).to(x0.dtype)                      # (B,)
    e = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)    # e ~ N(0, I)
    t_ = t.view(B, *[1] * (x0.dim() - 1))                                                # (B, 1, ...) broadcasts
    x_t = (1 - t_) * x0 + t_ * e          # the straight path: Liu et al. Sec. 2.1 (X_t), Esser et al. Sec. 3 (z_t)
    v = e - x0                            # its velocity dx_t/dt: the regression target of Liu et al. Eq. (1)
    return (model(x_t, t, y) - v).float().pow(2).mean()   # Eq. (1) / Lipman et al. Eq. (23), sigma_min = 0


# ----------------------------------------------------------------------------------------------------------------
# The sampler: Euler from noise (t = 1) to data (t = 0), classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------


def guided_velocity(model, x, t, y, cfg_scale):
    """v = v_u + s (v_c - v_u) (Ho & Salimans 2022, Eq. (6), s = 1 + w; DiT Sec. 3.1): the conditional velocity
    v_c = v(x, t, y) and the unconditional v_u = v(x, t, null) from one forward of the batch [cond; null] (2B).
    At s = 1 this is v_c: the conditional model alone, without the null half."""
    if cfg_scale == 1.0:
        return model(x, t, y)
    null = torch.full_like(y, model.cfg.num_classes)
    v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))              # (2B, C, g, g)
    v_c, v_u = v.chunk(2)                                                                # 2 x (B, C, g, g)
    return v_u + cfg_scale * (v_c - v_u)


def euler_sample(velocity, noise, num_steps):
    """Integrate dx/dt = velocity(x, t) from t = 1 (x = noise) down to t = 0 in num_steps equal Euler steps:
    x_{t - dt} = x_t - dt * v(x_t, t). velocity: (x (B, ...), t (B,)) -> (B, ...). Returns the t = 0 end, x_0."""
    x = noise
    ts = torch.linspace(1.0, 0.0, num_steps + 1, device=noise.device)                   # t_0 = 1 > ... > t_S = 0
    for k in range(num_steps):
        dt = ts[k] - ts[k + 1]
        t = ts[k].expand(x.shape[0]).to(x.dtype)                                         # (B,)
        x = x - dt * velocity(x, t)                                                      # x_{t - dt} = x_t - dt v
    return x


@torch.no_grad()
def sample(model, y, num_steps=50, cfg_scale=1.0, generator=None):
    """Latents (B, C, g, g) of the DiT `model` for the class labels y (B,): noise e ~ N(0, I) from `generator` (on
    y's device), then `euler_sample` of the guided velocity. The model runs in eval mode (no label dropout)."""
    c = model.cfg
    if y.dim() != 1 or y.dtype not in (torch.int32, torch.int64) or not y.numel():
        raise ValueError(f"sample: y must be a non-empty 1D tensor of class labels, got {y.dtype} {tuple(y.shape)}")
    if int(y.min()) < 0 or int(y.max()) >= c.num_classes:
        raise ValueError(f"sample: labels must lie in [0, {c.num_classes}), got {int(y.min())} .. {int(y.max())}")
    if num_steps < 1 or cfg_scale < 0:
        raise ValueError(f"sample: num_steps must be >= 1 and cfg_scale >= 0, got {num_steps} and {cfg_scale}")
    was_training = model.training
    model.eval()
    try:
        noise = torch.randn((y.shape[0], c.in_channels, c.input_size, c.input_size), generator=generator,
                            device=y.device)                                             # x_1 = e
        return euler_sample(lambda x, t: guided_velocity(model, x, t, y, cfg_scale), noise, num_steps)
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------
# Demo: DiT-B/2's size, a tiny DiT trained on class-dependent Gaussian blobs
# ----------------------------------------------------------------------------------------------------------------


def blobs(labels, grid=8, generator=None):
    """Toy latents (B, 1, grid, grid): a Gaussian bump (width 1 cell) centred in the quadrant of its class 0 .. 3
    (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right), jittered by up to a cell, on a -1 background."""
    B = labels.shape[0]
    q = grid / 4
    centre = torch.stack([q + 2 * q * (labels // 2), q + 2 * q * (labels % 2)], dim=1).float()   # (B, 2) (row, col)
    centre = centre + torch.rand(B, 2, generator=generator) * 2 - 1
    rr, cc = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")       # (g, g)
    d2 = (rr[None] - centre[:, :1, None]) ** 2 + (cc[None] - centre[:, 1:, None]) ** 2  # (B, g, g)
    return (2 * torch.exp(-d2 / 2) - 1)[:, None]                                          # (B, 1, g, g)


def peak_quadrant(x):
    """The quadrant (0 .. 3, as in `blobs`) of each latent's largest cell, (B,)."""
    B, _, g, _ = x.shape
    idx = x.flatten(1).argmax(dim=1)                                                      # (B,)
    return (idx // g >= g // 2).long() * 2 + (idx % g >= g // 2).long()


if __name__ == "__main__":
    torch.set_num_threads(1)                       # tiny ops: a second thread costs more than it saves
    for name in ("B/2", "XL/2"):
        with torch.device("meta"):
            big = build_dit(name)
        c, n = big.cfg, count_parameters(big)
        extra = (c.input_size // c.patch_size) ** 2 * c.hidden_size + c.patch_size ** 2 * c.in_channels * (
            c.hidden_size + 1)                     # DiT's frozen position Parameter and its learn_sigma outputs
        print(f"DiT-{name} on 32 x 32 x 4 latents, 1000 classes: {n:,} parameters ({n + extra:,} as DiT's release "
              f"counts, with its position table and variance outputs)")
    torch.manual_seed(0)
    model = build_dit("tiny", input_size=8, in_channels=1, num_classes=4, hidden_size=64, num_heads=4,
                      depth=4)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    steps = 400
    for step in range(steps):
        y = torch.randint(0, 4, (64,), generator=g)
        loss = flow_loss(model, blobs(y, generator=g), y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model, ema_decay(step, 0.999))
        if step % 50 == 0 or step == steps - 1:
            print(f"tiny DiT step {step:3d}  flow loss {loss.item():.4f}")
    y = torch.arange(4).repeat_interleave(32)
    for s in (0.0, 1.0, 2.0):
        x = sample(ema, y, num_steps=30, cfg_scale=s, generator=torch.Generator().manual_seed(1))
        hit = (peak_quadrant(x) == y).float().mean().item()
        print(f"EMA samples, cfg {s}: peak in the class's quadrant {hit:.0%} (chance 25%; cfg 0 = the null class)")
