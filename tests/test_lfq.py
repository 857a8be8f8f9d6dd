"""lfq.py against brute-force enumeration of the codebook."""
import itertools
import math

import pytest
import torch

from lfq import (LFQ, CodebookUsage, codes_to_indices, entropy_terms, indices_to_codes, join_index,
                 split_index)


def brute_force_entropies(z, inv_temperature):
    """float64 enumeration of all 2^d codes: p(c | z) = softmax(2 z.c * inv_temperature)."""
    z = z.reshape(-1, z.shape[-1]).double()
    d = z.shape[1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=d)), dtype=torch.float64)  # (2^d, d)
    p = torch.softmax(2 * z @ codes.T * inv_temperature, dim=-1)                                # (T, 2^d)
    per_sample = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    avg = p.mean(0)
    codebook = -(avg * avg.clamp_min(1e-300).log()).sum()
    return per_sample.item(), codebook.item()


def test_index_code_round_trip():
    idx = torch.randint(0, 2 ** 18, (4, 100))
    codes = indices_to_codes(idx, 18)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(codes_to_indices(codes), idx)
    # channel 0 is the least significant bit
    code = -torch.ones(18)
    code[0], code[3] = 1, 1
    assert codes_to_indices(code).item() == 1 + 8


def test_subtoken_split_round_trip():
    idx = torch.randint(0, 2 ** 18, (1000,))
    pre, post = split_index(idx, 6)
    assert pre.max() < 64 and post.max() < 4096
    assert torch.equal(join_index(pre, post, 6), idx)
    assert split_index(torch.tensor([64 * 5 + 3]))[0].item() == 3


@pytest.mark.parametrize("d,inv_t,scale", [(4, 100.0, 0.01), (7, 100.0, 0.02), (10, 100.0, 0.005), (10, 1.0, 1.0),
                                            (9, 100.0, 1.0)])
def test_entropy_terms_equal_brute_force(d, inv_t, scale):
    torch.manual_seed(d)
    z = torch.randn(3, 37, d) * scale
    per_sample, codebook = entropy_terms(z, inv_t)
    ps_ref, cb_ref = brute_force_entropies(z, inv_t)
    assert per_sample.item() == pytest.approx(ps_ref, rel=1e-4, abs=1e-5)
    assert codebook.item() == pytest.approx(cb_ref, rel=1e-4, abs=1e-5)


def test_entropy_gradient_matches_brute_force():
    torch.manual_seed(0)
    z = (torch.randn(20, 6) * 0.01).requires_grad_()
    ps, cb = entropy_terms(z, 100.0)
    (ps - cb).backward()
    z64 = z.detach().double().requires_grad_()
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=6)), dtype=torch.float64)
    p = torch.softmax(2 * z64 @ codes.T * 100.0, dim=-1)
    avg = p.mean(0)
    ((-(p * p.log()).sum(-1).mean()) + (avg * avg.log()).sum()).backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-3, atol=1e-5)


def test_entropy_terms_scale_to_d18_without_materialising():
    # 8192 tokens on 8192 distinct codes, far from 0: every p(. | z) is one-hot, so the per-sample entropy is 0 and
    # the batch's code distribution is uniform over 8192 codes: codebook entropy ln 8192 = 13 ln 2.
    indices = torch.randperm(2 ** 18, generator=torch.Generator().manual_seed(0))[:8192]
    z = 0.5 * indices_to_codes(indices, 18)
    per_sample, codebook = entropy_terms(z)
    assert per_sample.item() == pytest.approx(0.0, abs=1e-6)
    assert codebook.item() == pytest.approx(13 * math.log(2), rel=1e-5)


def test_straight_through_codes_and_commitment_by_hand():
    # two tokens of d = 3, written out: codes q = +1 where z > 0, else -1 (z = 0 gives -1)
    z = torch.tensor([[[0.5, -2.0, 0.0], [-0.75, 1.5, 0.25]]], requires_grad=True)       # (1, 2, 3)
    out = LFQ(dim=3)(z)
    assert out.z_q.tolist() == [[[1.0, -1.0, -1.0], [-1.0, 1.0, 1.0]]]
    assert out.indices.tolist() == [[1, 2 + 4]]                                        # bits 100 and 011, LSB first
    # (z - q)^2 = 0.25, 1, 1 and 0.0625, 0.25, 0.5625: 3.125 over 6 entries
    assert out.commitment.item() == pytest.approx(3.125 / 6, rel=1e-7)
    # q is a constant: d commitment / dz = 2 (z - q) / 6, and the straight-through z_q passes gradients unchanged
    g = torch.tensor([[[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]]])
    (out.commitment + (out.z_q * g).sum()).backward()
    z_minus_q = torch.tensor([[[-0.5, -1.0, 1.0], [0.25, 0.5, -0.75]]])
    torch.testing.assert_close(z.grad, z_minus_q / 3 + g)


def test_commitment_closed_form():
    # z = 0.25 everywhere quantizes to +1: the commitment is (1 - 0.25)^2 = 0.5625 exactly
    out = LFQ(dim=4)(torch.full((3, 4), 0.25))
    assert out.commitment.item() == pytest.approx(0.5625)
    assert out.indices.tolist() == [15, 15, 15]


def test_bf16_latents_give_the_float64_answers():
    """Latents computed under bf16 autocast (a Linear's bf16 output) quantize as in float64: the codes and the
    commitment by hand, the entropy terms and their gradient against the enumeration of all 2^4 codes - every term
    float32. The latents are multiples of 2^-9, exact in bf16, and small, so p(c | z) is far from one-hot."""
    a = torch.tensor([[3, -5, 1, 0], [-2, 4, -6, 7], [5, 1, -1, -3]], dtype=torch.float64)   # (3, 4)
    z = (a / 512).float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.linear(z, torch.eye(4))                     # (3, 4) bf16, the same values
        out = LFQ(dim=4)(h)
    assert h.dtype == torch.bfloat16
    assert out.commitment.dtype == out.per_sample_entropy.dtype == out.codebook_entropy.dtype == torch.float32
    assert out.indices.tolist() == [1 + 4, 2 + 8, 1 + 2]                      # the signs' bits, LSB first
    # every code differs from its latent by 1 - |z| in each channel (z = 0 -> -1 too): mean of (1 - |a| / 512)^2
    want_commit = (12 - 2 * a.abs().sum() / 512 + (a ** 2).sum() / 512 ** 2) / 12
    assert out.commitment.item() == pytest.approx(want_commit.item(), rel=1e-6)
    ps_ref, cb_ref = brute_force_entropies(a / 512, 100.0)
    assert out.per_sample_entropy.item() == pytest.approx(ps_ref, rel=1e-5)
    assert out.codebook_entropy.item() == pytest.approx(cb_ref, rel=1e-5)
    # the gradient of entropy loss + commitment, through the bf16 Linear (so to bf16's 3 digits)
    (out.per_sample_entropy - out.codebook_entropy + out.commitment).backward()
    z64 = (a / 512).requires_grad_()
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=4)), dtype=torch.float64)   # (16, 4)
    p = torch.softmax(2 * z64 @ codes.T * 100.0, dim=-1)                                      # (3, 16)
    avg = p.mean(0)
    q = torch.where(z64 > 0, 1.0, -1.0).double()
    loss = -(p * p.log()).sum(-1).mean() + (avg * avg.log()).sum() + ((z64 - q) ** 2).mean()
    loss.backward()
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-2, atol=1e-4)


def test_entropy_is_float32_under_bf16_autocast():
    """The promised exact float32 entropy under autocast (bf16 on GPUs; CPU autocast casts matmuls too): small
    latents (z ~ N(0, 0.003^2), where a bf16 product turns the gradient to noise) give the float32 values and
    gradient. Without the float32 island the codebook entropy came out 12.5 (bf16) instead of 12.4723 here."""
    torch.manual_seed(0)
    z = (torch.randn(4096, 18) * 0.003).requires_grad_()
    ps, cb = entropy_terms(z)
    grad = torch.autograd.grad(ps - cb, z)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ps_bf, cb_bf = entropy_terms(z)
    grad_bf = torch.autograd.grad(ps_bf - cb_bf, z)[0]
    assert ps_bf.dtype == cb_bf.dtype == torch.float32
    torch.testing.assert_close(torch.stack([ps_bf, cb_bf]), torch.stack([ps, cb]), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_bf, grad, rtol=1e-5, atol=1e-12)


def test_bad_input():
    with pytest.raises(ValueError, match="18 channels"):
        LFQ()(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="indices must lie"):
        indices_to_codes(torch.tensor([2 ** 18]), 18)


def test_codebook_usage_accumulates():
    usage = CodebookUsage(16)
    usage.update(torch.tensor([[0, 1], [1, 3]]))
    usage.update(torch.tensor([3, 15]))
    assert usage.gather().fraction == pytest.approx(4 / 16)
