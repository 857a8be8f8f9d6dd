"""merge.py against brute force and its invariants."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from merge import (KeptTokenSampler, bipartite_soft_matching, group_mean, matrix_to_source, merge_schedule,
                   merge_source_matrix, merge_wavg, recover, size_bias, source_to_matrix, track_source)


def brute_force_merge(metric, x, r, class_token=False):
    """ToMe by loops: returns the merged tokens (size-weighted mean of every group) in ToMe's output order."""
    N = metric.shape[0]
    A, Bset = list(range(0, N, 2)), list(range(1, N, 2))
    best = {}
    for a in A:
        if class_token and a == 0:
            best[a] = (-math.inf, None)
            continue
        scores = [(F.cosine_similarity(metric[a], metric[b], dim=0).item(), b) for b in Bset]
        best[a] = max(scores)
    r = min(r, (N - (1 if class_token else 0)) // 2)
    ranked = sorted(A, key=lambda a: -best[a][0])
    merged, kept = ranked[:r], ranked[r:]
    if class_token:
        kept = sorted(kept)
    groups = [[a] for a in kept] + [[b] + [a for a in merged if best[a][1] == b] for b in Bset]
    out = torch.stack([x[g].mean(0) for g in groups])
    return out, groups


@pytest.mark.parametrize("N,r,class_token", [(16, 5, False), (17, 8, True), (64, 20, True), (10, 30, False)])
def test_matching_equals_brute_force(N, r, class_token):
    torch.manual_seed(N + r)
    metric, x = torch.randn(N, 8), torch.randn(N, 3)
    merge, _ = bipartite_soft_matching(metric[None], r, class_token=class_token)
    got, size = merge_wavg(merge, x[None])
    want, groups = brute_force_merge(metric, x, r, class_token)
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(merge(x[None], mode="mean")[0], want)      # plain mean == size-weighted at size 1
    group_max = torch.stack([x[g].amax(0) for g in groups])
    torch.testing.assert_close(merge(x[None], mode="amax")[0], group_max)  # the ToMe gather/scatter path
    assert size[0, :, 0].tolist() == [float(len(g)) for g in groups]
    if class_token:
        torch.testing.assert_close(got[0, 0], x[0])  # the class token stays first, unmerged


def test_matching_scores_are_float32_under_bf16_autocast():
    """Tokens whose cosines all lie in (0.998, 1) (similar tokens, where merges happen): under bf16 autocast the
    merges are still those of the brute force. With bf16 scores (steps of 2^-8 near 1) they tied and the first A
    tokens merged into B token 0."""
    torch.manual_seed(0)
    N, r = 32, 6
    metric = torch.randn(1, 16) + 0.02 * torch.randn(N, 16)                    # (N, C), every cosine near 1
    x = torch.randn(N, 3)
    want, _ = brute_force_merge(metric.double(), x, r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merge, _ = bipartite_soft_matching(metric[None], r)
    torch.testing.assert_close(merge(x[None], mode="mean")[0], want)


class SumDtypes(torch.overrides.TorchFunctionMode):
    """Records the dtype every scatter_add / index_add accumulates in."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("scatter_add", "scatter_add_", "index_add", "index_add_"):
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_group_mean_sums_in_float32():
    """bf16 tokens (MergeTok's group means under autocast): the sums accumulate in float32. A bf16 scatter_add on
    CUDA rounds after every addition (600 additions of 0.1 give 32); the CPU's accumulates in float32 anyway, so the
    test asks for the dtype it sums in. Groups: 600 tokens of 0.1 and 24 tokens of 2 -> means 0.1 and 2."""
    x = torch.cat([torch.full((600, 4), 0.1), torch.full((24, 4), 2.0)])[None].bfloat16()   # (1, 624, 4)
    source = torch.cat([torch.zeros(600), torch.ones(24)]).long()[None]                       # (1, 624)
    with SumDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        means = group_mean(x, source, 2)
    assert seen.dtypes and set(seen.dtypes) == {torch.float32}
    assert means.dtype == torch.bfloat16
    assert means[0, :, 0].tolist() == [torch.tensor(0.1).bfloat16().item(), 2.0]


def test_tome_merge_sums_in_float32():
    """ToMe's merge of bf16 tokens (under autocast on CUDA) sums in float32, as group_mean does. Every token has
    the same matching feature, so all 600 A tokens merge into the first B token (ties go to the first): its sum
    of 601 bf16 tokens of 0.1 and their mean 0.1, the other 599 B tokens untouched."""
    N = 1200
    metric = torch.ones(1, N, 8)                                              # (1, N, 8), every cosine 1
    x = torch.full((1, N, 4), 0.1).bfloat16()
    with SumDtypes() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        merge, _ = bipartite_soft_matching(metric, N // 2)
        means, sums = merge(x, mode="mean"), merge(x, mode="sum")
    assert seen.dtypes and set(seen.dtypes) == {torch.float32}
    assert means.shape == (1, N // 2, 4) and means.dtype == torch.bfloat16
    assert means[0, :, 0].tolist() == [torch.tensor(0.1).bfloat16().item()] * (N // 2)
    assert sums[0, 0, 0].item() == torch.tensor(601 * torch.tensor(0.1).bfloat16().item()).bfloat16().item()


def test_size_sums_to_N_and_source_partitions():
    torch.manual_seed(0)
    B, N, C = 3, 64, 16
    x = torch.randn(B, N, C)
    size, matrix, source = None, None, None
    for r in merge_schedule(N, 10, 6):
        merge, _ = bipartite_soft_matching(x, r)
        matrix = merge_source_matrix(merge, x, matrix)
        source = track_source(merge, source)
        x, size = merge_wavg(merge, x, size)
    assert x.shape == (B, 10, C)
    torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((B,), float(N)))
    assert set(matrix.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(matrix.sum(dim=1) == 1)                               # every column exactly one 1
    torch.testing.assert_close(matrix.sum(dim=2), size[..., 0])            # row sums are the sizes
    # the cheap index map gives the very same source as ToMe's dense matrix tracking
    assert torch.equal(source_to_matrix(source, 10), matrix)
    assert torch.equal(matrix_to_source(matrix), source)


def test_multi_layer_merge_is_the_mean_of_each_groups_original_tokens():
    """ToMe's size-weighted average over several layers: every final merged token is the plain mean of the original
    tokens its group holds (read off the source, averaged here by a loop), and its size is their count. A merge that
    averages merged tokens without their sizes gives a token of 1 + 2 originals the weights 1/2, 1/4, 1/4."""
    torch.manual_seed(4)
    B, N, C, K = 2, 64, 6, 10
    x0 = torch.randn(B, N, C)                                              # the original tokens
    x, size, source = x0, None, None
    for r in merge_schedule(N, K, 6):
        merge, _ = bipartite_soft_matching(x, r)                           # the tokens are their own metric
        source = track_source(merge, source)
        x, size = merge_wavg(merge, x, size)
    assert x.shape == (B, K, C)
    for b in range(B):
        for k in range(K):
            members = [j for j in range(N) if source[b, j] == k]
            torch.testing.assert_close(x[b, k], x0[b, members].mean(dim=0))
            assert size[b, k, 0].item() == len(members)
    # the check has teeth: some group grew from merged tokens of unequal sizes (an odd size above 1)
    assert any(s % 2 == 1 and s > 1 for s in size[..., 0].flatten().tolist())


def test_recover_after_merge_is_exact_on_group_constant_input():
    torch.manual_seed(1)
    B, N, C, K = 2, 100, 8, 12
    metric = torch.randn(B, N, C)
    merges, source, tokens = [], None, metric
    for r in merge_schedule(N, K, 5):
        merge, _ = bipartite_soft_matching(tokens, r)
        tokens, _ = merge_wavg(merge, tokens)
        merges.append(merge)
        source = track_source(merge, source)
    # an input that is constant within each final merged group: merging it and recovering gives it back
    values = torch.randn(B, K, 5)
    x = torch.stack([values[b, source[b]] for b in range(B)])             # (B, N, 5), by plain indexing
    size, z = None, x
    for merge in merges:
        z, size = merge_wavg(merge, z, size)
    torch.testing.assert_close(recover(z, source), x)
    # Eq. (11) as the paper writes it, source_matrix^T z, gives the same
    torch.testing.assert_close(source_to_matrix(source, K).transpose(1, 2) @ z, x)
    # a generic input is not recovered exactly (recover is not the identity)
    assert not torch.allclose(recover(torch.randn(B, K, 5), source), x)


def test_unmerge_gives_each_token_its_group_value():
    torch.manual_seed(2)
    x = torch.randn(2, 20, 4)
    merge, unmerge = bipartite_soft_matching(x, 7)
    z, _ = merge_wavg(merge, x)
    full = unmerge(z)
    torch.testing.assert_close(full, recover(z, matrix_to_source(merge_source_matrix(merge, x))))


def test_proportional_attention_equals_attention_over_duplicated_keys():
    """softmax(q k^T + log s) over merged keys == softmax over the original keys when groups are constant."""
    torch.manual_seed(3)
    B, K, N, d = 2, 6, 15, 8
    assign = torch.cat([torch.arange(K), torch.randint(0, K, (N - K,))])[None].repeat(B, 1)  # every group non-empty
    k_merged, v_merged = torch.randn(B, K, d), torch.randn(B, K, d)
    k_full = k_merged.gather(1, assign[..., None].expand(B, N, d))          # duplicated keys, (B, N, d)
    v_full = v_merged.gather(1, assign[..., None].expand(B, N, d))
    size = source_to_matrix(assign, K).sum(-1, keepdim=True)                # (B, K, 1)
    q = torch.randn(B, 1, 4, d)                                             # (B, heads, queries, d)
    merged = F.scaled_dot_product_attention(q, k_merged[:, None], v_merged[:, None], attn_mask=size_bias(size))
    plain = F.scaled_dot_product_attention(q, k_full[:, None], v_full[:, None])
    torch.testing.assert_close(merged, plain)
    unbiased = F.scaled_dot_product_attention(q, k_merged[:, None], v_merged[:, None])
    assert not torch.allclose(unbiased, plain)                              # without the bias it differs


@pytest.mark.parametrize("N,K,kind", [(1024, 256, "square"), (256, 144, "square"), (256, 36, "square"),
                                      (1024, 256, "linear"), (256, 144, "linear"), (256, 36, "linear"),
                                      (256, 256, "square"), (1024, 1, "square")])
def test_schedules_for_table_A1(N, K, kind):
    r = merge_schedule(N, K, 12, kind)
    assert len(r) == 12 and sum(r) == N - K and min(r) >= 0
    tokens = N
    for rl in r:
        assert rl <= tokens // 2
        tokens -= rl
    if kind == "square" and K < N and N - K > 100:
        assert r[0] > r[5] > r[-1]                                          # decreasing
    if kind == "linear" and K < N:
        mean = (N - K) / 12
        assert abs(r[-1] - 0.5 * mean) <= 1.5 and 1.5 * mean - 1 <= r[0] <= 1.5 * mean + 12  # + remainder


def test_schedule_errors():
    with pytest.raises(ValueError, match="K must be"):
        merge_schedule(256, 0, 12)
    with pytest.raises(ValueError, match="K must be"):
        merge_schedule(256, 300, 12)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_schedule(1024, 1, 3)
    with pytest.raises(ValueError, match="kind"):
        merge_schedule(256, 36, 12, "cubic")


# Expected probabilities written out (computed by hand from Eq. (15) / (16); not with the sampler's formula):
#   exponential over i = 0..7:  w_i = 2 exp(-2 i) + 0.1 = 2.1, 0.37067, 0.13663, 0.10496, 0.10067, ...
#   gaussian over i = -1..7:    w_i = exp(-i^2 / 0.5) + 0.05 = 0.18534, 1.05, 0.18534, 0.05034, 0.05, ...
SAMPLER_CASES = [
    ("exponential", 0, 7, [0.67458, 0.11907, 0.04389, 0.03372, 0.03234, 0.03215, 0.03213, 0.03212]),  # paper G
    ("exponential", 0, 4, [0.74655, 0.13177, 0.04857, 0.03731, 0.03579]),                            # tiny G, R
    ("gaussian", -1, 7, [0.10769, 0.61011, 0.10769, 0.02925, 0.02905, 0.02905, 0.02905, 0.02905, 0.02905]),
    ("gaussian", -1, 4, [0.11797, 0.66836, 0.11797, 0.03204, 0.03183, 0.03183]),                      # paper G+R
]


@pytest.mark.parametrize("kind,low,high,expected", SAMPLER_CASES)
def test_sampler_frequencies_match_eq_15_16(kind, low, high, expected):
    sampler = KeptTokenSampler(K=144, low=low, high=high, kind=kind, seed=0)
    assert sampler.candidates == [(12 + i) ** 2 for i in range(low, high + 1)]
    np.testing.assert_allclose(sampler.probs, expected, atol=1e-5)
    draws = [sampler.sample(step) for step in range(20000)]
    freq = np.array([draws.count(c) for c in sampler.candidates]) / len(draws)
    np.testing.assert_allclose(freq, expected, atol=0.012)
    if kind == "exponential":
        assert min(draws) == 144                                            # never below the target
    # the same (seed, step) gives the same K: every rank agrees, a resumed run continues the same draws
    again = KeptTokenSampler(K=144, low=low, high=high, kind=kind, seed=0)
    assert [again.sample(s) for s in range(100)] == draws[:100]


def test_sampler_errors():
    with pytest.raises(ValueError, match="perfect square"):
        KeptTokenSampler(K=150)
    with pytest.raises(ValueError, match="kind"):
        KeptTokenSampler(K=144, kind="uniform")
    with pytest.raises(ValueError, match="start at the target"):
        KeptTokenSampler(K=144, low=-1, kind="exponential")
