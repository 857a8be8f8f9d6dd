"""The Source Recovery Model (recovery.py): Eq. (9) against a hand computation, the predicted source is a valid
source for any K, and after a few steps on a fixed batch it predicts the true source far above chance."""
import pytest
import torch

from merge import recover
from recovery import SourceRecovery
from tokenizer import build_tokenizer


def small_model(N=64):
    torch.manual_seed(0)
    return SourceRecovery(N, z_dim=18, dim=64, depth=2, num_heads=4, ffn=256)


def random_source(B, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    assign = torch.cat([torch.arange(K).expand(B, K), torch.randint(0, K, (B, N - K), generator=g)], dim=1)
    assign = assign.gather(1, torch.argsort(torch.rand(B, N, generator=g), dim=1))      # (B, N) onto all K
    return torch.zeros(B, K, N).scatter_(1, assign[:, None], 1.0), assign


def test_loss_is_the_cross_entropy_of_the_true_assignment():
    model = small_model()
    z = torch.sign(torch.randn(3, 16, 18))
    source, assign = random_source(3, 16, 64)
    logits = model.logits(z)                                                      # (B, N, K)
    manual = -torch.log_softmax(logits, dim=-1).gather(2, assign[..., None]).mean()
    assert torch.allclose(model.loss(z, source), manual, atol=1e-6)
    assert logits.shape == (3, 64, 16)


@pytest.mark.parametrize("K", [1, 16, 49, 64])
def test_predicted_source_is_a_source_for_any_k(K):
    model = small_model()
    z = torch.sign(torch.randn(2, K, 18))
    src = model.predict_source(z)
    assert src.shape == (2, K, 64)
    assert torch.equal(src.sum(dim=1), torch.ones(2, 64))                          # one merged token per position
    assert recover(z, src).shape == (2, 64, 18)


def test_too_many_merged_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="more than the N=64"):
        small_model().logits(torch.zeros(1, 65, 18))


def test_learns_the_source_of_real_merges_far_above_chance():
    """Real merge groups from a tiny encoder on a fixed batch: the model must learn where each token went."""
    torch.manual_seed(0)
    tok = build_tokenizer("gr", "tiny").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 64, 64, generator=g) * 2 - 1
    K = 16
    with torch.no_grad():
        enc = tok.encode(x, keep=K)
    model = small_model(tok.cfg.num_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=1e-2)
    before = model.accuracy(enc.z_q, enc.source)
    for _ in range(150):
        loss = model.loss(enc.z_q, enc.source)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.accuracy(enc.z_q, enc.source)
    chance = 1.0 / K
    assert after > max(5 * chance, before + 0.3), (before, after)
    # and the predicted source decodes to the same tokens as the true one where it is right
    pred = model.predict_source(enc.z_q)
    agree = (recover(enc.z_q, pred) == recover(enc.z_q, enc.source)).all(dim=-1).float().mean().item()
    assert agree >= after - 1e-6
