"""The MergeVQ tokenizer: CNN + ToMe-attention encoder, LFQ, source recovery, decoder (paper Sec. 3, Table A1).

    image (B, 3, H, W)
      -> encoder: CNN (or a ViT patch embedding for R) -> N tokens + CLS -> L ToMe attention blocks that merge
         N tokens into K (proportional attention, keys as the matching metric, source tracking)   Eq. (7), (14)
      -> projection to d = 18 channels -> lookup-free quantization (lfq.LFQ)                         Eq. (4)
      -> K merged indices (B, K), the source (B, N): the merged token holding each original token, i.e. the
         column-wise argmax of the paper's K x N source matrix (merge.py), the CLS feature (alignment head, Eq. (10))
      -> recovery of the N tokens: x_full[:, j] = z_q[:, source[:, j]]  (true source, or one predicted by
         recovery.py)                                                                             Eq. (5), (11)
      -> decoder: conv_in, attention blocks with MixFFN and a depthwise-conv position term, CNN upsampling with
         adaptive GroupNorm conditioned on the quantized latent, depth-to-space upsampling -> image   Eq. (6)

Variants (Table A1):  g  - CNN [1,2,4,8], 32x32 = 1024 tokens, K 256   (encoder 62.3M, decoder 82.8M)
                      gr - CNN [1,1,2,4,8], 16x16 = 256 tokens, K 144  (encoder 62.7M, decoder 83.4M)
                      r  - ViT-B/16, 16x16 = 256 tokens, K 36          (encoder 86.6M, decoder 83.4M)
Each has a `paper` preset (the default) and a `tiny` one for the CPU (32x32 or 64x64 images, narrow, few blocks).
A fourth variant, `mergetok` (MergeTok, arXiv 2605.30904: a joint continuous + discrete tokenizer on G's encoder
and decoder), has its config here (MergeTokConfig, the same presets) and its model in mergetok.py, which builds
on this module.

The encoder's attention blocks use DINOv2's key names (norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1,
mlp.fc2, ls2.gamma) so that the DINOv2 weight selection of G and G+R maps key to key.

    python tokenizer.py            # parameter counts of every paper preset next to Table A1, a tiny round trip
"""
import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import read_checkpoint
from lfq import LFQ, LFQOutput
from merge import (bipartite_soft_matching, track_source, merge_schedule, merge_wavg,
                   recover, size_bias)
from recovery import SourceRecovery
from vit import Block, Mlp

VARIANTS = ("g", "gr", "r")                 # MergeVQ's (Table A1)
ALL_VARIANTS = VARIANTS + ("mergetok",)     # + MergeTok (mergetok.py)

# ----------------------------------------------------------------------------------------------------------------
# Configuration: Table A1 (paper) and a CPU preset (tiny)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    variant: str = "g"
    image_size: int = 256
    z_channels: int = 18                    # LFQ bits d
    # encoder
    ch: int = 64                            # base CNN width
    enc_ch_mult: tuple = (1, 2, 4, 8)       # one level per entry; a stride-2 conv after every level but the last
    enc_res_blocks: int = 4                 # residual blocks per level
    norm_groups: int = 32                   # GroupNorm groups in the CNN parts (tiny: fewer, see PRESETS)
    patch_size: int = 0                     # > 0: a ViT patch embedding instead of the CNN (variant R)
    embed_dim: int = 512                    # width of the encoder's attention blocks
    enc_layers: int = 12                    # ToMe attention blocks
    enc_heads: int = 8
    # decoder
    dec_ch_mult: tuple = (1, 2, 4, 8)
    dec_res_blocks: int = 4                 # level 0; every other level has one more (the release's layout)
    dec_layers: int = 12
    dec_heads: int = 8
    # token merging (Appendix A.1, A.3)
    K: int = 256                         # target K
    K_low: int = 0                          # candidate offsets (sqrt(K) + i)^2, i = K_low..K_high (G: 256..529)
    K_high: int = 7
    K_sampling: str = "exponential"         # Eq. (15) exponential (from the target up), Eq. (16) gaussian, fixed
    merge_schedule: str = "square"          # paper: square; the release: linear
    # alignment head on the CLS token (Eq. 10): G 2 layers, G+R and R 3 layers
    align_dim: int = 768                    # DINOv2 ViT-B feature size
    align_hidden: int = 2048
    align_layers: int = 2
    # Source Recovery Model (Table A2)
    rec_dim: int = 384
    rec_layers: int = 2
    rec_heads: int = 8
    rec_ffn: int = 1536

    @property
    def grid(self):
        """Side of the token grid the encoder produces (and the decoder consumes)."""
        if self.patch_size:
            return self.image_size // self.patch_size
        return self.image_size // 2 ** (len(self.enc_ch_mult) - 1)

    @property
    def num_tokens(self):
        """N, the number of tokens before merging."""
        return self.grid ** 2


@dataclass
class MergeTokConfig(TokenizerConfig):
    """MergeTok (mergetok.py): G's encoder, quantizer and decoder (the fields above) and its continuous branch."""
    variant: str = "mergetok"
    vae_channels: int = 18                  # C, channels of the Gaussian posterior per token (= d: same width)
    sem_target: str = "group"               # (i) pulls mu toward its merged group's mean; "dinov2": toward DINOv2
                                            # features pooled over the group, through a learned projection


PRESETS = {
    "paper": {
        "g": TokenizerConfig(variant="g"),
        "gr": TokenizerConfig(variant="gr", enc_ch_mult=(1, 1, 2, 4, 8), dec_ch_mult=(1, 1, 2, 4, 8), K=144,
                              K_low=-1, K_high=4, K_sampling="gaussian", align_layers=3),
        "r": TokenizerConfig(variant="r", patch_size=16, embed_dim=768, enc_heads=12, dec_ch_mult=(1, 1, 2, 4, 8),
                             K=36, K_low=0, K_high=4, align_layers=3),
    },
    # tiny: narrow and shallow, for 2 CPU cores. GroupNorm(32) on 32-128 channels is nearly an instance norm that
    # strips colour; 4 groups learn faster there (docs/tokenizer_cpu.md, "How the tiny settings were chosen"). G:
    # 32 x 32 images, an 8 x 8 grid (N = 64) merged to K = 36: the scale at which a small generator draws the shapes'
    # outlines (docs/stage2_cpu.md); G+R and R: 64 x 64 images.
    "tiny": {
        "g": TokenizerConfig(variant="g", image_size=32, z_channels=10, ch=32, enc_ch_mult=(1, 2, 4), enc_res_blocks=1,
                             norm_groups=4, embed_dim=128, enc_layers=4, enc_heads=4, dec_ch_mult=(1, 2, 4),
                             dec_res_blocks=1, dec_layers=2, dec_heads=4, K=36, K_low=0, K_high=2, align_hidden=256,
                             rec_dim=64, rec_heads=4, rec_ffn=256),
        "gr": TokenizerConfig(variant="gr", image_size=64, ch=32, enc_ch_mult=(1, 1, 2, 4), enc_res_blocks=1,
                              norm_groups=4, embed_dim=128, enc_layers=4, enc_heads=4, dec_ch_mult=(1, 1, 2, 4),
                              dec_res_blocks=1, dec_layers=2, dec_heads=4, K=36, K_low=-1, K_high=2,
                              K_sampling="gaussian", align_hidden=256, align_layers=3, rec_dim=64, rec_heads=4,
                              rec_ffn=256),
        "r": TokenizerConfig(variant="r", image_size=64, ch=32, patch_size=8, embed_dim=128, enc_layers=4,
                             norm_groups=4, enc_heads=4, dec_ch_mult=(1, 1, 2, 4), dec_res_blocks=1, dec_layers=2,
                             dec_heads=4, K=16, K_low=0, K_high=4, align_hidden=256, align_layers=3, rec_dim=64,
                             rec_heads=4, rec_ffn=256),
    },
}
# MergeTok on G's layout at either scale (the same target K, so G and MergeTok compare at the same K)
for _preset in PRESETS.values():
    _preset["mergetok"] = MergeTokConfig(**{k: v for k, v in dataclasses.asdict(_preset["g"]).items()
                                            if k != "variant"})


def get_config(variant, preset="paper", **overrides):
    """The named preset of a variant, with field overrides (e.g. image_size=128, merge_schedule="linear")."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(ALL_VARIANTS)} (G, G+R, R, "
                         f"MergeTok)")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(PRESETS[preset][variant])}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown tokenizer config field(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(PRESETS[preset][variant], **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


def group_norm(channels, groups=32):
    """GroupNorm with `groups` groups (the release: 32), or the largest divisor of it that divides the width."""
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=1e-6)


# Two convolutions whose natural weights have size-1 dimensions, (C_out, C_in, 1, 1) and (C, 1, 3, 3), are stored
# without them. The strides of a size-1 dimension are arbitrary: the CPU backward returns gradients laid out unlike
# the parameters there, and DistributedDataParallel then copies every such gradient into its buckets, warning on
# every run ("grad strides do not match bucket view strides"). The same function and parameter count; a checkpoint
# with the 4-d layout (the release's) still loads.


class _Squeezed(nn.Module):
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dim() == 4:                       # the 4-d conv layout
            state_dict[key] = state_dict[key].reshape(self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PointwiseConv(_Squeezed):
    """A 1x1 convolution without bias; weight (C_out, C_in)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c_out, c_in))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))                       # nn.Conv2d's default init

    def forward(self, x):
        return F.conv2d(x, self.weight[:, :, None, None])                           # (C_out, C_in, 1, 1)


class DepthwiseConv(_Squeezed):
    """A depthwise k x k convolution (one filter per channel, padding k // 2) with bias; weight (C, k, k)."""

    def __init__(self, channels, kernel_size=3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels))
        bound = 1 / kernel_size                                                     # nn.Conv2d's default init
        nn.init.uniform_(self.weight, -bound * math.sqrt(3), bound * math.sqrt(3))
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        k = self.weight.shape[-1]
        return F.conv2d(x, self.weight[:, None], self.bias, padding=k // 2, groups=x.shape[1])  # (C, 1, k, k)


class ResBlock(nn.Module):
    """MAGVIT-v2 residual block: GroupNorm - SiLU - 3x3 conv, twice (no conv bias); 1x1 shortcut if widths differ."""

    def __init__(self, c_in, c_out, groups=32):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = PointwiseConv(c_in, c_out) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class ToMeBlock(Block):
    """Pre-norm ViT block (LayerScale 1e-5) that merges r tokens between attention and MLP, as ToMe does.

    Returns the merged tokens, their sizes (B, T - r, 1) and the source (B, N_orig + 1): the index map from every
    original token (CLS included, at 0) to the token that holds it now.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=1e-5, mlp=Mlp):
        super().__init__(dim, num_heads, mlp_ratio, init_values, mlp)

    def forward(self, x, size, source, r):
        bias = None if size is None else size_bias(size)                           # Eq. (14): + log size of keys
        h, metric = self.attn(self.norm1(x), bias, return_keys=True)               # metric (B, T, D/H)
        x = x + self.ls1(h)
        if r > 0:
            merge, _ = bipartite_soft_matching(metric, r, class_token=True)
            x, size = merge_wavg(merge, x, size)                                   # (B, T - r, D), (B, T - r, 1)
            source = track_source(merge, source)                                   # (B, N_orig + 1)
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x, size, source


class MixFFN(nn.Module):
    """fc1 - depthwise 3x3 conv over the token grid - GELU - fc2 (the decoder's FFN)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, hw):
        B, T, _ = x.shape
        h = self.fc1(x)                                                            # (B, T, F)
        h = h.transpose(1, 2).reshape(B, -1, *hw)                                  # (B, F, H, W)
        h = self.dwconv(h).flatten(2).transpose(1, 2)                              # (B, T, F)
        return self.fc2(F.gelu(h))


class DecoderBlock(Block):
    """The same block with a MixFFN (LayerScale 1e-5), run without merging (no CLS token, no sizes)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, init_values=1e-5):
        super().__init__(dim, num_heads, mlp_ratio, init_values, mlp=MixFFN)

    def forward(self, x, hw):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x), hw))


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then scale and bias predicted from the quantized latent's spatial std
    and mean (per channel of the latent)."""

    def __init__(self, z_channels, channels, groups=32, eps=1e-6):
        super().__init__()
        self.gn = nn.GroupNorm(math.gcd(channels, groups), channels, eps=eps, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)
        self.eps = eps

    def forward(self, x, z):
        zf = z.flatten(2)                                                          # (B, d, H*W)
        scale = self.gamma((zf.var(dim=-1, unbiased=False) + self.eps).sqrt())     # (B, C)
        bias = self.beta(zf.mean(dim=-1))                                          # (B, C)
        return self.gn(x) * scale[:, :, None, None] + bias[:, :, None, None]


class Upsample(nn.Module):
    """Depth-to-space upsampling: 3x3 conv C -> 4C, then pixel shuffle (B, 4C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


def _init_linear(module):
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image -> K merged latents (B, K, d) before quantization, the CLS feature and the source (B, N)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        if cfg.patch_size:                                  # R: ViT-B patch embedding
            self.conv_in = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size)
            self.norm_in = nn.GroupNorm(D, D, eps=1e-6)
            self.down = nn.ModuleList()
        else:                                               # G, G+R: MAGVIT-v2 CNN
            self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1, bias=False)
            self.down = nn.ModuleList()
            c_in = cfg.ch
            for level, mult in enumerate(cfg.enc_ch_mult):
                c_out = cfg.ch * mult
                stage = nn.Module()
                stage.block = nn.ModuleList([ResBlock(c_in if i == 0 else c_out, c_out, cfg.norm_groups)
                                             for i in range(cfg.enc_res_blocks)])
                if level < len(cfg.enc_ch_mult) - 1:
                    stage.downsample = nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)
                self.down.append(stage)
                c_in = c_out
            if c_in != D:
                raise ValueError(f"the CNN ends at width {c_in} but embed_dim is {D}: set ch * enc_ch_mult[-1] = "
                                 f"embed_dim")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.blocks = nn.ModuleList([ToMeBlock(D, cfg.enc_heads) for _ in range(cfg.enc_layers)])
        self.norm_out = group_norm(D, cfg.norm_groups)
        self.proj_out = nn.Linear(D, cfg.z_channels)        # the release's 1x1 conv_out
        nn.init.normal_(self.cls_token, std=1e-6)
        _init_linear(self.blocks)

    def features(self, x):
        """(B, 3, H, W) -> tokens (B, N, D) on an (h, w) grid. Inside features_computed_once(x), the tokens of that
        batch computed on entry."""
        once = getattr(self, "_features_once", None)
        if once is not None and once[0] is x:
            return once[1]
        h = self.conv_in(x)
        if self.cfg.patch_size:
            h = self.norm_in(h)
        for level, stage in enumerate(self.down):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return h.flatten(2).transpose(1, 2), tuple(h.shape[-2:])                   # (B, N, D), (h, w)

    @contextlib.contextmanager
    def features_computed_once(self, x):
        """Within this block, features(x) of this very batch x (the same tensor object) returns the tokens computed
        once on entry: encoding one batch at several K (train_stage2.py extract) runs the CNN (or the patch
        embedding), which does not depend on K, once instead of once per K."""
        self._features_once = (x, self.features(x))
        try:
            yield
        finally:
            self._features_once = None

    def merge_tokens(self, x, K):
        """Image -> the N tokens entering the attention blocks (B, N, D), the K merged tokens they leave as
        (B, K, D), the CLS feature (B, D) and the source (B, N) in [0, K). MergeTok (mergetok.py) reads all four."""
        tokens, _ = self.features(x)                                               # (B, N, D)
        B, N, _ = tokens.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens], dim=1)  # (B, 1 + N, D)
        size, source = None, None
        for block, r in zip(self.blocks, merge_schedule(N, K, len(self.blocks), self.cfg.merge_schedule)):
            x, size, source = block(x, size, source, r)
        if source is None:                                                         # K == N: nothing merged
            source = torch.arange(N + 1, device=x.device).expand(B, -1)
        # The CLS token never merges and stays at 0: image token j now sits in merged token source[:, 1 + j] - 1.
        return tokens, x[:, 1:], x[:, 0], source[:, 1:] - 1                     # (B, N, D), (B, K, D), (B, D), (B, N)

    def head(self, z):
        """GroupNorm over (B, D, T) and SiLU: tokens (B, T, D) -> (B, T, D), what proj_out reads."""
        return F.silu(self.norm_out(z.transpose(1, 2)).transpose(1, 2))

    def forward(self, x, K):
        _, z, cls, source = self.merge_tokens(x, K)                               # z (B, K, D), source (B, N)
        return self.proj_out(self.head(z)), cls, source                            # (B, K, d), (B, D), (B, N)


# ----------------------------------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    """Eq. (6), the decoder: (B, d, h, w) quantized latent grid (all N tokens, after recovery) -> image (B, 3, H, W)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        mult = cfg.dec_ch_mult
        c = cfg.ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.pos_embed = DepthwiseConv(c)                                  # depthwise-conv position term
        self.blocks = nn.ModuleList([DecoderBlock(c, cfg.dec_heads) for _ in range(cfg.dec_layers)])
        self.adaptive = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(len(mult))):                           # deepest level first
            c_out = cfg.ch * mult[level]
            n_blocks = cfg.dec_res_blocks + (1 if level > 0 else 0)
            self.adaptive.insert(0, AdaptiveGroupNorm(cfg.z_channels, c, cfg.norm_groups))
            stage = nn.Module()
            stage.block = nn.ModuleList([ResBlock(c if i == 0 else c_out, c_out, cfg.norm_groups)
                                         for i in range(n_blocks)])
            c = c_out
            if level > 0:
                stage.upsample = Upsample(c)
            self.up.insert(0, stage)
        self.norm_out = group_norm(c, cfg.norm_groups)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)
        _init_linear(self.blocks)

    def last_layer_weight(self):
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z):
        style = z                                                                  # (B, d, h, w)
        h = self.conv_in(z)                                                        # (B, C, h, w)
        h = h + self.pos_embed(h)
        B, C, H, W = h.shape
        t = h.flatten(2).transpose(1, 2)                                           # (B, h*w, C)
        for block in self.blocks:
            t = block(t, (H, W))
        h = t.transpose(1, 2).reshape(B, C, H, W)                                  # (B, C, h, w)
        for level in reversed(range(len(self.up))):
            h = self.adaptive[level](h, style)
            for block in self.up[level].block:
                h = block(h)
            if level > 0:
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------------


class Encoding(NamedTuple):
    """What stage 2 needs from an image: the K merged indices, the source and the kept count K."""
    indices: torch.Tensor           # (B, K) int64 LFQ indices of the merged tokens
    source: torch.Tensor            # (B, N) int64 in [0, K): the merged token that holds original token j
    z_q: torch.Tensor               # (B, K, d) quantized merged tokens in {-1, +1} (straight-through)
    K: int                          # the kept count
    cls: torch.Tensor               # (B, D) the encoder's CLS output (before the alignment head)
    lfq: LFQOutput                  # the quantizer's losses and statistics


class TokenizerOutput(NamedTuple):
    recon: torch.Tensor             # (B, 3, H, W)
    enc: Encoding
    recovery_loss: torch.Tensor     # Eq. (9): cross-entropy of the Source Recovery Model


class MergeVQTokenizer(nn.Module):
    variants = VARIANTS                     # the variants this class builds (mergetok.MergeTokenizer: "mergetok")

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if cfg.variant not in self.variants:
            raise ValueError(f"unknown variant {cfg.variant!r}: choose one of {', '.join(self.variants)}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = LFQ(cfg.z_channels)
        self.decoder = Decoder(cfg)
        self.recovery = SourceRecovery(cfg.num_tokens, z_dim=cfg.z_channels, dim=cfg.rec_dim,
                                       depth=cfg.rec_layers, num_heads=cfg.rec_heads, ffn=cfg.rec_ffn)
        D, Hd = cfg.embed_dim, cfg.align_hidden
        layers = [nn.Linear(D, Hd), nn.GELU()]              # Eq. (10) head: G 2 layers (LayerNorm), G+R/R 3 layers
        layers += [nn.LayerNorm(Hd)] if cfg.align_layers == 2 else [nn.Linear(Hd, Hd), nn.GELU()]
        self.align_head = nn.Sequential(*layers, nn.Linear(Hd, cfg.align_dim))

    # ---- kept counts K ---------------------------------------------------------------------------------------

    def check_K(self, K):
        """K must be an integer in [1, N] that the L merging layers can reach (each removes at most half)."""
        N, L = self.cfg.num_tokens, self.cfg.enc_layers
        if isinstance(K, bool) or not isinstance(K, int):
            raise ValueError(f"the kept count K must be an int, got {K!r}")
        if not 1 <= K <= N:
            raise ValueError(f"kept count K={K} is not allowed: it must be between 1 and N={N}")
        try:
            merge_schedule(N, K, L, self.cfg.merge_schedule)
        except ValueError as e:
            raise ValueError(f"kept count K={K} is not allowed: {e}") from None
        return K

    # ---- encode / decode -----------------------------------------------------------------------------------

    def _check_image(self, x):
        S = self.cfg.image_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-2:] != (S, S):
            raise ValueError(f"the {self.cfg.variant} tokenizer expects images (B, 3, {S}, {S}) in [-1, 1], "
                             f"got {tuple(x.shape)}")

    def encode(self, x, K=None):
        """Images (B, 3, H, W) in [-1, 1] -> Encoding (merged indices, source, z_q, K, CLS, LFQ terms)."""
        self._check_image(x)
        K = self.check_K(self.cfg.K if K is None else K)
        z, cls, source = self.encoder(x, K)                                     # (B, K, d), (B, D), (B, N)
        q = self.quantizer(z.float())                                              # LFQ in fp32
        return Encoding(q.indices, source, q.z_q, K, cls, q)

    def decode_codes(self, z_q, source=None, anchors=None):
        """Merged codes (B, K, d) + a source (B, N) -> images. No source: the Source Recovery Model predicts one from
        the codes and their anchors (B, K), the image positions of the merged tokens (merge.anchors)."""
        if source is None:
            if anchors is None:
                raise ValueError("decoding without a source needs the merged tokens' anchors (B, K): the Source "
                                 "Recovery Model places each token at its anchor")
            source = self.recovery.predict_source(z_q, anchors)                   # the Source Recovery Model
        if source.shape != (z_q.shape[0], self.cfg.num_tokens):
            raise ValueError(f"source {tuple(source.shape)} does not fit {z_q.shape[0]} images of "
                             f"N={self.cfg.num_tokens} tokens: expected ({z_q.shape[0]}, {self.cfg.num_tokens})")
        z_full = recover(z_q, source)                                              # Eq. (11): (B, N, d)
        g = self.cfg.grid
        z_full = z_full.transpose(1, 2).reshape(z_q.shape[0], -1, g, g)            # (B, d, g, g)
        return self.decoder(z_full)                                                # Eq. (6): (B, 3, H, W)

    def decode(self, indices, source=None, anchors=None):
        """Merged indices (B, K) + a source (true or predicted; None: predicted from the codes and their anchors
        (B, K)) -> images (B, 3, H, W)."""
        z_q = self.quantizer.indices_to_codes(indices).to(self.decoder.conv_in.weight.dtype)   # (B, K, d)
        return self.decode_codes(z_q, source, anchors)

    def forward(self, x, K=None):
        """The stage-1 forward: encode at K, recover with the true source, decode; the recovery loss (Eq. 9)."""
        enc = self.encode(x, K)
        recon = self.decode_codes(enc.z_q, enc.source)
        recovery_loss = self.recovery.loss(enc.z_q, enc.source)
        return TokenizerOutput(recon, enc, recovery_loss)

    # ---- global alignment (Eq. 10) -------------------------------------------------------------------------

    def align(self, view, K=None):
        """The student's prediction of the teacher's CLS feature, from a view of any size (multiple of the
        encoder's stride). The view is merged at the same ratio K / N as the reconstruction (K at image size)."""
        K = self.cfg.K if K is None else K
        N_view = (view.shape[-1] // (self.cfg.image_size // self.cfg.grid)) ** 2
        K_view = max(1, min(N_view, round(K * N_view / self.cfg.num_tokens)))
        try:
            merge_schedule(N_view, K_view, self.cfg.enc_layers, self.cfg.merge_schedule)
        except ValueError:
            K_view = N_view                                                # unreachable ratio: no merging
        _, cls, _ = self.encoder(view, K_view)
        return self.align_head(cls)                                                # (B, align_dim)

    # ---- DINOv2 weight selection (G, G+R) ------------------------------------------------------------------

    def load_dinov2_selection(self, teacher_state):
        """Initialise the encoder's attention blocks and CLS token from a DINOv2 state dict by taking evenly spaced
        elements along every dimension (768 -> 512: round(linspace(0, T - 1, S))). Returns the keys loaded."""
        own = self.encoder.state_dict()
        selected = {}
        for key, value in own.items():
            if not (key.startswith("blocks.") or key == "cls_token") or key not in teacher_state:
                continue
            t = teacher_state[key]
            if t.dim() != value.dim() or any(a < b for a, b in zip(t.shape, value.shape)):
                raise ValueError(f"DINOv2 weight selection: teacher {key} {tuple(t.shape)} cannot give "
                                 f"{tuple(value.shape)}")
            for dim, S in enumerate(value.shape):
                idx = torch.round(torch.linspace(0, t.shape[dim] - 1, S)).long()     # on the CPU: one answer
                t = t.index_select(dim, idx.to(t.device))                             # on the teacher's device
            selected[key] = t.to(value.dtype)
        if not selected:
            raise ValueError("DINOv2 weight selection: no teacher key matches the encoder (blocks.*, cls_token)")
        self.encoder.load_state_dict(selected, strict=False)
        return sorted(selected)


def build_tokenizer(variant, preset="paper", config=None, **overrides):
    """The tokenizer of a variant ('g', 'gr', 'r'; 'mergetok') at a preset ('paper' default, 'tiny'), or from a
    config."""
    if config is None:
        config = get_config(variant, preset, **overrides)
    elif config.variant != variant:
        raise ValueError(f"config is for variant {config.variant!r}, not {variant!r}")
    if variant == "mergetok":
        from mergetok import MergeTokenizer        # here, not at the top: mergetok.py builds on this module
        return MergeTokenizer(config)
    return MergeVQTokenizer(config)


def load_tokenizer(path, ema=True, device="cpu", return_checkpoint=False):
    """The tokenizer stored in a stage-1 checkpoint of train_stage1.py, in eval mode, with its EMA weights (the ones
    the paper evaluates; ema=False: the raw weights). One-line errors for a missing, empty, truncated or foreign
    file. With return_checkpoint, also the checkpoint dict (step, configs, ...)."""
    ckpt = read_checkpoint(path, "stage-1 checkpoint", required=("model", "ema", "tokenizer_config"))
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["tokenizer_config"].items()}
    config_class = MergeTokConfig if saved.get("variant") == "mergetok" else TokenizerConfig
    fields = {f.name for f in dataclasses.fields(config_class)}
    if set(saved) != fields:
        raise ValueError(f"stage-1 checkpoint {path} was written by another version of tokenizer.py (config fields "
                         f"differ: {', '.join(sorted(set(saved) ^ fields))})")
    config = config_class(**saved)
    model = build_tokenizer(config.variant, config=config)
    weights = ckpt["ema" if ema else "model"]
    own = model.state_dict()
    bad = sorted(set(own) ^ set(weights)) + sorted(k for k in own if k in weights and own[k].shape != weights[k].shape)
    if bad:
        raise ValueError(f"stage-1 checkpoint {path}: its weights do not fit its own configuration ({len(bad)} "
                         f"mismatched keys, e.g. {bad[0]})")
    model.load_state_dict(weights, strict=True)
    model = model.to(device).eval()
    return (model, ckpt) if return_checkpoint else model


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# Table A1 (millions): encoder (without the alignment head and the quantizer) and decoder
TABLE_A1 = {"g": (62.3, 82.8), "gr": (62.7, 83.4), "r": (86.6, 83.4)}


if __name__ == "__main__":
    with torch.device("meta"):
        models = {v: build_tokenizer(v) for v in VARIANTS}
    print(f"{'variant':8s} {'encoder':>10s} {'Table A1':>9s} {'decoder':>10s} {'Table A1':>9s} {'recovery':>9s}")
    for v, m in models.items():
        e, d = count_parameters(m.encoder) / 1e6, count_parameters(m.decoder) / 1e6
        print(f"{v:8s} {e:9.2f}M {TABLE_A1[v][0]:8.1f}M {d:9.2f}M {TABLE_A1[v][1]:8.1f}M "
              f"{count_parameters(m.recovery) / 1e6:8.2f}M")
    torch.manual_seed(0)
    tok = build_tokenizer("g", "tiny").eval()
    S = tok.cfg.image_size
    x = torch.rand(2, 3, S, S) * 2 - 1
    with torch.no_grad():
        enc = tok.encode(x)                                             # the target K
        print("tiny g: indices", tuple(enc.indices.shape), "source", tuple(enc.source.shape),
              "recon", tuple(tok.decode(enc.indices, enc.source).shape))
