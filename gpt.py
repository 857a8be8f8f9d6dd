"""LlamaGen's class-conditional GPT, the transformer of MergeVQ's stage 2 (paper Sec. 4, Appendix A.2, Table A2).

MergeVQ's generators start from LlamaGen (Sun et al. 2024, FoundationVision/LlamaGen, autoregressive/models/gpt.py
and generate.py) "modified by OpenMAGVIT2" (Appendix A.2): a decoder-only Llama-style transformer (2D RoPE,
SwiGLU, RMSNorm) over raster-ordered image codes, with a learnable class embedding as the starting token; the paper
uses GPT-L (Table A2: 24 blocks, width 1024, 16 heads, dropout 0.1, 343M parameters). This file builds that model
from scratch, in two vocabularies:

  plain       `vocab_size` codes, one embedding table and one head. The state dict has LlamaGen's key names and
              shapes (`tok_embeddings`, `layers.{i}.attention.wqkv`, `layers.{i}.feed_forward.w1`, ...), so
              LlamaGen's released class-to-image checkpoints load with strict=True (`load_llamagen`).
  factorized  LFQ's 2^18 codes (lfq.py) as two sub-tokens, pre = low 6 bits and post = high 12 bits, as in the
              MergeVQ release (ApexGen-X/MergeVQ taming/modules/transformer/gpt.py, after TencentARC/Open-MAGVIT2):
              input embedding pre_emb(pre) + post_emb(post); after the main blocks two "intra-token" blocks run on
              the pair [h_t, h_t + pre_emb(pre_t)] (the release: [h_t, pre_emb(pre_t)]; see INTRA_POST_INPUT);
              one head reads the pre logits at the first slot, another the post logits at the second. Sampling
              draws pre, then post given pre.

The three generators of stage 2 share it: the plain raster model (Table 3's "LlamaGen" rows: `generate` here),
and two subclasses built the same way, each adding its own tokens and its own forward and decoding: MergeAR
(mergear.py: the Merge Instruction token, the Eq. (12) mask, a compacted KV cache) and RandAR (randar.py: random
orders with position instructions).

Parts: 2D rotary position embedding / the transformer (RMSNorm, attention with a KV cache or an explicit mask,
SwiGLU) / presets / training layout and cached decoding / sampling and generation (top-k, top-p, classifier-free
guidance) / loading LlamaGen's checkpoints / demo.

    python gpt.py                          # parameter counts of the presets, a tiny model: 30 steps, sampling
    python -m pytest tests/test_gpt.py     # RoPE, cache == full forward, CFG, counts, loading
    python bench/bench_gpt.py              # tokens/s of the cached decoder vs. recomputing the prefix (CPU)

    from gpt import build_gpt, generate, load_llamagen
    model = build_gpt("L")                                   # LlamaGen GPT-L, 342,910,976 parameters
    load_llamagen(model, "c2i_L_256.pt")                     # LlamaGen's released weights, strict
    codes = generate(model.eval(), torch.tensor([207, 360]), 256, cfg_scale=2.0, top_k=0, top_p=1.0)
"""
import argparse
import math
import os
from collections import namedtuple
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from common import read_checkpoint
from lfq import join_index, split_index

# ----------------------------------------------------------------------------------------------------------------
# 2D rotary position embedding
# ----------------------------------------------------------------------------------------------------------------

# Why 2D RoPE makes the attention logit depend only on the 2D offset between two cells (labml-style).
#
# Write pair j of a query at cell m = (r_m, c_m) as the complex number q_j = q_{2j} + i q_{2j+1}, and likewise k_j
# for a key at cell n. RoPE multiplies each pair by a unit phasor whose angle is linear in the cell:
#
#     q~_j = q_j e^{i phi_j(m)},   phi_j(r, c) = r theta_j             (j < D_h/4: the row half)
#                                  phi_j(r, c) = c theta_{j - D_h/4}   (j >= D_h/4: the column half)
#
# A real dot product of two vectors of pairs is the real part of sum_j a_j conj(b_j), so
#
#     q~ . k~ = Re sum_j q_j conj(k_j) e^{i (phi_j(m) - phi_j(n))}
#             = Re sum_j q_j conj(k_j) e^{i phi_j(r_m - r_n, c_m - c_n)}       (phi_j is linear in (r, c))
#
# which sees the two cells only through their offset (r_m - r_n, c_m - c_n): two cell pairs with the same offset
# give the same logit for the same q and k. Each rotation is orthogonal, so |q~| = |q|. The row half of the pairs
# sees only the row offset, the column half only the column offset; within a half, theta_j = base^(-2j / (D_h/2))
# runs from 1 down, fast to slow, as in 1D RoPE (Su et al. 2021, RoFormer Sec. 3.2) on a head of width D_h/2.
# tests/test_gpt.py checks both properties (test_rope_logit_depends_only_on_the_2d_offset, ..._preserves_norms).


def precompute_freqs_cis_2d(grid_size, n_elem, base=10000, cls_token_num=1):
    """LlamaGen's 2D RoPE table: (cls_token_num + grid_size^2, n_elem // 2, 2), the last axis (cos, sin).

    n_elem is the head width D_h. Its D_h/2 rotation pairs are split in two halves: pair j < D_h/4 turns by
    r * theta_j (r the row of the cell), pair D_h/4 + j by c * theta_j (c its column), with
    theta_j = base^(-2j / (D_h/2)), j = 0 .. D_h/4 - 1: 1D RoPE's frequencies for a head of width D_h/2.
    Cells are in raster order (row-major), after `cls_token_num` class rows.

    The class rows are zeros (cos = sin = 0), LlamaGen's convention: they are not a zero angle (that would be
    cos = 1) but a projection onto 0, so the class token's query and key come out of `apply_rotary_emb` as zero.
    Its key then scores 0 against every query and its value is read with that fixed logit. The released
    checkpoints were trained this way, so we keep it.
    """
    if n_elem % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4 (two axes of rotation pairs), got {n_elem}")
    half = n_elem // 2                                                       # channels per axis
    theta = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))   # (D_h/4,)
    t = torch.arange(grid_size, dtype=torch.float32)
    angles = torch.outer(t, theta)                                           # (grid, D_h/4): position x frequency
    grid = torch.cat([angles[:, None, :].expand(-1, grid_size, -1),          # row angle r * theta at cell (r, c)
                      angles[None, :, :].expand(grid_size, -1, -1)], dim=-1)  # column angle c * theta; (g, g, D_h/2)
    table = torch.stack([grid.cos(), grid.sin()], dim=-1)                    # (g, g, D_h/2, 2)
    table = table.flatten(0, 1)                                              # (g*g, D_h/2, 2), raster order
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])           # (cls + g*g, D_h/2, 2)


def apply_rotary_emb(x, freqs_cis):
    """Rotate adjacent channel pairs (2j, 2j+1) of x (B, T, heads, D_h) by the table rows freqs_cis (T, D_h/2, 2),
    or by one table per sample (B, T, D_h/2, 2) (randar.py: every sample has its own generation order).

    Each pair is a complex number x_{2j} + i x_{2j+1}, multiplied by cos + i sin: (a + ib)(cos + i sin) =
    (a cos - b sin) + i (b cos + a sin), LlamaGen's two real lines, in one complex multiply: the same float32
    numbers, bit for bit, in a few operations instead of a dozen. Computed in float32, returned in x's dtype.
    """
    B, T, H, Dh = x.shape
    per_sample = freqs_cis.dim() == 4
    xc = torch.view_as_complex(x.float().reshape(B, T, H, Dh // 2, 2))      # (B, T, H, D_h/2) complex pairs
    f = torch.view_as_complex(freqs_cis.float().reshape(B if per_sample else 1, T, 1, Dh // 2, 2))  # cos + i sin
    return torch.view_as_real(xc * f).flatten(3).type_as(x)                 # (B, T, H, D_h/2, 2) -> (B, T, H, D_h)


# ----------------------------------------------------------------------------------------------------------------
# The transformer: RMSNorm, attention with a KV cache, SwiGLU, pre-norm blocks
# ----------------------------------------------------------------------------------------------------------------


def find_multiple(n, k):
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


def ffn_hidden_size(dim, multiple_of=256, ffn_dim_multiplier=None):
    """LlamaGen's (and Llama's) SwiGLU width: 2/3 of 4 dim, optionally scaled, rounded up to multiple_of.
    GPT-B 768 -> 2048, GPT-L 1024 -> 2816, GPT-XL 1280 -> 3584 (Table A2's "4096" for GPT-L is 4 dim)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, the normalisation computed in float32 (eps 1e-5, weight 1)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), bias-free, dropout on the output."""

    def __init__(self, dim, hidden, dropout=0.1):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache:
    """Keys and values of every position decoded so far, (B, heads, max_seq, D_h), written by position.

    A plain object, not a module: it never enters the state dict, and `model.to(...)` leaves it alone (the caches
    are rebuilt for every `generate` call)."""

    def __init__(self, batch, heads, max_seq, head_dim, dtype, device):
        self.k = torch.zeros(batch, heads, max_seq, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, input_pos, k, v):
        """Write k, v (B, heads, S, D_h) at positions input_pos (S,); return the whole cache, (B, heads, max_seq, D_h).
        The positions after the last written one are zeros that `context`'s mask hides. Not sliced to
        max(input_pos) + 1: that length is a device value, and reading it (int(...)) would wait for the device in every
        layer of every decoding step, to save attention over the unwritten keys (2 N D multiply-adds per token
        against 12 D^2 for its projections: small beside them at GPT-L's width D = 1024)."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v

    def context(self, input_pos, k, v):
        """What the attention of the new tokens reads: `update`, and the causal mask (1, S, L) over the cache
        (True where query input_pos[s] may read cached position l, i.e. l <= input_pos[s])."""
        keys, values = self.update(input_pos, k, v)
        mask = torch.arange(keys.shape[2], device=k.device)[None, :] <= input_pos[:, None]   # (S, L)
        return keys, values, mask[None]


class Attention(nn.Module):
    """Causal multi-head self-attention: one fused bias-free qkv projection (rows [q; k; v]), 2D RoPE on q and k,
    bias-free output projection, residual dropout. Three ways to pick the keys a query reads:
      training, no mask     the causal prefix of the input (the fused causal kernel; the plain model);
      training, mask        an explicit boolean mask (B, T, T), True = may attend (MergeAR's Eq. (12) mask);
      decoding              a cache (KVCache, or MergeAR's CompactKVCache) given input positions: the cache's
                            `context` returns the keys, values and mask (B or 1, S, L) the new tokens read."""

    def __init__(self, dim, n_head, attn_dropout_p=0.0, resid_dropout_p=0.1):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"width {dim} is not divisible by {n_head} heads")
        self.n_head, self.head_dim = n_head, dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)
        self.kv_cache = None                                                 # a KVCache while generating

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        B, T, D = x.shape
        q, k, v = self.wqkv(x).split(D, dim=-1)                              # 3 x (B, T, D)
        q = q.view(B, T, self.n_head, self.head_dim)                         # (B, T, H, D_h)
        k = k.view(B, T, self.n_head, self.head_dim)                         # (B, T, H, D_h)
        v = v.view(B, T, self.n_head, self.head_dim)                         # (B, T, H, D_h)
        q, k = apply_rotary_emb(q, freqs_cis), apply_rotary_emb(k, freqs_cis)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                     # 3 x (B, H, T, D_h)
        dropout = self.attn_dropout_p if self.training else 0.0
        if input_pos is None and mask is None:                               # teacher forcing: causal over x
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        elif input_pos is None:                                              # teacher forcing, explicit mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout)  # (B,1,T,T)
        else:                                                                # decoding: what the cache holds
            keys, values, mask = self.kv_cache.context(input_pos, k, v)      # 2 x (B, H, L, D_h), (B or 1, T, L)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, T, D)                           # (B, T, D)
        return self.resid_dropout(self.wo(out))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg.dim, cfg.n_head, cfg.attn_dropout_p, cfg.resid_dropout_p)
        self.feed_forward = FeedForward(cfg.dim, ffn_hidden_size(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier),
                                        cfg.ffn_dropout_p)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row, num_classes, for the null class of classifier-free guidance. In training
    each label is replaced by the null class with probability `dropout_prob` (0.1), so the model also learns the
    unconditional distribution. (LlamaGen adds the extra row only when dropout_prob > 0; we always add it.)"""

    def __init__(self, num_classes, dim, dropout_prob=0.1):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)                     # (B, 1, D)


# ----------------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    vocab_size: int = 16384           # plain: the codebook; factorized: 2^bits of the LFQ index (2^18)
    num_classes: int = 1000
    block_size: int = 256             # image tokens T = grid^2 (16 x 16 at 256 px with a 16x downsampling tokenizer)
    multiple_of: int = 256
    ffn_dim_multiplier: float = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    class_dropout_prob: float = 0.1
    class_cond: str = "prefix"        # prefix: LlamaGen's class token at position 0 only (the paper); add: also added
                                      # to every code's input embedding (the CPU preset: see CLASS_COND below)
    factorized: bool = False
    pre_bits: int = 6                 # factorized: pre = the low 6 bits, post = the rest (release: [6, 12])
    n_intra_layer: int = 2            # factorized: intra-token blocks on the pair [h_t, slot 1]
    intra_post_input: str = "state+pre"   # factorized: slot 1 = h_t + pre_emb(pre_t); "pre": pre_emb(pre_t) alone,
                                          # the release's (see INTRA_POST_INPUT below)
    merge_counts: tuple = ()          # MergeAR: the allowed kept counts K, one Merge Instruction row each; () = plain
    merge_window: int = None          # MergeAR: the window W of Eq. (12); None = one grid row, sqrt(block_size)
    position_head: bool = False       # RandAR on merged tokens: predict each token's cell (randar.py, Eq. (13))


# How the class label enters the model. "prefix" is LlamaGen's (and the paper's): one class token at position 0,
# which every code reads through attention. "add" also adds the class embedding to each code's input embedding (the
# null class's row where the label is dropped for CFG), as DiT-style models feed the label to every position. At CPU
# scale a small model ignores the prefix alone (the held-out NLL with the true label about equals the null class's,
# the samples follow their class at chance) and learns the label with "add": measured in docs/stage2_cpu.md
# (`train_stage2.py train --class-cond prefix|add`, then `nll`).
CLASS_COND = ("prefix", "add")

# What the post slot (slot 1) of the intra-token blocks starts from. "pre" is the MergeVQ release's and
# Open-MAGVIT2's: pre_emb(pre_t) alone. The post logits then see the transformer's state h_t only through slot 1's
# attention to slot 0, and that attention is blind to h_t: slot 0 takes the zero RoPE row, so its key is zero and
# slot 1's logit for it is fixed at 0; how much slot 1 reads h_t is set by slot 1's own content, never by h_t.
# Where the post sub-token is mostly predictable from pre_t (a toy's background; codes whose context also lives in
# the pre bits), h_t only adds noise to the post logits early in training and the model turns the read into a
# constant; from then on the post head passes almost no gradient to the state, the state does not learn what only
# the post sub-token needs, and a class carried by the high 12 bits alone is learned only after a long plateau,
# through which the samples draw post from its marginal given pre. "state+pre" (ours, the default) also puts h_t on
# slot 1's residual stream, h_t + pre_emb(pre_t), as slot 0 has it for the pre head: the post head reads the state
# as directly as the pre head does. Same parameters (names and shapes); the release's slot 1 stays reachable with
# intra_post_input="pre". Measured: docs/factorized_head.md.
INTRA_POST_INPUT = ("state+pre", "pre")

# LlamaGen's class-conditional sizes (its gpt.py's GPT_models: B 111M, L 343M, XL 775M, XXL 1.4B) and two CPU toys.
GPT_PRESETS = {
    "tiny": dict(dim=64, n_layer=2, n_head=4, block_size=16),                # the tests
    "small": dict(dim=128, n_layer=4, n_head=4),                              # train_stage2.py's CPU preset
    "B": dict(dim=768, n_layer=12, n_head=12),
    "L": dict(dim=1024, n_layer=24, n_head=16),
    "XL": dict(dim=1280, n_layer=36, n_head=20),
    "XXL": dict(dim=1536, n_layer=48, n_head=24),
}


# ----------------------------------------------------------------------------------------------------------------
# The model: training layout (teacher forcing) and cached decoding
# ----------------------------------------------------------------------------------------------------------------

GPTOutput = namedtuple("GPTOutput", ["logits", "loss"])
FactorizedOutput = namedtuple("FactorizedOutput", ["logits_pre", "logits_post", "loss"])


class Transformer(nn.Module):
    """LlamaGen's class-to-image GPT (plain vocabulary) or the MergeVQ release's factorized variant.

    Sequence: [class token, code_0, ..., code_{T-2}] at positions 0 .. T-1; the output at position t predicts
    code_t. Position 0 takes the class row of the RoPE table, position 1 + t the cell of code t (raster order).
    The factorized parts carry our names: pre_embeddings, post_embeddings, intra_layers, output_pre, output_post
    (the release's pre_emb, post_emb, factorized_blocks, head.0, head.1).
    class_cond "add" (a flag, not the paper's) also adds the class embedding to every code's input: CLASS_COND.
    """

    prefix_len = 1      # tokens before the codes, each on a zero RoPE row: the class token (MergeAR: [C, M])

    def __init__(self, cfg):
        super().__init__()
        if cfg.merge_counts and self.prefix_len == 1:
            raise ValueError("merge_counts are MergeAR's Merge Instruction rows: build the model with "
                             "mergear.build_mergear")
        if cfg.class_cond not in CLASS_COND:
            raise ValueError(f"class_cond must be one of {', '.join(CLASS_COND)}, got {cfg.class_cond!r}")
        if cfg.intra_post_input not in INTRA_POST_INPUT:
            raise ValueError(f"intra_post_input must be one of {', '.join(INTRA_POST_INPUT)}, "
                             f"got {cfg.intra_post_input!r}")
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        if cfg.factorized:
            bits = int(round(math.log2(cfg.vocab_size)))
            if 2 ** bits != cfg.vocab_size or not 0 < cfg.pre_bits < bits:
                raise ValueError(f"a factorized vocabulary must be 2^bits codes with 0 < pre_bits < bits, got "
                                 f"vocab_size={cfg.vocab_size}, pre_bits={cfg.pre_bits}")
            self.post_bits = bits - cfg.pre_bits
            self.pre_embeddings = nn.Embedding(2 ** cfg.pre_bits, cfg.dim)
            self.post_embeddings = nn.Embedding(2 ** self.post_bits, cfg.dim)
        else:
            self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        if cfg.factorized:
            self.intra_layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_intra_layer)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.factorized:
            self.output_pre = nn.Linear(cfg.dim, 2 ** cfg.pre_bits, bias=False)
            self.output_post = nn.Linear(cfg.dim, 2 ** self.post_bits, bias=False)
        else:
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

        self.add_prefix_embeddings(cfg)

        grid = math.isqrt(cfg.block_size)
        if grid * grid != cfg.block_size:
            raise ValueError(f"block_size must be a square number of tokens (a grid), got {cfg.block_size}")
        # A plain attribute, not a buffer: never in the state dict, and kept in float32 when the model is cast.
        self.freqs_cis = precompute_freqs_cis_2d(grid, cfg.dim // cfg.n_head, cfg.rope_base,
                                                 cls_token_num=self.prefix_len)
        self.initialize_weights()

    def add_prefix_embeddings(self, cfg):
        """The embeddings of the prefix tokens after the class token, made here so that `initialize_weights` draws
        them with every other weight: none for LlamaGen; MergeAR's Merge Instruction table (mergear.py)."""

    def initialize_weights(self):
        """Every Linear and Embedding weight ~ N(0, 0.02); LlamaGen's plain head zero (the first logits uniform).

        The factorized heads keep N(0, 0.02): zero-initialised (the release's init), they stall the factorized model
        on tests/test_conditioning.py's toy, whose samples then follow their label far less often
        (docs/factorized_head.md)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.initializer_range)
        if not self.cfg.factorized:
            nn.init.zeros_(self.output.weight)

    def rope(self, device):
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def intra_rope(self, device):
        """The intra-token blocks' two RoPE rows (2, D_h/2, 2): [zero row, identity (cos 1, sin 0)], whatever the
        prefix length of the main table (one class row for LlamaGen and RandAR, two for MergeAR's [C, M])."""
        half = self.cfg.dim // self.cfg.n_head // 2
        zero = torch.zeros(1, half, 2, device=device)
        identity = torch.stack([torch.ones(half, device=device), torch.zeros(half, device=device)], dim=-1)
        return torch.cat([zero, identity[None]])                             # (2, D_h/2, 2)

    # ---- pieces shared by teacher forcing and decoding ----

    def embed_codes(self, idx, cond=None):
        """(B, S) code indices -> (B, S, D); factorized: pre_emb(low bits) + post_emb(high bits). With class_cond
        "add", cond (B, 1, D), the class embedding of the sequence (the null class where it was dropped), is added
        to every position; "prefix" ignores it."""
        if self.cfg.factorized:
            pre, post = split_index(idx, self.cfg.pre_bits)
            e = self.pre_embeddings(pre) + self.post_embeddings(post)       # (B, S, D)
        else:
            e = self.tok_embeddings(idx)                                     # (B, S, D)
        if self.cfg.class_cond == "prefix":
            return e
        if cond is None:
            raise ValueError("this model adds the class embedding to every code (class_cond 'add'): pass cond")
        return e + cond                                                      # (B, S, D) + (B, 1, D)

    def run_layers(self, h, input_pos=None, mask=None):
        """The main stack on h (B, S, D) at positions input_pos (S,) (decoding) or 0 .. S-1 (teacher forcing, causal
        or with the boolean mask (B, S, S), True = may attend)."""
        rope = self.rope(h.device)
        freqs = rope[: h.shape[1]] if input_pos is None else rope[input_pos]     # (S, D_h/2, 2)
        for layer in self.layers:
            h = self.run_block(layer, h, freqs, input_pos, mask)
        return h

    # Set by train_stage2.py --checkpoint-activations (a plain attribute, not a GPTConfig field: checkpoints and
    # sampling do not depend on it).
    checkpoint_activations = False

    def run_block(self, layer, h, freqs, input_pos=None, mask=None):
        """One block of the main stack. With checkpoint_activations, in teacher forcing with gradients, the block's
        activations are not kept for backward but recomputed there from its input (torch.utils.checkpoint; dropout
        masks replayed from the saved RNG state): per block only the input (B, S, D) stays alive."""
        if self.checkpoint_activations and input_pos is None and torch.is_grad_enabled():
            return checkpoint(layer, h, freqs, None, mask, use_reentrant=False)
        return layer(h, freqs, input_pos, mask)

    def logits(self, h):
        """Plain head: (B, S, D) -> float32 logits (B, S, vocab)."""
        return self.output(self.norm(h)).float()

    def intra_logits(self, h, pre=None):
        """Factorized heads on the main stack's outputs h (B, S, D).

        Each position runs the intra-token blocks on its own 2-slot sequence [h_t, h_t + pre_emb(pre_t)] (with
        intra_post_input "pre", the release's [h_t, pre_emb(pre_t)]: INTRA_POST_INPUT says why not) with two fixed
        RoPE rows (the release's choice, the first two rows of its one-class-token table): slot 0 a zero row (a class
        row: it zeroes its q and k), slot 1 the identity (the cell (0, 0), angle 0). These rows are `intra_rope`, not
        the first rows of the model's table: MergeAR's prefix [C, M] makes both of those zero, which would zero slot
        1's q and k too (its attention a fixed 50/50 mix of the two slots). Slot 0 gives the pre logits, slot 1 the
        post logits given pre_t. With pre=None only slot 0 runs (sampling pre before it is known; causal attention
        makes slot 0 the same either way).
        Returns (logits_pre (B, S, 2^pre_bits), logits_post (B, S, 2^post_bits) or None), float32.
        """
        B, S, D = h.shape
        if pre is None:
            slots = [h]
        elif self.cfg.intra_post_input == "state+pre":
            slots = [h, h + self.pre_embeddings(pre)]                        # the post slot reads the state directly
        else:
            slots = [h, self.pre_embeddings(pre)]                            # the release: only through attention
        x = torch.stack(slots, dim=2).reshape(B * S, len(slots), D)          # (B*S, 1 or 2, D)
        freqs = self.intra_rope(h.device)[: len(slots)]                     # (1 or 2, D_h/2, 2)
        for layer in self.intra_layers:
            x = layer(x, freqs)
        x = self.norm(x).reshape(B, S, len(slots), D)                        # (B, S, 1 or 2, D)
        logits_pre = self.output_pre(x[:, :, 0]).float()
        logits_post = self.output_post(x[:, :, 1]).float() if pre is not None else None
        return logits_pre, logits_post

    # ---- teacher forcing (training layout) ----

    def forward(self, idx, cond_idx, targets=None, label_smoothing=0.0):
        """Teacher-forced logits for all T codes idx (B, T), in train and eval mode; both heads take the same input.

        The sequence is [class, code_0, ..., code_{T-2}]: the last code is predicted and never read, so the main
        stack drops it; the factorized head also reads the pre sub-token of every code it predicts (its
        intra-token blocks), all T of them.
        plain:      GPTOutput(logits (B, T, vocab), loss), loss the cross-entropy against targets (B, T) when given
                    (usually idx itself).
        factorized: FactorizedOutput(logits_pre (B, T, 64), logits_post (B, T, 4096), loss), idx 18-bit indices,
                    loss = CE(pre) + CE(post) against targets (B, T): -log p(pre) - log p(post | pre), the NLL of
                    the 18-bit code.
        Class labels are dropped to the null class with probability 0.1 in train mode. label_smoothing: Table A2
        says 0.1; LlamaGen's and the MergeVQ release's code use none (0.0, the default here).
        """
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"{idx.shape[1]} codes exceed block_size {self.cfg.block_size}, the RoPE grid")
        cond = self.cls_embedding(cond_idx, train=self.training)             # (B, 1, D)
        h = torch.cat([cond, self.embed_codes(idx[:, :-1], cond)], dim=1)    # (B, T, D): [class, codes 0 .. T-2]
        h = self.run_layers(self.tok_dropout(h))                             # (B, T, D)
        if not self.cfg.factorized:
            logits = self.logits(h)                                          # (B, T, vocab)
            loss = None if targets is None else F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), label_smoothing=label_smoothing)   # (B*T, vocab) vs (B*T,)
            return GPTOutput(logits, loss)
        pre, _ = split_index(idx, self.cfg.pre_bits)
        logits_pre, logits_post = self.intra_logits(h, pre)
        loss = None
        if targets is not None:
            t_pre, t_post = split_index(targets, self.cfg.pre_bits)
            # (B*T, 2^pre_bits) and (B*T, 2^post_bits) against (B*T,) sub-token targets
            loss = (F.cross_entropy(logits_pre.flatten(0, 1), t_pre.flatten(), label_smoothing=label_smoothing)
                    + F.cross_entropy(logits_post.flatten(0, 1), t_post.flatten(), label_smoothing=label_smoothing))
        return FactorizedOutput(logits_pre, logits_post, loss)

    # ---- cached decoding ----

    def setup_caches(self, batch, max_seq, dtype=None):
        """A KVCache per layer in the dtype of the keys the layers will write: under autocast (bf16 on GPUs) the
        qkv projection's output dtype, else the weights' (dtype overrides). Call it under the decoding's autocast."""
        device = self.norm.weight.device
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.norm.weight.dtype
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(batch, a.n_head, max_seq, a.head_dim, dtype, device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def step(self, idx, cond_idx, input_pos):
        """One decoding call through the cache: the class token (idx None, cond_idx (B,): prefill) or codes idx
        (B, S) at positions input_pos (S,), with their labels cond_idx (B,) (may be None for class_cond "prefix").
        Returns the main stack's outputs (B, S, D) (heads: `logits`, `intra_logits`)."""
        cond = None if cond_idx is None else self.cls_embedding(cond_idx, train=False)   # (B, 1, D)
        h = cond if idx is None else self.embed_codes(idx, cond)             # (B, 1 or S, D)
        return self.run_layers(self.tok_dropout(h), input_pos)


def gpt_config(preset, vocab_size=None, factorized=False, num_classes=1000, **overrides):
    """The GPTConfig of a preset in GPT_PRESETS ("tiny", "B", "L", "XL", "XXL"). vocab_size defaults to 16384
    (LlamaGen's VQ codebook) for the plain model and 2^18 (LFQ) for the factorized one; overrides set fields."""
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; choose one of {', '.join(GPT_PRESETS)}")
    if vocab_size is None:
        vocab_size = 2 ** 18 if factorized else 16384
    return replace(GPTConfig(**GPT_PRESETS[preset]), vocab_size=vocab_size, factorized=factorized,
                   num_classes=num_classes, **overrides)


def build_gpt(preset, vocab_size=None, factorized=False, num_classes=1000, **overrides):
    """A Transformer of a preset; see `gpt_config`."""
    return Transformer(gpt_config(preset, vocab_size, factorized, num_classes, **overrides))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Sampling and generation: temperature, top-k, top-p, classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------


def filter_logits(logits, top_k=0, top_p=1.0):
    """(B, V) logits with every token outside the top-k and outside the nucleus set to -inf.

    top-k: keep logits >= the k-th largest (0 = off). top-p: sort by probability, drop the tokens after the
    cumulative probability exceeds top_p, keeping the one that crosses it (and always the most likely token)."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]   # (B, 1)
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()                           # shift: keep the crossing token
        remove[..., 0] = False
        logits[remove.scatter(-1, order, remove)] = float("-inf")            # back to vocabulary order
    return logits


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of (B, V) logits: logits / max(temperature, 1e-5), filtered, softmax, multinomial."""
    logits = filter_logits(logits / max(temperature, 1e-5), top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)      # (B,)


def guide(logits, scale):
    """Classifier-free guidance on the stacked batch [cond; null] (2B, V): u + s (c - u), (B, V)."""
    c, u = logits.chunk(2, dim=0)                                            # 2 x (B, V)
    return u + scale * (c - u)


def combine(logits, B, use_cfg, guided, scale):
    """(B', V) logits of a generation step -> (B, V): guided (u + s (c - u)) from the [cond; null] batch, or its
    conditional half once guidance has stopped (cfg interval), or the logits themselves without guidance."""
    if not use_cfg:
        return logits
    return guide(logits, scale) if guided else logits[:B]


def cfg_scale_at(t, num_tokens, cfg_scale, schedule="constant"):
    """The guidance scale for code t: constant, or linear from 1 (first code) towards cfg_scale, RandAR's rule
    s = 1 + (s - 1) t / T with t the number of codes already generated."""
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * t / num_tokens
    raise ValueError(f"unknown cfg schedule {schedule!r}; choose constant or linear")


@torch.no_grad()
def generate(model, cond, num_tokens, cfg_scale=1.0, cfg_schedule="constant", cfg_interval=-1, temperature=1.0,
             top_k=0, top_p=1.0, generator=None, return_logits=False):
    """Sample num_tokens codes for the class labels cond (B,) with the KV cache; returns (B, num_tokens) int64.

    Guidance runs the batch [cond; null] (2B rows; null = class num_classes) whenever it can change the logits
    (cfg_scale != 1 or a linear schedule), feeds each sampled code to both halves, and samples from
    u + s (c - u). cfg_interval >= 0 stops guiding after LlamaGen's count of decode steps: codes
    t > cfg_interval + 1 (0-based) are sampled from the conditional logits alone. The factorized model samples
    pre from its pre head, then post from the post head given pre, both guided; the result is the 18-bit index.
    LlamaGen's defaults: demo cfg 4.0, top-k 2000; FID script cfg 1.5, top-k 0, top-p 1.

    return_logits: also return the (guided, pre-temperature) logits of every step, (B, num_tokens, vocab), or a
    pair (pre, post) for the factorized model.
    """
    if cond.dim() != 1 or cond.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cond must be a 1D tensor of class labels, got {cond.dtype} {tuple(cond.shape)}")
    if model.cfg.merge_counts:
        raise ValueError("this is a MergeAR model (prefix [C, M]): use mergear.generate_mergear")
    if not 0 < num_tokens <= model.cfg.block_size:
        raise ValueError(f"num_tokens must lie in [1, block_size = {model.cfg.block_size}], got {num_tokens}")
    was_training = model.training
    model.eval()
    B = cond.shape[0]
    use_cfg = cfg_scale != 1.0 or cfg_schedule != "constant"
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if use_cfg else cond   # (B or 2B,)
    model.setup_caches(labels.shape[0], num_tokens)                          # positions 0 .. num_tokens - 1
    codes, kept = [], []
    try:
        x = None
        for t in range(num_tokens):
            if t == 0:                                                       # prefill: the class token at 0
                h = model.step(None, labels, torch.arange(0, 1, device=cond.device))
            else:                                                            # the previous code at position t
                h = model.step(x[:, None], labels, torch.tensor([t], device=cond.device))
            h = h[:, -1:]                                                    # (B', 1, D)
            scale = cfg_scale_at(t, num_tokens, cfg_scale, cfg_schedule)
            guided = cfg_interval < 0 or t <= cfg_interval + 1
            if not model.cfg.factorized:
                logits = combine(model.logits(h)[:, 0], B, use_cfg, guided, scale)   # (B, vocab)
                code = sample_logits(logits, temperature, top_k, top_p, generator)
                kept.append(logits)
            else:
                l_pre = combine(model.intra_logits(h)[0][:, 0], B, use_cfg, guided, scale)   # (B, 2^pre_bits)
                pre = sample_logits(l_pre, temperature, top_k, top_p, generator)
                pre_in = pre.repeat(labels.shape[0] // B)[:, None]           # (B', 1): both halves
                l_post = combine(model.intra_logits(h, pre_in)[1][:, 0], B, use_cfg, guided, scale)  # (B, 2^post)
                post = sample_logits(l_post, temperature, top_k, top_p, generator)
                code = join_index(pre, post, model.cfg.pre_bits)
                kept.append((l_pre, l_post))
            codes.append(code)
            x = code.repeat(labels.shape[0] // B)                            # (B',)
    finally:
        model.clear_caches()
        model.train(was_training)
    codes = torch.stack(codes, dim=1)                                        # (B, num_tokens)
    if not return_logits:
        return codes
    if model.cfg.factorized:
        pre, post = (torch.stack([k[i] for k in kept], dim=1) for i in (0, 1))   # (B, T, 64), (B, T, 4096)
        return codes, (pre, post)
    return codes, torch.stack(kept, dim=1)                                   # (B, num_tokens, vocab)


# ----------------------------------------------------------------------------------------------------------------
# Loading LlamaGen's released checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _load_file(path):
    """read_checkpoint with argparse.Namespace allowed: LlamaGen's training checkpoints also store their "args"."""
    allow = getattr(torch.serialization, "safe_globals", None)
    if allow is None:
        return read_checkpoint(path, what="LlamaGen checkpoint")
    with allow([argparse.Namespace]):
        return read_checkpoint(path, what="LlamaGen checkpoint")


def load_llamagen(model, path_or_state_dict, key=None):
    """Load LlamaGen weights into a plain Transformer with strict=True; returns the model.

    Accepts a file path or a loaded dict, in any of the layouts LlamaGen's scripts read: {"model": sd} (released
    c2i files; training checkpoints add "optimizer", "steps", "args"), {"module": sd}, {"state_dict": sd}, or the
    raw state dict (the FSDP files). `key` picks an entry explicitly (e.g. "ema"). Drops a stray `freqs_cis` (the
    RoPE table is not a weight) and the "module." / "_orig_mod." prefixes of DDP and torch.compile. Errors are
    one line: missing, empty or corrupt file, no state dict, or keys / shapes that do not fit this model.
    """
    if model.cfg.factorized:
        raise ValueError("load_llamagen loads LlamaGen's plain-vocabulary weights; this model is factorized")
    where = "the given dict"
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        where = os.fspath(path_or_state_dict)
        ckpt = _load_file(path_or_state_dict)
    elif isinstance(path_or_state_dict, dict):
        ckpt = path_or_state_dict
    else:
        raise TypeError(f"load_llamagen takes a path or a dict, got {type(path_or_state_dict).__name__}")
    if key is not None:
        if key not in ckpt or not isinstance(ckpt[key], dict):
            raise ValueError(f"LlamaGen checkpoint {where} has no state dict under {key!r} "
                             f"(entries: {', '.join(map(str, ckpt))})")
        sd = ckpt[key]
    else:
        sd = next((ckpt[k] for k in ("model", "module", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"LlamaGen checkpoint {where} holds no state dict: entries like {bad[0]!r} are not tensors "
                         f"(entries: {', '.join(list(map(str, sd))[:6])})")
    clean = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k.split(".")[-1] != "freqs_cis":
            clean[k] = v
    expected = model.state_dict()
    missing = [k for k in expected if k not in clean]
    unexpected = [k for k in clean if k not in expected]
    shapes = [f"{k} {tuple(clean[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in clean and clean[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        c = model.cfg
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of other shape (e.g. {shapes[0]}: file vs model)" if shapes else ""]
        raise ValueError(f"LlamaGen checkpoint {where} does not fit this GPT (dim {c.dim}, {c.n_layer} layers, vocab "
                         f"{c.vocab_size}, {c.num_classes} classes): " + "; ".join(p for p in parts if p))
    model.load_state_dict(clean, strict=True)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.set_num_threads(1)                       # tiny ops: a second thread costs more than it saves
    for name in ("B", "L", "XL"):
        with torch.device("meta"):
            plain, fact = build_gpt(name), build_gpt(name, factorized=True)
        print(f"GPT-{name}: {count_parameters(plain):,} parameters (vocab 16384), "
              f"{count_parameters(fact):,} factorized (2^18 codes as 64 x 4096)")
    torch.manual_seed(0)
    model = build_gpt("tiny", vocab_size=256, num_classes=10)
    codes, labels = torch.randint(0, 256, (8, 16)), torch.randint(0, 10, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for step in range(30):
        loss = model(codes, labels, targets=codes).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 29:
            print(f"tiny step {step:2d}  loss {loss.item():.3f}  (uniform: {math.log(256):.3f})")
    out = generate(model, labels[:2], 16, cfg_scale=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    print("greedy codes with cfg 2.0:", out[0].tolist(), " training codes:", codes[0].tolist())
