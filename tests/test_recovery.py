"""The Source Recovery Model (recovery.py): Eq. (9) against a hand computation, the predicted source is a valid
source for any K, and after a few steps on a fixed batch it predicts the true source far above chance."""
import pytest
import torch

from data import ShapesDataset
from merge import recover
from recovery import SourceRecovery
from tokenizer import build_tokenizer


def small_model(N=64):
    torch.manual_seed(0)
    return SourceRecovery(N, z_dim=18, dim=64, depth=2, num_heads=4, ffn=256)


def random_source(B, K, N, seed=0):
    """A random (B, N) source map onto all K merged tokens (every group non-empty)."""
    g = torch.Generator().manual_seed(seed)
    source = torch.cat([torch.arange(K).expand(B, K), torch.randint(0, K, (B, N - K), generator=g)], dim=1)
    return source.gather(1, torch.argsort(torch.rand(B, N, generator=g), dim=1))       # (B, N)


def test_loss_is_the_cross_entropy_of_the_true_source():
    model = small_model()
    z = torch.sign(torch.randn(3, 16, 18))
    source = random_source(3, 16, 64)
    logits = model.logits(z)                                                      # (B, N, K)
    manual = sum(-torch.log_softmax(logits[b, j], dim=0)[source[b, j]] for b in range(3) for j in range(64)) / 192
    assert torch.allclose(model.loss(z, source), manual, atol=1e-5)
    assert logits.shape == (3, 64, 16)


@pytest.mark.parametrize("K", [1, 16, 49, 64])
def test_predicted_source_is_a_source_for_any_k(K):
    model = small_model()
    z = torch.sign(torch.randn(2, K, 18))
    src = model.predict_source(z)
    assert src.shape == (2, 64) and src.dtype == torch.int64
    assert 0 <= src.min() and src.max() < K                                       # one merged token per position
    assert recover(z, src).shape == (2, 64, 18)


def test_too_many_merged_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="more than the N=64"):
        small_model().logits(torch.zeros(1, 65, 18))


def test_learns_the_source_of_real_merges_on_held_out_images():
    """Real merge groups of a tiny encoder on the embedded shapes: trained on 96 images, scored on 64 others."""
    torch.manual_seed(0)
    tok = build_tokenizer("gr", "tiny").eval()
    K = 16
    with torch.no_grad():
        train = tok.encode(torch.stack([ShapesDataset("train", 64)[i][0] for i in range(96)]), K=K)
        held_out = tok.encode(torch.stack([ShapesDataset("val", 64)[i][0] for i in range(64)]), K=K)
    model = small_model(tok.cfg.num_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=1e-2)
    before = model.accuracy(held_out.z_q, held_out.source)
    for step in range(150):
        i = torch.arange(32) + 32 * (step % 3)
        loss = model.loss(train.z_q[i], train.source[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.accuracy(held_out.z_q, held_out.source)
    chance = 1.0 / K
    assert after > max(3 * chance, before + 0.15), (before, after)
    # and the predicted source decodes to the same tokens as the true one where it is right
    pred = model.predict_source(held_out.z_q)
    agree = (recover(held_out.z_q, pred) == recover(held_out.z_q, held_out.source)).all(dim=-1).float().mean()
    assert agree.item() >= after - 1e-6
