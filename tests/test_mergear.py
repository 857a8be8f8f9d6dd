"""mergear.py: the two readings of the representatives and the Eq. (12) mask against loops that apply the rule as
written, Sec. 4.1's property of the mask, the compacted cache against the masked forward (K < N, repeated codes,
with CFG), what the cache holds after every step against the rule applied by brute force, the Merge Instruction
token, and a tiny MergeAR that learns."""
import math

import pytest
import torch

import mergear
from gpt import build_gpt, generate
from mergear import (build_mergear, decode_mergear, generate_mergear, merge_causal_mask, merge_window, mergear_loss,
                     rep_disagreement, rep_from_codes, rep_from_source)

from conftest import randomize_heads

V, C = 64, 10                                   # tiny vocabulary and number of classes
FV = 2 ** 10                                    # tiny factorized vocabulary: pre 6 bits (64), post 4 bits (16)
KS = (4, 6, 8, 16)                              # the tiny MergeAR model's allowed kept counts

pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def merge_model():
    torch.manual_seed(2)
    model = build_mergear("tiny", vocab_size=V, num_classes=C, merge_counts=KS).eval()
    randomize_heads(model)
    return model


def runs_source(lengths):
    """A source map of contiguous runs: group g covers lengths[g] raster positions (merge.py's index layout)."""
    return torch.cat([torch.full((n,), g) for g, n in enumerate(lengths)])


def scattered_source(N, K, gen):
    """A source map with K groups scattered over the raster (ToMe merges across rows: groups need not be runs)."""
    src = torch.cat([torch.arange(K), torch.randint(0, K, (N - K,), generator=gen)])
    return src[torch.randperm(N, generator=gen)]


def codes_from_groups(source, group_codes):
    """The recovered codes of one tokenization: every member of group k carries group k's code."""
    return group_codes.gather(-1, source)


def brute_rep(labels):
    """rep[j] = the first position holding j's label, by search."""
    return [min(i for i in range(len(labels)) if labels[i] == labels[j]) for j in range(len(labels))]


def brute_mask(rep, W):
    """Eq. (12) written out: row t sees j <= t when j is its group's first member or t - j <= W."""
    N = len(rep)
    return torch.tensor([[j <= t and (rep[j] == j or t - j <= W) for j in range(N)] for t in range(N)])


# ----------------------------------------------------------------------------------------------------------------
# Representatives and the Eq. (12) mask
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("W", [0, 1, 2, 5])
def test_merge_causal_mask_equals_brute_force(W):
    gen = torch.Generator().manual_seed(W)
    N, B = 20, 6
    sources = torch.stack([scattered_source(N, K, gen) for K in (1, 3, 7, 12, 20, 9)])      # (B, N)
    codes = torch.randint(0, 5, (B, N), generator=gen)                  # few codes: many duplicates
    for labels, rep_fn in ((sources, rep_from_source), (codes, rep_from_codes)):
        rep = rep_fn(labels)
        mask = merge_causal_mask(rep, W)
        assert mask.shape == (B, N, N) and mask.dtype == torch.bool
        for b in range(B):
            assert rep[b].tolist() == brute_rep(labels[b].tolist())
            assert torch.equal(mask[b], brute_mask(brute_rep(labels[b].tolist()), W))
    # a window as long as the sequence is the causal mask
    assert torch.equal(merge_causal_mask(rep, N)[0], torch.ones(N, N, dtype=torch.bool).tril())


@pytest.mark.parametrize("W", [0, 2, 4])
def test_outside_the_window_each_group_is_one_token(W):
    """Sec. 4.1: "each original token is represented by at most one merged token in the context". Beyond the window,
    row t sees exactly one token of every group begun before it (so no group twice, none missing); within the
    window, every earlier token. Groups of scattered members, as ToMe merges them."""
    gen = torch.Generator().manual_seed(W)
    N = 24
    for K in (3, 8, 15):
        source = scattered_source(N, K, gen)
        mask = merge_causal_mask(rep_from_source(source[None]), W)[0]      # (N, N)
        for t in range(N):
            old = [j for j in range(t + 1) if t - j > W]
            seen = [source[j].item() for j in old if mask[t, j]]
            begun = {source[j].item() for j in old if source[j] not in source[:j]}   # first member beyond window
            assert sorted(seen) == sorted(begun), (K, t)
            assert all(mask[t, j] for j in range(max(0, t - W), t + 1))      # the window: every token
            assert not mask[t, t + 1:].any()                                # causal


def test_source_and_code_readings_disagree_where_groups_share_a_code():
    source = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3],
                           [0, 0, 1, 1, 2, 2, 3, 3]])
    codes = torch.tensor([[4, 4, 7, 7, 1, 1, 9, 9],                     # four distinct codes: agree
                          [4, 4, 7, 7, 4, 4, 9, 9]])                    # groups 0 and 2 share code 4
    assert torch.equal(rep_from_codes(codes)[0], rep_from_source(source)[0])
    assert rep_from_codes(codes)[1].tolist() == [0, 0, 2, 2, 0, 0, 6, 6]
    assert rep_from_source(source)[1].tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
    d = rep_disagreement(source, codes)
    assert d.token_rate == pytest.approx(2 / 16) and d.sequence_rate == 0.5 and d.folded_groups == 0.5


# ----------------------------------------------------------------------------------------------------------------
# The compacted cache
# ----------------------------------------------------------------------------------------------------------------


def decoding_batches():
    """Batches of (codes, K, W) with different duplicate and eviction patterns, N = 16, K < N except one."""
    gen = torch.Generator().manual_seed(0)
    runs = torch.stack([runs_source(L) for L in ([2, 2, 3, 2, 1, 4, 2], [4, 4, 4, 4], [1] * 8 + [8],
                                                [8] + [1] * 8)])           # (4, 16)
    distinct = torch.randperm(V, generator=gen)[:16]
    runs_codes = codes_from_groups(runs, distinct.expand(4, 16))
    shared = codes_from_groups(runs, torch.tensor([3, 5, 3, 8, 5, 1, 2, 3, 9]).expand(4, 9))   # groups share codes
    scattered = torch.stack([codes_from_groups(scattered_source(16, 6, gen), distinct[:6]) for _ in range(3)])
    return [
        (runs_codes, 8, 2),                                  # runs, groups of every length, Fig. 6's window
        (runs_codes, 8, 0),                                  # no window: duplicates see only themselves
        (shared, 6, 1),                                      # two groups sharing a code: the code reading folds them
        (scattered, 6, 3),                                   # groups scattered over the raster
        (torch.randint(0, 3, (3, 16), generator=gen), 4, 4),  # three codes, everything a duplicate
        (torch.stack([distinct, distinct.flip(0)]), 16, 2),   # no duplicates: plain causal attention
        (runs_codes[:2], torch.tensor([8, 16]), 20),          # per-sample K; a window longer than N
    ]


def guided_masked_forward(model, codes, cond, K, W, s):
    """The masked forward's logits with CFG u + s (c - u): the null branch is [null class, M] (M kept)."""
    rep = rep_from_codes(codes)
    with torch.no_grad():
        c = model(codes, cond, K, rep, W)
        if s == 1.0:
            return c
        u = model(codes, torch.full_like(cond, C), K, rep, W)
    if isinstance(c, tuple):
        return tuple(ui + s * (ci - ui) for ci, ui in zip(c, u))
    return u + s * (c - u)


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_compact_cache_replay_equals_the_masked_forward(merge_model, case, cfg):
    codes, K, W = decoding_batches()[case]
    B = codes.shape[0]
    cond = torch.arange(B) % C
    cached = decode_mergear(merge_model, cond, K, 16, W, codes=codes, cfg_scale=cfg).logits   # (B, N, V)
    assert cached.shape == (B, 16, V)
    torch.testing.assert_close(cached, guided_masked_forward(merge_model, codes, cond, K, W, cfg),
                               rtol=1e-4, atol=1e-4)
    # the mask matters: the plain causal forward gives other logits wherever a duplicate was evicted
    rep = rep_from_codes(codes)
    evicted = (merge_causal_mask(rep, W) != torch.ones(16, 16, dtype=torch.bool).tril()).any()
    if evicted and cfg == 1.0:
        with torch.no_grad():
            causal = merge_model(codes, cond, K, torch.arange(16).expand(B, 16), W)
        assert not torch.allclose(causal, cached, atol=1e-3)


@pytest.mark.parametrize("case", range(7))
def test_the_cache_holds_exactly_what_the_next_row_may_read(merge_model, case, monkeypatch):
    """After each decoding step t (x_{t-1} fed), the live slots of every sample hold exactly C, M and the image
    positions j <= t - 1 that row t may read: j the first position of its code, or t - j <= W (brute force). And
    the slots attention reads never outgrow the largest live count so far: freed slots are reused."""
    codes, K, W = decoding_batches()[case]
    B, N = codes.shape
    held, lengths = [], []
    real_evict = mergear.CacheSlots.evict

    def spy(slots, t):
        real_evict(slots, t)
        held.append([sorted(slots.pos[b][slots.live[b]].tolist()) for b in range(B)])
        lengths.append(slots.length)
    monkeypatch.setattr(mergear.CacheSlots, "evict", spy)
    decode_mergear(merge_model, torch.arange(B) % C, K, N, W, codes=codes, return_logits=False)
    assert len(held) == N - 1
    def readable(seq, t):                                                   # C, M and Eq. (12)'s row t
        return [-2, -1] + [j for j in range(min(t + 1, N)) if seq.index(seq[j]) == j or t - j <= W]

    most = 2                                                                # the largest live count so far
    for t in range(1, N):
        for b in range(B):
            seq = codes[b].tolist()
            assert held[t - 1][b] == [j for j in readable(seq, t) if j < t], (t, b)   # x_t is not fed yet
            most = max(most, len(readable(seq, t - 1)))                     # live while x_{t-1} was read
        assert lengths[t - 1] <= most, t


def test_a_window_as_long_as_the_sequence_is_the_causal_model(merge_model):
    codes, K, _ = decoding_batches()[0]
    cond = torch.arange(4)
    d = decode_mergear(merge_model, cond, K, 16, 16, codes=codes)        # W = N: nothing is ever evicted
    with torch.no_grad():
        causal = merge_model(codes, cond, K, torch.arange(16).expand(4, 16), 2)   # rep = identity: causal
    torch.testing.assert_close(d.logits, causal, rtol=1e-4, atol=1e-4)


def test_mergear_linear_cfg_scales_every_step(merge_model):
    """Linear CFG on the compacted cache: code t is guided with s_t = 1 + (s - 1) t / N, here 1 + 2 t / 16."""
    codes, K, W = decoding_batches()[0]
    cond = torch.arange(4) % C
    cached = decode_mergear(merge_model, cond, K, 16, W, codes=codes, cfg_scale=3.0, cfg_schedule="linear").logits
    rep = rep_from_codes(codes)
    with torch.no_grad():
        c = merge_model(codes, cond, K, rep, W)
        u = merge_model(codes, torch.full_like(cond, C), K, rep, W)
    s = torch.tensor([1 + t / 8 for t in range(16)])[None, :, None]      # 1.0, 1.125, ..., 2.875
    torch.testing.assert_close(cached, u + s * (c - u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached[:, 0], c[:, 0], rtol=1e-4, atol=1e-4)   # s_0 = 1: the conditional logits
    with pytest.raises(ValueError, match="cfg schedule"):
        decode_mergear(merge_model, cond, K, 16, W, codes=codes, cfg_scale=3.0, cfg_schedule="cosine")


def test_compact_cache_grows_when_codes_outnumber_K(merge_model):
    """Sampling may produce more distinct codes than K: the slots grow and the logits stay the masked forward's."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.stack([torch.randperm(V, generator=gen)[:16], torch.randint(0, 3, (16,), generator=gen)])
    cond, W = torch.tensor([1, 2]), 2
    d = decode_mergear(merge_model, cond, 4, 16, W, codes=codes, cfg_scale=2.0)   # K = 4, 16 distinct codes
    torch.testing.assert_close(d.logits, guided_masked_forward(merge_model, codes, cond, 4, W, 2.0),
                               rtol=1e-4, atol=1e-4)


def test_decoding_under_bf16_autocast(merge_model, monkeypatch):
    """Under autocast the activations are bf16: every layer's cache and the additive mask it returns take their
    dtype (half the bytes of float32; a float32 cache refuses the bf16 keys), and the logits stay close to
    float32's."""
    codes, K, W = decoding_batches()[0]
    cond = torch.arange(4) % C
    full = decode_mergear(merge_model, cond, K, 16, W, codes=codes)
    dtypes = set()
    real_context = mergear.CompactKVCache.context

    def spy(cache, input_pos, k, v):
        keys, values, mask = real_context(cache, input_pos, k, v)
        dtypes.update({cache.k.dtype, cache.v.dtype, mask.dtype})
        return keys, values, mask
    monkeypatch.setattr(mergear.CompactKVCache, "context", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = decode_mergear(merge_model, cond, K, 16, W, codes=codes)
    assert dtypes == {torch.bfloat16}
    torch.testing.assert_close(half.logits.float(), full.logits, rtol=0.05, atol=0.2)   # bf16: 8 mantissa bits


def test_generate_mergear_samples_what_the_masked_forward_predicts(merge_model):
    cond = torch.tensor([1, 7, 3])
    gen = torch.Generator().manual_seed(0)
    codes = generate_mergear(merge_model, cond, 6, 16, 2, temperature=1.0, generator=gen)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64 and not merge_model.training
    # greedy with CFG: the codes are the argmax of the guided masked forward on them (its rep from its own codes)
    d = decode_mergear(merge_model, cond, 6, 16, 2, cfg_scale=3.0, top_k=1)
    torch.testing.assert_close(d.logits, guided_masked_forward(merge_model, d.codes, cond, 6, 2, 3.0),
                               rtol=1e-4, atol=1e-4)
    assert torch.equal(d.codes, d.logits.argmax(-1))


def test_factorized_replay_equals_the_masked_forward():
    torch.manual_seed(3)
    model = build_mergear("tiny", vocab_size=FV, factorized=True, num_classes=C, merge_counts=KS).eval()
    randomize_heads(model)
    source = torch.stack([runs_source([2, 2, 3, 2, 1, 4, 2]), runs_source([5, 5, 6, 0])[:16]])
    codes = codes_from_groups(source, torch.randint(0, FV, (2, 7)))
    cond = torch.tensor([2, 5])
    pre, post = decode_mergear(model, cond, 6, 16, 2, codes=codes, cfg_scale=2.0).logits
    want_pre, want_post = guided_masked_forward(model, codes, cond, 6, 2, 2.0)
    torch.testing.assert_close(pre, want_pre, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(post, want_post, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The Merge Instruction token, the model, training
# ----------------------------------------------------------------------------------------------------------------


def test_merge_instruction_token(merge_model):
    codes, cond = torch.randint(0, V, (2, 16)), torch.tensor([3, 4])
    rep = rep_from_codes(codes)
    with torch.no_grad():
        a = merge_model(codes, cond, 4, rep, 2)
        b = merge_model(codes, cond, 16, rep, 2)
        mixed = merge_model(codes, cond, torch.tensor([4, 16]), rep, 2)
    assert not torch.allclose(a, b, atol=1e-3)               # M carries K
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], b[1])
    with pytest.raises(ValueError, match="K = 5 has no Merge Instruction row"):
        merge_model(codes, cond, 5, rep, 2)
    with pytest.raises(ValueError, match="build_mergear"):
        build_gpt("tiny", merge_counts=(4,))
    with pytest.raises(ValueError, match="MergeAR model"):
        generate(merge_model, cond, 16)
    with pytest.raises(ValueError, match="MergeAR model"):
        decode_mergear(build_gpt("tiny", vocab_size=V, num_classes=C), cond, 4, 16)
    # the plain model's keys and shapes plus one table, one row per allowed K; the prefix [C, M] on zero RoPE rows
    plain = build_gpt("tiny", vocab_size=V, num_classes=C).state_dict()
    ours = merge_model.state_dict()
    assert list(ours) == list(plain) + ["merge_embedding.weight"]
    assert all(ours[k].shape == plain[k].shape for k in plain)
    assert ours["merge_embedding.weight"].shape == (len(KS), 64)
    assert torch.count_nonzero(merge_model.freqs_cis[:2]) == 0
    assert merge_window(merge_model) == 4                    # the default window: one grid row of the 4 x 4 grid


def test_tiny_mergear_loss_falls_on_fixed_codes():
    torch.manual_seed(0)
    model = build_mergear("tiny", vocab_size=256, num_classes=C, merge_counts=KS)
    gen = torch.Generator().manual_seed(0)
    sources = torch.stack([scattered_source(16, 8, gen) for _ in range(8)])
    codes = codes_from_groups(sources, torch.randint(0, 256, (8, 8), generator=gen))
    labels = torch.randint(0, C, (8,))
    rep = rep_from_source(sources)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(30):
        loss = mergear_loss(model, codes, labels, 8, rep, 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), rel=1e-3)          # zero heads: uniform logits
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.merge_embedding.weight.grad is not None and model.merge_embedding.weight.grad.abs().sum() > 0
