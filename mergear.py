"""MergeAR: raster-order generation with KV-cache compression (paper Sec. 4.1, Eq. (12), Fig. 6, Table 3).

MergeAR is LlamaGen's GPT (gpt.py) with a second prefix token, a sparse causal mask in
training, and a compacted KV cache in decoding. The paper states the idea in a few sentences and one figure; the
rules below are our reading of them, each with the evidence it rests on.

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
    the first member of every group seen so far plus the W tokens before t. This is Fig. 6 (9 tokens, groups
    {1,2}, {3,4}, {5,6,7}, {8,9}, W = 2: each row sees itself and the two before it; further back only first
    members), and it keeps the property Sec. 4.1 asks for: "each original token is represented by at most one
    merged token in the context" outside the window. The loss is on all N positions: Fig. 6's target row
    includes the duplicates.
  The window W, shared by training and inference. Fig. 6 draws 2; our default is one grid row, sqrt(N) (16 at
    N = 256, 32 at N = 1024): then every token sees the token directly above it and the row between, the
    neighbourhood 2D RoPE measures offsets in, however the image was merged; with W = 2 a token inside a long
    group would lose its upper neighbour. The price is W keys per step (163 keys, not 257, at N = 256, K = 144).
    Measured on the CPU demo (tiny GPT, 1000 steps, held-out codes of the tiny G tokenizer at K = 64): W = 16
    reaches 3.015 nats per code, W = 2 3.213, the unmasked causal model 2.973.
  Where rep comes from. Training has the tokenizer's true source (merge.py's index map): rep_from_source. The
    decoder has only codes; Sec. 4.1: "MergeAR compares it against existing tokens in the KV cache. If it is a
    duplicate ..." - a code equal to an earlier code is a duplicate: rep_from_codes. The two differ wherever two
    groups share one code (the code reading folds the later group into the earlier); rep_disagreement measures
    how often on real tokenizations: on the tiny G tokenizer at K = 64, 11 of 64 groups per image share a code with
    an earlier group, and 12% of the positions (28% at K = 144) get another representative. Passing
    rep_from_codes(codes) to mergear_loss trains on the decoder's view, which train_stage2.py does by default: the
    same model trained with it scores 3.015 nats per code on held-out codes under the decoder's mask, against
    3.034 when trained with the source (tiny GPT, 1000 steps) - close, and the code reading never shows the model
    a mask it will not meet at inference.

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
  token. Its buffers hold 2 + (W + 1) + K slots per layer and sample (grown if sampling yields more than K distinct
  codes), the plain cache's N + 1: 291 against 1025 at N = 1024, K = 256. Batches are padded: the first-member
  region to the batch's largest count, with a per-sample valid mask (the ring's W + 1 slots are always in the
  read, masked while empty or expired).
  Guidance. The null branch of CFG is [null class, M]: M stays, since the merge amount describes the layout of
  the sequence (how many distinct groups its codes form), not its class, and both branches share the codes and
  so the cache layout. Class dropout in training likewise replaces C only.

Parts: representatives and the Eq. (12) mask, the model (gpt.py's Transformer with the Merge Instruction token, as
randar.py builds RandAR on it), training / decoding with the compacted cache / demo.

    python mergear.py                      # a tiny MergeAR: 100 steps, greedy decoding through its compacted cache
    python -m pytest tests/test_mergear.py # MergeAR's mask (Fig. 6, brute force), the compacted cache == masked forward
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
    The two agree exactly when no two groups share a code (and each group is one code, as in recovered codes)."""
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
# MergeAR decoding: the compacted cache (the Position Cache of Fig. 6)
# ----------------------------------------------------------------------------------------------------------------


class MergeCacheLayout:
    """Which compacted slot holds which image position, per sample; one object shared by every layer's cache.

    Slots: [0, 1] the prefix C, M; [2, 2 + R) a ring of R = W + 1 slots for duplicates (the W before row t and t
    itself), the duplicate at image position t in slot 2 + t mod R; [2 + R, ...) the first members, appended per
    sample in raster order. At step t the ring slot 2 + t mod R held position t - R = t - W - 1 (or an older one),
    which row t may no longer read (Eq. (12): t - j <= W), so it is released whatever t is, and taken again if t is
    a duplicate; every other ring slot keeps its state from the step that wrote it. Every token is written before
    its row's attention, and the attention reads the cache in place (no copy).

    A step costs ten small in-place tensor operations and one host sync (the batch's largest slot count, the
    length L of the read), shared by all layers; nothing is rebuilt or looped over the batch:
      unseen (B, vocab)     True for the codes not generated yet: the duplicate test is one gather
                            (a bool per code: 256 KiB per row for 2^18 codes)
      mask (B, capacity)    additive attention mask, 0 = live, -inf = empty, expired or padding; the attention
                            reads its first L columns (the first-member region is padded to the batch maximum)
      next_first (B, 1)     each sample's next first-member slot
    L changes only when a first member widens the read (about K of the N steps), so the caches re-slice their
    buffers only then. Capacity: 2 + R + K slots (K first members for a sequence of K groups), grown when sampling
    produces more distinct codes than K. The mask takes the activations' dtype (bf16 under autocast), allocated
    at the first write (`allocate`).
    """

    def __init__(self, batch, heads, window, K_max, num_tokens, vocab, device):
        self.batch, self.heads, self.window, self.ring, self.device = batch, heads, window, window + 1, device
        self.first0 = 2 + self.ring                                         # the first first-member slot
        self.max_capacity = self.first0 + num_tokens                        # every token a first member
        self.capacity = min(self.first0 + K_max, self.max_capacity)
        self.unseen = torch.ones(batch, vocab, dtype=torch.bool, device=device)                 # (B, vocab)
        self.next_first = torch.full((batch, 1), self.first0, dtype=torch.long, device=device)  # (B, 1)
        self.ring_index = torch.arange(2, self.first0, device=device)[:, None]   # (R, 1): slot of each ring place
        self.mask = None
        self.length = 2                                                     # slots read: the prefix so far
        self.prefill = True
        self.set_rows()
        self.slots = torch.empty(batch, heads, dtype=torch.long, device=device)   # (B, H) this step's rows
        self.flat_slot = self.slots.view(-1)                                # (B * H,) the caches' index

    def set_rows(self):
        """row_base (B, H): the first row of each (sample, head) in a cache's flat (B * H * capacity, D_h) view."""
        rows = torch.arange(self.batch * self.heads, device=self.device).reshape(self.batch, self.heads)
        self.row_base = rows * self.capacity                                # (B, H)

    def allocate(self, dtype):
        """The additive mask in the activations' dtype: the prefix live, everything else empty."""
        self.mask = torch.full((self.batch, self.capacity), -math.inf, dtype=dtype, device=self.device)
        self.mask[:, :2] = 0.0                                              # C and M: read by every row

    def grow(self, need):
        """More first-member slots (at least `need` slots in all): double the region, pad the mask."""
        room = max(need - self.first0, 2 * (self.capacity - self.first0), 1)
        extra = min(self.first0 + room, self.max_capacity) - self.capacity
        self.mask = F.pad(self.mask, (0, extra), value=-math.inf)          # (B, capacity + extra)
        self.capacity += extra
        self.set_rows()

    def plan(self, t, x):
        """Image position t with codes x (B, 1) is fed next: pick its slot (`flat_slot`, the (B * heads,) rows the
        caches' index_copy_ writes), update the mask, and when the read widens, `length` and `attn_mask` (B, 1, L)."""
        self.prefill = False
        is_first = self.unseen.gather(1, x)                                 # (B, 1) rep_from_codes: a new code?
        self.unseen.scatter_(1, x, False)
        ring = t % self.ring
        slot = torch.where(is_first, self.next_first, 2 + ring)            # (B, 1) appended, or into the ring
        self.next_first += is_first
        length = int(self.next_first.max())                                 # the one host sync of a step
        if length > self.capacity:
            self.grow(length)
        self.mask.index_fill_(1, self.ring_index[ring], -math.inf)         # position t - W - 1 expires
        self.mask.scatter_(1, slot, 0.0)                                    # t is live (Eq. (12): t - t <= W)
        torch.add(self.row_base, slot, out=self.slots)                      # (B, H) rows of the flat view
        if length != self.length:                                           # a first member widened the read
            self.length = length
            self.attn_mask = self.mask[:, None, :length]                    # (B, 1, L), a view: sees later writes


class PlainCacheLayout:
    """The baseline the bench measures MergeAR against: every position kept (the plain causal model), through the
    same cache code (CompactKVCache, in-place writes, the same additive mask) so that the two differ only in the
    slots read. Image position t sits in slot 2 + t, row t reads slots 0 .. t + 2, all live (the mask is zeros),
    and the length is known on the host: no sync, two tensor operations a step."""

    def __init__(self, batch, heads, num_tokens, device):
        self.batch, self.heads, self.device = batch, heads, device
        self.capacity = 1 + num_tokens                                      # C, M, x_0 .. x_{N-2}
        self.mask, self.length, self.prefill = None, 2, True
        rows = torch.arange(batch * heads, device=device).reshape(batch, heads)
        self.row_base = rows * self.capacity                                # (B, H)
        self.slots = torch.empty(batch, heads, dtype=torch.long, device=device)   # (B, H) this step's rows
        self.flat_slot = self.slots.view(-1)                                # (B * H,)

    def allocate(self, dtype):
        self.mask = torch.zeros(self.batch, self.capacity, dtype=dtype, device=self.device)   # every slot live

    def plan(self, t, x):
        """Image position t is fed next (x unused): slot 2 + t, the read grows by one."""
        self.prefill = False
        self.length = t + 3                                                 # C, M, x_0 .. x_t
        torch.add(self.row_base, 2 + t, out=self.slots)
        self.attn_mask = self.mask[:, None, : self.length]                  # (B, 1, L)


class CompactKVCache:
    """One layer's keys and values in MergeAR's compacted layout (B, heads, capacity, D_h), in the activations'
    dtype (allocated at the prefill's write: bf16 under autocast); with a PlainCacheLayout, the bench's plain
    baseline. Attention reads the first `layout.length` slots, never N: keys carry their RoPE rotation from the
    moment they were written, and attention is a function of the set of (key, value) pairs, so a slot's place is
    free. A step writes one row per (sample, head) with index_copy_ on a flat view, and re-slices the buffers
    only when the layout's length changed."""

    def __init__(self, layout):
        self.layout = layout
        self.k = self.v = None
        self.length = None

    def allocate(self, heads, head_dim, dtype):
        """Zero buffers (B, heads, capacity, D_h), or the current ones padded with zeros to a grown capacity."""
        lay = self.layout
        if self.k is None:
            self.k = torch.zeros(lay.batch, heads, lay.capacity, head_dim, dtype=dtype, device=lay.device)
            self.v = torch.zeros_like(self.k)
        else:
            extra = lay.capacity - self.k.shape[2]
            self.k, self.v = F.pad(self.k, (0, 0, 0, extra)), F.pad(self.v, (0, 0, 0, extra))
        self.k_rows, self.v_rows = self.k.view(-1, head_dim), self.v.view(-1, head_dim)   # (B*H*capacity, D_h)

    def context(self, input_pos, k, v):
        lay = self.layout
        B, H, S, D_h = k.shape
        if self.k is None:                                                  # [C, M]: causal, into slots 0 and 1
            self.allocate(H, D_h, k.dtype)
            if lay.mask is None:
                lay.allocate(k.dtype)
        if lay.prefill:
            self.k[:, :, :S], self.v[:, :, :S] = k, v
            return k, v, torch.ones(S, S, dtype=torch.bool, device=k.device).tril()[None]
        if self.length != lay.length:                                       # the read widened (or the layout grew)
            if self.k.shape[2] != lay.capacity:
                self.allocate(H, D_h, k.dtype)
            self.length = lay.length
            self.keys, self.values = self.k[:, :, : self.length], self.v[:, :, : self.length]   # (B, H, L, D_h)
        self.k_rows.index_copy_(0, lay.flat_slot, k.reshape(B * H, D_h))
        self.v_rows.index_copy_(0, lay.flat_slot, v.reshape(B * H, D_h))
        return self.keys, self.values, lay.attn_mask                        # (B, H, L, D_h) x 2, (B, 1, L)

    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


MergeARDecode = namedtuple("MergeARDecode", ["codes", "logits", "reads", "computed", "stored", "cache_bytes"])


def live_entries(codes, window):
    """The cache entries Eq. (12) keeps, counted from the codes (rep_from_codes' reading): (B, N) -> (B, N + 1),
    entry t = the keys row t reads besides itself: the prefix C, M, the first members among positions 0 .. t - 1
    and the duplicates among t - W .. t - 1. Two running sums, no (N, N) mask."""
    B, N = codes.shape
    first = (rep_from_codes(codes) == torch.arange(N, device=codes.device)).long()   # (B, N)
    zero = first.new_zeros(B, 1)
    n_first = torch.cat([zero, first.cumsum(1)], dim=1)                     # (B, N + 1): firsts before t
    n_dup = torch.cat([zero, (1 - first).cumsum(1)], dim=1)                 # (B, N + 1): duplicates before t
    start = (torch.arange(N + 1, device=codes.device) - window).clamp(min=0)   # (N + 1,) t - W, clipped
    return 2 + n_first + n_dup - n_dup[:, start]                            # (B, N + 1)


@torch.no_grad()
def decode_mergear(model, cond, K, num_tokens, window=None, codes=None, compact=True, cfg_scale=1.0,
                   cfg_schedule="constant", temperature=1.0, top_k=0, top_p=1.0, generator=None, return_logits=True,
                   layout=None):
    """MergeAR's raster-order decoding of num_tokens codes for labels cond (B,) and kept count K (int or (B,)).

    codes=None samples (temperature, top-k, top-p, CFG u + s (c - u) on the batch [cond; null], M in both
    halves, s constant or linear over the codes as in `generate`); given codes (B, num_tokens) are replayed
    (teacher forcing through the cache). compact=True uses the compacted cache: a fed code that equals an earlier
    code (rep_from_codes' rule) is a duplicate and goes into the ring of W + 1 slots, any other code is appended
    for good. compact=False keeps every position (PlainCacheLayout): the plain causal model on the same weights
    through the same cache code, the bench's baseline (gpt.py's `generate` has its own KVCache). layout: a cache
    layout of the caller's in place of either, for B' rows (the bench's attention-free bound; its logits, reads and
    computed counts are not the model's).

    Returns MergeARDecode(codes (B, N), logits (B, N, vocab) guided and pre-temperature (factorized: a pair; None
    with return_logits=False), reads (B, N) keys each step's attention uses (prefix and the fed token included;
    compact: Eq. (12)'s live entries, `live_entries`), computed (N,) keys the batched attention computes (padding
    included), stored (B,) live entries at the end, cache_bytes: the K/V buffers of all layers at the end, their
    peak (they only grow)).
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
    labels = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if use_cfg else cond   # (B', )
    K = torch.as_tensor(K, device=dev).long().reshape(-1).expand(B).repeat(halves)               # (B',)
    Bp = labels.shape[0]
    if layout is None:
        layout = (MergeCacheLayout(Bp, model.cfg.n_head, W, int(K.max()), num_tokens, model.cfg.vocab_size, dev)
                  if compact else PlainCacheLayout(Bp, model.cfg.n_head, num_tokens, dev))   # positions 0 .. N
    for layer in model.layers:
        layer.attention.kv_cache = CompactKVCache(layout)
    positions = torch.arange(num_tokens + 1, device=dev)                    # [C, M] at 0, 1; x_t at t + 2
    out, kept, computed = [], [], [2]                                       # step 0 reads C, M
    try:
        prefix = model.prefix(labels, K)                                    # (B', 2, D): [C, M]
        h = model.run_layers(prefix, positions[:2])                         # prefill [C, M]
        for t in range(num_tokens):
            if t > 0:                                                       # feed x_{t-1} at position t + 1
                x = (out[-1] if halves == 1 else out[-1].repeat(halves))[:, None]   # (B', 1)
                layout.plan(t - 1, x)
                computed.append(layout.length)
                h = model.run_layers(model.embed_codes(x, prefix[:, :1]), positions[t + 1: t + 2])
            h = h[:, -1:]                                                   # (B', 1, D)
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
        cache_bytes = sum(layer.attention.kv_cache.nbytes() for layer in model.layers)
    finally:
        model.clear_caches()
        model.train(was_training)
    out = torch.stack(out, 1)                                               # (B, N)
    reads, stored = decode_counts(out, W, compact)
    return MergeARDecode(out, stack_logits(kept, model.cfg.factorized) if return_logits else None, reads,
                         torch.tensor(computed), stored, cache_bytes)


def stack_logits(kept, factorized):
    """Per-step logits -> (B, N, vocab), or the factorized pair (B, N, 2^pre_bits), (B, N, 2^post_bits)."""
    if factorized:
        return tuple(torch.stack([k[i] for k in kept], dim=1) for i in (0, 1))
    return torch.stack(kept, dim=1)


def decode_counts(codes, window, compact):
    """reads (B, N) and stored (B,) of a decode of codes (B, N): Eq. (12)'s live entries (compact) or every
    position (plain: 2 + t keys at step t, N + 1 entries at the end)."""
    B, N = codes.shape
    if not compact:
        reads = torch.arange(2, N + 2, device=codes.device).expand(B, N)
        return reads, torch.full((B,), N + 1, device=codes.device)
    E = live_entries(codes, window)                                         # (B, N + 1)
    reads = torch.cat([torch.full((B, 1), 2, device=codes.device), E[:, : N - 1] + 1], dim=1)   # + the fed token
    return reads, E[:, N - 1]


def generate_mergear(model, cond, K, N, window=None, cfg_scale=1.0, cfg_schedule="constant", temperature=1.0,
                     top_k=0, top_p=1.0, generator=None):
    """Sample all N codes (B, N) int64 with the compacted cache; see `decode_mergear`."""
    return decode_mergear(model, cond, K, N, window, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                          return_logits=False).codes


def mergear_logits_cached(model, codes, cond, K, window=None, cfg_scale=1.0, cfg_schedule="constant"):
    """Feed the given codes (B, N) step by step through the compacted cache; every step's logits (B, N, vocab)
    (guided when cfg_scale != 1). Equals the model's teacher-forced forward with rep_from_codes(codes) (the module docstring's
    invariant)."""
    return decode_mergear(model, cond, K, codes.shape[1], window, codes=codes, cfg_scale=cfg_scale,
                          cfg_schedule=cfg_schedule).logits


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
    print("keys read per step:", d.reads[0].tolist(), f"(plain cache: 2 .. 17); live entries at the end: "
          f"{d.stored[0].item()} <= K + W + 2 = 8 for 4 distinct codes")
