"""diffusion.py against closed forms: the flow loss at the exact velocity field of Gaussian data equals its analytic
minimum (and a trained network approaches it), the Euler sampler driven by that field carries N(0, 1) to the data's
Gaussian, a tiny trained DiT draws the shape of its class and not under the null class, guidance at scale 1 is the
conditional model, adaLN-Zero makes every block the identity at initialisation, patchify / unpatchify and the
position table against brute force, and DiT-B/2's parameter count against the layer shapes."""
import math

import pytest
import torch
import torch.nn as nn
from scipy.integrate import quad

from diffusion import (DIT_PRESETS, build_dit, euler_sample, flow_loss, guided_velocity, patchify, sample, sincos_2d,
                       timestep_embedding, unpatchify)
from gpt import count_parameters

# ----------------------------------------------------------------------------------------------------------------
# Gaussian data: the exact velocity field and the irreducible loss
# ----------------------------------------------------------------------------------------------------------------

# Data x_0 ~ N(m, s^2), noise e ~ N(0, 1) independent, x_t = (1 - t) x_0 + t e, target v = e - x_0.
# (v, x_t) is jointly Gaussian for each t:
#     E[v] = -m,   Var v = 1 + s^2,   E[x_t] = (1 - t) m,   Var x_t = sigma_t^2 = (1 - t)^2 s^2 + t^2,
#     Cov(v, x_t) = Cov(e - x_0, (1 - t) x_0 + t e) = t - (1 - t) s^2.
# The regression's minimiser is the conditional mean
#     v*(x, t) = E[v | x_t = x] = -m + (t - (1 - t) s^2) / sigma_t^2 * (x - (1 - t) m),
# and what remains is the conditional variance
#     Var(v | x_t) = 1 + s^2 - (t - (1 - t) s^2)^2 / sigma_t^2 = s^2 / sigma_t^2
# (the numerator (1 + s^2)((1 - t)^2 s^2 + t^2) - (t - (1 - t) s^2)^2 collapses to s^2 ((1 - t) + t)^2 = s^2).
# The minimum loss is E_t[s^2 / sigma_t^2]. With t uniform on [0, 1]: sigma_t^2 = (1 + s^2)(t - s^2/(1 + s^2))^2
# + s^2/(1 + s^2), so the integral is s [arctan(((1 + s^2) t - s^2) / s)]_0^1 = s (arctan(1/s) + arctan(s)) = pi s / 2.
# With t logit-normal(0, 1) it is the 1-D integral against pi_ln(t) = exp(-logit(t)^2 / 2) / (sqrt(2 pi) t (1 - t)).


class Gaussian:
    """Data x_0 ~ N(m, s^2): samples, the exact velocity field v* and the minimum loss E_t[s^2 / sigma_t^2]."""

    def __init__(self, m, s):
        self.m, self.s = m, s

    def draw(self, n, generator, dtype=torch.float64):
        return self.m + self.s * torch.randn(n, 1, generator=generator, dtype=dtype)          # (n, 1)

    def velocity(self, x, t, y=None):
        """v*(x, t) = -m + (t - (1 - t) s^2) / sigma_t^2 * (x - (1 - t) m); x (B, 1), t (B,)."""
        m, s, t = self.m, self.s, t.to(x.dtype)[:, None]                                       # t (B, 1)
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        return -m + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * m)

    def min_loss(self, t_sampling):
        """pi s / 2 for uniform t; a quadrature against the logit-normal density pi_ln otherwise."""
        s = self.s
        if t_sampling == "uniform":
            return math.pi * s / 2
        density = lambda t: math.exp(-math.log(t / (1 - t)) ** 2 / 2) / (math.sqrt(2 * math.pi) * t * (1 - t))  # noqa
        return quad(lambda t: s ** 2 / ((1 - t) ** 2 * s ** 2 + t ** 2) * density(t), 0, 1)[0]


NARROW = Gaussian(1.5, 0.3)     # narrower than the noise: uniform and logit-normal minima 0.471 and 0.422 (10% apart)
UNIT = Gaussian(1.5, 1.0)       # a field without a sharp corner near t = s^2: a small MLP fits it in 800 steps


@pytest.mark.parametrize("t_sampling", ["uniform", "logit_normal"])
def test_flow_loss_at_the_exact_field_is_the_analytic_minimum(t_sampling):
    # The Monte-Carlo error of the mean of 10^6 squared residuals is below 0.3% of the value; the two t samplers'
    # minima are 10% apart, so a sampler of the wrong kind fails too.
    x0 = NARROW.draw(1_000_000, torch.Generator().manual_seed(0))
    loss = flow_loss(NARROW.velocity, x0, None, t_sampling, torch.Generator().manual_seed(1)).item()
    assert loss == pytest.approx(NARROW.min_loss(t_sampling), rel=0.01)


class SmallNet(nn.Module):
    """An MLP on (x_t, t): enough to learn v*(x, t), an affine map of x whose coefficients depend on t."""

    def __init__(self, width=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 1))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))                         # (B, 1)


def test_a_trained_network_approaches_the_minimum(one_thread):
    torch.manual_seed(0)
    net, steps = SmallNet(), 800
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    x_eval = UNIT.draw(200_000, torch.Generator().manual_seed(1), torch.float32)
    evaluate = lambda: flow_loss(net, x_eval, None, "uniform", torch.Generator().manual_seed(2)).item()  # noqa
    with torch.no_grad():
        before = evaluate()
    for _ in range(steps):
        loss = flow_loss(net, UNIT.draw(512, g, torch.float32), None, "uniform", g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lr_decay.step()
    with torch.no_grad():
        after = evaluate()
        t = torch.rand(20_000, generator=g)
        x_t = (1 - t[:, None]) * x_eval[:20_000] + t[:, None] * torch.randn(20_000, 1, generator=g)
        field_err = (net(x_t, t) - UNIT.velocity(x_t, t)).pow(2).mean().item()
    best = UNIT.min_loss("uniform")                                             # pi / 2
    assert before > 2 * best                                                    # at v = 0: E[v^2] = 1 + s^2 + m^2
    assert best * 0.99 < after < best * 1.03
    assert field_err < 0.02 * best                                              # it learnt v*, not only a low loss


def test_euler_with_the_exact_field_carries_noise_to_the_data_gaussian():
    """In 1-D the flow between two Gaussians is the monotone map x_0 = m + s e, so each sample must land there
    (Euler's error is first order: 0.025 at 100 steps, 0.006 at 400), and the samples are N(m, s^2)."""
    e = torch.randn(20_000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = euler_sample(NARROW.velocity, e, num_steps=400)
    assert (x0 - (NARROW.m + NARROW.s * e)).abs().max() < 0.01
    assert x0.mean().item() == pytest.approx(NARROW.m, abs=0.01)                 # noise mean 0 -> m
    assert x0.std().item() == pytest.approx(NARROW.s, rel=0.02)                  # noise std 1 -> s


# ----------------------------------------------------------------------------------------------------------------
# The class decides a global shape; the null class does not
# ----------------------------------------------------------------------------------------------------------------


def shape_templates():
    """(2, 1, 8, 8) in {-1, +1}: class 0 a filled 4 x 4 centre block, class 1 a ring (the border of the 6 x 6 square
    one cell in from the edge). Both have 16 or 20 cells on, at distance sqrt(4 * 36) = 12 from each other."""
    block, ring = -torch.ones(8, 8), -torch.ones(8, 8)
    block[2:6, 2:6] = 1
    ring[1:7, 1:7] = 1
    ring[2:6, 2:6] = -1
    return torch.stack([block, ring])[:, None]


def nearest_template(x, templates):
    return torch.cdist(x.flatten(1), templates.flatten(1)).argmin(dim=1)      # (B,)


@pytest.fixture(scope="module")
def shapes_dit(one_thread):
    """A tiny DiT (8 x 8 x 1 latents, patch 2: 16 tokens, width 64, 2 blocks) trained 250 steps of batch 64 on the
    two shapes plus N(0, 0.1^2) noise, labels dropped to the null class 20% of the time (7 s on one thread)."""
    torch.manual_seed(0)
    model = build_dit("tiny", input_size=8, in_channels=1, num_classes=2, hidden_size=64, num_heads=4, depth=2,
                      class_dropout_prob=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    g, templates = torch.Generator().manual_seed(0), shape_templates()
    losses = []
    for _ in range(250):
        y = torch.randint(0, 2, (64,), generator=g)
        x0 = templates[y] + 0.1 * torch.randn(64, 1, 8, 8, generator=g)
        loss = flow_loss(model, x0, y, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_the_class_decides_the_shape_and_the_null_class_does_not(shapes_dit):
    """Seeds 0, 1, 2 of this recipe: 94-100% of the conditional samples nearest their class's shape; under the null
    class 47-52% nearest the label they were drawn beside (the same noise), each still a shape (nearest-shape
    distance about 0.8-1.0, against 6 for the mean of the two shapes)."""
    model, losses = shapes_dit
    assert sum(losses[-50:]) / 50 < 0.2 * sum(losses[:50]) / 50
    templates, y = shape_templates(), torch.arange(2).repeat_interleave(64)
    x = sample(model, y, num_steps=20, cfg_scale=1.0, generator=torch.Generator().manual_seed(1))
    assert (nearest_template(x, templates) == y).float().mean() >= 0.9
    # cfg 0: v = v_u, the null class alone, from the same noise: a sample of the class mix, whatever y says
    x_null = sample(model, y, num_steps=20, cfg_scale=0.0, generator=torch.Generator().manual_seed(1))
    follows = (nearest_template(x_null, templates) == y).float().mean().item()
    assert 0.3 <= follows <= 0.7
    # and each one a shape, not a blur (with the null row never trained, no label dropout: median 3.05)
    assert torch.cdist(x_null.flatten(1), templates.flatten(1)).min(dim=1).values.median() < 2.0


# ----------------------------------------------------------------------------------------------------------------
# Guidance
# ----------------------------------------------------------------------------------------------------------------


def random_dit(seed=0, **overrides):
    """A tiny DiT whose zero-initialised layers (adaLN, final Linear) get random weights, so v is not 0."""
    torch.manual_seed(seed)
    model = build_dit("tiny", input_size=8, in_channels=3, num_classes=5, hidden_size=32, num_heads=4, depth=2,
                      **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_guidance_at_scale_one_is_the_conditional_model_exactly():
    model = random_dit()                                                        # left in training mode on purpose
    y = torch.tensor([0, 3, 4, 1])
    got = sample(model, y, num_steps=8, cfg_scale=1.0, generator=torch.Generator().manual_seed(7))
    assert model.training                                                       # sample restores the mode
    model.eval()
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = euler_sample(lambda x, t: model(x, t, y), noise, 8)
    assert torch.equal(got, want)


def test_guidance_is_v_u_plus_s_times_v_c_minus_v_u():
    model = random_dit().eval()
    y, s = torch.tensor([0, 3, 4, 1]), 3.0
    null = torch.full_like(y, 5)
    with torch.no_grad():
        x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
        v_c, v_u = model(x, t, y), model(x, t, null)                          # two separate forwards
        assert not torch.allclose(v_c, v_u, atol=1e-3)                          # the label matters in this model
        torch.testing.assert_close(guided_velocity(model, x, t, y, s), v_u + s * (v_c - v_u), rtol=1e-5, atol=1e-5)
        noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
        want = euler_sample(lambda x, t: (1 - s) * model(x, t, null) + s * model(x, t, y), noise, 6)
    got = sample(model, y, num_steps=6, cfg_scale=s, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# The network: adaLN-Zero, patchify / unpatchify, positions, time features, sizes
# ----------------------------------------------------------------------------------------------------------------


def test_adaln_zero_blocks_are_the_identity_and_the_output_is_zero_at_init():
    torch.manual_seed(0)
    model = build_dit("tiny", input_size=8, in_channels=3, num_classes=5, hidden_size=32, num_heads=4,
                      depth=3)
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 5])
    assert torch.equal(model(x, t, y), torch.zeros(2, 3, 8, 8))


def test_the_velocity_depends_on_time_and_class():
    """Both reach c = t_emb + y_emb. The shape test cannot see a DiT blind to t: on two shapes with little noise the
    time-averaged field still carries noise to the right shape (measured: 100% of the samples, at a flow loss of 0.18
    instead of 0.14); a velocity blind to t only follows E[e - x_0 | x_t], averaged over the whole path."""
    model = random_dit().eval()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        v = model(x, torch.full((2,), 0.2), y)
        assert not torch.allclose(v, model(x, torch.full((2,), 0.8), y), atol=1e-3)
        assert not torch.allclose(v, model(x, torch.full((2,), 0.2), torch.tensor([3, 0])), atol=1e-3)


def test_unpatchify_against_brute_force_and_the_round_trip():
    B, C, h, p = 2, 3, 4, 2
    tokens = torch.randn(B, h * h, p * p * C)
    img = unpatchify(tokens, p, C)
    assert img.shape == (B, C, h * p, h * p)
    for b in range(B):
        for r in range(h):
            for col in range(h):
                for i in range(p):
                    for j in range(p):
                        for ch in range(C):
                            # token r * h + col holds its patch's cell (i, j), channel ch at (i * p + j) * C + ch
                            want = tokens[b, r * h + col, (i * p + j) * C + ch]
                            assert img[b, ch, r * p + i, col * p + j] == want
    assert torch.equal(patchify(img, p), tokens)
    x = torch.randn(B, C, 8, 8)
    assert torch.equal(unpatchify(patchify(x, p), p, C), x)


def test_the_patch_embedding_reads_the_cells_unpatchify_writes():
    """Token k of the stride-p convolution and token k of unpatchify are the same p x p patch: the conv's output
    equals a Linear applied to patchify(x) with the conv weight laid out in patchify's (i, j, channel) order."""
    model = random_dit()
    x = torch.randn(2, 3, 8, 8)
    w = model.x_embedder.proj.weight                                            # (d, C, p, p)
    W = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)                           # (d, p*p*C) in (i, j, channel) order
    want = patchify(x, 2) @ W.T + model.x_embedder.proj.bias                   # (B, T, d)
    torch.testing.assert_close(model.x_embedder(x), want, rtol=1e-5, atol=1e-5)


def test_position_table_against_the_closed_form():
    dim, grid = 16, 4
    table = sincos_2d(dim, grid)
    for r in range(grid):
        for c in range(grid):
            want = []
            for pos in (c, r):                                       # the column first (MAE, DiT), then the row
                w = [10000 ** (-k / (dim // 4)) for k in range(dim // 4)]
                want += [math.sin(pos * wk) for wk in w] + [math.cos(pos * wk) for wk in w]
            torch.testing.assert_close(table[r * grid + c], torch.tensor(want), rtol=0, atol=1e-6)
    model = random_dit()
    assert "pos_embed" not in dict(model.named_parameters())                   # fixed: a buffer, never trained
    torch.testing.assert_close(model.pos_embed[0], sincos_2d(32, 4))


def test_time_features_against_the_closed_form():
    t = torch.tensor([0.0, 0.25, 731.5])
    emb = timestep_embedding(t, 8)
    f = [10000 ** (-k / 4) for k in range(4)]
    for n, tn in enumerate(t.tolist()):
        want = [math.cos(tn * fk) for fk in f] + [math.sin(tn * fk) for fk in f]
        torch.testing.assert_close(emb[n], torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_dit_b2_parameter_count_from_the_layer_shapes():
    d, C, p, T, n_cls, L, f = 768, 4, 2, (32 // 2) ** 2, 1000, 12, 256
    lin = lambda i, o: i * o + o                                                # noqa: E731 (a Linear with bias)
    patch = d * C * p * p + d
    time = lin(f, d) + lin(d, d)
    label = (n_cls + 1) * d                                                     # + the null class row
    block = lin(d, 3 * d) + lin(d, d) + lin(d, 4 * d) + lin(4 * d, d) + lin(d, 6 * d)   # qkv, proj, MLP, adaLN
    final = lin(d, p * p * C) + lin(d, 2 * d)
    ours = patch + time + label + L * block + final
    assert ours == 130_303_504
    # DiT's release counts 130,512,416 for DiT-B/2 (the "130M"): its learn_sigma head has 2C outputs, p*p*C * (d + 1)
    # more numbers, and its fixed position table is a frozen nn.Parameter, T * d more.
    assert ours + p * p * C * (d + 1) + T * d == 130_512_416
    with torch.device("meta"):
        model = build_dit("B/2")
        assert count_parameters(model) == ours
        out = model(torch.empty(2, 4, 32, 32), torch.empty(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 4, 32, 32)
    assert DIT_PRESETS["B/2"] == dict(hidden_size=768, depth=12, num_heads=12)   # DiT Table 1


def test_tiny_preset_shapes():
    model = build_dit("tiny")
    B, c = 3, model.cfg
    out = model(torch.randn(B, c.in_channels, c.input_size, c.input_size), torch.rand(B), torch.tensor([0, 9, 10]))
    assert out.shape == (B, 18, 8, 8) and model.pos_embed.shape == (1, 16, 192)   # MergeTok tiny's 8 x 8 x 18 grid
    # 6 blocks of width 192: attention 4 D^2 + 4 D, MLP 8 D^2 + 5 D, adaLN D x 6 D + 6 D; the patch embedding
    # (2 x 2 x 18 -> D), time MLP (256 -> D -> D), labels (10 + 1 null rows), final adaLN (D -> 2 D) and Linear (D -> 72)
    D = 192
    blocks = 6 * ((4 * D * D + 4 * D) + (8 * D * D + 5 * D) + (6 * D * D + 6 * D))
    rest = (72 * D + D) + (256 * D + D + D * D + D) + 11 * D + (2 * D * D + 2 * D) + (D * 72 + 72)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == blocks + rest


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any work
# ----------------------------------------------------------------------------------------------------------------


def test_bad_input_is_one_line():
    model = random_dit()
    cases = [
        (lambda: build_dit("huge"), "unknown DiT preset"),
        (lambda: build_dit("tiny", input_size=15), "not a multiple of the patch size"),
        (lambda: build_dit("tiny", hidden_size=90), "must divide into"),
        (lambda: model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])), "x must be (B, 3, 8, 8)"),
        (lambda: model(torch.randn(2, 3, 8, 8), torch.rand(3), torch.tensor([0, 1])), "one per latent"),
        (lambda: model(torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0.0, 1.0])), "integer class labels"),
        (lambda: sample(model, torch.tensor([0, 5])), "labels must lie in [0, 5)"),
        (lambda: sample(model, torch.tensor([0]), num_steps=0), "num_steps must be >= 1"),
        (lambda: flow_loss(model, torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), "cosine"), "unknown t sampling"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)
