"""The Source Recovery Model (recovery.py): Eq. (9) against a brute-force cross-entropy over the tokens anchored at
or before each position, the predicted source is a source of the anchors for any K and any token order, the
queries read the merged tokens (Eq. (8)'s cross-attention), the anchors alone tell two tokens of one code apart,
and it learns the source of real merges on held-out images."""
import math

import pytest
import torch

from data import ShapesDataset
from merge import anchors, recover
from recovery import SourceRecovery
from tokenizer import build_tokenizer


def small_model(N=64, seed=0, z_dim=18):
    torch.manual_seed(seed)
    return SourceRecovery(N, z_dim=z_dim, dim=64, depth=2, num_heads=4, ffn=256)


def random_source(B, K, N, seed=0):
    """A random (B, N) source map onto all K merged tokens (every group non-empty)."""
    g = torch.Generator().manual_seed(seed)
    source = torch.cat([torch.arange(K).expand(B, K), torch.randint(0, K, (B, N - K), generator=g)], dim=1)
    return source.gather(1, torch.argsort(torch.rand(B, N, generator=g), dim=1))       # (B, N)


def test_loss_is_the_cross_entropy_over_the_tokens_anchored_before_each_position():
    model = small_model()
    z = torch.sign(torch.randn(3, 16, 18))
    source = random_source(3, 16, 64)
    a = anchors(source, 16)
    with torch.no_grad():
        logits = model.logits(z, a)                                               # (B, N, K)
    assert logits.shape == (3, 64, 16)
    manual = 0.0
    for b in range(3):
        for j in range(64):
            allowed = [k for k in range(16) if a[b, k] <= j]                      # anchored at or before j
            assert all(math.isinf(logits[b, j, k]) for k in range(16) if k not in allowed)
            row = logits[b, j, allowed]
            manual -= (row[allowed.index(source[b, j].item())] - torch.logsumexp(row, 0)).item()
    assert model.loss(z, source).item() == pytest.approx(manual / 192, rel=1e-5)


@pytest.mark.parametrize("K", [1, 16, 49, 64])
def test_predicted_source_is_a_source_of_the_anchors_for_any_k(K):
    model = small_model()
    z = torch.sign(torch.randn(2, K, 18))
    a = anchors(random_source(2, K, 64, seed=K), K)
    src = model.predict_source(z, a)
    assert src.shape == (2, 64) and src.dtype == torch.int64
    assert recover(z, src).shape == (2, 64, 18)
    for b in range(2):
        for k in range(K):
            assert src[b, a[b, k]] == k                                           # an anchor holds its own token
        for j in range(64):
            assert a[b, src[b, j]] <= j                                           # ... and nothing before it


def test_the_token_order_does_not_matter():
    model = small_model()
    z, source = torch.sign(torch.randn(2, 16, 18)), random_source(2, 16, 64, seed=3)
    a = anchors(source, 16)
    perm = torch.randperm(16)
    assert torch.equal(perm[model.predict_source(z[:, perm], a[:, perm])], model.predict_source(z, a))


def test_the_queries_read_the_merged_tokens():
    """Eq. (8): the queries attend to the merged tokens (cross-attention), then score them as cluster centres. So a
    change of one merged token moves the scores of the other tokens too, at every position: a model whose queries
    attended to themselves only would change column k alone."""
    model = small_model()
    z, source = torch.sign(torch.randn(1, 16, 18)), random_source(1, 16, 64, seed=4)
    a = anchors(source, 16)
    changed = z.clone()
    changed[0, 5] = -changed[0, 5]                                                # token 5 flips every bit
    with torch.no_grad():
        before, after = model.logits(z, a), model.logits(changed, a)
    others = [k for k in range(16) if k != 5]
    finite = torch.isfinite(before[0][:, others])
    moved = (before[0][:, others] - after[0][:, others]).abs()[finite]
    assert (moved > 1e-6).float().mean() > 0.99


def test_too_many_merged_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match="more than the N=64"):
        small_model().logits(torch.zeros(1, 65, 18), torch.arange(65)[None])
    with pytest.raises(ValueError, match="anchors must be"):
        small_model().logits(torch.zeros(1, 4, 18), torch.arange(3)[None])


def split_images(B, g):
    """A 4 x 4 grid cut at a random column s in {1, 2, 3}: token 0 holds the columns < s, token 1 the others; both
    tokens have the SAME code. Returns (z (B, 2, 18), source (B, 16), s (B,))."""
    s = torch.randint(1, 4, (B,), generator=g)
    col = torch.arange(16) % 4
    source = (col[None, :] >= s[:, None]).long()                                  # (B, 16)
    z = torch.ones(B, 2, 18)                                                      # one code for both tokens
    return z, source, s


def test_only_the_anchors_tell_two_tokens_of_one_code_apart():
    """The two tokens are the same code; only their anchors (cells 0 and s) say where the cut is. Below the first
    row every cell is free to go either way (both anchors lie before it), and a guess that does not know s can be
    right on at most (1 + 2/3 + 2/3 + 1) / 4 = 83% of those cells; the model reads s from the anchors."""
    model = small_model(N=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        z, source, _ = split_images(32, g)
        loss = model.loss(z, source)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, source, s = split_images(300, g)
    a = anchors(source, 2)
    assert torch.equal(a, torch.stack([torch.zeros_like(s), s], dim=1))           # the anchors are (0, s)
    free = slice(4, 16)                                                           # rows 1-3
    right = (model.predict_source(z, a)[:, free] == source[:, free]).float().mean().item()
    assert right > 0.97, right
    wrong_cut = torch.stack([torch.zeros_like(s), 1 + s % 3], dim=1)              # another s: another split
    misled = (model.predict_source(z, wrong_cut)[:, free] == source[:, free]).float().mean().item()
    assert misled < 0.8, misled


def test_learns_the_source_of_real_merges_on_held_out_images():
    """Real merge groups of a tiny encoder on the embedded shapes: trained on 96 images, scored on 64 others, on the
    positions that are no anchor (an anchor's own token is given)."""
    torch.manual_seed(0)
    tok = build_tokenizer("g", "tiny").eval()
    S, K = tok.cfg.image_size, 16
    with torch.no_grad():
        train = tok.encode(torch.stack([ShapesDataset("train", S)[i][0] for i in range(96)]), K=K)
        held_out = tok.encode(torch.stack([ShapesDataset("val", S)[i][0] for i in range(64)]), K=K)
    model = small_model(tok.cfg.num_tokens, z_dim=tok.cfg.z_channels)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=1e-2)
    a = anchors(held_out.source, K)
    not_anchor = torch.ones_like(held_out.source, dtype=torch.bool).scatter(1, a, False)

    def accuracy():
        pred = model.predict_source(held_out.z_q, a)
        return (pred == held_out.source)[not_anchor].float().mean().item()

    before = accuracy()
    for step in range(150):
        i = torch.arange(32) + 32 * (step % 3)
        loss = model.loss(train.z_q[i], train.source[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert after > before + 0.15, (before, after)
    # and the predicted source decodes to the same tokens as the true one where it is right
    pred = model.predict_source(held_out.z_q, a)
    agree = (recover(held_out.z_q, pred) == recover(held_out.z_q, held_out.source)).all(dim=-1).float().mean()
    assert agree.item() >= (pred == held_out.source).float().mean().item() - 1e-6
