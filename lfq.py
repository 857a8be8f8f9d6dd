"""Lookup-free quantization (LFQ): the quantizer of MergeVQ (paper Sec. 3.1, Eq. (4); MAGVIT-v2 / Open-MAGVIT2),
and MAGVIT-v2's entropy penalty that trains it (Yu et al. 2024, Sec. 3.1).

Every channel of a d-dimensional latent is quantized on its own to its sign: the codebook is {-1, +1}^d
(d = 18: 2^18 = 262144 codes) and needs no lookup. The index of a code is the binary number of its bits,
index = sum_k 2^k [z_k > 0] with channel 0 the least significant bit.

The entropy loss, MAGVIT-v2's entropy penalty E[H(p(c | z))] - H(E[p(c | z)]) (the MergeVQ paper's Eq. (4) is the
quantizer alone), asks every token to be confident (low per-sample entropy) and the batch to use the whole codebook
(high entropy of the mean code distribution), with p(c | z) = softmax_c(2 z.c / tau), tau = 1 / inv_temperature.
Both terms are computed exactly without ever holding (tokens x 2^d) numbers:
  - p(c | z) factorises over the bits, p(c | z) = prod_k sigmoid(4 z_k c_k / tau), so the per-sample entropy is a
    sum of d binary entropies (closed form);
  - the code distribution of the batch, mean_t p(c | z_t), is a (2^(d/2) x 2^(d/2)) matrix
    P_lo^T P_hi / T when the bits are split into a low and a high half: one matrix product.
Under torchrun the batch distribution is averaged over all ranks, so the loss does not depend on the number of
processes.

    python lfq.py            # quantize a few random latents and print the loss breakdown
"""
from collections import namedtuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common import all_reduce_sum_differentiable

# The quantizer returns its terms unweighted; their weights (Table A1: entropy 0.1, commitment 0.25) are set in one
# place, the training configuration, and applied by losses.generator_loss.
LFQOutput = namedtuple("LFQOutput", ["z_q", "indices", "per_sample_entropy", "codebook_entropy", "commitment"])

# ----------------------------------------------------------------------------------------------------------------
# Codes and indices
# ----------------------------------------------------------------------------------------------------------------


def codes_to_indices(codes):
    """(..., d) codes (or latents: only the sign counts) -> (...) int64 index = sum_k 2^k [z_k > 0]."""
    d = codes.shape[-1]
    bits = (codes > 0).long()                                                     # (..., d)
    weights = 2 ** torch.arange(d, device=codes.device, dtype=torch.long)         # (d,)
    return (bits * weights).sum(dim=-1)


def indices_to_codes(indices, dim):
    """(...) int64 indices -> (..., dim) float codes in {-1, +1}."""
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    if indices.numel() and (indices.min() < 0 or indices.max() >= 2 ** dim):
        raise ValueError(f"indices must lie in [0, 2^{dim}), got range [{indices.min()}, {indices.max()}]")
    bits = (indices[..., None] >> torch.arange(dim, device=indices.device)) & 1  # (..., dim)
    return bits.float() * 2 - 1


def split_index(indices, low_bits=6):
    """Stage-2 sub-tokens: an index -> (pre, post) = (low `low_bits` bits, remaining high bits). Release: [6, 12]."""
    return indices & ((1 << low_bits) - 1), indices >> low_bits


def join_index(pre, post, low_bits=6):
    """Inverse of split_index."""
    return pre + (post << low_bits)


# ----------------------------------------------------------------------------------------------------------------
# Entropy terms (exact, factorised)
# ----------------------------------------------------------------------------------------------------------------


def _bit_table(nbits, device):
    """(2^nbits, nbits) table of the bits of every sub-code, bit k of code c at column k."""
    codes = torch.arange(2 ** nbits, device=device)
    return ((codes[:, None] >> torch.arange(nbits, device=device)) & 1).float()   # (2^nbits, nbits)


def _half_code_probs(logit_pos, logit_neg):
    """Probabilities of every sub-code for every token from per-bit log-probabilities.

    logit_pos, logit_neg: (T, n) log p(bit = +1) and log p(bit = -1). Returns (T, 2^n).
    """
    table = _bit_table(logit_pos.shape[1], logit_pos.device)                      # (2^n, n)
    log_p = logit_pos @ table.T + logit_neg @ (1 - table).T                       # (T, 2^n)
    return log_p.exp()


def entropy_terms(z, inv_temperature=100.0, sync=True):
    """Exact (per_sample_entropy, codebook_entropy) of p(c | z) = softmax_c(2 z.c * inv_temperature): the two terms
    of MAGVIT-v2's entropy penalty (Yu et al. 2024, Sec. 3.1), per_sample_entropy - codebook_entropy.

    z: (..., d) latents; all leading dimensions are tokens. Returns two float32 scalars:
      per_sample_entropy = mean_t H(p(. | z_t)), codebook_entropy = H(mean_t p(. | z_t)).
    In a distributed run with sync=True the mean over tokens in the codebook term covers every rank
    (differentiably): a collective, so every rank must call it. sync=False keeps it local to this process.
    float32 throughout, autocast off: under bf16 autocast the two products below would run in bf16 (even on
    float32 inputs) and round every code probability to 8 bits - the gradient of small latents turns to noise.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        return _entropy_terms(z.reshape(-1, z.shape[-1]).float(), inv_temperature, sync)   # (T, d)


def _entropy_terms(z, inv_temperature, sync):
    """entropy_terms on float32 latents z (T, d), called with autocast off."""
    T, d = z.shape
    a = 4.0 * inv_temperature * z                                                 # bit logits, (T, d)
    log_pos, log_neg = F.logsigmoid(a), F.logsigmoid(-a)                          # log p(+1), log p(-1)

    # Per-sample entropy: a sum of d binary entropies, H = -p log p - (1 - p) log(1 - p).
    p_pos = torch.sigmoid(a)
    per_sample = -(p_pos * log_pos + (1 - p_pos) * log_neg).sum(dim=-1).mean()

    # Codebook entropy: mean_t p(c) with p(c) = p_lo(c_lo) p_hi(c_hi): one (2^lo x T) @ (T x 2^hi) product.
    lo = d // 2
    P_lo = _half_code_probs(log_pos[:, :lo], log_neg[:, :lo])                    # (T, 2^lo)
    P_hi = _half_code_probs(log_pos[:, lo:], log_neg[:, lo:])                    # (T, 2^(d - lo))
    joint = P_lo.T @ P_hi                                                          # sum_t p(c), (2^lo, 2^(d - lo))
    count = torch.tensor(float(T), device=z.device)
    if sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        joint = all_reduce_sum_differentiable(joint)                               # sum over every rank's tokens
        dist.all_reduce(count)
    avg = joint / count                                                           # mean_t p(c)
    codebook = -(avg * avg.clamp_min(1e-30).log()).sum()
    return per_sample, codebook


# ----------------------------------------------------------------------------------------------------------------
# The quantizer
# ----------------------------------------------------------------------------------------------------------------


class LFQ(nn.Module):
    """Lookup-free quantizer, Eq. (4): q = sign(z), straight-through gradient. Also returns, unweighted, the terms
    of MAGVIT-v2's entropy penalty (Yu et al. 2024, Sec. 3.1), per_sample_entropy and codebook_entropy (the loss is
    their difference), and the commitment mse(z, q)."""

    def __init__(self, dim=18, inv_temperature=100.0):
        super().__init__()
        self.dim = dim
        self.codebook_size = 2 ** dim
        self.inv_temperature = inv_temperature

    def forward(self, z):
        if z.shape[-1] != self.dim:
            raise ValueError(f"LFQ expects latents with {self.dim} channels in the last dimension, got {tuple(z.shape)}")
        q = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))          # (B, N, d) in {-1, +1}
        z_q = z + (q - z).detach()                                               # straight-through estimator
        indices = codes_to_indices(q)                                            # (B, N)
        # Only a training forward synchronises across ranks: evaluation (eval mode, e.g. the EMA model drawing
        # pictures on rank 0 alone) must not enter a collective the other ranks never join.
        per_sample, codebook = entropy_terms(z, self.inv_temperature, sync=self.training)
        commitment = F.mse_loss(z.float(), q.float())
        return LFQOutput(z_q, indices, per_sample, codebook, commitment)

    def indices_to_codes(self, indices):
        return indices_to_codes(indices, self.dim)

    def extra_repr(self):
        return f"dim={self.dim}, codebook_size={self.codebook_size}, inv_temperature={self.inv_temperature}"


# ----------------------------------------------------------------------------------------------------------------
# Codebook usage
# ----------------------------------------------------------------------------------------------------------------


class CodebookUsage:
    """Counts which of the 2^d codes were used at least once, over many batches and (with .gather()) all ranks."""

    def __init__(self, num_codes, device="cpu"):
        self.num_codes = num_codes
        self.used = torch.zeros(num_codes, dtype=torch.bool, device=device)

    def update(self, indices):
        self.used[indices.reshape(-1).to(self.used.device)] = True

    def gather(self):
        """Combine the counts of every rank (a code used anywhere counts); a no-op in one process."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            used = self.used.to(torch.uint8)
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            self.used = used.bool()
        return self

    @property
    def fraction(self):
        return self.used.float().mean().item()


if __name__ == "__main__":
    torch.manual_seed(0)
    lfq = LFQ()
    z = torch.randn(2, 256, 18, requires_grad=True)
    out = lfq(z)
    print("indices[0, :8]:", out.indices[0, :8].tolist())
    print("round trip:", torch.equal(indices_to_codes(out.indices, 18), out.z_q.detach()))
    print(f"per-sample entropy {out.per_sample_entropy:.4f}  codebook entropy {out.codebook_entropy:.4f} "
          f"(max {18 * torch.log(torch.tensor(2.0)):.4f})  commitment {out.commitment:.4f}")
