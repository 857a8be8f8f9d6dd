"""randar.py: the cosine schedule of parallel decoding, cells and orders, the position instruction token, the loss
against the step-by-step conditionals, parallel decoding through the KV cache against teacher forcing (logits,
cell logits and cached keys, with CFG), drawing cells without replacement, greedy sampling, the Source Recovery
path written out, RandAR-L's parameter count and a tiny RandAR that learns."""
import itertools
import math
from collections import Counter

import pytest
import torch

from gpt import apply_rotary_emb, build_gpt, count_parameters, generate
from lfq import join_index, split_index
from randar import (build_randar, check_cells, check_order, decode_randar, decode_with_recovery, generate_randar,
                    num_query_tokens_schedule, randar_inputs, randar_losses, random_orders, sample_cells,
                    teacher_forced_samples, to_generation_order, to_slot_order)

from conftest import randomize_heads

V, C = 64, 10                                   # tiny vocabulary and number of classes
FV = 2 ** 10                                    # tiny factorized vocabulary: pre 6 bits (64), post 4 bits (16)
N = 16                                          # the tiny preset's grid: 4 x 4 cells
L = 6                                           # merged tokens: 6 of the 16 cells

pytestmark = pytest.mark.usefixtures("one_thread")    # conftest.py: tiny models run fastest on one thread


def with_position_head(model):
    with torch.no_grad():
        model.position_output.weight.normal_(0, 0.5)           # zero at init: give it weights, as the heads
    return model


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return with_position_head(randomize_heads(build_randar("tiny", vocab_size=V, num_classes=C,
                                                           position_head=True).eval()))


@pytest.fixture(scope="module")
def factorized():
    torch.manual_seed(1)
    return with_position_head(randomize_heads(build_randar("tiny", vocab_size=FV, factorized=True, num_classes=C,
                                                           position_head=True).eval()))


def random_cells(B, L, seed):
    """L distinct cells of the 4 x 4 grid per sample, (B, L)."""
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed)).argsort(1)[:, :L]


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
# Cells, orders and the training sequence
# ----------------------------------------------------------------------------------------------------------------


def test_orders_round_trip_between_slot_and_generation_order():
    gen = torch.Generator().manual_seed(0)
    order = random_orders(5, L, gen)
    assert torch.equal(order.sort(1).values, torch.arange(L).expand(5, L))
    tokens = torch.randint(0, V, (5, L), generator=gen)
    x = to_generation_order(tokens, order)
    assert all(x[b, i] == tokens[b, order[b, i]] for b in range(5) for i in range(L))
    assert torch.equal(to_slot_order(x, order), tokens)
    assert not torch.equal(order[0], order[1])                          # one order per sample
    with pytest.raises(ValueError, match="permutation"):
        check_order(torch.zeros(5, L, dtype=torch.long), 5, L)
    with pytest.raises(ValueError, match="order must be"):
        check_order(order[:, :-1], 5, L)


def test_cells_must_be_distinct_cells_of_the_grid():
    assert torch.equal(check_cells(torch.tensor([[0, 15, 3]]), 1, 3, N), torch.tensor([[0, 15, 3]]))
    with pytest.raises(ValueError, match="distinct"):
        check_cells(torch.tensor([[0, 5, 5]]), 1, 3, N)
    with pytest.raises(ValueError, match="grid of N = 16"):
        check_cells(torch.tensor([[0, 16, 3]]), 1, 3, N)
    with pytest.raises(ValueError, match="cells must be"):
        check_cells(torch.tensor([[0, 1]]), 1, 3, N)


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


def test_position_instruction_is_the_shared_embedding_rotated_by_the_tokens_cell(plain):
    cond = torch.tensor([3, 7])
    order, cells = random_orders(2, L, torch.Generator().manual_seed(1)), random_cells(2, L, 2)
    tokens = torch.randint(0, V, (2, L))
    with torch.no_grad():
        h, freqs = randar_inputs(plain, tokens, cond, order, cells)
    assert h.shape == (2, 1 + 2 * L, 64) and freqs.shape == (2, 1 + 2 * L, 8, 2)
    H, Dh = plain.cfg.n_head, 64 // plain.cfg.n_head
    e = plain.pos_instruct_embeddings.detach().view(H, Dh)
    for i in range(L):                                                  # every step of sample 1
        k = order[1, i].item()
        r, c = divmod(cells[1, k].item(), 4)                            # the cell of the token of step i
        expected = torch.cat([rotate_by_cell(e[head], r, c, Dh) for head in range(H)])
        torch.testing.assert_close(h[1, 1 + 2 * i], expected, rtol=1e-5, atol=1e-6)    # P_i
        torch.testing.assert_close(h[1, 2 + 2 * i], plain.tok_embeddings.weight[tokens[1, k]])   # X_i, no dropout
    # P_i and X_i carry the RoPE of their token's cell; the class token the zero row, whatever the order.
    table, gen_cells = plain.freqs_cis, to_generation_order(cells, order)
    assert torch.equal(freqs[:, 1::2], table[1 + gen_cells]) and torch.equal(freqs[:, 2::2], table[1 + gen_cells])
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
        h, _ = randar_inputs(plain, torch.randint(0, V, (4, L)), torch.arange(4), random_orders(4, L),
                             random_cells(4, L, 0))
    finally:
        plain.tok_dropout.p = 0.1
        plain.eval()
    # nn.Dropout zeroes single channels: about half of the image tokens' channels, none of P's or C's
    assert 0.4 < (h[:, 2::2] == 0).float().mean() < 0.6
    assert (h[:, 1::2] != 0).all() and (h[:, 0] != 0).all()


# ----------------------------------------------------------------------------------------------------------------
# The loss: the step-by-step conditionals of Eq. (13)
# ----------------------------------------------------------------------------------------------------------------


def step_by_step_nll(model, tokens, cond, order, cells):
    """The NLL of one sequence, each conditional computed by its own causal call on the prefix that precedes it:
    -log p(cell_i | C, pairs < i) from the last output of [C, P_0, X_0, .., X_{i-1}], -log p(token_i | .., cell_i)
    from the last output of that prefix + P_i. Returns (token NLL, cell NLL), each summed over the L steps."""
    full, f_full = randar_inputs(model, tokens, cond, order, cells)            # (1, 1 + 2L, D), rope rows
    tok_nll = cell_nll = 0.0
    x, used = to_generation_order(tokens, order)[0], []
    gen_cells = to_generation_order(cells, order)[0]
    for i in range(tokens.shape[1]):
        out = model.run_rotated(full[:, :1 + 2 * i], f_full[:, :1 + 2 * i])[:, -1:]    # output at X_{i-1} (or C)
        logits = model.cell_logits(out)[0, 0]                                   # (N,) unmasked
        logits[used] = float("-inf")
        cell_nll -= logits.log_softmax(-1)[gen_cells[i]].item()
        out = model.run_rotated(full[:, :2 + 2 * i], f_full[:, :2 + 2 * i])[:, -1:]    # output at P_i
        if model.cfg.factorized:
            pre, post = split_index(x[i], model.cfg.pre_bits)
            l_pre, l_post = model.intra_logits(out, pre.view(1, 1))
            tok_nll -= (l_pre[0, 0].log_softmax(-1)[pre] + l_post[0, 0].log_softmax(-1)[post]).item()
        else:
            tok_nll -= model.logits(out)[0, 0].log_softmax(-1)[x[i]].item()
        used.append(gen_cells[i].item())
    return tok_nll, cell_nll


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_loss_is_the_mean_of_the_step_by_step_conditionals(plain, factorized, which):
    """Teacher forcing in one call gives each step the conditional a prefix-by-prefix computation gives, and the
    cells generated before a step have probability 0 at it (the loss of a cell that came before is never taken)."""
    model = plain if which == "plain" else factorized
    torch.manual_seed(0)
    tokens, cond = torch.randint(0, model.cfg.vocab_size, (2, L)), torch.tensor([1, 8])
    order, cells = random_orders(2, L, torch.Generator().manual_seed(3)), random_cells(2, L, 4)
    with torch.no_grad():
        losses = randar_losses(model, tokens, cond, cells, order)
        expected = [step_by_step_nll(model, tokens[b:b + 1], cond[b:b + 1], order[b:b + 1], cells[b:b + 1])
                    for b in range(2)]
    assert losses.tokens.item() == pytest.approx(sum(e[0] for e in expected) / (2 * L), rel=1e-4)
    assert losses.cells.item() == pytest.approx(sum(e[1] for e in expected) / (2 * L), rel=1e-4)
    # another order, another loss
    with torch.no_grad():
        other = randar_losses(model, tokens, cond, cells, random_orders(2, L, torch.Generator().manual_seed(9)))
    assert abs(other.tokens.item() - losses.tokens.item()) > 1e-4


def test_logits_depend_only_on_the_cell_token_pairs_already_generated(plain):
    """The token logits at step i are a function of the (cell, token) pairs of steps < i and the cell of step i; the
    cell logits at step i of the pairs of steps < i only."""
    torch.manual_seed(0)
    tokens, cond, cells = torch.randint(0, V, (1, L)), torch.tensor([4]), random_cells(1, L, 5)
    a = random_orders(1, L, torch.Generator().manual_seed(2))
    b = a.clone()
    b[0, 3:] = b[0, 3:].flip(0)                                        # same first 3 steps, then another order
    with torch.no_grad():
        la, lb = plain(tokens, cond, a, cells), plain(tokens, cond, b, cells)
        torch.testing.assert_close(la.logits[:, :3], lb.logits[:, :3], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(la.logits[:, 3], lb.logits[:, 3], atol=1e-3)      # step 3 asks for another cell
        torch.testing.assert_close(la.cell_logits[:, :4], lb.cell_logits[:, :4], rtol=1e-4, atol=1e-5)
        # moving the cell of step 3 changes its token logits, not its cell logits
        moved = cells.clone()
        free = [c for c in range(N) if c not in cells[0].tolist()][0]
        moved[0, a[0, 3]] = free
        lm = plain(tokens, cond, a, moved)
        torch.testing.assert_close(la.cell_logits[:, :4], lm.cell_logits[:, :4], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(la.logits[:, 3], lm.logits[:, 3], atol=1e-3)


# ----------------------------------------------------------------------------------------------------------------
# Parallel decoding through the KV cache
# ----------------------------------------------------------------------------------------------------------------


def teacher_forced_cache(model, tokens, cond, order, cells):
    """Every layer's keys and values of the full training sequence (one causal call through a fresh cache)."""
    with torch.no_grad():
        h, freqs = randar_inputs(model, tokens, cond, order, cells)
        model.setup_caches(tokens.shape[0], 1 + 2 * tokens.shape[1])
        try:
            model.run_rotated(h, freqs, torch.arange(h.shape[1]))
            return [(l.attention.kv_cache.k.clone(), l.attention.kv_cache.v.clone()) for l in model.layers]
        finally:
            model.clear_caches()


def guided(model, tokens, cond, order, cells, scales):
    """Teacher-forced u + s (c - u) per generation step (scales (L,)) of the token logits (a pair for the factorized
    model) and of the cell logits, the cells generated before at -inf."""
    with torch.no_grad():
        c = model(tokens, cond, order, cells)
        u = model(tokens, torch.full_like(cond, C), order, cells)
    s = scales[None, :, None]
    mix = lambda ci, ui: ui + s * (ci - ui)                                        # noqa: E731
    logits = tuple(map(mix, c.logits, u.logits)) if model.cfg.factorized else mix(c.logits, u.logits)
    used = torch.isinf(c.cell_logits)
    return logits, mix(c.cell_logits.masked_fill(used, 0), u.cell_logits.masked_fill(used, 0)).masked_fill(
        used, float("-inf"))


@pytest.mark.parametrize("which", ["plain", "factorized"])
@pytest.mark.parametrize("T", [3, L])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_first_queries_and_cached_keys_equal_teacher_forcing(plain, factorized, which, T, cfg):
    """Drawn cells: decode, then re-run the drawn (cell, token) pairs through teacher forcing. The first query of
    every step sees the teacher-forced prefix, so its token logits and the cell logits it was drawn from agree."""
    model = plain if which == "plain" else factorized
    cond = torch.tensor([2, 9])
    d = decode_randar(model, cond, L, T, cfg_scale=cfg, generator=torch.Generator().manual_seed(3), keep_cache=True)
    assert d.tokens.shape == d.cells.shape == (2, L) and d.tokens.dtype == torch.int64 and not model.training
    check_cells(d.cells, 2, L, N)                                            # distinct cells of the grid
    assert torch.equal(d.order, torch.arange(L).expand(2, L))                # drawn cells: slot i = step i
    counts = d.counts
    done = torch.tensor([0] + list(itertools.accumulate(counts))[:-1])       # tokens before each step
    scales = torch.repeat_interleave(1 + (cfg - 1) * done / L, torch.tensor(counts))   # linear CFG, (L,)
    tf, tf_cells = guided(model, d.tokens, cond, d.order, d.cells, scales)
    got = d.logits if which == "factorized" else (d.logits,)
    tf = tf if which == "factorized" else (tf,)
    firsts = first_queries(counts)
    for g, t in zip(got, tf):
        torch.testing.assert_close(g[:, firsts], t[:, firsts], rtol=1e-4, atol=1e-4)
        if T == L:
            torch.testing.assert_close(g, t, rtol=1e-4, atol=1e-4)
        else:                                                  # later queries see queries, not tokens
            assert not torch.allclose(g, t, atol=1e-3)
    torch.testing.assert_close(d.cell_logits[:, firsts], tf_cells[:, firsts], rtol=1e-4, atol=1e-4)
    # The cache: 1 + 2L slots; up to the last step's first query it holds the teacher-forced keys and values of
    # the generated sequence ([cond; null] halves alike), the stale queries after it differ, nothing past them.
    p_last = 1 + 2 * (L - counts[-1])                          # position of the last step's first query
    end = 2 * L - counts[-1] + 1                               # one past the last written slot
    halves = [cond] if cfg == 1.0 else [cond, torch.full_like(cond, C)]
    for h, labels in enumerate(halves):
        ref = teacher_forced_cache(model, d.tokens, labels, d.order, d.cells)
        for (k, v), (k_ref, v_ref) in zip(d.cache, ref):
            k, v = k[2 * h: 2 * h + 2], v[2 * h: 2 * h + 2]
            assert k.shape[2] == 1 + 2 * L
            torch.testing.assert_close(k[:, :, :p_last + 1], k_ref[:, :, :p_last + 1], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v[:, :, :p_last + 1], v_ref[:, :, :p_last + 1], rtol=1e-4, atol=1e-5)
            assert (k[:, :, end:] == 0).all() and (v[:, :, end:] == 0).all()
            if counts[-1] > 1:
                assert not torch.allclose(k[:, :, p_last + 1:end], k_ref[:, :, p_last + 1:end], atol=1e-3)


def test_given_cells_decode_in_a_random_order_as_teacher_forcing(plain):
    """RandAR over a grid (--tokens grid): the cells are given, every one of the N, in a random order."""
    cond, cells = torch.tensor([0, 5]), torch.arange(N).expand(2, N)
    order = random_orders(2, N, torch.Generator().manual_seed(4))
    d = decode_randar(plain, cond, N, N, order=order, cells=cells, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d.cells, cells) and d.cell_logits is None
    with torch.no_grad():
        torch.testing.assert_close(d.logits, plain(d.tokens, cond, order, cells).logits, rtol=1e-4, atol=1e-5)


def test_decoding_under_bf16_autocast(factorized):
    """The GPU's decoding path, bf16 autocast: the KV cache takes the activations' dtype (a float32 cache refused
    the bf16 keys in index_put), and replayed tokens give the teacher-forced float32 logits up to bf16's rounding."""
    cond, tokens = torch.tensor([0, 5]), torch.randint(0, FV, (2, L), generator=torch.Generator().manual_seed(3))
    order, cells = random_orders(2, L, torch.Generator().manual_seed(4)), random_cells(2, L, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = decode_randar(factorized, cond, L, L, tokens=tokens, cells=cells, order=order, keep_cache=True)
    assert d.cache[0][0].dtype == torch.bfloat16
    with torch.no_grad():
        want = factorized(tokens, cond, order, cells).logits                  # float32: (pre, post)
    for got, expected in zip(d.logits, want):
        torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_replayed_tokens_through_the_cache_equal_teacher_forcing(factorized):
    cond, tokens = torch.tensor([0, 5]), torch.randint(0, FV, (2, L))
    order, cells = random_orders(2, L, torch.Generator().manual_seed(4)), random_cells(2, L, 6)
    d = decode_randar(factorized, cond, L, L, tokens=tokens, cells=cells, order=order)
    assert d.counts == [1] * L                                                  # T = L: one token per step
    with torch.no_grad():
        l_pre, l_post = factorized(tokens, cond, order, cells).logits
    torch.testing.assert_close(d.logits[0], l_pre, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.logits[1], l_post, rtol=1e-4, atol=1e-5)
    # The replay feeds the given tokens in generation order: the token of slot order[b, i] is read from step i + 1
    # on. Change only its post sub-token (+64: the low 6 bits, pre, stay), which step i's post head does not read.
    i, b = 2, torch.arange(2)
    changed = tokens.clone()
    changed[b, order[:, i]] = (tokens[b, order[:, i]] + 64) % FV
    e = decode_randar(factorized, cond, L, L, tokens=changed, cells=cells, order=order)
    for before, after in zip(d.logits, e.logits):                               # pre, post: (B, L, vocab)
        torch.testing.assert_close(before[:, :i + 1], after[:, :i + 1], rtol=0, atol=0)
        assert ((before[:, i + 1:] - after[:, i + 1:]).abs().amax(-1) > 1e-4).all()   # every later step sees it
    with pytest.raises(ValueError, match="need their cells"):
        decode_randar(factorized, cond, L, L, tokens=tokens)


def test_cells_are_drawn_without_replacement_with_the_softmax_probabilities(plain):
    """sample_cells' Gumbel top-k: the first of n draws follows softmax(logits / temperature) over the cells not
    used yet (counted over many draws), a used cell is never drawn, the n cells are distinct, and at temperature
    -> 0 they are the n largest logits."""
    h = torch.randn(1, 1, 64)
    used = torch.zeros(1, N, dtype=torch.bool)
    used[0, [0, 3, 7]] = True
    with torch.no_grad():
        logits = plain.cell_logits(h)[0, 0]                                       # (N,)
    p = logits.masked_fill(used[0], float("-inf")).softmax(-1)
    g, counts = torch.Generator().manual_seed(0), torch.zeros(N)
    for _ in range(4000):
        with torch.no_grad():
            cells, _ = sample_cells(plain, h, 1, False, 1.0, used, 3, 1.0, g)
        assert len(set(cells[0].tolist())) == 3 and not used[0, cells[0]].any()
        counts[cells[0, 0]] += 1
    assert (counts / 4000 - p).abs().max() < 0.03, (counts / 4000, p)
    with torch.no_grad():
        greedy, _ = sample_cells(plain, h, 1, False, 1.0, used, 3, 1e-6, g)
    assert set(greedy[0].tolist()) == set(logits.masked_fill(used[0], float("-inf")).topk(3).indices.tolist())


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_top_k_one_is_greedy(plain, factorized, which):
    model = plain if which == "plain" else factorized
    cond = torch.tensor([1, 6])
    tokens, cells = generate_randar(model, cond, L, L, top_k=1, generator=torch.Generator().manual_seed(5))
    order = torch.arange(L).expand(2, L)                                           # drawn cells: slot = step
    with torch.no_grad():
        out = model(tokens, cond, order, cells).logits
    if which == "plain":
        assert torch.equal(tokens, out.argmax(-1))
    else:                                                                          # pre greedy, post greedy given pre
        assert torch.equal(tokens, join_index(out[0].argmax(-1), out[1].argmax(-1), 6))


def test_cfg_scale_one_is_the_conditional_model(plain):
    cond, cells = torch.tensor([2, 8]), random_cells(2, L, 7)
    order = random_orders(2, L, torch.Generator().manual_seed(6))
    for schedule in ("linear", "constant"):
        d = decode_randar(plain, cond, L, L, cfg_scale=1.0, cfg_schedule=schedule, order=order, cells=cells,
                          generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(d.logits, plain(d.tokens, cond, order, cells).logits, rtol=1e-4, atol=1e-5)
    # a constant scale s guides every step by s, the drawn cells too
    d = decode_randar(plain, cond, L, L, cfg_scale=2.5, cfg_schedule="constant", top_k=1,
                      generator=torch.Generator().manual_seed(0))
    logits, cell_logits = guided(plain, d.tokens, cond, d.order, d.cells, torch.full((L,), 2.5))
    torch.testing.assert_close(d.logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.cell_logits, cell_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        decode_randar(plain, cond, L, L, cfg_scale=2.0, cfg_schedule="cosine")


# ----------------------------------------------------------------------------------------------------------------
# Images through the Source Recovery Model
# ----------------------------------------------------------------------------------------------------------------


def test_decode_with_recovery_written_out():
    """decode_with_recovery: the codes of the indices bit by bit (LFQ: bit k -> +-1), the source predicted from them
    at their anchors, Eq. (11) position by position, the N tokens laid out on the grid in raster order, the
    decoder. The tokens may come in any order: the recovery model reads (code, anchor) pairs."""
    from merge import anchors
    from tokenizer import build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer("r", "tiny").eval()                   # N = 64, K = 16
    with torch.no_grad():
        enc = tok.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    a = anchors(enc.source, 16)
    d_bits, g = tok.cfg.z_channels, tok.cfg.grid
    z = torch.tensor([[[1.0 if (idx >> k) & 1 else -1.0 for k in range(d_bits)] for idx in row]
                      for row in enc.indices.tolist()])                                # (B, K, d)
    assert torch.equal(z, enc.z_q)
    with torch.no_grad():
        src = tok.recovery.predict_source(z, a)                                        # (B, N)
        grid = torch.zeros(2, d_bits, g, g)
        for b in range(2):
            for j in range(g * g):
                grid[b, :, j // g, j % g] = z[b, src[b, j]]                            # Eq. (11): x_j = z_source[j]
        expected = tok.decoder(grid)
    images, source = decode_with_recovery(tok, enc.indices, a)
    assert torch.equal(source, src)
    torch.testing.assert_close(images, expected)
    perm = torch.randperm(16)                                                          # the same pairs reordered
    _, permuted = decode_with_recovery(tok, enc.indices[:, perm], a[:, perm])
    assert torch.equal(perm[permuted], source)


# ----------------------------------------------------------------------------------------------------------------
# Sizes, keys and training
# ----------------------------------------------------------------------------------------------------------------


def test_randar_l_is_llamagen_l_plus_one_embedding():
    with torch.device("meta"):
        gpt, randar = build_gpt("L", factorized=True), build_randar("L", factorized=True)
        plain_gpt, plain_randar = build_gpt("L"), build_randar("L")
        merged = build_randar("L", factorized=True, position_head=True)              # + a head of dim x N
    assert count_parameters(randar) == count_parameters(gpt) + 1024
    assert count_parameters(plain_randar) == 342_910_976 + 1024
    assert count_parameters(merged) == count_parameters(randar) + 1024 * 256
    keys = set(plain_randar.state_dict())
    assert keys - set(plain_gpt.state_dict()) == {"pos_instruct_embeddings"}
    assert set(merged.state_dict()) - set(randar.state_dict()) == {"position_output.weight"}


def test_init_and_errors():
    torch.manual_seed(0)
    model = build_randar("tiny", vocab_size=V, num_classes=C, dim=256, n_head=4, position_head=True)
    assert model.pos_instruct_embeddings.std().item() == pytest.approx(0.02, rel=0.15)
    assert (model.output.weight == 0).all() and (model.position_output.weight == 0).all()
    with pytest.raises(ValueError, match="Merge Instruction"):
        build_randar("tiny", merge_counts=(4,))
    with pytest.raises(ValueError, match="generate_randar"):
        generate(model, torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="cond"):
        generate_randar(model, torch.tensor([[0]]), L, 4)
    with pytest.raises(ValueError, match="cond"):
        randar_losses(model, torch.zeros(2, L, dtype=torch.long), torch.tensor([0]), random_cells(2, L, 0))
    no_head = build_randar("tiny", vocab_size=V, num_classes=C)
    with pytest.raises(ValueError, match="no position head"):
        generate_randar(no_head, torch.tensor([0]), L, 2)


@pytest.mark.parametrize("which", ["plain", "factorized"])
def test_tiny_randar_loss_falls_on_fixed_tokens(which):
    torch.manual_seed(0)
    vocab = 256 if which == "plain" else 2 ** 18
    model = build_randar("tiny", vocab_size=vocab, factorized=which == "factorized", num_classes=C,
                         position_head=True)
    tokens, labels, cells = torch.randint(0, vocab, (8, L)), torch.arange(8), random_cells(8, L, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss = randar_losses(model, tokens, labels, cells, generator=gen)   # a fresh order per sample and step
        opt.zero_grad()
        sum(loss).backward()
        opt.step()
        losses.append(loss)
    uniform = math.log(256) if which == "plain" else math.log(64) + math.log(4096)
    # heads of zeros (plain) or of N(0, 0.02) (factorized): about uniform logits
    assert losses[0].tokens.item() == pytest.approx(uniform, rel=3e-3)
    # zero position head: step i picks uniformly among the N - i cells not taken, mean over the L steps
    assert losses[0].cells.item() == pytest.approx(sum(math.log(N - i) for i in range(L)) / L, rel=1e-3)
    assert losses[-1].tokens.item() < 0.7 * losses[0].tokens.item()
    assert losses[-1].cells.item() < 0.8 * losses[0].cells.item()


def test_teacher_forced_samples_at_zero_temperature_are_the_argmax(plain, factorized):
    """finetune-recovery's data: at temperature -> 0 the token drawn for each slot is the argmax of the teacher-
    forced logits (factorized: pre's argmax, then post's argmax given that pre), put back in slot order."""
    torch.manual_seed(0)
    cond, cells = torch.tensor([1, 2]), random_cells(2, L, 8)
    order = random_orders(2, L)
    tokens = torch.randint(0, V, (2, L))
    made = teacher_forced_samples(plain, tokens, cond, cells, order, temperature=1e-6)
    with torch.no_grad():
        expected = to_slot_order(plain(tokens, cond, order, cells).logits.argmax(-1), order)
    assert torch.equal(made, expected)
    codes = torch.randint(0, FV, (2, L))
    made = teacher_forced_samples(factorized, codes, cond, cells, order, temperature=1e-6)
    pre, post = split_index(to_generation_order(made, order), 6)
    with torch.no_grad():
        l_pre, _ = factorized(codes, cond, order, cells).logits
        assert torch.equal(pre, l_pre.argmax(-1))
        # post given the drawn pre: the logits of the sequence whose pre sub-tokens are the drawn ones
        h, freqs = randar_inputs(factorized, codes, cond, order, cells)
        h = factorized.run_rotated(h, freqs)[:, 1::2]
        assert torch.equal(post, factorized.intra_logits(h, pre)[1].argmax(-1))
