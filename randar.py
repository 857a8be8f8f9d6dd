"""RandAR on MergeVQ's merged tokens: random-order generation with Source Recovery (paper Sec. 4.2, Table 3).

Sec. 4.2: random-order AR generators "introduce positional encoding prediction", Eq. (13): the sequence is
randomly shuffled, and "a positional instruction token" before each image token names "its original position in
raster order". MergeVQ uses them with its K quantized merged tokens as the targets and, after generation, the
Source Recovery Model (recovery.py, Sec. 3.2) to predict the source that recovers the N tokens (Eq. (11)) for the
decoder. Table 3: G+R generates K = 144 tokens in 64 steps, G 256 tokens in 88 steps, with RandAR-L (343M) and
linear CFG. This file is RandAR (Pang et al. 2025, ziqipang/RandAR) built on gpt.py's LlamaGen transformer; the
layout below is read off RandAR's code, the positions of merged tokens are our reading.

  Tokens and cells. Every token has a cell of the N grid, its "original position in raster order": a merged token
    its anchor (merge.anchors: the first original position its group holds; K distinct cells of N), a recovered
    code (`--tokens grid`, Table 3's baseline row: all N cells, RandAR over a raster tokenizer's grid) its own
    cell. The model's RoPE grid is the N grid (block_size N): cell (r, c) rotates by [r theta, c theta].
  The model. gpt.py's Transformer with the same keys and shapes (LlamaGen's names, the plain or the factorized
    2^18 vocabulary) plus the position instruction embedding `pos_instruct_embeddings` (1, dim), N(0, 0.02),
    RandAR's name (RandAR-L = LlamaGen-L + 1024 parameters), and for merged tokens a position head
    `position_output` (dim -> N, zero at init), ours.
  The sequence. One permutation `order` per sample (order[i] = the slot generated at step i), and
        [C, P_0, X_0, P_1, X_1, ..., P_{L-1}, X_{L-1}]     at positions 0, 1, 2, ..., 2L,
    C the class token, X_i = the embedding of the token of slot order[i], P_i = the shared instruction embedding
    rotated, head by head, by the 2D RoPE of that token's cell ("generate this cell next"). In attention P_i and
    X_i both carry that cell's RoPE; C takes the zero class row (LlamaGen's convention: its q and k vanish).
    The output at P_i predicts X_i (read at positions 1, 3, ..., 2L - 1): the cross-entropy of every token,
    factorized CE(pre) + CE(post) as in gpt.py. Token dropout hits the image tokens X only (RandAR's choice).
  Where the cells come from at generation time. RandAR's own tokens fill the whole grid, so any order of the cells
    will do and RandAR draws one. K merged tokens sit at K of the N cells, and which K is part of the image (ToMe
    keeps a token where the content changes: the anchors trace the shape). So the model predicts them, Eq. (13)'s
    "positional encoding prediction" taken literally: the output at X_{i-1} (at C for i = 0), positions
    0, 2, ..., 2L - 2, gives a distribution over the cells not yet generated, trained by cross-entropy against the
    cell of the token that comes next in the random order. Its best answer is the cells still to come, each with
    the chance that it comes next; sampling from it draws the K anchors of an image one by one. The factorization
        p(cells, tokens | class) = prod_i p(cell_i | class, pairs < i) p(token_i | class, pairs < i, cell_i)
    is exact in any order, so the loss is the NLL of the image's (cell, token) pairs under a random order.

Parallel decoding (RandAR's, the invariant tests/test_randar.py checks). Step j samples n_j tokens, one per query
P_t, ..., P_{t+n_j-1} (t = tokens done before the step). Each step makes two calls through the KV cache:
  1. the previous step's tokens in the training layout, [X_s, P_{s+1}, X_{s+1}, ..., X_{t-1}] from X_s's position
     2 + 2s on (s = the previous step's first query; [C] at 0 for step 0), overwriting the stale queries P_{s+1} ..
     that stood there; its last output, at X_{t-1}, predicts the cell of token t. With predicted cells, the step's
     n_j cells are drawn from it without replacement (the first exactly, the others RandAR's approximation).
  2. the queries [P_t, ..., P_{t+n_j-1}] at positions 1 + 2t, 2 + 2t, ...: their outputs give the tokens.
  Why the first query of each step equals teacher forcing. By induction, after call 1 positions 0 .. 2t hold
  exactly the training inputs [C, P_0, X_0, ..., X_{t-1}]. A key or value at position p is a function of the inputs
  at positions <= p (causal attention; each row rotated by its own cell's RoPE before it is written), and the cache
  mask lets a query at p read l <= p only. So P_t at 1 + 2t reads the teacher-forced prefix. The other queries of a
  step read earlier queries in place of tokens, a context no training sequence shows (RandAR's approximation); all
  of them match teacher forcing when T = L. The cache holds 1 + 2L entries, RandAR's size.
  Schedule (`num_query_tokens_schedule`): tokens done after step j = max(j, min(floor((1 - cos(pi j / 2T)) L + 1),
  L)), RandAR's cosine rule after its off-by-one fix: 1 x 24, 2 x 9, 3 x 16, 4 x 29, 5 x 10 for T = 88, L = 256
  (not monotone). RandAR's loop always starts with one token; the closed form equals it whenever its first count is
  1 (T = 88, L = 256 and T = 64, L = 144 included) and otherwise keeps exactly T steps.
  Guidance. The batch [cond; null] shares the order, the cells and the tokens; step j uses s_j = 1 + (s - 1)
  (tokens done before step j) / L (RandAR's linear CFG from 1 to s, gpt.py's `cfg_scale_at`) on the token logits
  and on the cell logits alike.

Parts: cells and orders / the model / training layout and loss / parallel decoding / images through the Source
Recovery Model / demo.

    python randar.py                        # RandAR-L's parameter count, a tiny RandAR with predicted cells
    python -m pytest tests/test_randar.py   # schedule, cache == teacher forcing, cells, orders, CFG

    from randar import build_randar, randar_loss, generate_randar, decode_with_recovery
    model = build_randar("L", factorized=True, block_size=256, position_head=True)   # RandAR-L, G+R's N = 256
    loss = randar_loss(model, indices, labels, anchors)          # indices, anchors (B, 144): the tokenizer's
    indices, anchors = generate_randar(model.eval(), labels, 144, 64, cfg_scale=3.0)  # 64 steps, linear CFG
    images, source = decode_with_recovery(tokenizer, indices, anchors)   # Source Recovery, Eq. (11), decoder
"""
import math
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import (Transformer, apply_rotary_emb, cfg_scale_at, combine, count_parameters, gpt_config,
                 sample_logits)
from lfq import join_index, split_index

# ----------------------------------------------------------------------------------------------------------------
# Cells and orders
# ----------------------------------------------------------------------------------------------------------------


def check_cells(cells, B, L, N):
    """cells must be (B, L) integers, each row L distinct cells of the N grid."""
    if cells.shape != (B, L) or cells.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"cells must be (B, L) = ({B}, {L}) integers, got {cells.dtype} {tuple(cells.shape)}")
    cells = cells.long()
    if bool(((cells < 0) | (cells >= N)).any()):
        raise ValueError(f"cells must lie on the model's grid of N = {N} cells, got values in "
                         f"[{int(cells.min())}, {int(cells.max())}]")
    if L > 1 and bool((cells.sort(dim=1).values.diff(dim=1) == 0).any()):
        raise ValueError("cells must be distinct within every row: one token per cell")
    return cells


def random_orders(B, L, generator=None, device=None):
    """One uniform random permutation of the L slots per sample, (B, L) int64 (argsort of uniform noise), drawn on
    `device` (default: torch's default device) with `generator`, which must live there (a CUDA draw takes a CUDA
    generator)."""
    return torch.rand(B, L, generator=generator, device=device).argsort(dim=1)


def check_order(order, B, L):
    """order must be (B, L) integers, every row a permutation of 0 .. L-1."""
    if order.shape != (B, L) or order.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"order must be (B, L) = ({B}, {L}) integers, got {order.dtype} {tuple(order.shape)}")
    if not torch.equal(order.sort(dim=1).values, torch.arange(L, device=order.device).expand(B, L)):
        raise ValueError("order must hold a permutation of the slots 0 .. L-1 in every row")
    return order.long()


def to_generation_order(tokens, order):
    """Slot order -> generation order: x[:, i] = tokens[:, order[:, i]], (B, L)."""
    return tokens.gather(1, order)


def to_slot_order(x, order):
    """Generation order -> slot order: tokens[:, order[:, i]] = x[:, i], (B, L); the inverse of
    `to_generation_order` (the same as gathering with argsort(order), RandAR's inverse permutation)."""
    return torch.empty_like(x).scatter_(1, order, x)


def interleave(p, x):
    """(B, L, ...) and (B, L, ...) -> (B, 2L, ...): p_0, x_0, p_1, x_1, ..."""
    return torch.stack([p, x], dim=2).flatten(1, 2)                          # (B, L, 2, ...) -> (B, 2L, ...)


def used_cells(cells_gen, N):
    """(B, L) cells in generation order -> (B, L, N) bool: True where the cell was generated before step i (the
    cells step i's prediction may not name again)."""
    onehot = F.one_hot(cells_gen, N)                                         # (B, L, N)
    return (onehot.cumsum(dim=1) - onehot) > 0                               # exclusive running union


# ----------------------------------------------------------------------------------------------------------------
# The model: gpt.py's transformer plus the position instruction embedding and the position head
# ----------------------------------------------------------------------------------------------------------------

RandAROutput = namedtuple("RandAROutput", ["logits", "cell_logits"])


class RandARTransformer(Transformer):
    """gpt.py's Transformer (plain or factorized vocabulary, LlamaGen's keys) plus the shared position instruction
    embedding `pos_instruct_embeddings` (1, dim), N(0, 0.02), and with cfg.position_head the head that predicts the
    next token's cell, `position_output` (dim -> block_size cells, zero at init: the first cells uniform).
    forward(tokens, cond, order, cells) gives the teacher-forced logits in generation order; `decode_randar`
    decodes. gpt.py's raster `generate` does not apply."""

    def __init__(self, cfg):
        if cfg.merge_counts:
            raise ValueError("a RandAR model has no Merge Instruction token: build it without merge_counts")
        super().__init__(cfg)
        self.pos_instruct_embeddings = nn.Parameter(torch.empty(1, cfg.dim))
        nn.init.normal_(self.pos_instruct_embeddings, mean=0.0, std=cfg.initializer_range)
        if cfg.position_head:
            self.position_output = nn.Linear(cfg.dim, cfg.block_size, bias=False)
            nn.init.zeros_(self.position_output.weight)

    def cell_rope(self, cells):
        """The RoPE rows of cells (B, L) of the N grid, (B, L, D_h/2, 2) (row 0 of the table is the class row)."""
        return self.rope(cells.device)[1 + cells]

    def position_instructions(self, freqs):
        """P_i: the shared embedding, each head's D_h channels rotated by the RoPE of P_i's cell.
        freqs (B, L, D_h/2, 2) -> (B, L, D)."""
        B, L = freqs.shape[:2]
        H = self.cfg.n_head
        p = self.pos_instruct_embeddings.view(1, 1, H, -1).expand(B, L, H, -1)  # (B, L, H, D_h)
        return apply_rotary_emb(p, freqs).reshape(B, L, self.cfg.dim)       # (B, L, D)

    def cell_logits(self, h):
        """Position head: outputs h (B, S, D) -> float32 logits (B, S, N) of the next token's cell (unmasked)."""
        if not self.cfg.position_head:
            raise ValueError("this RandAR model has no position head (its cells are given: --tokens grid)")
        return self.position_output(self.norm(h)).float()

    def run_rotated(self, h, freqs, input_pos=None):
        """The main stack on h (B, S, D) with one RoPE row per sample and position, freqs (B, S, D_h/2, 2); causal
        (teacher forcing) or through the KV cache at positions input_pos (S,) (decoding). Activation checkpointing
        as gpt.Transformer.run_block."""
        for layer in self.layers:
            h = self.run_block(layer, h, freqs, input_pos)
        return h

    def forward(self, tokens, cond_idx, order, cells):
        """Teacher-forced outputs in generation order, tokens and cells (B, L) in slot order, cond_idx (B,), order
        (B, L). RandAROutput(logits: (B, L, vocab) float32, logits[:, i] predicts tokens[:, order[:, i]], or
        (logits_pre, logits_post), post given the true pre, for the factorized model; cell_logits: (B, L, N),
        cell_logits[:, i] predicts cells[:, order[:, i]], cells generated before step i at -inf; None without a
        position head)."""
        h, freqs = randar_inputs(self, tokens, cond_idx, order, cells)       # (B, 1 + 2L, D), (B, 1 + 2L, D_h/2, 2)
        h = self.run_rotated(h, freqs)                                      # (B, 1 + 2L, D)
        out_P = h[:, 1::2]                                                  # (B, L, D): the outputs at P_0 .. P_{L-1}
        if not self.cfg.factorized:
            logits = self.logits(out_P)                                     # (B, L, vocab)
        else:
            pre, _ = split_index(to_generation_order(tokens, order), self.cfg.pre_bits)
            logits = self.intra_logits(out_P, pre)                          # (B, L, 64), (B, L, 2^post_bits)
        cell_logits = None
        if self.cfg.position_head:
            cells_gen = to_generation_order(cells.long(), order)            # (B, L)
            cell_logits = self.cell_logits(h[:, 0:-1:2])                    # (B, L, N): outputs at C, X_0 .. X_{L-2}
            cell_logits = cell_logits.masked_fill(used_cells(cells_gen, self.cfg.block_size), float("-inf"))
        return RandAROutput(logits, cell_logits)

    def step(self, idx, cond_idx, input_pos):
        raise ValueError("this is a RandAR model (position instructions, per-sample orders): use generate_randar")


def build_randar(preset, vocab_size=None, factorized=False, num_classes=1000, **overrides):
    """A RandARTransformer from gpt.py's GPT_PRESETS ("tiny", "B", "L", "XL", "XXL"), like `build_gpt`: vocab_size
    defaults to 16384 (LlamaGen's and RandAR's VQ codebook) for the plain model and 2^18 (LFQ) for the factorized
    one; overrides set GPTConfig fields: block_size the N cells of the grid, position_head=True for merged tokens."""
    return RandARTransformer(gpt_config(preset, vocab_size, factorized, num_classes, **overrides))


# ----------------------------------------------------------------------------------------------------------------
# Training layout and loss
# ----------------------------------------------------------------------------------------------------------------


def randar_inputs(model, tokens, cond, order, cells):
    """The training sequence [C, P_0, X_0, ..., P_{L-1}, X_{L-1}] (B, 1 + 2L, D) and its RoPE rows
    (B, 1 + 2L, D_h/2, 2): zero for C, the cell of slot order[i] for both P_i and X_i. tokens, cells (B, L) in slot
    order. Class labels drop to the null class (p = 0.1) and image tokens get token dropout in train mode."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, L) indices in slot order, got {tuple(tokens.shape)}")
    B, L = tokens.shape
    if cond.shape != (B,):
        raise ValueError(f"cond must be (B,) = ({B},) class labels, got {tuple(cond.shape)}")
    order = check_order(order, B, L)
    cells = check_cells(cells, B, L, model.cfg.block_size)
    f = model.cell_rope(to_generation_order(cells, order))                  # (B, L, D_h/2, 2)
    P = model.position_instructions(f)                                      # (B, L, D)
    c = model.cls_embedding(cond, train=model.training)                     # (B, 1, D)
    X = model.tok_dropout(model.embed_codes(to_generation_order(tokens, order), c))   # (B, L, D), image tokens only
    h = torch.cat([c, interleave(P, X)], dim=1)                             # (B, 1 + 2L, D)
    f_cls = model.rope(tokens.device)[:1].expand(B, 1, -1, -1)              # (B, 1, D_h/2, 2): the zero class row
    return h, torch.cat([f_cls, interleave(f, f)], dim=1)                   # (B, 1 + 2L, D_h/2, 2)


RandARLosses = namedtuple("RandARLosses", ["tokens", "cells"])


def randar_losses(model, tokens, cond, cells, order=None, generator=None, label_smoothing=0.0):
    """The two cross-entropies of L (cell, token) pairs in random orders, each a mean over the L steps: "tokens"
    -log p(token_i | ..., cell_i) (factorized: CE(pre) + CE(post), the NLL of the 18-bit code) and "cells"
    -log p(cell_i | ...) (Eq. (13); 0 without a position head: the cells are given). tokens, cells (B, L) in slot
    order; one permutation per sample drawn from `generator` when order is None. label_smoothing (tokens only):
    Table A2 says 0.1; RandAR's code uses none (the default)."""
    if order is None:
        order = random_orders(tokens.shape[0], tokens.shape[1], generator, tokens.device)
    out = model(tokens, cond, order, cells)
    x = to_generation_order(tokens, order)                                  # (B, L) the targets, generation order
    if not model.cfg.factorized:
        token_loss = F.cross_entropy(out.logits.flatten(0, 1), x.flatten(), label_smoothing=label_smoothing)
    else:
        pre, post = split_index(x, model.cfg.pre_bits)
        token_loss = (F.cross_entropy(out.logits[0].flatten(0, 1), pre.flatten(), label_smoothing=label_smoothing)
                      + F.cross_entropy(out.logits[1].flatten(0, 1), post.flatten(), label_smoothing=label_smoothing))
    cell_loss = torch.zeros((), device=tokens.device)
    if out.cell_logits is not None:                                         # Eq. (13): (B*L, N) vs (B*L,)
        cell_loss = F.cross_entropy(out.cell_logits.flatten(0, 1), to_generation_order(cells.long(), order).flatten())
    return RandARLosses(token_loss, cell_loss)


def randar_loss(model, tokens, cond, cells, order=None, generator=None, label_smoothing=0.0):
    """The training loss: the NLL of the (cell, token) pairs per step, `randar_losses` summed."""
    return sum(randar_losses(model, tokens, cond, cells, order, generator, label_smoothing))


# ----------------------------------------------------------------------------------------------------------------
# Parallel decoding
# ----------------------------------------------------------------------------------------------------------------


def num_query_tokens_schedule(T, L):
    """Tokens sampled at each of T steps (a list of T counts >= 1 summing to L): RandAR's cosine schedule, tokens
    done after step j = max(j, min(floor((1 - cos(pi j / 2T)) L + 1), L)).

    Why every count is >= 1 for T <= L: g(j) = (1 - cos(pi j / 2T)) L is convex with g(0) = 0, so once
    floor(g(j - 1) + 1) >= j its average step, and so its next step, is >= 1; before that max(j, .) counts one per
    step. And g(T - 1) < L - 1 (sin(pi / 2T) > 1 / T >= 1 / L), so the last step still has a token."""
    if not 1 <= T <= L:
        raise ValueError(f"the number of steps T must lie in [1, L = {L}], got {T}")
    done = [0] + [max(j, min(math.floor((1 - math.cos(math.pi * j / (2 * T))) * L + 1), L)) for j in range(1, T + 1)]
    return [b - a for a, b in zip(done, done[1:])]


RandARDecode = namedtuple("RandARDecode", ["tokens", "cells", "order", "logits", "cell_logits", "counts", "cache"])


def write_tokens(model, x, f, j, counts, done, labels):
    """Call 1 of step j: the previous step's tokens in the training layout (step 0: the class token), written
    through the cache; returns the output at the last position (B', 1, D), which predicts the cell of token `done`.
    x (B', L) tokens and f (B', L, D_h/2, 2) RoPE rows so far, generation order."""
    if j == 0:
        h = model.cls_embedding(labels, train=False)                                        # (B', 1, D)
        freqs = model.rope(labels.device)[:1].expand(h.shape[0], 1, -1, -1)                 # (B', 1, D_h/2, 2)
        return model.run_rotated(h, freqs, torch.arange(0, 1, device=labels.device))
    s = done - counts[j - 1]                                                # the previous step's first query
    X = model.embed_codes(x[:, s:done], model.cls_embedding(labels, train=False))           # (B', m, D)
    P = model.position_instructions(f[:, s:done])                                           # (B', m, D)
    h = interleave(P, X)[:, 1:]                                             # [X_s, P_{s+1}, .., X_{done-1}]
    freqs = interleave(f[:, s:done], f[:, s:done])[:, 1:]                   # (B', 2m - 1, D_h/2, 2)
    pos = torch.arange(2 + 2 * s, 2 + 2 * s + h.shape[1], device=labels.device)
    return model.run_rotated(h, freqs, pos)[:, -1:]                         # (B', 1, D): the output at X_{done-1}


def sample_cells(model, h, B, use_cfg, scale, used, n, temperature, generator):
    """n distinct cells per sample from the position head's output h (B', 1, D): guided cell logits, the cells in
    `used` (B, N) removed, drawn without replacement by the Gumbel top-k trick (the n largest of logits / temperature
    + Gumbel noise are a draw without replacement from the softmax; torch.multinomial would return cells of
    probability 0 once the others are taken). Returns (cells (B, n), guided logits (B, N), masked)."""
    logits = combine(model.cell_logits(h)[:, 0], B, use_cfg, True, scale)   # (B, N) guided before masking
    logits = logits.masked_fill(used, float("-inf"))
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
    scores = logits / max(temperature, 1e-5) - torch.log(-torch.log(u))     # + Gumbel(0, 1) noise
    return scores.topk(n, dim=-1).indices, logits                           # (B, n), (B, N)


def sample_queries(model, h, B, use_cfg, scale, given, temperature, top_k, top_p, generator):
    """One token per query from the outputs h (B', n, D) of a step's queries: (tokens (B, n), the guided logits
    (B, n, vocab), or the pair (pre, post) for the factorized model, which samples pre, then post given pre).
    given (B, n): replay these tokens instead of sampling."""
    n = h.shape[1]

    def draw(logits):                                                       # (B, n, V) -> (B, n)
        return sample_logits(logits.flatten(0, 1), temperature, top_k, top_p, generator).view(B, n)

    halves = h.shape[0] // B
    if not model.cfg.factorized:
        logits = combine(model.logits(h), B, use_cfg, True, scale)          # (B, n, vocab)
        return (given if given is not None else draw(logits)), logits
    pre_bits = model.cfg.pre_bits
    known_pre, known_post = split_index(given, pre_bits) if given is not None else (None, None)
    l_pre = combine(model.intra_logits(h)[0], B, use_cfg, True, scale)     # (B, n, 2^pre_bits)
    pre = known_pre if given is not None else draw(l_pre)
    l_post = combine(model.intra_logits(h, pre.repeat(halves, 1))[1], B, use_cfg, True, scale)   # (B, n, 2^post)
    post = known_post if given is not None else draw(l_post)
    return join_index(pre, post, pre_bits), (l_pre, l_post)


def decoding_plan(model, cond, L, order, cells, tokens, generator):
    """The orders and the known cells and tokens of a decode, checked: (order (B, L), cells in generation order
    (B, L) or None when the model draws them, replayed tokens in generation order (B, L) or None)."""
    B, dev, N = cond.shape[0], cond.device, model.cfg.block_size
    if not 1 <= L <= N:
        raise ValueError(f"L = {L} tokens do not fit the model's grid of N = {N} cells")
    if cells is None:
        if not model.cfg.position_head:
            raise ValueError("this RandAR model has no position head: pass the cells to generate (e.g. all N)")
        if tokens is not None:
            raise ValueError("replayed tokens need their cells")
        return torch.arange(L, device=dev).expand(B, L), None, None         # drawn cells: slot i = step i
    cells = check_cells(cells.to(dev), B, L, N)
    order = random_orders(B, L, generator, dev) if order is None else check_order(order.to(dev), B, L)
    given = None
    if tokens is not None:
        if tokens.shape != (B, L):
            raise ValueError(f"replayed tokens must be (B, L) = ({B}, {L}), got {tuple(tokens.shape)}")
        given = to_generation_order(tokens.to(dev), order)                  # (B, L)
    return order, to_generation_order(cells, order), given


@torch.no_grad()
def decode_randar(model, cond, L, num_steps, cfg_scale=1.0, cfg_schedule="linear", temperature=1.0, top_k=0,
                  top_p=1.0, order=None, cells=None, generator=None, tokens=None, keep_cache=False):
    """RandAR's parallel decoding of L tokens in num_steps steps (`num_query_tokens_schedule`) for labels cond (B,).

    cells (B, L): the cell of every slot (all N cells for RandAR over a grid; replayed anchors), generated in
    `order` (drawn from `generator` if None); or None: the position head draws the cells step by step (merged
    tokens), and slot i is the token of step i. Sampling: temperature, top-k, top-p (the cells: temperature only);
    with cfg_scale != 1 guidance u + s (c - u) on the batch [cond; null], s linear from 1 (tokens done before the
    step / L) or constant, on token and cell logits. At s = 1 guidance is the identity and the null half is skipped.
    tokens (B, L) in slot order (with their cells): replay them through the cache instead of sampling (teacher
    forcing through the parallel layout).

    Returns RandARDecode(tokens, cells (B, L) in slot order, order, logits (B, L, vocab) in generation order, guided
    and pre-temperature (factorized: a pair), cell_logits (B, L, N) guided and masked (None when cells are given),
    counts (the schedule), cache: with keep_cache, each layer's (k, v) (B', heads, 1 + 2L, D_h) at the end).
    """
    if cond.dim() != 1 or cond.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cond must be a 1D tensor of class labels, got {cond.dtype} {tuple(cond.shape)}")
    B, dev, N = cond.shape[0], cond.device, model.cfg.block_size
    order, cells_gen, given = decoding_plan(model, cond, L, order, cells, tokens, generator)
    counts = num_query_tokens_schedule(num_steps, L)
    cfg_scale_at(0, L, cfg_scale, cfg_schedule)                             # an unknown schedule fails here
    use_cfg = cfg_scale != 1.0
    halves = 2 if use_cfg else 1
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if use_cfg else cond   # (B',)
    drawn = cells_gen is None
    if drawn:
        cells_gen = torch.zeros(B, L, dtype=torch.long, device=dev)         # filled step by step
    x = torch.zeros(B * halves, L, dtype=torch.long, device=dev)            # (B', L) tokens in generation order
    f = torch.zeros(B * halves, L, *model.rope(dev).shape[1:], device=dev)  # (B', L, D_h/2, 2) their RoPE rows
    used = torch.zeros(B, N, dtype=torch.bool, device=dev)                  # cells generated so far
    was_training = model.training
    model.eval()
    model.setup_caches(B * halves, 1 + 2 * L)
    kept, kept_cells, done = [], [], 0
    try:
        for j, n in enumerate(counts):
            scale = cfg_scale_at(done, L, cfg_scale, cfg_schedule)
            h_last = write_tokens(model, x, f, j, counts, done, labels)     # (B', 1, D)
            if drawn:
                new_cells, cell_logits = sample_cells(model, h_last, B, use_cfg, scale, used, n, temperature,
                                                      generator)
                cells_gen[:, done:done + n] = new_cells
                kept_cells.append(cell_logits[:, None].expand(-1, n, -1))
            used.scatter_(1, cells_gen[:, done:done + n], True)
            f[:, done:done + n] = model.cell_rope(cells_gen[:, done:done + n]).repeat(halves, 1, 1, 1)
            P = model.position_instructions(f[:, done:done + n])            # (B', n, D)
            pos = torch.arange(1 + 2 * done, 1 + 2 * done + n, device=dev)
            h = model.run_rotated(P, f[:, done:done + n], pos)              # (B', n, D): the outputs at the queries
            replay = None if given is None else given[:, done:done + n]     # (B, n)
            new, logits = sample_queries(model, h, B, use_cfg, scale, replay, temperature, top_k, top_p, generator)
            x[:, done:done + n] = new.repeat(halves, 1)                     # both halves feed the same tokens
            kept.append(logits)
            done += n
        cache = [(l.attention.kv_cache.k, l.attention.kv_cache.v) for l in model.layers] if keep_cache else None
    finally:
        model.clear_caches()
        model.train(was_training)
    if model.cfg.factorized:
        logits = tuple(torch.cat([k[i] for k in kept], dim=1) for i in (0, 1))   # (B, L, 64), (B, L, 2^post_bits)
    else:
        logits = torch.cat(kept, dim=1)                                     # (B, L, vocab)
    cell_logits = torch.cat(kept_cells, dim=1) if drawn else None           # (B, L, N)
    return RandARDecode(to_slot_order(x[:B], order), to_slot_order(cells_gen, order), order, logits, cell_logits,
                        counts, cache)


@torch.no_grad()
def teacher_forced_samples(model, tokens, cond, cells, order=None, temperature=1.0, generator=None):
    """What the generator would write at each slot given the true (cell, token) pairs before it and the slot's
    cell: one token per slot drawn from the teacher-forced distribution (the factorized head draws pre, then post
    given the drawn pre), (B, L) in slot order. These are generator-made codes of real images whose true source is
    known: the fine-tuning data of the Source Recovery Model (train_stage2.py finetune-recovery). order: drawn
    from `generator` when None."""
    B, L = tokens.shape
    if order is None:
        order = random_orders(B, L, generator, tokens.device)
    was_training = model.training
    model.eval()
    try:
        h, freqs = randar_inputs(model, tokens, cond, order, cells)         # (B, 1 + 2L, D), rows of RoPE
        h = model.run_rotated(h, freqs)[:, 1::2]                            # (B, L, D): the outputs at the P_i
        x, _ = sample_queries(model, h, B, False, 1.0, None, temperature, 0, 1.0, generator)   # (B, L) gen. order
    finally:
        model.train(was_training)
    return to_slot_order(x, order)


def generate_randar(model, cond, L, num_steps, cfg_scale=1.0, cfg_schedule="linear", temperature=1.0, top_k=0,
                    top_p=1.0, cells=None, generator=None):
    """Sample L tokens for labels cond (B,) in num_steps parallel steps: (tokens (B, L), cells (B, L)), the cells
    drawn by the position head (merged tokens: the anchors) unless given (a grid's cells, each its own slot, in a
    random order). RandAR's defaults: 88 steps for L = 256, linear CFG, top-k 0, top-p 1, temperature 1. See
    `decode_randar`."""
    d = decode_randar(model, cond, L, num_steps, cfg_scale, cfg_schedule, temperature, top_k, top_p, None, cells,
                      generator)
    return d.tokens, d.cells


# ----------------------------------------------------------------------------------------------------------------
# Images: the Source Recovery Model, recovery (Eq. (11)) and the decoder
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_with_recovery(tokenizer, indices, anchors):
    """Generated merged indices (B, K) at their anchors (B, K) -> (images (B, 3, H, W), the predicted source (B, N)).

    Sec. 4.2: the source is unknown after generation; the Source Recovery Model predicts it from the quantized
    tokens z_q (B, K, d) at their anchors (recovery.py, Eq. (8)), the tokens are copied to their N positions
    (Eq. (11)) and decoded. The same as tokenizer.decode(indices, None, anchors); this also returns the source."""
    z_q = tokenizer.quantizer.indices_to_codes(indices).to(tokenizer.decoder.conv_in.weight.dtype)   # (B, K, d)
    source = tokenizer.recovery.predict_source(z_q, anchors)                 # (B, N)
    return tokenizer.decode_codes(z_q, source), source


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.set_num_threads(1)                       # tiny ops: a second thread costs more than it saves
    with torch.device("meta"):
        plain, fact = build_randar("L"), build_randar("L", factorized=True)
    print(f"RandAR-L: {count_parameters(plain):,} parameters (vocab 16384; LlamaGen-L + 1024), "
          f"{count_parameters(fact):,} factorized (2^18 codes as 64 x 4096)")
    for T, L in ((88, 256), (64, 144)):
        counts = num_query_tokens_schedule(T, L)
        print(f"schedule T = {T}, L = {L}: {counts[:30]} ... {counts[-6:]}")

    # A tiny RandAR with a position head, 60 steps on 8 fixed images of K = 6 tokens at 6 of the 16 cells of a
    # 4 x 4 grid, a fresh order every step.
    torch.manual_seed(0)
    model = build_randar("tiny", vocab_size=256, num_classes=10, position_head=True)
    tokens, labels = torch.randint(0, 256, (8, 6)), torch.arange(8)
    cells = torch.rand(8, 16).argsort(1)[:, :6]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for step in range(60):
        loss = randar_losses(model, tokens, labels, cells)
        opt.zero_grad()
        sum(loss).backward()
        opt.step()
        if step % 20 == 0 or step == 59:
            print(f"tiny RandAR step {step:2d}  tokens {loss.tokens.item():.3f} (uniform {math.log(256):.3f})  "
                  f"cells {loss.cells.item():.3f}")
    gen = torch.Generator().manual_seed(0)
    d = decode_randar(model, labels[:2], 6, 3, cfg_scale=2.0, top_k=1, temperature=1e-6, generator=gen)
    print(f"3 parallel steps, tokens per step {d.counts}")
    print("greedy (cell, token) pairs with linear cfg 1 -> 2:", sorted(zip(d.cells[0].tolist(), d.tokens[0].tolist())))
    print("training pairs:                                   ", sorted(zip(cells[0].tolist(), tokens[0].tolist())))
