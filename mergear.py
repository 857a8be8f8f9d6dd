"""MergeAR: raster-order generation with KV-cache compression (paper Sec. 4.1, Eq. (12), Fig. 6, Table 3).

MergeAR is LlamaGen's GPT (gpt.py) with three additions, in the order this file defines them: the Merge Instruction
token M after the class token, the sparse causal mask of Eq. (12) in training, and a compacted KV cache in
decoding that holds exactly the keys that mask lets the next token read. The paper states the idea in a few
sentences and one figure; the rules below are our reading of them, each with the evidence it rests on.

  What is generated. All N recovered codes, in raster order, one per step: Table 3's "Step" column reads 256
    for MergeVQ (G+R) + MergeAR (144 merged tokens recovered to 256) and 1024 for (G) (256 recovered to 1024),
    the lengths of the recovered codes. The members of one merged group are identical copies of one code
    (recovery, Eq. (11), copies the merged token to each of its positions), and Appendix A.2 says MergeAR needs
    no Source Recovery Model. The saving is a shorter attention context per step, not fewer steps.
  The prefix [C, M]. C is the class embedding; M the Merge Instruction token, "a learnable embedding token with
    a given merge number" (Appendix A.2): one row per allowed kept count K (cfg.merge_counts). We index by K, the
    number the tokenizer samples (Appendix A.3 samples "the number of tokens retained"); with N fixed it carries
    the same information as r = N - K. Both take zero RoPE rows (LlamaGen's class-token convention) and are
    never evicted.
  The mask, Eq. (12). With rep[j] = the first raster position of j's group, image position t attends to C, M and
        j <= t  and  (rep[j] == j  or  t - j <= W),
    the first member of every group seen so far plus the W tokens before t: our reading of Fig. 6 (9 tokens,
    groups {1,2}, {3,4}, {5,6,7}, {8,9}, W = 2: each row sees itself and the two before it, further back only
    first members). It keeps the property Sec. 4.1 asks for: "each original token is represented by at most one
    merged token in the context" outside the window. The loss is on all N positions: Fig. 6's target row
    includes the duplicates.
  The window W, shared by training and inference. Fig. 6 draws 2; our default is one grid row, sqrt(N) (16 at
    N = 256, 32 at N = 1024): then every token sees the token directly above it and the row between, the
    neighbourhood 2D RoPE measures offsets in, however the image was merged; with W = 2 a token inside a long
    group would lose its upper neighbour. The price is W more keys per step: at most 2 + K + W + 1 (163 at
    N = 256, K = 144) instead of the plain cache's up to N + 1. The likelihood of both windows was measured on an
    earlier preset (docs/stage2_cpu.md, "The previous recipes"; `train_stage2.py train --model mergear --window W`,
    then `nll`).
  Where rep comes from. Training has the tokenizer's true source (merge.py's index map): rep_from_source. The
    decoder has only codes; Sec. 4.1: "MergeAR compares it against existing tokens in the KV cache. If it is a
    duplicate ..." - a code equal to an earlier code is a duplicate: rep_from_codes. The two differ wherever two
    groups share one code (the code reading folds the later group into the earlier). Passing
    rep_from_codes(codes) to mergear_loss (train_stage2.py's default, --rep codes) trains on the decoder's view:
    the model never sees a mask it will not meet at inference. How often the readings differ on real
    tokenizations (`rep_disagreement`, printed by `train_stage2.py extract`) and what each reading scores are in
    docs/stage2_cpu.md.

Why the compacted cache gives the masked forward's logits (tests/test_mergear.py checks it, with CFG, K < N and
repeated codes, and checks what the cache holds after every step against the rule applied by brute force):
  1. The rows that may read key j form an interval, j <= t <= e_j, with e_j = infinity for a first member and
     e_j = j + W for a duplicate. Once t > e_j no later row reads j, so dropping it loses nothing: after step t
     the cache holds exactly the keys Eq. (12) lets the next row read - the prefix, the first members and the
     duplicates in the window (the "Position Cache" of Fig. 6). `CacheSlots.evict` is that rule, one line.
  2. Key and value of position j, at every layer, are computed once at step j from the layer's input at j, which
     is, by induction over positions, what the masked forward computes there: row j's attention read the same set.
  3. Softmax attention is a function of the set of (key, value) pairs, and RoPE rotates a key by its own position
     before it is written, so neither the slot a key sits in nor masked padding changes a logit.
  4. Whether rep[j] == j depends only on codes[:j + 1], so the decoder knows row t's mask at step t; the mask it
     mirrors is rep_from_codes of its own codes.
  Size: after any step the cache holds at most 2 + K + W entries (K first members - the distinct codes so far, K
  for a sequence of K groups - and at most W duplicates); the step's attention reads those and the fed token. A
  fed token takes the lowest free slot, so the slots attention reads never outnumber the largest live count so far;
  the buffers hold 2 + K + W + 2 slots per layer and sample (doubled if sampling yields more distinct codes), the
  plain cache's N + 1: 292 against 1025 at N = 1024, K = 256. Batches are padded to the batch's largest count, the
  free slots masked. Decoding cost against the plain cache: docs/mergear_decoding.md (`bench/bench_mergear.py`).
  Guidance. The null branch of CFG is [null class, M]: M stays, since the merge amount describes the layout of
  the sequence (how many distinct groups its codes form), not its class, and both branches share the codes and
  so the cache. Class dropout in training likewise replaces C only.

Parts: representatives and the Eq. (12) mask / the model (gpt.py's Transformer with the Merge Instruction token,
as randar.py builds RandAR on it) and its loss / decoding through the compacted cache / how often the two readings
of rep differ / demo.

    python mergear.py                      # a tiny MergeAR: 100 steps, greedy decoding through its compacted cache
    python -m pytest tests/test_mergear.py # the Eq. (12) mask and the cache against brute force and the masked forward
    python bench/bench_mergear.py          # MergeAR's compacted cache vs. the plain KV cache: tokens/s, entries, PNG

    from mergear import build_mergear, generate_mergear, mergear_loss, rep_from_source
    model = build_mergear("L", factorized=True, merge_counts=range(1, 257))   # MergeAR on 2^18 LFQ codes
    loss = mergear_loss(model, codes, labels, K, rep_from_source(source), window=None)   # W = one grid row
    codes = generate_mergear(model.eval(), torch.tensor([207, 360]), 144, 256)           # K = 144, N = 256
"""
import math
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt import Transformer, cfg_scale_at, combine, gpt_config, sample_logits
from lfq import join_index, split_index


# ----------------------------------------------------------------------------------------------------------------
# Representatives and the sparsity causal mask, Eq. (12)
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


def merge_causal_mask(rep, window):
    """Eq. (12), the sparsity causal mask over the N image positions: (B, N) rep -> (B, N, N) bool, True where
    position t may attend to position j:

        j <= t  and  ( rep[j] == j          a group's first member: kept for good
                       or t - j <= window )  any token, for the `window` steps after it (and itself)

    Our reading of Fig. 6 (9 tokens, groups {1,2}, {3,4}, {5,6,7}, {8,9}, window 2); tests/test_mergear.py checks
    it against a loop over (t, j). The prefix [C, M] is not in this matrix: every image position also attends to
    both prefix tokens."""
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


# ----------------------------------------------------------------------------------------------------------------
# The model: gpt.Transformer with the Merge Instruction token, and the loss
# ----------------------------------------------------------------------------------------------------------------


def merge_window(model, window=None):
    """The window W shared by training and inference: the argument, else the config's, else one grid row."""
    if window is None:
        window = model.cfg.merge_window
    if window is None:
        window = math.isqrt(model.cfg.block_size)
    if window < 0:
        raise ValueError(f"the window W must be >= 0, got {window}")
    return int(window)


class MergeARTransformer(Transformer):
    """gpt.py's Transformer (plain or factorized vocabulary, LlamaGen's keys) with the Merge Instruction token M:
    `merge_embedding`, one row per allowed kept count K (cfg.merge_counts), N(0, 0.02) like every embedding. The
    prefix is [C, M], two zero RoPE rows. forward(codes, cond, K, rep) gives the teacher-forced logits under the
    Eq. (12) mask; `decode_mergear` decodes through the compacted cache. gpt.py's raster `generate` does not apply."""

    prefix_len = 2                                                          # [C, M]

    def add_prefix_embeddings(self, cfg):
        Ks = cfg.merge_counts
        if not Ks or len(set(Ks)) != len(Ks) or min(Ks) < 1:
            raise ValueError(f"merge_counts must be distinct positive kept counts K (at least one), got {Ks}")
        self.merge_embedding = nn.Embedding(len(Ks), cfg.dim)

    def merge_instruction_index(self, K, batch, device):
        """Kept counts K (an int, or (B,) ints) -> (B,) rows of the Merge Instruction table (cfg.merge_counts)."""
        K = torch.as_tensor(K, device=device).long().reshape(-1).expand(batch)  # (B,)
        allowed = torch.tensor(self.cfg.merge_counts, device=device)        # (n_K,)
        hit = K[:, None] == allowed[None, :]                                # (B, n_K)
        if not hit.any(1).all():
            bad = K[~hit.any(1)][0].item()
            raise ValueError(f"K = {bad} has no Merge Instruction row; allowed: {list(self.cfg.merge_counts)}")
        return hit.float().argmax(1)                                        # (B,)

    def prefix(self, labels, K, train=False):
        """The prefix [C, M] (B, 2, D): class embedding (dropped to the null class with p = 0.1 in training) and the
        Merge Instruction embedding of K. The null branch of CFG keeps M (only C becomes the null class)."""
        c = self.cls_embedding(labels, train=train)                         # (B, 1, D)
        m = self.merge_embedding(self.merge_instruction_index(K, labels.shape[0], labels.device))   # (B, D)
        return torch.cat([c, m[:, None]], dim=1)                            # (B, 2, D)

    def forward(self, codes, cond_idx, K, rep, window=None):
        """Teacher-forced MergeAR: logits for all N codes (B, N) under the Eq. (12) mask.

        Sequence [C, M, x_0, .., x_{N-2}] at positions 0 .. N; the output at M predicts x_0 and the output at x_t
        predicts x_{t+1}. Image row t attends to C, M and the Eq. (12) set of rep (B, N) (training: rep_from_source
        or rep_from_codes; the cache mirrors rep_from_codes). cond_idx (B,) labels, K an int or (B,).
        Returns (B, N, vocab) float32, or (logits_pre, logits_post) for the factorized model.
        """
        B, N = codes.shape
        if N > self.cfg.block_size:
            raise ValueError(f"{N} codes exceed block_size {self.cfg.block_size}, the RoPE grid")
        if rep.shape != codes.shape:
            raise ValueError(f"rep {tuple(rep.shape)} must have the shape of codes {tuple(codes.shape)}")
        W = merge_window(self, window)
        prefix = self.prefix(cond_idx, K, train=self.training)              # (B, 2, D): [C, M]
        h = torch.cat([prefix, self.embed_codes(codes[:, :-1], prefix[:, :1])], dim=1)   # (B, N + 1, D)
        mask = prefixed_mask(merge_causal_mask(rep, W)[:, : N - 1, : N - 1], 2)    # (B, N + 1, N + 1), Eq. (12)
        h = self.run_layers(self.tok_dropout(h), mask=mask)[:, 1:]          # (B, N, D): outputs at M, x_0 .. x_{N-2}
        if not self.cfg.factorized:
            return self.logits(h)                                           # (B, N, vocab)
        return self.intra_logits(h, split_index(codes, self.cfg.pre_bits)[0])


def build_mergear(preset, vocab_size=None, factorized=False, num_classes=1000, merge_counts=(), **overrides):
    """A MergeARTransformer from gpt.py's GPT_PRESETS, like `build_gpt` (vocab_size 16384 plain, 2^18 factorized);
    merge_counts the allowed kept counts K, one Merge Instruction row each; overrides set GPTConfig fields
    (merge_window: W, default one grid row)."""
    return MergeARTransformer(gpt_config(preset, vocab_size, factorized, num_classes, merge_counts=tuple(merge_counts),
                                         **overrides))


def check_mergear(model):
    """One line when a function of this file is given another model (a plain or RandAR Transformer)."""
    if not isinstance(model, MergeARTransformer):
        raise ValueError(f"this needs a MergeAR model (mergear.build_mergear), got {type(model).__name__}")


def mergear_loss(model, codes, cond, K, rep, window=None, label_smoothing=0.0):
    """Cross-entropy of all N codes (duplicates included: Fig. 6's target row) under the Eq. (12) mask; the
    factorized model's loss is CE(pre) + CE(post), the NLL of the 18-bit code."""
    check_mergear(model)
    out = model(codes, cond, K, rep, window)
    if not model.cfg.factorized:
        return F.cross_entropy(out.flatten(0, 1), codes.flatten(), label_smoothing=label_smoothing)
    pre, post = split_index(codes, model.cfg.pre_bits)
    return (F.cross_entropy(out[0].flatten(0, 1), pre.flatten(), label_smoothing=label_smoothing)
            + F.cross_entropy(out[1].flatten(0, 1), post.flatten(), label_smoothing=label_smoothing))


# ----------------------------------------------------------------------------------------------------------------
# Decoding: the compacted KV cache (the Position Cache of Fig. 6)
# ----------------------------------------------------------------------------------------------------------------


class CacheSlots:
    """Which token each slot of the compacted cache holds, per sample; one object shared by every layer's cache.

    While live[b, s], slot s of sample b holds the token at position pos[b, s] (C = -2, M = -1, image positions
    0, 1, ...) with its code (-1 for C and M); first[b, s] marks the tokens kept for good (C, M, first members).
    A fed token takes its sample's lowest free slot; `evict` frees the slots the next row may not read. Attention
    reads slots 0 .. length - 1 through `mask`, the free ones at -inf; the lowest-free rule keeps that length at
    most the largest live count so far, 2 + K + W + 1 for a sequence of K groups. The slots double when sampling
    makes more. dtype: the activations' (bf16 under autocast), the additive mask's."""

    def __init__(self, batch, window, capacity, dtype, device):
        self.window, self.capacity, self.length, self.dtype = window, capacity, 0, dtype
        self.pos = torch.zeros(batch, capacity, dtype=torch.long, device=device)    # (B, S)
        self.code = torch.full_like(self.pos, -1)                                   # (B, S)
        self.first = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # (B, S)
        self.live = torch.zeros_like(self.first)                                    # (B, S)

    def add(self, pos, code, first):
        """The token about to be fed, at position pos (an int), code (B,), first (B,) bool: into `slot` (B, 1)."""
        self.slot = (~self.live).to(torch.uint8).argmax(1, keepdim=True)           # (B, 1) the lowest free slot
        self.pos.scatter_(1, self.slot, pos)
        self.code.scatter_(1, self.slot, code[:, None])
        self.first.scatter_(1, self.slot, first[:, None])
        self.live.scatter_(1, self.slot, True)
        self.length = max(self.length, int(self.slot.max()) + 1)                   # the step's one host sync
        if self.length == self.capacity:                                            # keep a free slot for the next
            more = lambda x, value: F.pad(x, (0, self.capacity), value=value)      # noqa: E731
            self.pos, self.code, self.first, self.live = (more(self.pos, 0), more(self.code, -1),
                                                          more(self.first, False), more(self.live, False))
            self.capacity *= 2
        live = self.live[:, None, : self.length]                                    # (B, 1, L) the slots read
        self.mask = torch.zeros(live.shape, dtype=self.dtype, device=live.device).masked_fill_(~live, -math.inf)

    def is_new(self, code):
        """Sec. 4.1: "MergeAR compares it against existing tokens in the KV cache": code (B,) is its group's first
        member iff no live slot holds it (the first member of every code so far is in the cache for good)."""
        return ~((self.code == code[:, None]) & self.live).any(1)           # (B,)

    def evict(self, t):
        """Free what image row t may not read, Eq. (12): keep C, M and first members, any other position j while
        t - j <= W."""
        self.live &= self.first | (t - self.pos <= self.window)


class CompactKVCache:
    """One layer's keys and values (B, heads, S, D_h), slot s as the shared CacheSlots describes it; allocated in
    the activations' dtype (bf16 under autocast) at the first write."""

    def __init__(self, slots):
        self.slots, self.k, self.v = slots, None, None

    def context(self, input_pos, k, v):
        """gpt.Attention's cache call: write the fed token's k, v (B, heads, 1, D_h) into its slot; return the keys,
        values and mask (B, 1, L) of the slots it reads."""
        slots = self.slots
        if self.k is None:
            self.k = self.v = k.new_zeros(*k.shape[:2], 0, k.shape[3])        # (B, H, 0, D_h), padded below
        if self.k.shape[2] < slots.capacity:                                    # the first write, or more slots
            extra = slots.capacity - self.k.shape[2]
            self.k, self.v = F.pad(self.k, (0, 0, 0, extra)), F.pad(self.v, (0, 0, 0, extra))
        index = slots.slot[:, None, :, None].expand_as(k)                       # (B, H, 1, D_h)
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        L = slots.length
        return self.k[:, :, :L], self.v[:, :, :L], slots.mask                  # (B, H, L, D_h) x 2, (B, 1, L)


MergeARDecode = namedtuple("MergeARDecode", ["codes", "logits"])


@torch.no_grad()
def decode_mergear(model, cond, K, num_tokens, window=None, codes=None, cfg_scale=1.0, cfg_schedule="constant",
                   temperature=1.0, top_k=0, top_p=1.0, generator=None, return_logits=True):
    """MergeAR's raster-order decoding of num_tokens codes for labels cond (B,) and kept count K (int or (B,)),
    through the compacted cache.

    codes=None samples (temperature, top-k, top-p, CFG u + s (c - u) on the batch [cond; null], M in both
    halves, s constant or linear over the codes as in gpt.py's `generate`); given codes (B, num_tokens) are
    replayed (teacher forcing through the cache). Each fed code that no cache entry holds is its group's first
    member and stays for good; any other is a duplicate and leaves the cache W steps later.
    Returns MergeARDecode(codes (B, N), logits (B, N, vocab) guided and pre-temperature, or the factorized pair;
    None with return_logits=False).
    """
    check_mergear(model)
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
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if use_cfg else cond   # (B',)
    K = torch.as_tensor(K, device=dev).long().reshape(-1).expand(B).repeat(halves)               # (B',)
    capacity = min(2 + int(K.max()) + (W + 1) + 1, 2 + num_tokens)         # C, M, K firsts, W + 1 others, 1 free
    autocast = torch.is_autocast_enabled(dev.type)                           # the keys' dtype, as gpt.setup_caches
    dtype = torch.get_autocast_dtype(dev.type) if autocast else model.norm.weight.dtype
    slots = CacheSlots(labels.shape[0], W, capacity, dtype, dev)
    for layer in model.layers:
        layer.attention.kv_cache = CompactKVCache(slots)
    positions = torch.arange(num_tokens + 1, device=dev)                    # C, M at 0, 1; x_j at j + 2
    out, kept = [], []
    try:
        prefix = model.prefix(labels, K)                                    # (B', 2, D): [C, M]
        for p in range(2):                                                  # C, then M: one token per call
            slots.add(p - 2, torch.full_like(labels, -1), torch.ones_like(labels, dtype=torch.bool))
            h = model.run_layers(prefix[:, p:p + 1], positions[p:p + 1])    # (B', 1, D)
        for t in range(num_tokens):                                         # the output at position t + 1: code t
            if t > 0:                                                       # feed x_{t-1}, image position t - 1
                x = out[-1].repeat(halves)                                  # (B',) both halves the same code
                slots.add(t - 1, x, slots.is_new(x))
                h = model.run_layers(model.embed_codes(x[:, None], prefix[:, :1]), positions[t + 1:t + 2])
                slots.evict(t)                                              # keep what row t may read
            scale = cfg_scale_at(t, num_tokens, cfg_scale, cfg_schedule)
            if not model.cfg.factorized:
                logits = combine(model.logits(h)[:, 0], B, use_cfg, True, scale)   # (B, vocab)
                code = codes[:, t] if codes is not None else sample_logits(logits, temperature, top_k, top_p,
                                                                           generator)
                step = logits
            else:
                l_pre = combine(model.intra_logits(h)[0][:, 0], B, use_cfg, True, scale)   # (B, 2^pre_bits)
                given = split_index(codes[:, t], model.cfg.pre_bits) if codes is not None else None
                pre = given[0] if given else sample_logits(l_pre, temperature, top_k, top_p, generator)
                l_post = combine(model.intra_logits(h, pre.repeat(halves)[:, None])[1][:, 0], B, use_cfg, True,
                                 scale)                                     # (B, 2^post_bits)
                post = given[1] if given else sample_logits(l_post, temperature, top_k, top_p, generator)
                code = join_index(pre, post, model.cfg.pre_bits)
                step = (l_pre, l_post)
            if return_logits:
                kept.append(step)
            out.append(code)
    finally:
        model.clear_caches()
        model.train(was_training)
    logits = None
    if return_logits and model.cfg.factorized:
        logits = tuple(torch.stack([k[i] for k in kept], dim=1) for i in (0, 1))   # (B, N, 64), (B, N, 2^post)
    elif return_logits:
        logits = torch.stack(kept, dim=1)                                   # (B, N, vocab)
    return MergeARDecode(torch.stack(out, 1), logits)


def generate_mergear(model, cond, K, N, window=None, cfg_scale=1.0, cfg_schedule="constant", temperature=1.0,
                     top_k=0, top_p=1.0, generator=None):
    """Sample all N codes (B, N) int64 with the compacted cache; see `decode_mergear`."""
    return decode_mergear(model, cond, K, N, window, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                          return_logits=False).codes


# ----------------------------------------------------------------------------------------------------------------
# How often the two readings of rep differ (train_stage2.py extract prints it)
# ----------------------------------------------------------------------------------------------------------------

RepDisagreement = namedtuple("RepDisagreement", ["token_rate", "sequence_rate", "folded_groups"])


def rep_disagreement(source, codes):
    """How often the two readings differ on pairs (source (B, N), codes (B, N)) of one tokenization.

    token_rate     the fraction of the B*N tokens whose representative differs;
    sequence_rate  the fraction of sequences with at least one such token;
    folded_groups  groups per sequence that code equality folds into an earlier group sharing their code
                   (distinct sources minus distinct codes, averaged over the batch).
    The two agree exactly when no two groups share a code (and each group is one code, as in recovered codes)."""
    a, b = rep_from_source(source), rep_from_codes(codes)
    differs = a != b                                                        # (B, N)
    arange = torch.arange(source.shape[1], device=source.device)
    groups = (a == arange).sum(1) - (b == arange).sum(1)                    # (B,) first members lost
    return RepDisagreement(differs.float().mean().item(), differs.any(1).float().mean().item(),
                           groups.float().mean().item())


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.set_num_threads(1)                       # tiny ops: a second thread costs more than it saves
    labels = torch.randint(0, 10, (8,))
    # A tiny MergeAR, 100 steps: 8 sequences of 16 codes in 4 merged groups (contiguous runs), K = 4, W = 2 (the
    # window of Fig. 6); then greedy decoding with CFG through the compacted cache.
    model = build_mergear("tiny", vocab_size=256, num_classes=10, merge_counts=(4, 8, 16))
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
