"""RandAR on MergeVQ's merged tokens: random-order generation with Source Recovery (paper Sec. 4.2, Table 3).

Sec. 4.2: random-order AR generators "introduce positional encoding prediction": the sequence is randomly
shuffled, and "a positional instruction token" before each image token names the original position of the token to
come. MergeVQ uses them with its K quantized merged tokens as the targets and, after generation, the Source
Recovery Model (recovery.py, Sec. 3.2) to predict the source that recovers the N tokens (Eq. (11)) for the decoder.
Table 3: G+R generates K = 144 tokens in 64 steps, G 256 tokens in 88 steps, with RandAR-L (343M) and linear CFG.
This file is RandAR (Pang et al. 2025, ziqipang/RandAR) built on gpt.py's LlamaGen transformer; the layout
below is read off RandAR's code.

  The model. gpt.py's Transformer with the same keys and shapes (LlamaGen's names, the plain or the factorized
    2^18 vocabulary) plus one parameter, the position instruction embedding `pos_instruct_embeddings` (1, dim),
    N(0, 0.02), RandAR's name: RandAR-L = LlamaGen-L + 1024 parameters.
  The sequence. One permutation `order` per sample (order[i] = the slot generated at step i), and
        [C, P_0, X_0, P_1, X_1, ..., P_{L-1}, X_{L-1}]     at positions 0, 1, 2, ..., 2L,
    C the class token, X_i = the embedding of the token of slot order[i], P_i = the shared instruction embedding
    rotated, head by head, by the 2D RoPE of the cell of slot order[i] ("generate this cell next"). In attention P_i
    and X_i both carry that cell's RoPE; C takes the zero class row (LlamaGen's convention: its q and k vanish).
    The output at P_i predicts X_i (logits read at positions 1, 3, ..., 2L - 1), so the loss is the cross-entropy
    of every token, factorized: CE(pre) + CE(post) as in gpt.py. Token dropout hits the image tokens X only, not
    C or P (RandAR's choice; LlamaGen drops the whole [class, tokens] sequence).
  Slots and cells. L = K merged tokens, a perfect square (every K the paper uses is), on a sqrt(K) x sqrt(K) grid:
    slot k, the k-th output of ToMe (merge.py), sits at cell (k // sqrt(K), k % sqrt(K)). The cell (r, c) rotates
    by [r theta, c theta] in any grid, so a model built for a larger grid (block_size 256) serves K = 144 by reading
    the rows of those cells in its table. We keep ToMe's output order as the slot order for two reasons. The Source
    Recovery Model was trained on it: its slot embedding is indexed by k (recovery.py), so the generated tokens go
    back to slot order k (`to_slot_order`) before `predict_source` and nothing else has to be permuted. And that
    order already codes position: every merge outputs [unmerged A tokens ranked by match score, all B tokens in
    raster order] (merge.py), and a guess of a position's merged token from its slot alone is right for 0.34 of
    the positions on our tiny tokenizer (README); RoPE on the slot grid hands that structure to the generator.

Parallel decoding (RandAR's, the invariant tests/test_randar.py checks). Step j samples n_j tokens, one per query
P_t, ..., P_{t+n_j-1} (t = tokens done before the step), all read from one call. The next call writes, from the
position of the first query P_t on,
        [X_t, P_{t+1}, X_{t+1}, ..., P_{t+n_j-1}, X_{t+n_j-1}, P_{t'}, ..., P_{t'+n_{j+1}-1}]      (t' = t + n_j)
i.e. the stale query slots are overwritten with the training layout and the next queries are appended.
  1. By induction, after each call positions 0 .. 2t' hold exactly the training inputs [C, P_0, X_0, ..., X_{t'-1}]:
     the call rewrote everything past the previous first query (which stood where the training layout has it).
  2. A key or value at position p is a function of the inputs at positions <= p (causal attention; each row carries
     its own cell's RoPE, rotated before it is written), and the cache mask lets a query at p read l <= p only.
     So the first query P_{t'} at 2t' + 1 reads the teacher-forced prefix: its logits equal teacher forcing. The
     other queries of a step read earlier queries in place of tokens, a context no training sequence shows
     (RandAR's approximation); all of them match teacher forcing when T = L.
  3. Every call writes at least as far as the previous one (2t' + n_{j+1} >= t + t'), so no slot at or below the
     last written one is stale except the current queries, and attention never reads past it. The cache holds
     1 + 2L entries, RandAR's size (X_{L-1}'s slot, 2L, is never written: the last step ends at 2L - n_T).
  Schedule (`num_query_tokens_schedule`): tokens done after step j = max(j, min(floor((1 - cos(pi j / 2T)) L + 1),
  L)), RandAR's cosine rule after its off-by-one fix: 1 x 24, 2 x 9, 3 x 16, 4 x 29, 5 x 10 for T = 88, L = 256
  (not monotone). RandAR's loop always starts with one token; the closed form equals it whenever its first count is
  1 (T = 88, L = 256 and T = 64, L = 144 included) and otherwise (few steps, e.g. T = 3, L = 16: 3, 5, 8 against
  RandAR's 1, 7, 8, which overruns T when T = 1) keeps exactly T steps.
  Guidance. The batch [cond; null] shares the order and the tokens; step j uses s_j = 1 + (s - 1) (tokens done
  before step j) / L (RandAR's linear CFG from 1 to s, gpt.py's `cfg_scale_at`; the paper sweeps s in steps of 0.1).

Parts: slots, cells and orders / the model / training layout and loss / parallel decoding / images through the
Source Recovery Model / demo.

    python randar.py                        # RandAR-L's parameter count, a tiny RandAR: 40 steps, the schedule,
                                            # parallel decoding with CFG
    python -m pytest tests/test_randar.py   # schedule, cache == teacher forcing, orders, position instruction, CFG

    from randar import build_randar, randar_loss, generate_randar, decode_with_recovery
    model = build_randar("L", factorized=True, block_size=144)          # RandAR-L on 2^18 codes, K = 144 (G+R)
    loss = randar_loss(model, indices, labels)                          # indices (B, 144): the tokenizer's, slot order
    indices = generate_randar(model.eval(), labels, 144, 64, cfg_scale=3.0)   # slot order, 64 steps, linear CFG
    images, source = decode_with_recovery(tokenizer, indices)          # Source Recovery, Eq. (11), decoder
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
# Slots, cells and orders
# ----------------------------------------------------------------------------------------------------------------


def slot_rope_rows(model, L, device=None):
    """The RoPE table rows (L,) of slots 0 .. L-1: slot k at cell (k // sqrt(L), k % sqrt(L)), looked up in the
    model's table of sqrt(block_size)^2 cells (after its class row). The angles of a cell do not depend on the grid
    it is listed in, so any square L <= block_size works."""
    g, G = math.isqrt(L), math.isqrt(model.cfg.block_size)
    if L < 1 or g * g != L:
        raise ValueError(f"RandAR lays the L merged tokens on a square grid: L must be a perfect square, got {L}")
    if g > G:
        raise ValueError(f"L = {L} tokens need a {g} x {g} grid, larger than the model's {G} x {G} (block_size)")
    k = torch.arange(L, device=device)
    return 1 + (k // g) * G + k % g                                          # (L,): class row 0, then raster cells


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


# ----------------------------------------------------------------------------------------------------------------
# The model: gpt.py's transformer plus the position instruction embedding
# ----------------------------------------------------------------------------------------------------------------


class RandARTransformer(Transformer):
    """gpt.py's Transformer (plain or factorized vocabulary, LlamaGen's keys) plus the shared position instruction
    embedding `pos_instruct_embeddings` (1, dim), N(0, 0.02). forward(tokens, cond, order) gives the teacher-forced
    logits in generation order; `generate_randar` decodes. gpt.py's raster `generate` does not apply."""

    def __init__(self, cfg):
        if cfg.merge_counts:
            raise ValueError("a RandAR model has no Merge Instruction token: build it without merge_counts")
        super().__init__(cfg)
        self.pos_instruct_embeddings = nn.Parameter(torch.empty(1, cfg.dim))
        nn.init.normal_(self.pos_instruct_embeddings, mean=0.0, std=cfg.initializer_range)

    def cell_rope(self, order, L):
        """The RoPE rows of the cells generated at each step, (B, L, D_h/2, 2)."""
        rows = slot_rope_rows(self, L, order.device)[order]                   # (B, L)
        return self.rope(order.device)[rows]                                  # (B, L, D_h/2, 2)

    def position_instructions(self, freqs):
        """P_i: the shared embedding, each head's D_h channels rotated by the RoPE of P_i's cell.
        freqs (B, L, D_h/2, 2) -> (B, L, D)."""
        B, L = freqs.shape[:2]
        H = self.cfg.n_head
        p = self.pos_instruct_embeddings.view(1, 1, H, -1).expand(B, L, H, -1)  # (B, L, H, D_h)
        return apply_rotary_emb(p, freqs).reshape(B, L, self.cfg.dim)       # (B, L, D)

    def run_rotated(self, h, freqs, input_pos=None):
        """The main stack on h (B, S, D) with one RoPE row per sample and position, freqs (B, S, D_h/2, 2); causal
        (teacher forcing) or through the KV cache at positions input_pos (S,) (decoding). Activation checkpointing
        as gpt.Transformer.run_block."""
        for layer in self.layers:
            h = self.run_block(layer, h, freqs, input_pos)
        return h

    def forward(self, tokens, cond_idx, order):
        """Teacher-forced logits in generation order: logits[:, i] predicts tokens[:, order[:, i]]. tokens (B, L) in
        slot order, cond_idx (B,), order (B, L). Returns (B, L, vocab) float32, or (logits_pre, logits_post), post
        given the true pre, for the factorized model."""
        h, freqs = randar_inputs(self, tokens, cond_idx, order)              # (B, 1 + 2L, D), (B, 1 + 2L, D_h/2, 2)
        h = self.run_rotated(h, freqs)[:, 1::2]                             # (B, L, D): the outputs at P_0 .. P_{L-1}
        if not self.cfg.factorized:
            return self.logits(h)                                           # (B, L, vocab)
        pre, _ = split_index(to_generation_order(tokens, order), self.cfg.pre_bits)
        return self.intra_logits(h, pre)                                    # (B, L, 64), (B, L, 2^post_bits)

    def step(self, idx, cond_idx, input_pos):
        raise ValueError("this is a RandAR model (position instructions, per-sample orders): use generate_randar")


def build_randar(preset, vocab_size=None, factorized=False, num_classes=1000, **overrides):
    """A RandARTransformer from gpt.py's GPT_PRESETS ("tiny", "B", "L", "XL", "XXL"), like `build_gpt`: vocab_size
    defaults to 16384 (LlamaGen's and RandAR's VQ codebook) for the plain model and 2^18 (LFQ) for the factorized
    one; overrides set GPTConfig fields. block_size sets the RoPE grid (256 = 16 x 16): any square K up to it works
    (K = 144 on the default grid)."""
    return RandARTransformer(gpt_config(preset, vocab_size, factorized, num_classes, **overrides))


# ----------------------------------------------------------------------------------------------------------------
# Training layout and loss
# ----------------------------------------------------------------------------------------------------------------


def randar_inputs(model, tokens, cond, order):
    """The training sequence [C, P_0, X_0, ..., P_{L-1}, X_{L-1}] (B, 1 + 2L, D) and its RoPE rows
    (B, 1 + 2L, D_h/2, 2): zero for C, the cell of slot order[i] for both P_i and X_i. tokens (B, L) in slot order.
    Class labels drop to the null class (p = 0.1) and image tokens get token dropout in train mode."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, L) merged indices in slot order, got {tuple(tokens.shape)}")
    B, L = tokens.shape
    if cond.shape != (B,):
        raise ValueError(f"cond must be (B,) = ({B},) class labels, got {tuple(cond.shape)}")
    order = check_order(order, B, L)
    f = model.cell_rope(order, L)                                           # (B, L, D_h/2, 2)
    P = model.position_instructions(f)                                      # (B, L, D)
    c = model.cls_embedding(cond, train=model.training)                     # (B, 1, D)
    X = model.tok_dropout(model.embed_codes(to_generation_order(tokens, order), c))   # (B, L, D), image tokens only
    h = torch.cat([c, interleave(P, X)], dim=1)                             # (B, 1 + 2L, D)
    f_cls = model.rope(tokens.device)[:1].expand(B, 1, -1, -1)              # (B, 1, D_h/2, 2): the zero class row
    return h, torch.cat([f_cls, interleave(f, f)], dim=1)                   # (B, 1 + 2L, D_h/2, 2)


def randar_logits(model, tokens, cond, order):
    """Teacher-forced logits in generation order, (B, L, vocab) or the factorized pair; see RandARTransformer."""
    return model(tokens, cond, order)


def randar_loss(model, tokens, cond, order=None, generator=None, label_smoothing=0.0):
    """Cross-entropy of all L tokens (B, L) (slot order) in random orders: one permutation per sample drawn from
    `generator` when order is None. Factorized: CE(pre) + CE(post), the NLL of the 18-bit code. label_smoothing:
    Table A2 says 0.1; RandAR's code uses none (the default)."""
    if order is None:
        order = random_orders(tokens.shape[0], tokens.shape[1], generator, tokens.device)
    out = model(tokens, cond, order)
    x = to_generation_order(tokens, order)                                  # (B, L) the targets, generation order
    if not model.cfg.factorized:
        return F.cross_entropy(out.flatten(0, 1), x.flatten(), label_smoothing=label_smoothing)  # (B*L, V) vs (B*L,)
    pre, post = split_index(x, model.cfg.pre_bits)
    return (F.cross_entropy(out[0].flatten(0, 1), pre.flatten(), label_smoothing=label_smoothing)
            + F.cross_entropy(out[1].flatten(0, 1), post.flatten(), label_smoothing=label_smoothing))


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


RandARDecode = namedtuple("RandARDecode", ["tokens", "order", "logits", "counts", "cache"])


def step_inputs(model, P, f, x, counts, j, done, labels):
    """The input of decoding call j: embeddings (B', S, D), RoPE rows (B', S, D_h/2, 2) and positions (S,).
    Call 0 is [C, P_0 .. P_{n-1}] at 0 .. n. Call j > 0 rewrites the previous step's queries from the first one's
    place on, in the training layout, and appends the next queries:
        [X_s, P_{s+1}, X_{s+1}, .., X_{done-1}, P_done, .., P_{done+n-1}]  at positions 2 + 2s, ..
    (s = the generation index of the previous step's first query). P, f: (B', L, ...) for the whole order;
    x (B', L) the tokens so far, generation order."""
    n = counts[j]
    rope = model.rope(P.device)
    if j == 0:
        h = torch.cat([model.cls_embedding(labels, train=False), P[:, :n]], dim=1)            # (B', 1 + n, D)
        freqs = torch.cat([rope[:1].expand(P.shape[0], 1, -1, -1), f[:, :n]], dim=1)        # (B', 1 + n, D_h/2, 2)
        return h, freqs, torch.arange(0, 1 + n, device=P.device)
    m = counts[j - 1]
    s = done - m
    X = model.embed_codes(x[:, s:done], model.cls_embedding(labels, train=False))           # (B', m, D)
    h = torch.cat([interleave(P[:, s:done], X)[:, 1:], P[:, done:done + n]], dim=1)         # (B', 2m - 1 + n, D)
    freqs = torch.cat([interleave(f[:, s:done], f[:, s:done])[:, 1:], f[:, done:done + n]], dim=1)
    return h, freqs, torch.arange(2 + 2 * s, 2 + 2 * s + h.shape[1], device=P.device)


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


@torch.no_grad()
def decode_randar(model, cond, L, num_steps, cfg_scale=1.0, cfg_schedule="linear", temperature=1.0, top_k=0,
                  top_p=1.0, order=None, generator=None, tokens=None, keep_cache=False):
    """RandAR's parallel decoding of L tokens in num_steps steps (`num_query_tokens_schedule`) for labels cond (B,).

    order (B, L): the generation order (drawn from `generator` if None). Sampling: temperature, top-k, top-p; with
    cfg_scale != 1 guidance u + s (c - u) on the batch [cond; null], s linear from 1 (tokens done before the step
    / L) or constant. At s = 1 guidance is the identity and the null half is skipped. tokens (B, L) in slot order:
    replay them through the cache instead of sampling (teacher forcing through the parallel layout).

    Returns RandARDecode(tokens (B, L) in slot order, order, logits (B, L, vocab) in generation order, guided and
    pre-temperature (factorized: a pair), counts (the schedule), cache: with keep_cache, each layer's (k, v)
    (B', heads, 1 + 2L, D_h) at the end, else None).
    """
    if cond.dim() != 1 or cond.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cond must be a 1D tensor of class labels, got {cond.dtype} {tuple(cond.shape)}")
    B, dev = cond.shape[0], cond.device
    slot_rope_rows(model, L)                                                # L square and within the grid
    counts = num_query_tokens_schedule(num_steps, L)
    order = random_orders(B, L, generator, dev) if order is None else check_order(order.to(dev), B, L)
    given = None
    if tokens is not None:
        if tokens.shape != (B, L):
            raise ValueError(f"replayed tokens must be (B, L) = ({B}, {L}), got {tuple(tokens.shape)}")
        given = to_generation_order(tokens, order)                          # (B, L)
    cfg_scale_at(0, L, cfg_scale, cfg_schedule)                             # an unknown schedule fails here
    use_cfg = cfg_scale != 1.0
    halves = 2 if use_cfg else 1
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if use_cfg else cond   # (B',)
    was_training = model.training
    model.eval()
    f = model.cell_rope(order, L)                                           # (B, L, D_h/2, 2)
    P = model.position_instructions(f).repeat(halves, 1, 1)                 # (B', L, D): both halves, one order
    f = f.repeat(halves, 1, 1, 1)                                           # (B', L, D_h/2, 2)
    x = torch.zeros(B * halves, L, dtype=torch.long, device=dev)            # (B', L) tokens in generation order
    model.setup_caches(B * halves, 1 + 2 * L)
    kept, done = [], 0
    try:
        for j, n in enumerate(counts):
            h, freqs, pos = step_inputs(model, P, f, x, counts, j, done, labels)
            h = model.run_rotated(h, freqs, pos)[:, -n:]                    # (B', n, D): the outputs at the queries
            scale = cfg_scale_at(done, L, cfg_scale, cfg_schedule)
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
    return RandARDecode(to_slot_order(x[:B], order), order, logits, counts, cache)


@torch.no_grad()
def teacher_forced_samples(model, tokens, cond, order=None, temperature=1.0, generator=None):
    """What the generator would write at each slot given the true tokens before it: one token per slot drawn from
    the teacher-forced distribution (the factorized head draws pre, then post given the drawn pre), (B, L) in slot
    order. These are generator-made codes of real images whose true source is known: the fine-tuning data of the
    Source Recovery Model (train_stage2.py finetune-recovery). order: drawn from `generator` when None."""
    B, L = tokens.shape
    if order is None:
        order = random_orders(B, L, generator, tokens.device)
    was_training = model.training
    model.eval()
    try:
        h, freqs = randar_inputs(model, tokens, cond, order)                # (B, 1 + 2L, D), rows of RoPE
        h = model.run_rotated(h, freqs)[:, 1::2]                            # (B, L, D): the outputs at the P_i
        x, _ = sample_queries(model, h, B, False, 1.0, None, temperature, 0, 1.0, generator)   # (B, L) gen. order
    finally:
        model.train(was_training)
    return to_slot_order(x, order)


def generate_randar(model, cond, L, num_steps, cfg_scale=1.0, cfg_schedule="linear", temperature=1.0, top_k=0,
                    top_p=1.0, order=None, generator=None):
    """Sample L merged tokens for labels cond (B,) in num_steps parallel steps; (B, L) int64 in slot order (the
    order the Source Recovery Model reads). RandAR's defaults: 88 steps for L = 256, linear CFG, top-k 0, top-p 1,
    temperature 1. See `decode_randar`."""
    return decode_randar(model, cond, L, num_steps, cfg_scale, cfg_schedule, temperature, top_k, top_p, order,
                         generator).tokens


# ----------------------------------------------------------------------------------------------------------------
# Images: the Source Recovery Model, recovery (Eq. (11)) and the decoder
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_with_recovery(tokenizer, indices):
    """Generated merged indices (B, K) in slot order -> (images (B, 3, H, W), the predicted source (B, N)).

    Sec. 4.2: the source is unknown after generation; the Source Recovery Model predicts it from the quantized
    tokens z_q (B, K, d) (recovery.py, Eq. (8)), the tokens are copied to their N positions (Eq. (11)) and decoded.
    The same as tokenizer.decode(indices), which predicts the source when none is given; this also returns it."""
    z_q = tokenizer.quantizer.indices_to_codes(indices).to(tokenizer.decoder.conv_in.weight.dtype)   # (B, K, d)
    source = tokenizer.recovery.predict_source(z_q)                          # (B, N)
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

    # A tiny RandAR, 40 steps on 8 fixed sequences of K = 16 tokens (a 4 x 4 slot grid), a fresh order every step.
    torch.manual_seed(0)
    model = build_randar("tiny", vocab_size=256, num_classes=10)
    tokens, labels = torch.randint(0, 256, (8, 16)), torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for step in range(40):
        loss = randar_loss(model, tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 39:
            print(f"tiny RandAR step {step:2d}  loss {loss.item():.3f}  (uniform: {math.log(256):.3f})")
    gen = torch.Generator().manual_seed(0)
    d = decode_randar(model, labels[:2], 16, 6, cfg_scale=2.0, top_k=1, generator=gen)
    print(f"6 parallel steps, tokens per step {d.counts}; order of sample 0: {d.order[0].tolist()}")
    print("greedy tokens with linear cfg 1 -> 2 (slot order):", d.tokens[0].tolist())
    print("training tokens:                                  ", tokens[0].tolist())
    print(f"slots right: {(d.tokens == tokens[:2]).float().mean().item():.2f}")
