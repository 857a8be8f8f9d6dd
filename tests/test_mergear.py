"""mergear.py: the Eq. (12) mask against Fig. 6 and a brute force, the two readings of the representatives, the
compacted cache against the masked forward (with CFG), its size, a tiny MergeAR that learns, and the public names
mergear.py re-exports from gpt.py."""
import math

import pytest
import torch

from gpt import build_gpt, generate
from mergear import (build_mergear, decode_mergear, generate_mergear, merge_causal_mask, mergear_logits_cached,
                     mergear_loss, rep_disagreement, rep_from_codes, rep_from_source)

from conftest import randomize_heads

V, C = 64, 10                                   # tiny vocabulary and number of classes
FV = 2 ** 10                                    # tiny factorized vocabulary: pre 6 bits (64), post 4 bits (16)

pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py: tiny models run fastest on one thread


# ----------------------------------------------------------------------------------------------------------------
# MergeAR: representatives, the Eq. (12) mask, the compacted cache, training
# ----------------------------------------------------------------------------------------------------------------

KS = (4, 6, 8, 16)                              # the tiny MergeAR model's allowed kept counts


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


def brute_rep(labels):
    return [min(i for i in range(len(labels)) if labels[i] == labels[j]) for j in range(len(labels))]


def brute_mask(rep, W):
    """Eq. (12) written out: row t sees j <= t when j is its group's first member or t - j <= W."""
    N = len(rep)
    return torch.tensor([[j <= t and (rep[j] == j or t - j <= W) for j in range(N)] for t in range(N)])


def test_fig6_mask_is_the_papers_example():
    # Fig. 6: 9 tokens, groups {1,2}, {3,4}, {5,6,7}, {8,9} (1-based), window 2
    source = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 3, 3]])
    rep = rep_from_source(source)
    assert rep.tolist() == [[0, 0, 2, 2, 4, 4, 4, 7, 7]]
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0, 0, 0],
                             [1, 0, 1, 1, 1, 0, 0, 0, 0],
                             [1, 0, 1, 1, 1, 1, 0, 0, 0],
                             [1, 0, 1, 0, 1, 1, 1, 0, 0],
                             [1, 0, 1, 0, 1, 1, 1, 1, 0],
                             [1, 0, 1, 0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(merge_causal_mask(rep, 2)[0], expected)
    # the recovered codes: one code per group, all distinct -> the same reading
    assert torch.equal(rep_from_codes(torch.tensor([[5, 5, 9, 9, 1, 1, 1, 7, 7]])), rep)


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


def codes_from_groups(source, group_codes):
    """The recovered codes of one tokenization: every member of group k carries group k's code."""
    return group_codes.gather(-1, source)


def decoding_batches():
    """Batches of (codes, K, W) with different duplicate and eviction patterns, N = 16."""
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


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_compact_cache_replay_equals_the_masked_forward(merge_model, case, cfg):
    codes, K, W = decoding_batches()[case]
    B = codes.shape[0]
    cond = torch.arange(B) % C
    cached = mergear_logits_cached(merge_model, codes, cond, K, W, cfg_scale=cfg)       # (B, N, V)
    rep = rep_from_codes(codes)
    with torch.no_grad():
        c = merge_model(codes, cond, K, rep, W)
        full = c
        if cfg != 1.0:                                       # the null branch: class -> null, M kept
            u = merge_model(codes, torch.full_like(cond, C), K, rep, W)
            full = u + cfg * (c - u)
    assert cached.shape == (B, 16, V)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    # the mask matters: the plain causal forward gives other logits wherever a duplicate was evicted
    evicted = (merge_causal_mask(rep, W) != torch.ones(16, 16, dtype=torch.bool).tril()).any()
    if evicted and cfg == 1.0:
        with torch.no_grad():
            causal = merge_model(codes, cond, K, torch.arange(16).expand(B, 16), W)
        assert not torch.allclose(causal, full, atol=1e-3)


def test_mergear_linear_cfg_scales_every_step(merge_model):
    """Linear CFG on the compacted cache: code t is guided with s_t = 1 + (s - 1) t / N, here 1 + 2 t / 16."""
    codes, K, W = decoding_batches()[0]
    cond = torch.arange(4) % C
    cached = mergear_logits_cached(merge_model, codes, cond, K, W, cfg_scale=3.0, cfg_schedule="linear")
    rep = rep_from_codes(codes)
    with torch.no_grad():
        c = merge_model(codes, cond, K, rep, W)
        u = merge_model(codes, torch.full_like(cond, C), K, rep, W)
    s = torch.tensor([1 + t / 8 for t in range(16)])[None, :, None]      # 1.0, 1.125, ..., 2.875
    torch.testing.assert_close(cached, u + s * (c - u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached[:, 0], c[:, 0], rtol=1e-4, atol=1e-4)   # s_0 = 1: the conditional logits
    with pytest.raises(ValueError, match="cfg schedule"):
        mergear_logits_cached(merge_model, codes, cond, K, W, cfg_scale=3.0, cfg_schedule="cosine")


def test_plain_cache_replay_is_the_causal_model(merge_model):
    codes, K, _ = decoding_batches()[0]
    cond = torch.arange(4)
    d = decode_mergear(merge_model, cond, K, 16, 2, codes=codes, compact=False)
    with torch.no_grad():
        causal = merge_model(codes, cond, K, torch.arange(16).expand(4, 16), 2)   # rep = identity
    torch.testing.assert_close(d.logits, causal, rtol=1e-4, atol=1e-4)
    assert d.computed.tolist() == list(range(2, 18))         # prefix + every earlier code


def test_cache_holds_at_most_K_plus_W_plus_2_entries(merge_model):
    W = 2
    # K = 4 groups; the last group's run is long, so the sequence ends with W live duplicates: exactly K + W + 2
    source = torch.stack([runs_source([3, 2, 1, 10]), runs_source([2, 2, 2, 10]), runs_source([4, 4, 4, 4])])
    codes = codes_from_groups(source, torch.tensor([11, 22, 33, 44]).expand(3, 4))
    d = decode_mergear(merge_model, torch.tensor([0, 1, 2]), 4, 16, W, codes=codes)
    K, N = 4, 16
    for b in range(3):
        rep = brute_rep(codes[b].tolist())                                  # first position of each code
        rows = brute_mask(rep, W)                                           # Eq. (12) written out, (N, N)
        # step 0 reads the prefix C, M; step t >= 1 feeds x_{t-1} and reads C, M and Eq. (12)'s row t - 1
        assert d.reads[b].tolist() == [2] + [2 + int(rows[t].sum()) for t in range(N - 1)], b
        # live at the end (x_0 .. x_{N-2} fed; row N - 1 reads next): C, M, every first member, and the
        # duplicates j with (N - 1) - j <= W
        live = 2 + sum(rep[j] == j or (N - 1) - j <= W for j in range(N - 1))
        assert d.stored[b] == live, b
    assert d.stored.tolist() == [K + W + 2] * 3                              # the bound, reached by each sample
    # every step reads at most the live entries + the fed token; the batched attention pads to the batch maximum
    assert (d.reads <= K + W + 3).all() and (d.computed <= K + W + 3).all()
    assert (d.computed >= d.reads.max(0).values).all()
    # every step's reads: the prefix, Eq. (12)'s row of the fed position (brute force); the batched attention
    # computes the ring's W + 1 slots and the batch's largest count of distinct codes so far
    for t in range(1, 16):
        for b in range(3):
            assert d.reads[b, t] == 2 + brute_mask(brute_rep(codes[b].tolist()), W)[t - 1].sum()
        assert d.computed[t] == 2 + (W + 1) + max(len(set(codes[b, :t].tolist())) for b in range(3))
    # the buffers: 2 + (W + 1) + K slots per sample, K and V, every layer (float32, width 64)
    layers, dim = len(merge_model.layers), merge_model.cfg.dim
    assert d.cache_bytes == 2 * layers * 3 * (2 + (W + 1) + K) * dim * 4
    # W = 0: no ring, the prefix and the K first members only
    assert decode_mergear(merge_model, torch.tensor([0]), 4, 16, 0, codes=codes[:1]).stored.item() == K + 2
    # the plain cache of the same sequence keeps every position: N + 1 entries, N + 1 keys at the last step
    plain = decode_mergear(merge_model, torch.tensor([0]), 4, 16, W, codes=codes[:1], compact=False)
    assert plain.stored.item() == 17 and plain.computed[-1] == 17
    assert plain.cache_bytes == 2 * layers * 1 * 17 * dim * 4


def test_compact_cache_grows_when_codes_outnumber_K(merge_model):
    """Sampling may produce more distinct codes than K: the first-member region grows (4 -> 8 -> 16 slots here)
    and the logits stay the masked forward's."""
    gen = torch.Generator().manual_seed(5)
    codes = torch.stack([torch.randperm(V, generator=gen)[:16], torch.randint(0, 3, (16,), generator=gen)])
    cond, W = torch.tensor([1, 2]), 2
    d = decode_mergear(merge_model, cond, 4, 16, W, codes=codes, cfg_scale=2.0)   # K = 4, 16 distinct codes
    rep = rep_from_codes(codes)
    with torch.no_grad():
        c = merge_model(codes, cond, 4, rep, W)
        u = merge_model(codes, torch.full_like(cond, C), 4, rep, W)
    torch.testing.assert_close(d.logits, u + 2.0 * (c - u), rtol=1e-4, atol=1e-4)
    layers, dim = len(merge_model.layers), merge_model.cfg.dim
    assert d.cache_bytes == 2 * layers * 4 * (2 + (W + 1) + 16) * dim * 4          # 2 x 2 rows with CFG
    assert d.stored.tolist() == [2 + 15, 2 + 3 + W]                                 # 15 fed firsts; 3 codes + window


def test_a_compacted_decoding_step_reads_back_one_value(merge_model, monkeypatch):
    """A MergeAR step waits for the device once: the batch's largest slot count (the read's length), read after the
    duplicate test; nothing in the layers. Setup reads K's maximum (the first capacity). The plain layout's length
    is known on the host: it reads only what both share (the check of K in merge_instruction_index)."""
    codes, K, W = decoding_batches()[3]
    reads = []
    for name in ("__int__", "item", "tolist", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: (reads.append(_name),
                                                                                          _real(self, *a))[1])
    decode_mergear(merge_model, torch.arange(3), K, 16, W, codes=codes, compact=False, return_logits=False)
    shared = list(reads)
    reads.clear()
    decode_mergear(merge_model, torch.arange(3), K, 16, W, codes=codes, return_logits=False)
    assert len(reads) == len(shared) + 1 + 15               # K's maximum + one per fed token x_0 .. x_14
    assert len(shared) <= 1


@pytest.mark.parametrize("compact", [True, False])
def test_decoding_under_bf16_autocast(merge_model, compact):
    """Under autocast the activations are bf16: the cache takes their dtype (half the bytes), not the model's
    float32 (an index write of bf16 keys into a float32 cache fails), and the logits stay close."""
    codes, K, W = decoding_batches()[0]
    cond = torch.arange(4) % C
    full = decode_mergear(merge_model, cond, K, 16, W, codes=codes, compact=compact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = decode_mergear(merge_model, cond, K, 16, W, codes=codes, compact=compact)
    assert half.cache_bytes * 2 == full.cache_bytes
    torch.testing.assert_close(half.logits.float(), full.logits, rtol=0.05, atol=0.2)   # bf16: 8 mantissa bits


def test_generate_mergear_samples_what_the_masked_forward_predicts(merge_model):
    cond = torch.tensor([1, 7, 3])
    gen = torch.Generator().manual_seed(0)
    codes = generate_mergear(merge_model, cond, 6, 16, 2, temperature=1.0, generator=gen)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64 and not merge_model.training
    # greedy with CFG: the codes are the argmax of the guided masked forward on them (its rep from its own codes)
    s = 3.0
    d = decode_mergear(merge_model, cond, 6, 16, 2, cfg_scale=s, top_k=1)
    rep = rep_from_codes(d.codes)
    with torch.no_grad():
        c = merge_model(d.codes, cond, 6, rep, 2)
        u = merge_model(d.codes, torch.full_like(cond, C), 6, rep, 2)
    torch.testing.assert_close(d.logits, u + s * (c - u), rtol=1e-4, atol=1e-4)
    assert torch.equal(d.codes, d.logits.argmax(-1))


def test_factorized_replay_equals_the_masked_forward():
    torch.manual_seed(3)
    model = build_mergear("tiny", vocab_size=FV, factorized=True, num_classes=C, merge_counts=KS).eval()
    randomize_heads(model)
    source = torch.stack([runs_source([2, 2, 3, 2, 1, 4, 2]), runs_source([5, 5, 6, 0])[:16]])
    codes = codes_from_groups(source, torch.randint(0, FV, (2, 7)))
    cond = torch.tensor([2, 5])
    pre, post = decode_mergear(model, cond, 6, 16, 2, codes=codes, cfg_scale=2.0).logits
    rep = rep_from_codes(codes)
    with torch.no_grad():
        c = model(codes, cond, 6, rep, 2)
        u = model(codes, torch.full_like(cond, C), 6, rep, 2)
    torch.testing.assert_close(pre, u[0] + 2.0 * (c[0] - u[0]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(post, u[1] + 2.0 * (c[1] - u[1]), rtol=1e-4, atol=1e-4)


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
    # the plain model's state dict is untouched; MergeAR adds one table, one row per allowed K, and zero RoPE rows
    assert "merge_embedding.weight" not in build_gpt("tiny").state_dict()
    assert merge_model.merge_embedding.weight.shape == (len(KS), 64)
    assert torch.count_nonzero(merge_model.freqs_cis[:2]) == 0
    # the default window is one grid row
    from mergear import merge_window
    assert merge_window(merge_model) == 4


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
