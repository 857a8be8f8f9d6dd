"""randar.py: the cosine schedule of parallel decoding, the slot grid and the orders, the position instruction token,
parallel decoding through the KV cache against teacher forcing (logits and cached keys, with CFG), greedy sampling,
the slot order the Source Recovery Model reads, RandAR-L's parameter count and a tiny RandAR that learns."""
import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from lfq import join_index, split_index
from gpt import apply_rotary_emb, build_gpt, count_parameters, generate, precompute_freqs_cis_2d
from randar import (build_randar, check_order, decode_randar, decode_with_recovery, generate_randar,
                    num_query_tokens_schedule, randar_inputs, randar_logits, randar_loss, random_orders,
                    slot_rope_rows, teacher_forced_samples, to_generation_order, to_slot_order)

from conftest import randomize_heads

V, C = 64, 10                                   # tiny vocabulary and number of classes
FV = 2 ** 10                                    # tiny factorized vocabulary: pre 6 bits (64), post 4 bits (16)
L = 16                                          # the tiny preset's grid: 4 x 4 slots

pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return randomize_heads(build_randar("tiny", vocab_size=V, num_classes=C).eval())


@pytest.fixture(scope="module")
def factorized():
    torch.manual_seed(1)
    return randomize_heads(build_randar("tiny", vocab_size=FV, factorized=True, num_classes=C).eval())


def first_queries(counts):
    """Generation indices of the first query of every step."""
    return [sum(counts[:j]) for j in range(len(counts))]


def run_lengths(counts):
    return [(value, len(list(run))) for value, run in itertools.groupby(counts)]


# ----------------------------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------------------------


def randar_loop_schedule(T, L):
    """RandAR's step-by-step rule (its generate loop): one token first; then after step c (1-based) the target
    min(int((1 - cos(pi / 2 (c + 1) / T)) L + 1), L) tokens done, at least one more, at most what is left."""
    counts, done = [1], 1
    while done < L:
        target = min(int((1 - math.cos(math.pi / 2 * (len(counts) + 1) / T)) * L + 1), L)
        n = min(max(target - done, 1), L - done)
        counts.append(n)
        done += n
    return counts


def test_schedule_of_the_papers_settings():
    counts = num_query_tokens_schedule(88, 256)                 # MergeVQ (G): K = 256 in 88 steps
    assert sorted(Counter(counts).items()) == [(1, 24), (2, 9), (3, 16), (4, 29), (5, 10)]
    assert run_lengths(counts) == [
        (1, 24), (2, 6), (3, 1), (2, 1), (3, 1), (2, 1), (3, 2), (2, 1), (3, 7), (4, 1), (3, 2), (4, 1), (3, 1),
        (4, 1), (3, 1), (4, 2), (3, 1), (4, 11), (5, 1), (4, 3), (5, 1), (4, 2), (5, 1), (4, 1), (5, 1), (4, 1),
        (5, 1), (4, 1), (5, 1), (4, 1), (5, 1), (4, 1), (5, 1), (4, 1), (5, 1), (4, 1), (5, 1), (4, 1)]
    counts = num_query_tokens_schedule(64, 144)                 # MergeVQ (G+R): K = 144 in 64 steps
    assert sorted(Counter(counts).items()) == [(1, 23), (2, 10), (3, 23), (4, 8)]
    assert run_lengths(counts) == [
        (1, 23), (2, 6), (3, 1), (2, 1), (3, 1), (2, 1), (3, 1), (2, 1), (3, 4), (2, 1), (3, 2), (4, 1), (3, 5),
        (4, 1), (3, 2), (4, 1), (3, 1), (4, 1), (3, 2), (4, 1), (3, 1), (4, 1), (3, 1), (4, 1), (3, 1), (4, 1), (3, 1)]


def test_schedule_has_T_steps_of_at_least_one_token_summing_to_L():
    for n in range(1, 97):
        assert num_query_tokens_schedule(n, n) == [1] * n       # T = L: one token per step
        for T in range(1, n + 1):
            counts = num_query_tokens_schedule(T, n)
            assert len(counts) == T and min(counts) >= 1 and sum(counts) == n, (T, n, counts)
            if counts[0] == 1:                                  # RandAR's loop starts with one token
                assert counts == randar_loop_schedule(T, n), (T, n)
    assert num_query_tokens_schedule(3, 16) == [3, 5, 8] and randar_loop_schedule(3, 16) == [1, 7, 8]
    for bad in (0, 17):
        with pytest.raises(ValueError, match="steps T"):
            num_query_tokens_schedule(bad, 16)


# ----------------------------------------------------------------------------------------------------------------
# Slots, cells, orders and the training sequence
# ----------------------------------------------------------------------------------------------------------------


def test_slot_k_sits_at_cell_k_div_g_k_mod_g(plain):
    assert torch.equal(slot_rope_rows(plain, 16), torch.arange(16) + 1)        # the 4 x 4 table itself
    big = build_randar("tiny", vocab_size=V, num_classes=C, block_size=64)     # an 8 x 8 table
    k = torch.arange(16)
    assert torch.equal(slot_rope_rows(big, 16), 1 + (k // 4) * 8 + k % 4)
    # The rows read from the 8 x 8 table are the 4 x 4 grid's RoPE: a cell's angles do not depend on the grid.
    small_table = precompute_freqs_cis_2d(4, 16)
    torch.testing.assert_close(big.freqs_cis[slot_rope_rows(big, 16)], small_table[1:])
    with pytest.raises(ValueError, match="perfect square"):
        slot_rope_rows(plain, 12)
    with pytest.raises(ValueError, match="larger than"):
        slot_rope_rows(plain, 25)


def test_orders_round_trip_between_slot_and_generation_order():
    gen = torch.Generator().manual_seed(0)
    order = random_orders(5, L, gen)
    assert torch.equal(order.sort(1).values, torch.arange(L).expand(5, L))
    tokens = torch.randint(0, V, (5, L), generator=gen)
    x = to_generation_order(tokens, order)
    assert all(x[b, i] == tokens[b, order[b, i]] for b in range(5) for i in range(L))
    assert torch.equal(to_slot_order(x, order), tokens)
    assert torch.equal(x.gather(1, order.argsort(1)), tokens)            # RandAR's inverse permutation
    assert not torch.equal(order[0], order[1])                          # one order per sample
    with pytest.raises(ValueError, match="permutation"):
        check_order(torch.zeros(5, L, dtype=torch.long), 5, L)
    with pytest.raises(ValueError, match="order must be"):
        check_order(order[:, :-1], 5, L)


def rotate_by_cell(e, r, c, head_dim, base=10000.0):
    """One head's vector e (D_h,) turned by the 2D RoPE of cell (r, c), written out: pair j < D_h/4 by
    r theta_j, pair D_h/4 + j by c theta_j, theta_j = base^(-2j / (D_h/2))."""
    quarter = head_dim // 4
    out = e.clone()
    for pair in range(head_dim // 2):
        j = pair % quarter
        angle = (r if pair < quarter else c) * base ** (-2 * j / (head_dim / 2))
        a, b = e[2 * pair].item(), e[2 * pair + 1].item()
        out[2 * pair] = a * math.cos(angle) - b * math.sin(angle)
        out[2 * pair + 1] = b * math.cos(angle) + a * math.sin(angle)
    return out


def test_position_instruction_is_the_shared_embedding_rotated_by_its_cell(plain):
    cond = torch.tensor([3, 7])
    order = random_orders(2, L, torch.Generator().manual_seed(1))
    tokens = torch.randint(0, V, (2, L))
    with torch.no_grad():
        h, freqs = randar_inputs(plain, tokens, cond, order)
    assert h.shape == (2, 1 + 2 * L, 64) and freqs.shape == (2, 1 + 2 * L, 8, 2)
    H, Dh = plain.cfg.n_head, 64 // plain.cfg.n_head
    e = plain.pos_instruct_embeddings.detach().view(H, Dh)
    i = 5                                                               # step 5 of sample 1
    k = order[1, i].item()
    r, c = divmod(k, 4)
    expected = torch.cat([rotate_by_cell(e[head], r, c, Dh) for head in range(H)])
    torch.testing.assert_close(h[1, 1 + 2 * i], expected, rtol=1e-5, atol=1e-6)        # P_i
    assert (r, c) != (0, 0) and not torch.allclose(h[1, 1 + 2 * i], e.flatten())
    torch.testing.assert_close(h[1, 2 + 2 * i], plain.tok_embeddings.weight[tokens[1, k]])   # X_i, no dropout
    # P_i and X_i carry the RoPE of cell order[i]; the class token the zero row, whatever the order.
    table = plain.freqs_cis
    assert torch.equal(freqs[:, 1::2], table[1 + order]) and torch.equal(freqs[:, 2::2], table[1 + order])
    assert torch.equal(freqs[:, 0], torch.zeros(2, 8, 2))
    torch.testing.assert_close(h[:, 0], plain.cls_embedding.embedding_table.weight[cond])
    # so the class token's query and key are zero in every layer, as in LlamaGen
    attn = plain.layers[0].attention
    qkv = attn.wqkv(plain.layers[0].attention_norm(h[:, :1])).view(2, 1, 3, H, Dh)      # (B, 1, q/k/v, H, D_h)
    assert apply_rotary_emb(qkv[:, :, 0], freqs[:, :1]).abs().max() == 0
    assert apply_rotary_emb(qkv[:, :, 1], freqs[:, :1]).abs().max() == 0


def test_token_dropout_hits_image_tokens_only(plain):
    plain.train()
    try:
        plain.tok_dropout.p = 0.5
        torch.manual_seed(0)
        h, _ = randar_inputs(plain, torch.randint(0, V, (4, L)), torch.arange(4), random_orders(4, L))
    finally:
        plain.tok_dropout.p = 0.1
        plain.eval()
    # nn.Dropout zeroes single channels: about half of the image tokens' channels, none of P's or C's
    assert 0.4 < (h[:, 2::2] == 0).float().mean() < 0.6
    assert (h[:, 1::2] != 0).all() and (h[:, 0] != 0).all()


# ----------------------------------------------------------------------------------------------------------------
# The loss and the orders
# ----------------------------------------------------------------------------------------------------------------


def test_logits_depend_only_on_the_cell_token_pairs_already_generated(plain):
    """The logits at step i are a function of the (cell, token) pairs of steps < i and the cell of step i.
    (Slot k is tied to its cell, so no relabelling of the slots keeps those pairs except the identity; what can be
    checked is this causal structure, and that the order matters.)"""
    torch.manual_seed(0)
    tokens, cond = torch.randint(0, V, (1, L)), torch.tensor([4])
    a = random_orders(1, L, torch.Generator().manual_seed(2))
    b = a.clone()
    b[0, 6:] = b[0, 6:][torch.randperm(L - 6)]                         # same first 6 steps, then another order
    assert b[0, 6] != a[0, 6]
    with torch.no_grad():
        la, lb = randar_logits(plain, tokens, cond, a), randar_logits(plain, tokens, cond, b)
        torch.testing.assert_close(la[:, :6], lb[:, :6], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(la[:, 6], lb[:, 6], atol=1e-3)       # step 6 asks for another cell
        # changing the token generated at step 6 changes only the steps after it
        changed = tokens.clone()
        changed[0, a[0, 6]] = (tokens[0, a[0, 6]] + 1) % V
        lc = randar_logits(plain, changed, cond, a)
        torch.testing.assert_close(la[:, :7], lc[:, :7], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(la[:, 7:], lc[:, 7:], atol=1e-3)


def test_loss_is_the_cross_entropy_in_generation_order(plain, factorized):
    torch.manual_seed(0)
    cond = torch.tensor([1, 2, 3])
    order = random_orders(3, L)
    with torch.no_grad():
        tokens = torch.randint(0, V, (3, L))
        x = to_generation_order(tokens, order)
        loss = randar_loss(plain, tokens, cond, order)
        assert loss.item() == pytest.approx(F.cross_entropy(randar_logits(plain, tokens, cond, order).flatten(0, 1),
                                                            x.flatten()).item(), rel=1e-6)
        # relabelling the samples of the batch (tokens, labels and orders together) keeps the loss
        perm = torch.tensor([2, 0, 1])
        assert randar_loss(plain, tokens[perm], cond[perm], order[perm]).item() == pytest.approx(loss.item(),
                                                                                               rel=1e-5)
        # another order, another loss
        assert abs(randar_loss(plain, tokens, cond, random_orders(3, L)).item() - loss.item()) > 1e-4
        # factorized: CE(pre) + CE(post) = the NLL of the code
        codes = torch.randint(0, FV, (3, L))
        l_pre, l_post = randar_logits(factorized, codes, cond, order)
        pre, post = split_index(to_generation_order(codes, order), 6)
        nll = -(l_pre.log_softmax(-1).gather(-1, pre[..., None]).mean()
                + l_post.log_softmax(-1).gather(-1, post[..., None]).mean())
        assert randar_loss(factorized, codes, cond, order).item() == pytest.approx(nll.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Parallel decoding through the KV cache
# ----------------------------------------------------------------------------------------------------------------


def teacher_forced_cache(model, tokens, cond, order):
    """Every layer's keys and values of the full training sequence (one causal call through a fresh cache)."""
    with torch.no_grad():
        h, freqs = randar_inputs(model, tokens, cond, order)
        model.setup_caches(tokens.shape[0], 1 + 2 * tokens.shape[1])
        try:
            model.run_rotated(h, freqs, torch.arange(h.shape[1]))
            return [(l.attention.kv_cache.k.clone(), l.attention.kv_cache.v.clone()) for l in model.layers]
        finally:
            model.clear_caches()


def guided(model, tokens, cond, order, scales):
    """Teacher-forced u + s (c - u) per generation step (scales (L,)); a pair for the factorized model."""
    with torch.no_grad():
        c = randar_logits(model, tokens, cond, order)
        u = randar_logits(model, tokens, torch.full_like(cond, C), order)
    s = scales[None, :, None]
    if model.cfg.factorized:
        return tuple(ui + s * (ci - ui) for ci, ui in zip(c, u))
    return u + s * (c - u)


@pytest.mark.parametrize("which", ["plain", "factorized"])
@pytest.mark.parametrize("T", [5, L])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_first_queries_and_cached_keys_equal_teacher_forcing(plain, factorized, which, T, cfg):
    model = plain if which == "plain" else factorized
    cond = torch.tensor([2, 9])
    gen = torch.Generator().manual_seed(3)
    d = decode_randar(model, cond, L, T, cfg_scale=cfg, generator=gen, keep_cache=True)
    assert d.tokens.shape == (2, L) and d.tokens.dtype == torch.int64 and not model.training
    assert torch.equal(d.tokens, to_slot_order(to_generation_order(d.tokens, d.order), d.order))
    counts = d.counts
    done = torch.tensor([0] + list(itertools.accumulate(counts))[:-1])             # tokens before each step
    scales = torch.repeat_interleave(1 + (cfg - 1) * done / L, torch.tensor(counts))   # linear CFG, (L,)
    tf = guided(model, d.tokens, cond, d.order, scales)
    got = d.logits if which == "factorized" else (d.logits,)
    tf = tf if which == "factorized" else (tf,)
    firsts = first_queries(counts)
    for g, t in zip(got, tf):
        torch.testing.assert_close(g[:, firsts], t[:, firsts], rtol=1e-4, atol=1e-4)
        if T == L:
            torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-4)
        else:                                                  # later queries see queries, not tokens
            assert not torch.allclose(g, t, atol=1e-3)
    # The cache: 1 + 2L slots; up to the last step's first query it holds the teacher-forced keys and values of
    # the generated sequence ([cond; null] halves alike), the stale queries after it differ, nothing past them.
    p_last = 1 + 2 * (L - counts[-1])                          # position of the last step's first query
    end = 2 * L - counts[-1] + 1                               # one past the last written slot
    halves = [cond] if cfg == 1.0 else [cond, torch.full_like(cond, C)]
    for h, labels in enumerate(halves):
        ref = teacher_forced_cache(model, d.tokens, labels, d.order)
        for (k, v), (k_ref, v_ref) in zip(d.cache, ref):
            k, v = k[2 * h: 2 * h + 2], v[2 * h: 2 * h + 2]
            assert k.shape[2] == 1 + 2 * L
            torch.testing.assert_close(k[:, :, :p_last + 1], k_ref[:, :, :p_last + 1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v[:, :, :p_last + 1], v_ref[:, :, :p_last + 1], rtol=1e-4, atol=1e-5)
            assert (k[:, :, end:] == 0).all() and (v[:, :, end:] == 0).all()
            if counts[-1] > 1:
                assert not torch.allclose(k[:, :, p_last + 1:end], k_ref[:, :, p_last + 1:end], atol=1e-3)


def test_decoding_under_bf16_autocast(factorized):
    """The GPU's decoding path, bf16 autocast: the KV cache takes the activations' dtype (a float32 cache refused
    the bf16 keys in index_put), and replayed tokens give the teacher-forced float32 logits up to bf16's rounding."""
    cond, tokens = torch.tensor([0, 5]), torch.randint(0, FV, (2, L), generator=torch.Generator().manual_seed(3))
    order = random_orders(2, L, torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = decode_randar(factorized, cond, L, L, tokens=tokens, order=order, keep_cache=True)
    assert d.cache[0][0].dtype == torch.bfloat16
    with torch.no_grad():
        want = randar_logits(factorized, tokens, cond, order)                  # float32: (pre, post)
    for got, expected in zip(d.logits, want):
        torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_replayed_tokens_through_the_cache_equal_teacher_forcing(factorized):
    cond, tokens = torch.tensor([0, 5]), torch.randint(0, FV, (2, L))
    order = random_orders(2, L, torch.Generator().manual_seed(4))
    d = decode_randar(factorized, cond, L, L, tokens=tokens, order=order)
    assert d.counts == [1] * L                                                  # T = L: one token per step
    with torch.no_grad():
        l_pre, l_post = randar_logits(factorized, tokens, cond, order)
    torch.testing.assert_close(d.logits[0], l_pre, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.logits[1], l_post, rtol=1e-4, atol=1e-5)
    # The replay feeds the given tokens in generation order: the token of slot order[b, i] is read from step i + 1
    # on. Change only its post sub-token (+64: the low 6 bits, pre, stay), which step i's post head does not read.
    i, b = 5, torch.arange(2)
    changed = tokens.clone()
    changed[b, order[:, i]] = (tokens[b, order[:, i]] + 64) % FV
    e = decode_randar(factorized, cond, L, L, tokens=changed, order=order)
    for before, after in zip(d.logits, e.logits):                               # pre, post: (B, L, vocab)
        torch.testing.assert_close(before[:, :i + 1], after[:, :i + 1], rtol=0, atol=0)
        assert ((before[:, i + 1:] - after[:, i + 1:]).abs().amax(-1) > 1e-4).all()   # every later step sees it


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_top_k_one_is_greedy(plain, factorized, which):
    model = plain if which == "plain" else factorized
    cond = torch.tensor([1, 6])
    order = random_orders(2, L, torch.Generator().manual_seed(5))
    tokens = generate_randar(model, cond, L, L, top_k=1, order=order)              # T = L: one token per step
    x = to_generation_order(tokens, order)
    with torch.no_grad():
        out = randar_logits(model, tokens, cond, order)
    if which == "plain":
        assert torch.equal(x, out.argmax(-1))
    else:                                                                          # pre greedy, post greedy given pre
        assert torch.equal(x, join_index(out[0].argmax(-1), out[1].argmax(-1), 6))
    # parallel steps: every query takes its own argmax, the first of each step the teacher-forced one
    d = decode_randar(model, cond, L, 4, top_k=1, order=order)
    x = to_generation_order(d.tokens, order)
    firsts = first_queries(d.counts)
    with torch.no_grad():
        out = randar_logits(model, d.tokens, cond, order)
    if which == "plain":
        assert torch.equal(x, d.logits.argmax(-1)) and torch.equal(x[:, firsts], out.argmax(-1)[:, firsts])
    else:
        assert torch.equal(split_index(x, 6)[0], d.logits[0].argmax(-1))
        assert torch.equal(split_index(x, 6)[0][:, firsts], out[0].argmax(-1)[:, firsts])


def test_cfg_scale_one_is_the_conditional_model(plain):
    cond, order = torch.tensor([2, 8]), random_orders(2, L, torch.Generator().manual_seed(6))
    for schedule in ("linear", "constant"):
        d = decode_randar(plain, cond, L, L, cfg_scale=1.0, cfg_schedule=schedule, order=order,
                          generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(d.logits, randar_logits(plain, d.tokens, cond, order), rtol=1e-4, atol=1e-5)
    # a constant scale s guides every step by s
    d = decode_randar(plain, cond, L, L, cfg_scale=2.5, cfg_schedule="constant", order=order, top_k=1)
    torch.testing.assert_close(d.logits, guided(plain, d.tokens, cond, order, torch.full((L,), 2.5)),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        decode_randar(plain, cond, L, L, cfg_scale=2.0, cfg_schedule="cosine")


# ----------------------------------------------------------------------------------------------------------------
# The slot order the Source Recovery Model reads
# ----------------------------------------------------------------------------------------------------------------


def test_tokens_come_back_in_the_slot_order_recovery_reads():
    """The tokenizer's merged indices are in ToMe's output order, slot k, the index of recovery.py's slot embedding.
    RandAR trains on them in that order and returns its tokens in it, so decode_with_recovery predicts the source
    from the same slots the recovery model was trained on (Eq. (9) takes enc.z_q in slot order)."""
    from tokenizer import build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer("r", "tiny").eval()                   # N = 64, K = 16: a 4 x 4 slot grid
    with torch.no_grad():
        enc = tok.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert enc.indices.shape == (2, L)
    model = randomize_heads(build_randar("tiny", factorized=True, num_classes=C).eval())   # 2^18 codes
    order = random_orders(2, L, torch.Generator().manual_seed(7))
    # Greedy decoding in 6 parallel steps: the token sampled at generation step i (pre, then post given pre, each
    # its argmax) comes back at slot order[b, i]
    d = decode_randar(model, torch.tensor([0, 1]), L, 6, top_k=1, order=order)
    pre, post = d.logits[0].argmax(-1), d.logits[1].argmax(-1)                        # (B, L) generation order
    assert all(d.tokens[b, order[b, i]] == pre[b, i] + 64 * post[b, i] for b in range(2) for i in range(L))
    # decode_with_recovery, written out: the codes of the indices bit by bit (LFQ: bit k -> +-1), the predicted
    # source, Eq. (11) position by position, the N tokens laid out on the 8 x 8 grid in raster order, the decoder
    d_bits, g = tok.cfg.z_channels, tok.cfg.grid
    z = torch.tensor([[[1.0 if (idx >> k) & 1 else -1.0 for k in range(d_bits)] for idx in row]
                      for row in enc.indices.tolist()])                                # (B, K, d)
    assert torch.equal(z, enc.z_q)
    with torch.no_grad():
        src = tok.recovery.predict_source(z)                                           # (B, N)
        grid = torch.zeros(2, d_bits, g, g)
        for b in range(2):
            for j in range(g * g):
                grid[b, :, j // g, j % g] = z[b, src[b, j]]                            # Eq. (11): x_j = z_source[j]
        expected = tok.decoder(grid)
    images, source = decode_with_recovery(tok, enc.indices)
    assert torch.equal(source, src)
    torch.testing.assert_close(images, expected)
    assert not torch.equal(source, enc.source)              # the predicted source is not the true one here
    # The order matters to the recovery model only through its slot embedding: fed the tokens in generation
    # order it predicts other sources, and with the slot embedding zeroed it is blind to the order.
    rec = tok.recovery
    z_gen = enc.z_q.gather(1, order[..., None].expand(-1, -1, enc.z_q.shape[-1]))    # (B, K, d) generation order
    assert not torch.equal(order.gather(1, rec.predict_source(z_gen)), source)
    with torch.no_grad():
        rec.slot_embed.zero_()
    assert torch.equal(order.gather(1, rec.predict_source(z_gen)), rec.predict_source(enc.z_q))


# ----------------------------------------------------------------------------------------------------------------
# Sizes, keys and training
# ----------------------------------------------------------------------------------------------------------------


def test_randar_l_is_llamagen_l_plus_one_embedding():
    with torch.device("meta"):
        gpt, randar = build_gpt("L", factorized=True), build_randar("L", factorized=True)
        plain_gpt, plain_randar = build_gpt("L"), build_randar("L")
    assert count_parameters(randar) == count_parameters(gpt) + 1024
    assert count_parameters(plain_randar) == 342_910_976 + 1024
    keys = set(plain_randar.state_dict())
    assert keys - set(plain_gpt.state_dict()) == {"pos_instruct_embeddings"}
    assert set(plain_gpt.state_dict()) <= keys and plain_randar.pos_instruct_embeddings.shape == (1, 1024)


def test_init_and_errors():
    torch.manual_seed(0)
    model = build_randar("tiny", vocab_size=V, num_classes=C, dim=256, n_head=4)
    assert model.pos_instruct_embeddings.std().item() == pytest.approx(0.02, rel=0.15)
    assert (model.output.weight == 0).all()
    with pytest.raises(ValueError, match="Merge Instruction"):
        build_randar("tiny", merge_counts=(4,))
    with pytest.raises(ValueError, match="generate_randar"):
        generate(model, torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="cond"):
        generate_randar(model, torch.tensor([[0]]), L, 4)
    with pytest.raises(ValueError, match="cond"):
        randar_loss(model, torch.zeros(2, L, dtype=torch.long), torch.tensor([0]))


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_tiny_randar_loss_falls_on_fixed_tokens(which):
    torch.manual_seed(0)
    vocab = 256 if which == "plain" else 2 ** 18
    model = build_randar("tiny", vocab_size=vocab, factorized=which == "factorized", num_classes=C)
    tokens, labels = torch.randint(0, vocab, (8, L)), torch.arange(8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = randar_loss(model, tokens, labels, generator=gen)           # a fresh order per sample and step
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    uniform = math.log(256) if which == "plain" else math.log(64) + math.log(4096)
    assert losses[0] == pytest.approx(uniform, rel=1e-3)                # zero heads: uniform logits
    assert losses[-1] < 0.7 * losses[0], losses


def test_teacher_forced_samples_at_zero_temperature_are_the_argmax(plain, factorized):
    """finetune-recovery's data: at temperature -> 0 the token drawn for each slot is the argmax of the teacher-
    forced logits (factorized: pre's argmax, then post's argmax given that pre), put back in slot order."""
    torch.manual_seed(0)
    cond = torch.tensor([1, 2])
    order = random_orders(2, L)
    tokens = torch.randint(0, V, (2, L))
    made = teacher_forced_samples(plain, tokens, cond, order, temperature=1e-6)
    with torch.no_grad():
        expected = to_slot_order(randar_logits(plain, tokens, cond, order).argmax(-1), order)
    assert torch.equal(made, expected)
    codes = torch.randint(0, FV, (2, L))
    made = teacher_forced_samples(factorized, codes, cond, order, temperature=1e-6)
    pre, post = split_index(to_generation_order(made, order), 6)
    with torch.no_grad():
        l_pre, _ = randar_logits(factorized, codes, cond, order)
        assert torch.equal(pre, l_pre.argmax(-1))
        # post given the drawn pre: the logits of the sequence whose pre sub-tokens are the drawn ones
        h, freqs = randar_inputs(factorized, codes, cond, order)
        h = factorized.run_rotated(h, freqs)[:, 1::2]
        assert torch.equal(post, factorized.intra_logits(h, pre)[1].argmax(-1))
