"""MergeTok (mergetok.py: the model and its losses): the code collision probability k_ij against a brute-force
enumeration of both tokens' code distributions, the group constraints' closed-form values (disjoint hard codes:
exclusivity 0; a group sharing one hard code: collision 1), their invariance to relabelling the groups, finite
gradients as tau -> 0, the semantic alignment and KL closed forms, the model's merged latents, one training step,
the loss falling on a fixed batch, evaluate.py's two branches and train_stage2.py extract on a MergeTok checkpoint."""
import dataclasses
import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data as data_lib
import evaluate as E
import losses
import mergetok
import train_stage1
import train_stage2
from common import save_checkpoint
from data import ShapesDataset
from merge import group_mean, recover
from mergetok import MergeTokenizer
from tokenizer import build_tokenizer, get_config, load_tokenizer

# ----------------------------------------------------------------------------------------------------------------
# k_ij and the group constraints (ii)
# ----------------------------------------------------------------------------------------------------------------


def brute_force_collision(u, tau):
    """P(c_i = c_j) by enumerating all 2^d codes: sum_c p(c | u_i) p(c | u_j), p(c | u) = prod_b p(c_b | u_b),
    p(c_b = 1 | u_b) = sigmoid(4 u_b / tau). u (N, d) float64 -> (N, N)."""
    N, d = u.shape
    s = torch.sigmoid(4.0 * u.double() / tau)                                  # (N, d) P(bit b = 1)
    k = torch.zeros(N, N, dtype=torch.float64)
    for code in itertools.product([0, 1], repeat=d):
        c = torch.tensor(code, dtype=torch.float64)                            # (d,)
        p = torch.where(c.bool(), s, 1 - s).prod(dim=1)                        # (N,) p(code | u_i)
        k += p[:, None] * p[None, :]
    return k


@pytest.mark.parametrize("d", [1, 3, 8])
@pytest.mark.parametrize("tau", [0.3, 1.0, 4.0])
def test_code_collision_equals_brute_force_enumeration(d, tau):
    g = torch.Generator().manual_seed(d)
    u = torch.randn(2, 5, d, generator=g) * 0.5                              # 2 images of 5 tokens
    u[1, 3] = u[1, 1]                                                         # two tokens with one latent
    k = mergetok.code_collision(u, tau)                                        # (2, 5, 5)
    for b in range(2):
        torch.testing.assert_close(k[b].double(), brute_force_collision(u[b], tau), rtol=1e-5, atol=1e-7)
    assert torch.allclose(k, k.transpose(1, 2))                                # k_ij = k_ji


def hard_latents(codes, d):
    """Integer codes -> latents of magnitude 1 whose signs are the codes' bits: (N,) -> (1, N, d)."""
    bits = (torch.tensor(codes)[:, None] >> torch.arange(d)) & 1              # (N, d)
    return (bits.float() * 2 - 1)[None]


def test_disjoint_hard_codes_give_zero_exclusivity_and_shared_codes_full_collision():
    # groups {0, 1, 2} -> code 5, {3, 4} -> code 9, {5} -> code 12: every group one code, no code in two groups
    source = torch.tensor([[0, 0, 0, 1, 1, 2]])
    u = hard_latents([5, 5, 5, 9, 9, 12], d=4)
    intra, exc = mergetok.group_constraints(u, source, tau=0.01)              # 4 u / tau = +-400: hard bits
    assert exc.item() == 0.0
    assert intra.item() == 1.0                                                 # every pair in a group collides
    # group 0 shares one code (its 3 x 2 = 6 ordered pairs collide), group 1's two members differ (2 pairs, none):
    # intra = 6 / 8. Group 2 has group 0's code: 2 x 3 ordered pairs across groups collide, of 36 - 9 - 4 - 1 = 22
    u = hard_latents([5, 5, 5, 9, 10, 5], d=4)
    intra, exc = mergetok.group_constraints(u, source, tau=0.01)
    inter_pairs = 6 * 6 - (9 + 4 + 1)                                          # ordered pairs across groups
    assert intra.item() == pytest.approx(6 / 8, abs=1e-7)
    assert exc.item() == pytest.approx(6 / inter_pairs, abs=1e-7)


def test_single_member_groups_and_single_group_give_zero():
    u = torch.randn(1, 4, 3)
    intra, _ = mergetok.group_constraints(u, torch.arange(4)[None], tau=1.0)  # K = N: no pair inside a group
    _, exc = mergetok.group_constraints(u, torch.zeros(1, 4, dtype=torch.long), tau=1.0)  # K = 1: none across
    assert intra.item() == 0.0 and exc.item() == 0.0


def test_group_losses_are_invariant_to_permuting_group_labels():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 12, 6, generator=g)
    source = torch.randint(0, 5, (3, 12), generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])                                       # relabel group k as perm[k]
    a = mergetok.group_constraints(u, source, 1.0)
    b = mergetok.group_constraints(u, perm[source], 1.0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
    # (i) too: the groups are what counts, not their names
    mu = torch.randn(3, 12, 4, generator=g)
    torch.testing.assert_close(mergetok.semantic_alignment(mu, source, 5),
                               mergetok.semantic_alignment(mu, perm[source], 5))


@pytest.mark.parametrize("tau", [1e-1, 1e-3, 1e-6])
def test_gradients_stay_finite_as_tau_gets_small(tau):
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 16, 18, generator=g)
    u[:, 0] = 0.0                                                              # bits exactly on the boundary
    u[:, 1] = u[:, 2]                                                          # identical tokens
    u.requires_grad_(True)
    source = torch.randint(0, 4, (2, 16), generator=g)
    intra, exc = mergetok.group_constraints(u, source, tau)
    (intra + exc).backward()
    assert torch.isfinite(u.grad).all()
    assert 0.0 <= exc.item() <= 1.0 and 0.0 <= intra.item() <= 1.0


def test_group_constraints_in_row_blocks_equal_the_pair_sums_written_out():
    """k_ij taken a few rows at a time (blocks recomputed in backward) against the product formula on the whole
    (B, N, N, d) table in float64, pair by pair: the same values and the same gradients."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 10, 5, generator=g, dtype=torch.float64).float()
    source = torch.randint(0, 4, (2, 10), generator=g)
    # expected: k_ij = prod_b [s_ib s_jb + (1 - s_ib)(1 - s_jb)], averaged over the pairs by a loop
    u64 = u.double().requires_grad_(True)
    s = torch.sigmoid(4.0 * u64 / 0.7)                                           # (B, N, d)
    k = (s[:, :, None] * s[:, None] + (1 - s[:, :, None]) * (1 - s[:, None])).prod(-1)   # (B, N, N)
    intra_pairs = [(b, i, j) for b in range(2) for i in range(10) for j in range(10)
                   if i != j and source[b, i] == source[b, j]]
    inter_pairs = [(b, i, j) for b in range(2) for i in range(10) for j in range(10) if source[b, i] != source[b, j]]
    want = [sum(k[p] for p in pairs) / len(pairs) for pairs in (intra_pairs, inter_pairs)]
    want_grad = torch.autograd.grad(want[0] + 2 * want[1], u64)[0]
    for chunk in (2 * 10 * 5 * 3, 10 ** 6):                                      # blocks of 3 rows; one block
        assert mergetok.collision_rows(2, 10, 5, chunk) == (3 if chunk < 10 ** 6 else 10)
        x = u.clone().requires_grad_(True)
        intra, exc = mergetok.group_constraints(x, source, 0.7, chunk_elements=chunk)
        (intra + 2 * exc).backward()
        assert intra.item() == pytest.approx(want[0].item(), rel=1e-5)
        assert exc.item() == pytest.approx(want[1].item(), rel=1e-5)
        torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# (i) and the KL: closed forms
# ----------------------------------------------------------------------------------------------------------------


def test_semantic_alignment_closed_form():
    # tokens 0, 1 in group 0 with orthogonal means e1, e2: their group mean (e1 + e2) / 2 is at 45 degrees to both,
    # 1 - cos = 1 - 1 / sqrt(2) each; token 2 alone in group 1 is its own mean (0); token 3 in group 2 with token 4,
    # parallel to it (0)
    mu = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 3.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]])
    source = torch.tensor([[0, 0, 1, 2, 2]])
    want = 2 * (1 - 1 / math.sqrt(2)) / 5
    assert mergetok.semantic_alignment(mu, source, 3).item() == pytest.approx(want, rel=1e-6)
    # the group mean is a stop-gradient target c: d/dmu (1 - cos(mu, c)) = -(c / |c| - cos mu / |mu|) / |mu|, at
    # mu = e1, c / |c| = (e1 + e2) / sqrt 2, cos = 1 / sqrt 2: -e2 / sqrt 2, divided by the 5 tokens of the mean
    mu.requires_grad_(True)
    mergetok.semantic_alignment(mu, source, 3).backward()
    torch.testing.assert_close(mu.grad[0, 0], torch.tensor([0.0, -1 / math.sqrt(2) / 5, 0.0]), atol=1e-6, rtol=0)


def test_gaussian_kl_closed_form():
    mu, logvar = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    assert mergetok.gaussian_kl(mu, logvar).item() == 0.0                       # the prior itself
    mu[..., 0] = 2.0                                                           # 0.5 * 2^2 per token
    logvar[..., 1] = math.log(4.0)                                             # 0.5 (4 - 1 - ln 4) per token
    assert mergetok.gaussian_kl(mu, logvar).item() == pytest.approx(2.0 + 0.5 * (3 - math.log(4.0)), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tokenizer("mergetok", "tiny", z_channels=18, image_size=64).eval()   # C = d = 18, N = 256


def images(n=2, seed=0):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_merged_latents_are_group_means_and_decode_paths_agree(tiny):
    x = images()
    with torch.no_grad():
        enc = tiny.encode(x, K=64)
        out = tiny(x, K=64)
        N = tiny.cfg.num_tokens
        assert enc.indices.shape == (2, 64) and enc.source.shape == (2, N) and enc.u.shape == (2, N, 18)
        assert enc.mu.shape == enc.logvar.shape == (2, N, 18) and enc.latent.shape == (2, 64, 18)
        for b in range(2):                                                    # the source partitions N into K
            assert sorted(set(enc.source[b].tolist())) == list(range(64))
        # merged token k: code = sign of its members' mean latent; continuous latent (eval) = their mean mu
        for b, k in [(0, 0), (0, 17), (1, 63)]:
            members = (enc.source[b] == k).nonzero()[:, 0]
            mean_u = enc.u[b, members].mean(dim=0)
            assert torch.equal(enc.z_q[b, k], torch.where(mean_u > 0, 1.0, -1.0))
            torch.testing.assert_close(enc.latent[b, k], enc.mu[b, members].mean(dim=0))
        # forward decodes both branches in one decoder call; the same as decoding each on its own
        torch.testing.assert_close(out.recon, tiny.decode(enc.indices, enc.source), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.recon_vae, tiny.decode_latent(enc.latent, enc.source), atol=1e-5, rtol=0)
        # K = N: nothing merges, every token is its own group and its own merged token
        full = tiny.encode(x, K=N)
        assert torch.equal(full.source, torch.arange(N).expand(2, N))
        torch.testing.assert_close(full.latent, full.mu)
    assert isinstance(tiny, MergeTokenizer) and out.sem_pred is None


def test_group_mean_inverts_recover():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 3, generator=g)
    source = torch.cat([torch.arange(5), torch.randint(0, 5, (7,), generator=g)]).expand(2, 12)  # every group used
    torch.testing.assert_close(group_mean(recover(z, source), source, 5), z)


# ----------------------------------------------------------------------------------------------------------------
# Training, evaluation, stage 2
# ----------------------------------------------------------------------------------------------------------------


def train(tmp_path, name, *extra):
    out = str(tmp_path / name)
    assert train_stage1.main(["--variant", "mergetok", "--preset", "tiny", "--out", out, "--log-every", "1",
                              "--sample-every", "100000", *extra]) == 0
    with open(os.path.join(out, "log.jsonl")) as f:
        return out, [json.loads(line) for line in f]


def test_one_training_step(tmp_path):
    out, log = train(tmp_path, "one", "--steps", "1", "--batch-size", "2", "--disc-start", "0")
    for term in ["recon", "recon_vae", "kl", "sem", "intra", "exc", "commit", "entropy", "recovery", "gan_g",
                 "disc", "batch_usage"]:
        assert np.isfinite(log[-1][term]), term
    assert 0 < log[-1]["batch_usage"] <= 1
    tok = load_tokenizer(os.path.join(out, "last.pt"))                         # what stage 2 and evaluate.py load
    assert isinstance(tok, MergeTokenizer) and tok.cfg.variant == "mergetok"


def test_loss_falls_on_a_fixed_batch(tmp_path):
    ds = ShapesDataset("val", size=64)
    for i in range(4):                                                         # a folder of 4 images: one batch
        img, label = ds[i]
        (tmp_path / "data" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(data_lib.tensor_to_uint8(img)).save(tmp_path / "data" / f"c{label}" / f"{i}.png")
    _, log = train(tmp_path, "fixed", "--data", str(tmp_path / "data"), "--steps", "16", "--batch-size", "4",
                   "--keep", "64", "--disc-start", "1000")
    for term in ["recon", "recon_vae"]:
        first, last = np.mean([r[term] for r in log[:2]]), np.mean([r[term] for r in log[-2:]])
        assert last < 0.6 * first, (term, first, last)


def test_mergetok_flags_are_checked(capsys):
    for argv, message in [(["--variant", "g", "--sem-weight", "0"], "--sem-weight: MergeTok settings"),
                          (["--variant", "mergetok", "--exc-weight", "-1"], "--exc-weight must be 0 or more"),
                          (["--variant", "mergetok", "--group-tau", "0"], "--group-tau must be positive"),
                          (["--variant", "mergetok", "--sem-target", "dinov2"], "needs the DINOv2 teacher")]:
        assert train_stage1.main([*argv, "--preset", "tiny", "--out", "/nonexistent/never"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A MergeTok checkpoint in train_stage1.py's format (random weights)."""
    cfg = get_config("mergetok", "tiny", z_channels=18, image_size=64)                  # N = 256
    torch.manual_seed(0)
    sd = build_tokenizer("mergetok", config=cfg).state_dict()
    path = str(tmp_path_factory.mktemp("mergetok") / "tok.pt")
    save_checkpoint(path, {"model": sd, "ema": sd, "tokenizer_config": dataclasses.asdict(cfg), "step": 1})
    return path


def test_recon_reports_both_branches(ckpt, capsys):
    assert E.main(["recon", "--ckpt", ckpt, "--max-images", "3", "--keep", "64", "--source", "both",
                   "--device", "cpu", "--out", ckpt + ".json"]) == 0
    assert "continuous" in capsys.readouterr().out
    rows = json.loads(open(ckpt + ".json").read())["rows"]
    assert [(r["K"], r["source"], r["branch"]) for r in rows] == \
        [(64, "true", "discrete"), (64, "predicted", "discrete"), (64, "true", "continuous")]
    assert rows[0]["codebook_usage"] > 0 and rows[2]["codebook_usage"] is None and rows[2]["bits"] is None
    # the continuous row is the decoded merged posterior means
    model = load_tokenizer(ckpt)
    x = torch.stack([data_lib.build_dataset(None, "val", size=64)[i][0] for i in range(3)])
    with torch.no_grad():
        enc = model.encode(x, K=64)
        rec01 = (model.decode_latent(enc.latent, enc.source).clamp(-1, 1) + 1) / 2
    assert rows[2]["psnr"] == pytest.approx(E.psnr(rec01, (x + 1) / 2).mean().item(), rel=1e-5)


def test_stage2_extract_reads_a_mergetok_checkpoint(ckpt, tmp_path):
    codes = str(tmp_path / "codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", ckpt, "--num-images", "3", "--keep", "64",
                              "--amp", "none", "--out", codes]) == 0               # float32, as encode below
    table = torch.load(codes, weights_only=True)
    tok = load_tokenizer(ckpt)
    x = torch.stack([ShapesDataset("train", size=64)[i][0] for i in range(3)])
    with torch.no_grad():
        enc = tok.encode(x, K=64)
    assert torch.equal(table["indices"][64].long(), enc.indices) and torch.equal(table["source"][64].long(), enc.source)


def test_semantic_alignment_toward_dinov2_features(tmp_path):
    # closed form: a prediction along its group's pooled teacher feature costs 0, an orthogonal one 1 - margin
    teacher = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])            # tokens 0, 1 in group 0; 2 in group 1
    source = torch.tensor([[0, 0, 1]])
    pred = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])                # token 1 orthogonal to its group's
    assert mergetok.semantic_alignment_dinov2(pred, teacher, source, 2, margin=0.5).item() == pytest.approx(0.5 / 3)
    # one training step with the teacher's patch features: a small random DINOv2 (width 768, as the projection's)
    args = train_stage1.parse_args(["--variant", "mergetok", "--preset", "tiny", "--batch-size", "2",
                                    "--image-size", "64", "--sem-target", "dinov2", "--out", str(tmp_path / "o")])
    run_ = train_stage1.setup(args, 0, 1, torch.device("cpu"))
    torch.manual_seed(0)
    run_.teacher = run_.extra.teacher = losses.DINOv2(depth=1).eval().requires_grad_(False)
    assert run_.teacher.patch_grid(torch.zeros(1, 3, 56, 56), 16).shape == (1, 256, 768)
    x = torch.stack([ShapesDataset("train", 64)[i][0] for i in range(2)])
    terms = train_stage1.train_step(x, 64, 0, run_)
    assert {"sem", "align"} <= set(terms) and all(torch.isfinite(v) for v in terms.values())
    assert run_.model.sem_proj.weight.grad is not None and run_.model.sem_proj.weight.grad.abs().sum() > 0
