"""Token merging with source tracking: the ToMe core of MergeVQ.

Implements (paper Sec. 3.1-3.3, Appendix A.1 and A.3; ToMe, Bolya et al. 2023):
  - bipartite soft matching (A = even tokens, B = odd tokens, cosine scores, the r best edges merge)  Eq. (7)
  - the size-weighted average of merged tokens (A.1) and the proportional-attention bias log(size)     Eq. (14)
  - the source matrix that records which original tokens every merged token holds                     Eq. (2)
  - token recovery: x_full = source^T @ z                                                            Eq. (5), (11)
  - the group mean of original tokens per merged token (source @ x / size; MergeTok's groups, mergetok.py)
  - merge schedules over L layers (square-decreasing: paper; linear: authors' release)
  - kept-token sampling around the target K (exponential: Eq. (15); Gaussian: Eq. (16))

Shapes: B batch, N tokens in, K tokens kept, C channels.

The source. The paper's source matrix is (K, N), binary with one 1 per column: row k holds the original tokens
merged into token k. Everywhere in this project the source crosses the code in one equivalent form, the index map
`source` (B, N) int64 with source[b, j] = k where the matrix has its 1 (the column-wise argmax). It costs O(N) per
merging layer (`track_source`: push the map through every merge's `dst`), recovery is a gather (Eq. (11)), and the
Source Recovery Model's target and prediction are the same map (Eq. (8)-(9)). ToMe's dense matrix, merged with
an elementwise max at every layer (`merge_source_matrix`, O(N^2) memory), is kept as the reference the tests and
the bench compare with; `source_to_matrix` / `matrix_to_source` convert.

    python merge.py          # a small demo: merge a piecewise-constant sequence and recover it exactly
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------------------
# Bipartite soft matching (ToMe)
# ----------------------------------------------------------------------------------------------------------------


def _identity_merge(N, batch, device):
    """A merge that does nothing (r = 0); its `dst` maps every token to itself."""
    def merge(x, mode="mean"):
        return x

    def unmerge(x):
        return x

    merge.dst = torch.arange(N, device=device).expand(batch, N)  # (B, N)
    return merge, unmerge


def bipartite_soft_matching(metric, r, class_token=False):
    """Match tokens of set A (even positions) to set B (odd positions) and plan r merges.

    metric: (B, N, C) matching features (MergeVQ: the attention keys averaged over heads).
    r: how many tokens to remove; clamped to (N - protected) // 2.
    class_token: the token at index 0 is a class token; it never merges and stays at index 0.

    Returns (merge, unmerge):
      merge(x, mode="mean"): (B, N, C) -> (B, N - r, C), order [unmerged A tokens, all B tokens]; each of the r
        merged A tokens is reduced into its best B match with `mode` ("mean", "sum", "amax", ...).
      unmerge(x): (B, N - r, C) -> (B, N, C), every input token takes the value of the token it went into.
      merge.dst: (B, N) int64, the output position of every input token.
    The scores are float32 cosines, autocast off: in bf16 they land on steps of 2^-8 near 1, where the cosines of
    similar tokens lie, and ties (broken by token order) would decide which tokens merge.
    """
    B, N, _ = metric.shape
    protected = 1 if class_token else 0
    r = min(int(r), (N - protected) // 2)
    if r <= 0:
        return _identity_merge(N, B, metric.device)

    with torch.no_grad(), torch.autocast(device_type=metric.device.type, enabled=False):
        metric = metric.float()
        metric = metric / metric.norm(dim=-1, keepdim=True)               # unit length: dot = cosine
        a, b = metric[:, ::2], metric[:, 1::2]                              # (B, Na, C), (B, Nb, C)
        scores = a @ b.transpose(-1, -2)                                    # (B, Na, Nb)
        if class_token:
            scores[:, 0, :] = -math.inf                                     # the class token never merges
        node_max, node_idx = scores.max(dim=-1)                             # best B match of every A token, (B, Na)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]     # A tokens by best score, (B, Na, 1)
        unm_idx = edge_idx[:, r:]                                           # A tokens that stay, (B, Na - r, 1)
        src_idx = edge_idx[:, :r]                                           # A tokens that merge, (B, r, 1)
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)          # their B partners, (B, r, 1)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]                                # keep index order: class token first

        # Where every input token lands in the output [unmerged A, B].
        Na, Nb = a.shape[1], b.shape[1]
        n_unm = Na - r
        a_out = torch.empty(B, Na, dtype=torch.long, device=metric.device)
        a_out.scatter_(1, unm_idx[..., 0], torch.arange(n_unm, device=metric.device).expand(B, n_unm))
        a_out.scatter_(1, src_idx[..., 0], n_unm + dst_idx[..., 0])
        dst = torch.empty(B, N, dtype=torch.long, device=metric.device)  # (B, N)
        dst[:, ::2] = a_out
        dst[:, 1::2] = n_unm + torch.arange(Nb, device=metric.device)

    n_out = N - r
    flat_dst = (dst + n_out * torch.arange(B, device=dst.device)[:, None]).reshape(-1)   # (B * N,)
    counts = torch.zeros(B * n_out, device=dst.device).index_add_(0, flat_dst, torch.ones(B * N, device=dst.device))

    def merge(x, mode="mean"):
        C = x.shape[-1]
        if mode in ("sum", "mean"):
            # One pass: every input token is added into its output slot (the same result as ToMe's gather +
            # scatter_reduce, about twice as fast on the CPU because it reads x once).
            # The sums accumulate in float32 (at least), as group_mean's: a bf16 index_add_ on CUDA rounds after
            # every addition, and ToMe's size-weighted sums (merge_wavg) add many tokens into one.
            acc = torch.promote_types(x.dtype, torch.float32)
            out = torch.zeros(B * n_out, C, dtype=acc, device=x.device)
            out.index_add_(0, flat_dst, x.reshape(B * N, C).to(acc))           # (B * (N - r), C)
            if mode == "mean":
                out = out / counts[:, None].to(acc)
            return out.to(x.dtype).view(B, n_out, C)                         # (B, N - r, C)
        src, dst_tokens = x[:, ::2], x[:, 1::2]                             # (B, Na, C), (B, Nb, C)
        unm = src.gather(dim=1, index=unm_idx.expand(B, Na - r, C))         # (B, Na - r, C)
        src = src.gather(dim=1, index=src_idx.expand(B, r, C))              # (B, r, C)
        dst_tokens = dst_tokens.scatter_reduce(1, dst_idx.expand(B, r, C), src, reduce=mode)  # (B, Nb, C)
        return torch.cat([unm, dst_tokens], dim=1)                          # (B, N - r, C)

    def unmerge(x):
        return x.gather(dim=1, index=dst[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, C)

    merge.dst = dst
    return merge, unmerge


def merge_wavg(merge, x, size=None):
    """Size-weighted average: x <- merge(x * size, sum) / merge(size, sum). size (B, N, 1) starts at ones."""
    if size is None:                                                        # all sizes 1: a plain mean
        return merge(x, mode="mean"), merge(torch.ones_like(x[..., :1]), mode="sum")   # (B, N - r, C), (.., 1)
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")                                          # (B, N - r, 1)
    return x / size, size


def merge_source_matrix(merge, x, source=None):
    """Dense source tracking (ToMe): rows are merged with an elementwise max, so the matrix stays binary.

    source: (B, N, N_orig), the identity when None (then N_orig = N). Returns (B, N - r, N_orig).
    """
    if source is None:
        B, N = x.shape[:2]
        source = torch.eye(N, device=x.device, dtype=x.dtype)[None].expand(B, N, N)  # (B, N, N)
    return merge(source, mode="amax")


def track_source(merge, source=None):
    """Source tracking: source (B, N_orig) int64, the merged token that holds each original token.

    It starts as arange(N) and is pushed through every merge by the merge's `dst` map: O(N) per layer.
    """
    dst = merge.dst                                                         # (B, N)
    if source is None:
        return dst.clone()
    return dst.gather(dim=1, index=source)                                  # (B, N_orig)


def source_to_matrix(source, K, dtype=torch.float32):
    """The index map (B, N) -> the paper's source matrix (B, K, N), binary with exactly one 1 per column."""
    B, N = source.shape
    matrix = torch.zeros(B, K, N, device=source.device, dtype=dtype)
    return matrix.scatter_(1, source[:, None, :], 1.0)                      # (B, K, N)


def matrix_to_source(matrix):
    """The source matrix (B, K, N) -> the index map (B, N): the row holding each column's 1."""
    return matrix.argmax(dim=1)


def recover(z, source):
    """Token recovery, Eq. (11): x_full = source_matrix^T z, i.e. x_full[:, j] = z[:, source[:, j]]: a gather
    that reads a source, the encoder's or the one the Source Recovery Model (recovery.py) predicts. Its output on
    codes are the "recovered codes" (codes_table.gather_codes; RandAR's --tokens grid runs over them).

    z: (B, K, C) merged tokens; source: (B, N) int64 index map with values in [0, K). Returns (B, N, C).
    """
    if source.dim() != 2 or source.shape[0] != z.shape[0] or source.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"recover: source {tuple(source.shape)} {source.dtype} does not fit tokens "
                         f"{tuple(z.shape)}: expected an int64 index map (B, N) for z (B, K, C)")
    return z.gather(1, source[..., None].long().expand(-1, -1, z.shape[-1]))   # Eq. (11): (B, N, C)


def anchors(source, K):
    """The image position of every merged token: its anchor, the first original position (raster order) it holds.

    source (B, N) -> anchors (B, K) int64, anchors[b, k] = min{j : source[b, j] = k}. Every merged token holds at
    least one position, so the anchors of one image are K distinct cells of the N grid, and an original position j
    always belongs to a merged token whose anchor is <= j. The anchor is also the token MergeAR's Eq. (12) mask keeps
    for a group (mergear.rep_from_source: the first member in raster order). Sec. 4.2 names each generated token by
    "its original position in raster order" (Eq. (13)); for a merged token this is that position.
    """
    if source.dim() != 2 or source.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"anchors: source must be an integer index map (B, N), got {source.dtype} "
                         f"{tuple(source.shape)}")
    B, N = source.shape
    j = torch.arange(N, device=source.device).expand(B, N)                    # (B, N) each position's index
    first = torch.full((B, K), N, dtype=torch.long, device=source.device)
    first = first.scatter_reduce(1, source.long(), j, reduce="amin")          # (B, K)
    if bool((first == N).any()):
        raise ValueError(f"anchors: a merged token of {K} holds no position (the source does not cover 0..K-1)")
    return first


def group_mean(x, source, K):
    """The mean of the original tokens held by each merged token: x (B, N, C), source (B, N) -> (B, K, C).

    m_k = sum_j [source_j = k] x_j / size_k, i.e. (source_matrix @ x) / size: the direction opposite to recover
    (Eq. (11)), and what ToMe's size-weighted average (merge_wavg) gives when every original token has size 1.
    So group_mean(recover(z, source), source, K) == z, and recover(group_mean(x)) is each token's group mean.
    The sums accumulate in float32 (at least): a bf16 scatter_add on CUDA rounds after every addition (600 additions
    of 1 give 256), so a group of more than 256 tokens would get a wrong mean. The result has x's dtype.
    """
    if source.shape != x.shape[:2] or source.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"group_mean: source {tuple(source.shape)} {source.dtype} does not fit tokens "
                         f"{tuple(x.shape)}: expected an int64 index map (B, N) for x (B, N, C)")
    B, N, C = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)                          # bf16 / fp16 tokens sum in fp32
    index = source.long()[..., None]                                           # (B, N, 1)
    sums = torch.zeros(B, K, C, dtype=acc, device=x.device)
    sums = sums.scatter_add(1, index.expand(-1, -1, C), x.to(acc))            # (B, K, C)
    ones = torch.ones(B, N, 1, dtype=acc, device=x.device)
    size = torch.zeros(B, K, 1, dtype=acc, device=x.device).scatter_add(1, index, ones)   # (B, K, 1) members
    return (sums / size.clamp_min(1)).to(x.dtype)                              # (B, K, C); an empty group stays 0


# ----------------------------------------------------------------------------------------------------------------
# Proportional attention
# ----------------------------------------------------------------------------------------------------------------


def size_bias(size):
    """Eq. (14): A = softmax(Q K^T / sqrt(d) + log s). size (B, N, 1) -> additive logits bias (B, 1, 1, N).

    A merged key that stands for s original keys gets the attention weight of s identical keys.
    """
    return size.float().log()[:, None, None, :, 0]                         # (B, 1, 1, N)


# ----------------------------------------------------------------------------------------------------------------
# Merge schedules over the L attention layers (Appendix A.1)
# ----------------------------------------------------------------------------------------------------------------


def merge_schedule(N, K, L, kind="square"):
    """Per-layer r (tokens removed by each of the L layers) that takes N tokens down to K.

    kind="square" (paper, Appendix A.1): r_l proportional to (L - l)^2, l = 0..L-1, many merges early.
    kind="linear" (authors' release): r_l decreasing linearly from about 1.5 r to 0.5 r, r = (N - K) / L.
    The rounding remainder goes to the first layer. A layer can remove at most half of the tokens it receives
    (bipartite matching); any excess is carried to the next layer. A class token is not counted in N.
    """
    if kind not in ("square", "linear"):
        raise ValueError(f"merge schedule kind must be 'square' or 'linear', got {kind!r}")
    if not 1 <= K <= N:
        raise ValueError(f"K must be between 1 and the number of tokens N={N}, got K={K}")
    if L < 1:
        raise ValueError(f"need at least one merging layer, got L={L}")
    if kind == "square":
        weights = [(L - l) ** 2 for l in range(L)]
    else:
        weights = [1.5 - l / max(L - 1, 1) for l in range(L)]
    r = [int((N - K) * w / sum(weights)) for w in weights]                 # N - K tokens removed in all
    r[0] += (N - K) - sum(r)

    # Feasibility: a layer removes at most half of the tokens it receives. Walk the layers in order; where the plan
    # would leave too many tokens for the layers after it to reach K, take more now; carry any difference on.
    def fewest_after(tokens, layers):                                      # halving `layers` times
        for _ in range(layers):
            tokens -= tokens // 2
        return tokens

    if fewest_after(N, L) > K:
        raise ValueError(f"cannot merge N={N} tokens down to K={K} in {L} layers: each layer removes at most half "
                         f"of its tokens, so the fewest reachable is {fewest_after(N, L)}")
    tokens, carry = N, 0
    for l in range(L):
        want = r[l] + carry
        lower = 0
        while fewest_after(tokens - lower, L - l - 1) > K:
            lower += 1
        r[l] = min(max(want, lower), tokens // 2, tokens - K)
        carry = want - r[l]
        tokens -= r[l]
    return r


# ----------------------------------------------------------------------------------------------------------------
# Kept-token sampling (Appendix A.3)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class KeptTokenSampler:
    """Draws the kept count K of each training step around the target K (Appendix A.3).

    Candidates are perfect squares (sqrt(K) + i)^2 for offsets i = low..high, so the merged tokens can always form
    a square grid. Weights over the offsets:
      exponential, Eq. (15): p_i ~ 2 exp(-2 i) + 0.1, i = 0, 1, ...: the target is the most likely, then a tail of
                  larger K. Our reading: the exponential starts AT the target (low = 0), so no candidate is below it;
                  the candidate range of Eq. (15) is not legible in our copy of the paper, and a weight through
                  exp(-2 |i|) would give a K below the target almost the weight of the next one up.
      gaussian,   Eq. (16): p_i ~ exp(-i^2 / (2 * 0.5^2)) + 0.05: centred on the target, one smaller candidate
                  (low = -1). The paper uses it for G+R; the authors' release uses it for G too, over 225..529.
      fixed:      always the target.
    The draw depends only on (seed, step), so every rank draws the same K and a resumed run draws what the
    uninterrupted run would have.
    """
    K: int
    low: int = 0
    high: int = 4
    kind: str = "exponential"
    seed: int = 0
    candidates: list = field(init=False)
    probs: np.ndarray = field(init=False)

    def __post_init__(self):
        root = math.isqrt(self.K)
        if root * root != self.K:
            raise ValueError(f"the target kept count K must be a perfect square, got {self.K}")
        if self.low > self.high or root + self.low < 1:
            raise ValueError(f"bad candidate offsets low={self.low}, high={self.high} for the target K={self.K}")
        offsets = np.arange(self.low, self.high + 1)
        self.candidates = [int((root + i) ** 2) for i in offsets]
        if self.kind == "exponential":
            if self.low < 0:
                raise ValueError(f"the exponential weights (Eq. (15)) start at the target: low must be >= 0, got "
                                 f"{self.low} (a smaller candidate needs the gaussian weights, Eq. (16))")
            w = 2.0 * np.exp(-2.0 * offsets) + 0.1                         # Eq. (15)
        elif self.kind == "gaussian":
            w = np.exp(-offsets.astype(float) ** 2 / (2 * 0.5 ** 2)) + 0.05  # Eq. (16)
        elif self.kind == "fixed":
            w = (offsets == 0).astype(float)
        else:
            raise ValueError(f"sampler kind must be 'exponential', 'gaussian' or 'fixed', got {self.kind!r}")
        self.probs = w / w.sum()

    def sample(self, step):
        rng = np.random.default_rng([self.seed, step])
        return self.candidates[int(rng.choice(len(self.candidates), p=self.probs))]


# ----------------------------------------------------------------------------------------------------------------
# Demo
# ----------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    torch.manual_seed(0)
    B, N, C, K = 1, 16, 4, 8
    x = torch.randn(B, K, C).repeat_interleave(2, dim=1)                    # pairs of equal tokens, (B, N, C)
    size, source, tokens = None, None, x
    for r in merge_schedule(N, K, L=1):           # one layer: every A token finds its twin in B
        m, _ = bipartite_soft_matching(tokens, r)
        tokens, size = merge_wavg(m, tokens, size)
        source = track_source(m, source)
    print("schedule (square, N=1024 -> K=256, 12 layers):", merge_schedule(1024, 256, 12))
    print("sizes:", size[0, :, 0].tolist())
    print("source map (N,):", source[0].tolist())
    print("source matrix (K x N):\n", source_to_matrix(source, K)[0].int())
    print("recover(merge(x)) == x:", torch.allclose(recover(tokens, source), x, atol=1e-6))
