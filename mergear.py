"""Stage 2 of MergeVQ: the class-conditional autoregressive transformer (paper Sec. 4, Appendix A.2, Table A2).

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
              the pair [h_t, pre_emb(pre_t)]; one head reads the pre logits at the first slot, another the post
              logits at the second. Sampling draws pre, then post given pre.

MergeAR (Sec. 4.1, Eq. (12), Fig. 6) is the same model with a second prefix token, a sparse causal mask in
training, and a compacted KV cache in decoding. The paper states the idea in a few sentences and one figure; the
rules below are our reading of them, each with the evidence it rests on.

  What is generated. All N recovered tokens, in raster order, one per step: Table 3's "Step" column reads 256
    for MergeVQ (G+R) + MergeAR (144 merged tokens recovered to 256) and 1024 for (G) (256 recovered to 1024),
    the lengths of the recovered sequences. The members of one merged group are identical copies of one code
    (recovery, Eq. (11), copies the merged token to each of its positions), and Appendix A.2 says MergeAR needs
    no Source Recovery Model. The saving is a shorter attention context per step, not fewer steps.
  The prefix [C, M]. C is the class embedding; M the Merge Instruction token, "a learnable embedding token with
    a given merge number" (Appendix A.2): one row per allowed kept count K (cfg.merge_counts). We index by K, the
    number the tokenizer samples (Appendix A.3 samples "the number of tokens retained"); with N fixed it carries
    the same information as r = N - K. Both take zero RoPE rows (LlamaGen's class-token convention) and are
    never evicted.
  The mask, Eq. (12). With rep[j] = the first raster position of j's group, image position t attends to C, M and
        j <= t  and  (rep[j] == j  or  t - j <= W),
    the first member of every group seen so far plus the W tokens before t. This is Fig. 6 (9 tokens, groups
    {1,2}, {3,4}, {5,6,7}, {8,9}, W = 2: each row sees itself and the two before it; further back only first
    members), and it keeps the property Sec. 4.1 asks for: "each original token is represented by at most one
    merged token in the context" outside the window. The loss is on all N positions: Fig. 6's target row
    includes the duplicates.
  The window W, shared by training and inference. Fig. 6 draws 2; our default is one grid row, sqrt(N) (16 at
    N = 256, 32 at N = 1024): then every token sees the token directly above it and the row between, the
    neighbourhood 2D RoPE measures offsets in, however the image was merged; with W = 2 a token inside a long
    group would lose its upper neighbour. The price is W keys per step (163 keys, not 257, at N = 256, K = 144).
  Where rep comes from. Training has the tokenizer's true source (merge.py's index map): rep_from_source. The
    decoder has only codes; Sec. 4.1: "MergeAR compares it against existing tokens in the KV cache. If it is a
    duplicate ..." - a code equal to an earlier code is a duplicate: rep_from_codes. The two differ wherever two
    groups share one code (the code reading folds the later group into the earlier); rep_disagreement measures
    how often on real tokenizations. Passing rep_from_codes(codes) to mergear_loss trains on the decoder's view.

Why the compacted cache gives the masked forward's logits (the invariant tests/test_mergear.py checks, with CFG):
  1. The rows that may read key j form an interval, j <= t <= e_j, with e_j = infinity for a first member and
     e_j = j + W for a duplicate. Once t > e_j no later row reads j, so dropping it loses nothing: after step t
     the cache holds exactly the keys Eq. (12) lets the next row read - the prefix, the first members and the
     duplicates in the window (the "Position Cache" of Fig. 6; a ring of W + 1 slots holds the duplicates).
  2. Key and value of position j, at every layer, are computed once at step j from the layer's input at j, which
     is, by induction over positions, what the masked forward computes there: row j's attention read the same set.
  3. Softmax attention is a function of the set of (key, value) pairs, and RoPE rotates a key by its own position
     before it is written, so neither the slot a key sits in nor masked padding changes a logit.
  4. Whether rep[j] == j depends only on codes[:j + 1], so the decoder knows row t's mask at step t; the mask it
     mirrors is rep_from_codes of its own codes.
  Size: after any step the cache holds at most 2 + K + W live entries (K first members - the distinct codes so
  far, K for a sequence of K groups - and at most W duplicates); the step's attention reads those and the fed
  token. Batches are padded: the first-member region to the batch's
  largest count, with a per-sample valid mask (the ring's W + 1 slots are always in the read, masked while
  empty or expired).
  Guidance. The null branch of CFG is [null class, M]: M stays, since the merge amount describes the layout of
  the sequence (how many distinct groups its codes form), not its class, and both branches share the codes and
  so the cache layout. Class dropout in training likewise replaces C only.

Parts: 2D rotary position embedding / the transformer (RMSNorm, attention with a KV cache or an explicit mask,
SwiGLU) / presets / training layout and loss / sampling and generation (top-k, top-p, classifier-free guidance) /
MergeAR: representatives, the Eq. (12) mask, training / MergeAR decoding with the compacted cache / loading
LlamaGen's checkpoints.

    python mergear.py                      # parameter counts of the presets, a tiny model: 30 steps, sampling; a
                                           # tiny MergeAR: 100 steps, its compacted cache
    python -m pytest tests/test_mergear.py # RoPE, cache == full forward, CFG, counts, loading; MergeAR's mask, cache
    python bench/bench_gpt.py              # tokens/s of the cached decoder vs. recomputing the prefix (CPU)
    python bench/bench_mergear.py          # MergeAR's compacted cache vs. the plain KV cache: tokens/s, entries

    from mergear import build_gpt, generate, load_llamagen
    model = build_gpt("L")                                   # LlamaGen GPT-L, 342,910,976 parameters
    load_llamagen(model, "c2i_L_256.pt")                     # LlamaGen's released weights, strict
    codes = generate(model.eval(), torch.tensor([207, 360]), 256, cfg_scale=2.0, top_k=0, top_p=1.0)

    from mergear import generate_mergear, mergear_loss, rep_from_source
    model = build_gpt("L", factorized=True, merge_counts=tuple(range(1, 257)))   # MergeAR on 2^18 LFQ codes
    loss = mergear_loss(model, codes, labels, K, rep_from_source(source), window=None)   # W = one grid row
    codes = generate_mergear(model.eval(), torch.tensor([207, 360]), 144, 256)           # K = 144, N = 256
"""
import argparse
import math
import os
from collections import namedtuple
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

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
# tests/test_mergear.py checks both properties.


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

    Each pair is a complex number x_{2j} + i x_{2j+1}, multiplied by cos + i sin. Computed in float32 and returned
    in x's dtype.
    """
    B, T, H, Dh = x.shape
    xp = x.float().reshape(B, T, H, Dh // 2, 2)                              # (B, T, H, D_h/2, 2) pairs
    per_sample = freqs_cis.dim() == 4
    f = freqs_cis.float().reshape(B if per_sample else 1, T, 1, Dh // 2, 2)  # (B or 1, T, 1, D_h/2, 2)
    cos, sin = f[..., 0], f[..., 1]
    out = torch.stack([xp[..., 0] * cos - xp[..., 1] * sin,                  # Re[(a + ib)(cos + i sin)]
                       xp[..., 1] * cos + xp[..., 0] * sin], dim=-1)         # Im[...]; (B, T, H, D_h/2, 2)
    return out.flatten(3).type_as(x)                                         # (B, T, H, D_h)


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
        """Write k, v (B, heads, S, D_h) at positions input_pos (S,); return the cache up to the last written
        position, (B, heads, L, D_h) with L = max(input_pos) + 1."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        end = int(input_pos.max()) + 1
        return self.k[:, :, :end], self.v[:, :, :end]

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
    factorized: bool = False
    pre_bits: int = 6                 # factorized: pre = the low 6 bits, post = the rest (release: [6, 12])
    n_intra_layer: int = 2            # factorized: intra-token blocks on the pair [h_t, pre_emb(pre_t)]
    merge_counts: tuple = ()          # MergeAR: the allowed kept counts K, one Merge Instruction row each; () = plain
    merge_window: int = None          # MergeAR: the window W of Eq. (12); None = one grid row, sqrt(block_size)


# LlamaGen's class-conditional sizes (gpt.py GPT_models: B 111M, L 343M, XL 775M, XXL 1.4B) and a CPU toy.
GPT_PRESETS = {
    "tiny": dict(dim=64, n_layer=2, n_head=4, block_size=16),
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
    """

    def __init__(self, cfg):
        super().__init__()
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

        # MergeAR (below): a Merge Instruction embedding per allowed K; the prefix is [C, M], two zero RoPE rows.
        self.prefix_len = 1
        if cfg.merge_counts:
            if len(set(cfg.merge_counts)) != len(cfg.merge_counts) or min(cfg.merge_counts) < 1:
                raise ValueError(f"merge_counts must be distinct positive kept counts K, got {cfg.merge_counts}")
            self.merge_embedding = nn.Embedding(len(cfg.merge_counts), cfg.dim)
            self.prefix_len = 2

        grid = math.isqrt(cfg.block_size)
        if grid * grid != cfg.block_size:
            raise ValueError(f"block_size must be a square number of tokens (a grid), got {cfg.block_size}")
        # A plain attribute, not a buffer: never in the state dict, and kept in float32 when the model is cast.
        self.freqs_cis = precompute_freqs_cis_2d(grid, cfg.dim // cfg.n_head, cfg.rope_base,
                                                 cls_token_num=self.prefix_len)
        self.initialize_weights()

    def initialize_weights(self):
        """Every Linear and Embedding weight ~ N(0, 0.02); the output heads zero (the first logits are uniform)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.initializer_range)
        for head in ([self.output_pre, self.output_post] if self.cfg.factorized else [self.output]):
            nn.init.zeros_(head.weight)

    def rope(self, device):
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    # ---- pieces shared by teacher forcing and decoding ----

    def embed_codes(self, idx):
        """(B, S) code indices -> (B, S, D); factorized: pre_emb(low bits) + post_emb(high bits)."""
        if self.cfg.factorized:
            pre, post = split_index(idx, self.cfg.pre_bits)
            return self.pre_embeddings(pre) + self.post_embeddings(post)
        return self.tok_embeddings(idx)

    def run_layers(self, h, input_pos=None, mask=None):
        """The main stack on h (B, S, D) at positions input_pos (S,) (decoding) or 0 .. S-1 (teacher forcing, causal
        or with the boolean mask (B, S, S), True = may attend)."""
        rope = self.rope(h.device)
        freqs = rope[: h.shape[1]] if input_pos is None else rope[input_pos]     # (S, D_h/2, 2)
        for layer in self.layers:
            h = layer(h, freqs, input_pos, mask)
        return h

    def logits(self, h):
        """Plain head: (B, S, D) -> float32 logits (B, S, vocab)."""
        return self.output(self.norm(h)).float()

    def intra_logits(self, h, pre=None):
        """Factorized heads on the main stack's outputs h (B, S, D).

        Each position runs the intra-token blocks on its own 2-slot sequence [h_t, pre_emb(pre_t)] with the first
        two RoPE rows (the release's choice: slot 0 takes the class row, which zeroes its q and k; slot 1 the cell
        (0, 0), the identity). Slot 0 gives the pre logits, slot 1 the post logits given pre_t. With pre=None only
        slot 0 runs (sampling pre before it is known; causal attention makes slot 0 the same either way).
        Returns (logits_pre (B, S, 2^pre_bits), logits_post (B, S, 2^post_bits) or None), float32.
        """
        B, S, D = h.shape
        slots = [h] if pre is None else [h, self.pre_embeddings(pre)]
        x = torch.stack(slots, dim=2).reshape(B * S, len(slots), D)          # (B*S, 1 or 2, D)
        freqs = self.rope(h.device)[: len(slots)]
        for layer in self.intra_layers:
            x = layer(x, freqs)
        x = self.norm(x).reshape(B, S, len(slots), D)                        # (B, S, 1 or 2, D)
        logits_pre = self.output_pre(x[:, :, 0]).float()
        logits_post = self.output_post(x[:, :, 1]).float() if pre is not None else None
        return logits_pre, logits_post

    # ---- teacher forcing (training layout) ----

    def forward(self, idx, cond_idx, targets=None, label_smoothing=0.0):
        """Teacher-forced logits for all T codes, in train and eval mode.

        plain:      idx (B, T-1), the first T-1 codes (LlamaGen's layout); returns GPTOutput(logits (B, T, vocab),
                    loss), loss the cross-entropy against targets (B, T) when given.
        factorized: idx (B, T), all T codes as 18-bit indices (the intra-token blocks read the pre sub-token of
                    the code they predict); returns FactorizedOutput(logits_pre (B, T, 64), logits_post (B, T, 4096),
                    loss) with loss = CE(pre) + CE(post) against targets (B, T) (usually idx itself).
                    CE(pre) + CE(post) = -log p(pre) - log p(post | pre) is the NLL of the 18-bit code.
        Class labels are dropped to the null class with probability 0.1 in train mode. label_smoothing: Table A2
        says 0.1; LlamaGen's and the MergeVQ release's code use none (0.0, the default here).
        """
        if self.cfg.merge_counts:
            raise ValueError("this is a MergeAR model (prefix [C, M]): use mergear_logits / mergear_loss")
        cond = self.cls_embedding(cond_idx, train=self.training)             # (B, 1, D)
        inputs = idx[:, :-1] if self.cfg.factorized else idx                 # (B, T-1)
        h = torch.cat([cond, self.embed_codes(inputs)], dim=1)               # (B, T, D): [class, codes]
        if h.shape[1] > self.cfg.block_size:
            raise ValueError(f"{h.shape[1]} positions (class + {h.shape[1] - 1} input codes) exceed block_size "
                             f"{self.cfg.block_size}, the RoPE grid: at most {self.cfg.block_size} codes are predicted")
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
        dtype = dtype or self.norm.weight.dtype
        device = self.norm.weight.device
        for layer in self.layers:
            a = layer.attention
            a.kv_cache = KVCache(batch, a.n_head, max_seq, a.head_dim, dtype, device)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def step(self, idx, cond_idx, input_pos):
        """One decoding call through the cache: the class token (cond_idx (B,), prefill) or codes idx (B, S) at
        positions input_pos (S,). Returns the main stack's outputs (B, S, D) (heads: `logits`, `intra_logits`)."""
        if cond_idx is not None:
            h = self.cls_embedding(cond_idx, train=False)                    # (B, 1, D)
        else:
            h = self.embed_codes(idx)                                        # (B, S, D)
        return self.run_layers(self.tok_dropout(h), input_pos)


def build_gpt(preset, vocab_size=None, factorized=False, num_classes=1000, **overrides):
    """A Transformer from GPT_PRESETS ("tiny", "B", "L", "XL", "XXL"). vocab_size defaults to 16384 (LlamaGen's
    VQ codebook) for the plain model and 2^18 (LFQ) for the factorized one; overrides set GPTConfig fields."""
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r}; choose one of {', '.join(GPT_PRESETS)}")
    if vocab_size is None:
        vocab_size = 2 ** 18 if factorized else 16384
    cfg = replace(GPTConfig(**GPT_PRESETS[preset]), vocab_size=vocab_size, factorized=factorized,
                  num_classes=num_classes, **overrides)
    return Transformer(cfg)


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
        raise ValueError("this is a MergeAR model (prefix [C, M]): use generate_mergear")
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
                h = model.step(x[:, None], None, torch.tensor([t], device=cond.device))
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
# MergeAR (Sec. 4.1, Eq. (12), Fig. 6): representatives, the sparsity causal mask, training
# ----------------------------------------------------------------------------------------------------------------


def first_occurrence(labels):
    """(B, N) integer labels -> (B, N) int64 rep with rep[b, j] = min{i : labels[b, i] == labels[b, j]}.

    A stable sort puts equal labels next to each other in raster order; the first of each run is the smallest
    position holding that label, and every member of the run takes it. O(N log N), no (N, N) matrix."""
    B, N = labels.shape
    order = torch.argsort(labels, dim=1, stable=True)                       # (B, N): equal labels in raster order
    sorted_labels = labels.gather(1, order)                                 # (B, N)
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[:, 1:] = sorted_labels[:, 1:] != sorted_labels[:, :-1]           # a run of one label begins here
    idx = torch.arange(N, device=labels.device).expand(B, N)
    run_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values   # (B, N) in sorted order
    first = order.gather(1, run_start)                                      # smallest raster position of the run
    return torch.empty_like(order).scatter_(1, order, first)                # (B, N) back in raster order


def rep_from_source(source):
    """Training reading: the tokenizer's true source map (B, N) (merge.py: source[j] = the merged token holding
    original token j) -> rep (B, N), rep[j] = min{i : source[i] == source[j]}, the first raster position of j's
    merged group."""
    return first_occurrence(source)


def rep_from_codes(codes):
    """Inference reading: token j is a duplicate when its code equals an earlier token's code,
    rep[j] = min{i : codes[i] == codes[j]}. (B, N) codes -> (B, N) rep. The decoder can apply it on the fly (a code
    is a first member iff it has not been generated before), which is why the mask the cache mirrors is built
    from it."""
    return first_occurrence(codes)


RepDisagreement = namedtuple("RepDisagreement", ["token_rate", "sequence_rate", "folded_groups"])


def rep_disagreement(source, codes):
    """How often the two readings differ on pairs (source (B, N), codes (B, N)) of one tokenization.

    token_rate     the fraction of the B*N tokens whose representative differs;
    sequence_rate  the fraction of sequences with at least one such token;
    folded_groups  groups per sequence that code equality folds into an earlier group sharing their code
                   (distinct sources minus distinct codes, averaged over the batch).
    The two agree exactly when no two groups share a code (and each group is one code, as recovered tokens are)."""
    a, b = rep_from_source(source), rep_from_codes(codes)
    differs = a != b                                                        # (B, N)
    arange = torch.arange(source.shape[1], device=source.device)
    groups = (a == arange).sum(1) - (b == arange).sum(1)                    # (B,) first members lost
    return RepDisagreement(differs.float().mean().item(), differs.any(1).float().mean().item(),
                           groups.float().mean().item())


def merge_causal_mask(rep, window):
    """Eq. (12), the sparsity causal mask over the N image positions: (B, N) rep -> (B, N, N) bool, True where
    position t may attend to position j:

        j <= t  and  ( rep[j] == j          a group's first member: kept for good
                       or t - j <= window )  any token, for the `window` steps after it (and itself)

    Fig. 6 (9 tokens, groups {1,2}, {3,4}, {5,6,7}, {8,9}, window 2) is this rule; tests/test_mergear.py writes it
    out. The prefix [C, M] is not in this matrix: every image position also attends to both prefix tokens."""
    N = rep.shape[1]
    pos = torch.arange(N, device=rep.device)
    t, j = pos[:, None], pos[None, :]                                       # (N, 1) rows, (1, N) columns
    causal = j <= t                                                         # (N, N)
    recent = (t - j) <= window                                              # (N, N) the sliding window
    first = (rep == pos)[:, None, :]                                        # (B, 1, N) first members
    return causal & (recent | first)                                        # (B, N, N)


def prefixed_mask(image_mask, prefix_len=2):
    """The mask over the whole training sequence [prefix, image inputs]: (B, S, S) -> (B, P + S, P + S). The prefix
    rows are causal among themselves and see no image token; every image row sees the whole prefix."""
    B, S, _ = image_mask.shape
    P = prefix_len
    full = torch.zeros(B, P + S, P + S, dtype=torch.bool, device=image_mask.device)
    rows = torch.arange(P + S, device=image_mask.device)
    full[:, :, :P] = rows[:, None] >= rows[None, :P]                        # prefix columns: causal
    full[:, P:, P:] = image_mask                                            # image block: Eq. (12)
    return full


def merge_window(model, window=None):
    """The window W shared by training and inference: the argument, else the config's, else one grid row."""
    if window is None:
        window = model.cfg.merge_window
    if window is None:
        window = math.isqrt(model.cfg.block_size)
    if window < 0:
        raise ValueError(f"the window W must be >= 0, got {window}")
    return int(window)


def merge_instruction_index(model, K, batch, device):
    """Kept counts K (an int, or (B,) ints) -> (B,) rows of the Merge Instruction table (model.cfg.merge_counts)."""
    if not model.cfg.merge_counts:
        raise ValueError("this model has no Merge Instruction token: build it with merge_counts=(K, ...)")
    K = torch.as_tensor(K, device=device).long().reshape(-1).expand(batch)  # (B,)
    allowed = torch.tensor(model.cfg.merge_counts, device=device)           # (n_K,)
    hit = K[:, None] == allowed[None, :]                                    # (B, n_K)
    if not hit.any(1).all():
        bad = K[~hit.any(1)][0].item()
        raise ValueError(f"K = {bad} has no Merge Instruction row; allowed: {list(model.cfg.merge_counts)}")
    return hit.float().argmax(1)                                            # (B,)


def merge_prefix(model, labels, K, train=False):
    """The prefix [C, M] (B, 2, D): class embedding (dropped to the null class with p = 0.1 in training) and the
    Merge Instruction embedding of K. The null branch of CFG keeps M (only C becomes the null class)."""
    c = model.cls_embedding(labels, train=train)                            # (B, 1, D)
    m = model.merge_embedding(merge_instruction_index(model, K, labels.shape[0], labels.device))   # (B, D)
    return torch.cat([c, m[:, None]], dim=1)                                # (B, 2, D)


def mergear_logits(model, codes, cond, K, rep, window=None):
    """Teacher-forced MergeAR: logits for all N codes under the Eq. (12) mask.

    Sequence [C, M, x_0, .., x_{N-2}] at positions 0 .. N; the output at M predicts x_0 and the output at x_t
    predicts x_{t+1}. Image row t attends to C, M and the Eq. (12) set of rep (B, N) (training: rep_from_source;
    the cache invariant: rep_from_codes). codes (B, N), cond (B,) labels, K an int or (B,).
    Returns (B, N, vocab) float32, or (logits_pre, logits_post) for the factorized model.
    """
    if not model.cfg.merge_counts:
        raise ValueError("this model has no Merge Instruction token: build it with merge_counts=(K, ...)")
    B, N = codes.shape
    if N > model.cfg.block_size:
        raise ValueError(f"{N} codes exceed block_size {model.cfg.block_size}, the RoPE grid")
    if rep.shape != codes.shape:
        raise ValueError(f"rep {tuple(rep.shape)} must have the shape of codes {tuple(codes.shape)}")
    W = merge_window(model, window)
    h = torch.cat([merge_prefix(model, cond, K, train=model.training),
                   model.embed_codes(codes[:, :-1])], dim=1)                # (B, N + 1, D): [C, M, x_0 .. x_{N-2}]
    mask = prefixed_mask(merge_causal_mask(rep, W)[:, : N - 1, : N - 1], 2)    # (B, N + 1, N + 1), Eq. (12)
    h = model.run_layers(model.tok_dropout(h), mask=mask)[:, 1:]            # (B, N, D): outputs at M, x_0 .. x_{N-2}
    if not model.cfg.factorized:
        return model.logits(h)                                              # (B, N, vocab)
    return model.intra_logits(h, split_index(codes, model.cfg.pre_bits)[0])


def mergear_loss(model, codes, cond, K, rep, window=None, label_smoothing=0.0):
    """Cross-entropy of all N codes (duplicates included: Fig. 6's target row) under the Eq. (12) mask; the
    factorized model's loss is CE(pre) + CE(post), the NLL of the 18-bit code."""
    out = mergear_logits(model, codes, cond, K, rep, window)
    if not model.cfg.factorized:
        return F.cross_entropy(out.flatten(0, 1), codes.flatten(), label_smoothing=label_smoothing)
    pre, post = split_index(codes, model.cfg.pre_bits)
    return (F.cross_entropy(out[0].flatten(0, 1), pre.flatten(), label_smoothing=label_smoothing)
            + F.cross_entropy(out[1].flatten(0, 1), post.flatten(), label_smoothing=label_smoothing))


# ----------------------------------------------------------------------------------------------------------------
# MergeAR decoding: the compacted cache (the Position Cache of Fig. 6)
# ----------------------------------------------------------------------------------------------------------------


class MergeCacheLayout:
    """Which compacted slot holds which image position, per sample; one object shared by every layer's cache.

    Slots: [0, 1] the prefix C, M; [2, 2 + R) a ring of R = W + 1 slots for duplicates (the W before row t and t
    itself), the duplicate at image position j in slot 2 + j mod R; [2 + R, ...) the first members, appended per
    sample in raster order. A ring slot is live for row t while it holds a position j >= t - W. The write of a
    duplicate at t overwrites position t - R = t - W - 1 at the latest, which row t may no longer read, so every
    token is written before its row's attention and the attention reads the cache in place (no copy).
    Samples of a batch hold different numbers of first members: that region is padded to the batch maximum and
    `mask` marks each sample's live slots.
    """

    def __init__(self, batch, window, num_tokens, device):
        self.batch, self.window, self.ring = batch, window, window + 1
        self.capacity = 2 + self.ring + num_tokens                          # room for every token being a first
        self.ring_pos = torch.full((batch, self.ring), -(1 << 40), dtype=torch.long, device=device)  # empty: far back
        self.n_first = torch.zeros(batch, dtype=torch.long, device=device)
        self.prefill = True

    def plan(self, t, is_first):
        """Image position t is fed next: where its key goes (`slot`, (B,)) and the slots its row reads (`length`,
        `mask` (B, length)). is_first (B,) bool: t is its group's first member (a code not generated before)."""
        self.prefill = False
        B, dev = self.batch, is_first.device
        ring_slot = t % self.ring
        self.slot = torch.where(is_first, 2 + self.ring + self.n_first, torch.full_like(self.n_first, 2 + ring_slot))
        self.ring_pos[:, ring_slot] = torch.where(is_first, self.ring_pos[:, ring_slot],
                                                  torch.full_like(self.n_first, t))   # a duplicate enters the ring
        self.n_first += is_first.long()                                     # a first member is appended for good
        n_max = int(self.n_first.max())
        self.length = 2 + self.ring + n_max                                 # slots read, padding included
        ring_live = self.ring_pos >= t - self.window                        # (B, R) Eq. (12): t - j <= W
        first_live = torch.arange(n_max, device=dev)[None, :] < self.n_first[:, None]   # (B, n_max) not padding
        self.mask = torch.cat([torch.ones(B, 2, dtype=torch.bool, device=dev), ring_live, first_live], dim=1)

    def stored(self, t):
        """Live entries (B,) for row t: the prefix, the first members, the ring positions j >= t - W."""
        return 2 + self.n_first + (self.ring_pos >= t - self.window).sum(1)


class CompactKVCache:
    """One layer's keys and values in MergeAR's compacted layout (B, heads, capacity, D_h). Attention reads the
    first `layout.length` slots, never N: keys carry their RoPE rotation from the moment they were written, and
    attention is a function of the set of (key, value) pairs, so a slot's place is free."""

    def __init__(self, layout, heads, head_dim, dtype, device):
        self.layout = layout
        self.k = torch.zeros(layout.batch, heads, layout.capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def context(self, input_pos, k, v):
        lay = self.layout
        if lay.prefill:                                                     # [C, M]: causal, into slots 0 and 1
            S = k.shape[2]
            self.k[:, :, :S], self.v[:, :, :S] = k, v
            return k, v, torch.ones(S, S, dtype=torch.bool, device=k.device).tril()[None]
        b = torch.arange(lay.batch, device=k.device)
        self.k[b, :, lay.slot] = k[:, :, 0]                                 # (B, H, D_h) into each sample's slot
        self.v[b, :, lay.slot] = v[:, :, 0]
        L = lay.length
        return self.k[:, :, :L], self.v[:, :, :L], lay.mask[:, None, :]    # (B, H, L, D_h) x 2, (B, 1, L)


MergeARDecode = namedtuple("MergeARDecode", ["codes", "logits", "reads", "computed", "stored"])


@torch.no_grad()
def decode_mergear(model, cond, K, num_tokens, window=None, codes=None, compact=True, cfg_scale=1.0,
                   cfg_schedule="constant", temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """MergeAR's raster-order decoding of num_tokens codes for labels cond (B,) and kept count K (int or (B,)).

    codes=None samples (temperature, top-k, top-p, CFG u + s (c - u) on the batch [cond; null], M in both
    halves, s constant or linear over the codes as in `generate`); given codes (B, num_tokens) are replayed (teacher forcing through the cache). compact=True uses the
    compacted cache: a fed code that equals an earlier code (rep_from_codes' rule) is a duplicate and goes into the
    ring of W + 1 slots, any other code is appended for good. compact=False is part 1's KVCache: every position
    kept, the plain causal model on the same weights (the bench's baseline).

    Returns MergeARDecode(codes (B, N), logits (B, N, vocab) guided and pre-temperature (factorized: a pair),
    reads (B, N) keys each step's attention actually uses (prefix and the fed token included), computed (N,) keys
    the batched attention computes (padding included), stored (B,) live entries at the end (compact only)).
    """
    if cond.dim() != 1 or cond.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cond must be a 1D tensor of class labels, got {cond.dtype} {tuple(cond.shape)}")
    if not 0 < num_tokens <= model.cfg.block_size:
        raise ValueError(f"num_tokens must lie in [1, block_size = {model.cfg.block_size}], got {num_tokens}")
    if codes is not None and codes.shape != (cond.shape[0], num_tokens):
        raise ValueError(f"replayed codes must be (B, num_tokens) = ({cond.shape[0]}, {num_tokens}), "
                         f"got {tuple(codes.shape)}")
    W = merge_window(model, window)
    was_training = model.training
    model.eval()
    B, dev = cond.shape[0], cond.device
    use_cfg = cfg_scale != 1.0 or cfg_schedule != "constant"
    cfg_scale_at(0, num_tokens, cfg_scale, cfg_schedule)                    # an unknown schedule fails here
    halves = 2 if use_cfg else 1
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if use_cfg else cond   # (B', )
    K = torch.as_tensor(K, device=dev).long().reshape(-1).expand(B).repeat(halves)               # (B',)
    Bp = labels.shape[0]
    if compact:
        layout = MergeCacheLayout(Bp, W, num_tokens, dev)
        for layer in model.layers:
            a = layer.attention
            a.kv_cache = CompactKVCache(layout, a.n_head, a.head_dim, model.norm.weight.dtype, dev)
    else:
        model.setup_caches(Bp, num_tokens + 1)                              # positions 0 .. N (x_{N-1} is not fed)
    out, kept, reads, computed = [], [], [], []
    history = torch.empty(B, num_tokens, dtype=torch.long, device=dev)     # the codes fed so far
    try:
        h = model.run_layers(merge_prefix(model, labels, K), torch.arange(2, device=dev))   # prefill [C, M]
        for t in range(num_tokens):
            if t == 0:                                                      # the output at M predicts x_0
                reads.append(torch.full((B,), 2, device=dev))
                computed.append(2)
            else:                                                           # feed x_{t-1} at position t + 1
                x = out[-1]                                                 # (B,)
                if compact:
                    is_first = ~(history[:, : t - 1] == x[:, None]).any(1)  # rep_from_codes: a new code?
                    history[:, t - 1] = x
                    layout.plan(t - 1, is_first.repeat(halves))
                    reads.append(layout.mask[:B].sum(1))
                    computed.append(layout.mask.shape[1])
                else:
                    reads.append(torch.full((B,), t + 2, device=dev))       # prefix + x_0 .. x_{t-1}
                    computed.append(t + 2)
                h = model.run_layers(model.embed_codes(x.repeat(halves)[:, None]), torch.tensor([t + 1], device=dev))
            h = h[:, -1:]                                                   # (B', 1, D)
            scale = cfg_scale_at(t, num_tokens, cfg_scale, cfg_schedule)
            if not model.cfg.factorized:
                logits = combine(model.logits(h)[:, 0], B, use_cfg, True, scale)   # (B, vocab)
                code = codes[:, t] if codes is not None else sample_logits(logits, temperature, top_k, top_p,
                                                                           generator)
                kept.append(logits)
            else:
                l_pre = combine(model.intra_logits(h)[0][:, 0], B, use_cfg, True, scale)   # (B, 2^pre_bits)
                given = split_index(codes[:, t], model.cfg.pre_bits) if codes is not None else None
                pre = given[0] if given else sample_logits(l_pre, temperature, top_k, top_p, generator)
                l_post = combine(model.intra_logits(h, pre.repeat(halves)[:, None])[1][:, 0], B, use_cfg, True,
                                 scale)                                     # (B, 2^post_bits)
                post = given[1] if given else sample_logits(l_post, temperature, top_k, top_p, generator)
                code = join_index(pre, post, model.cfg.pre_bits)
                kept.append((l_pre, l_post))
            out.append(code)
        stored = layout.stored(num_tokens - 1)[:B] if compact else torch.full((B,), num_tokens + 1, device=dev)
    finally:
        model.clear_caches()
        model.train(was_training)
    if model.cfg.factorized:
        logits = tuple(torch.stack([k[i] for k in kept], dim=1) for i in (0, 1))   # (B, N, 64), (B, N, 2^post)
    else:
        logits = torch.stack(kept, dim=1)                                   # (B, N, vocab)
    return MergeARDecode(torch.stack(out, 1), logits, torch.stack(reads, 1), torch.tensor(computed), stored)


def generate_mergear(model, cond, K, N, window=None, cfg_scale=1.0, cfg_schedule="constant", temperature=1.0,
                     top_k=0, top_p=1.0, generator=None):
    """Sample all N codes (B, N) int64 with the compacted cache; see `decode_mergear`."""
    return decode_mergear(model, cond, K, N, window, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator).codes


def mergear_logits_cached(model, codes, cond, K, window=None, cfg_scale=1.0, cfg_schedule="constant"):
    """Feed the given codes (B, N) step by step through the compacted cache; every step's logits (B, N, vocab)
    (guided when cfg_scale != 1). Equals mergear_logits with rep_from_codes(codes) (the module docstring's
    invariant)."""
    return decode_mergear(model, cond, K, codes.shape[1], window, codes=codes, cfg_scale=cfg_scale,
                          cfg_schedule=cfg_schedule).logits


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
        loss = model(codes[:, :-1], labels, targets=codes).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 29:
            print(f"tiny step {step:2d}  loss {loss.item():.3f}  (uniform: {math.log(256):.3f})")
    out = generate(model, labels[:2], 16, cfg_scale=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    print("greedy codes with cfg 2.0:", out[0].tolist(), " training codes:", codes[0].tolist())

    # A tiny MergeAR, 100 steps: 8 sequences of 16 codes in 4 merged groups (contiguous runs), K = 4, W = 2 (the
    # window of Fig. 6); then greedy decoding with CFG through the compacted cache.
    model = build_gpt("tiny", vocab_size=256, num_classes=10, merge_counts=(4, 8, 16))
    cuts = torch.stack([torch.randperm(15)[:3].sort().values + 1 for _ in range(8)])     # (8, 3) run boundaries
    source = (torch.arange(16)[None, :, None] >= cuts[:, None, :]).sum(-1)               # (8, 16) group index
    codes = torch.randint(0, 256, (8, 4)).gather(1, source)                             # one code per group
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for step in range(100):
        loss = mergear_loss(model, codes, labels, 4, rep_from_source(source), window=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == 99:
            print(f"tiny MergeAR step {step:2d}  loss {loss.item():.3f}")
    d = decode_mergear(model, labels[:2], 4, 16, 2, cfg_scale=2.0, top_k=1)
    print("MergeAR greedy codes:", d.codes[0].tolist(), " training codes:", codes[0].tolist())
    print("keys read per step:", d.reads[0].tolist(), f"(plain cache: 2 .. 17); live entries at the end: "
          f"{d.stored[0].item()} <= K + W + 2 = 8 for 4 distinct codes")
