"""train_stage2.py with MergeTok's continuous latents and the DiT: extract writes the latents (the merged latents
recovered to the N grid with the source, checked against a loop over the grid) and their per-channel statistics,
and refuses to for a tokenizer without a continuous branch; `train --model dit` + `sample` write images decoded
from the EMA's latents, unscaled, through the continuous path (checked against the same steps done by hand); a
resumed DiT run equals the straight one; `nll` of a DiT is its held-out flow loss. A random-init MergeTok tiny
tokenizer (32 px, N = 64, K = 36, C = 18) keeps every run small."""
import dataclasses
import os

import numpy as np
import pytest
import torch

import train_stage2
from common import save_checkpoint
from data import ShapesDataset, tensor_to_uint8
from diffusion import DiT, DiTConfig, sample
from tokenizer import build_tokenizer, get_config, load_tokenizer

IMAGES = 8


def tokenizer_checkpoint(path, variant):
    """A stage-1 checkpoint in train_stage1.py's format (model and EMA the same random weights) of a tiny tokenizer.
    MergeTok's posterior starts at N(0, 0.02): scaled up so its latents are not all near zero."""
    cfg = get_config(variant, "tiny")
    torch.manual_seed(0)
    tok = build_tokenizer(variant, config=cfg)
    if variant == "mergetok":
        with torch.no_grad():
            tok.posterior.weight.normal_(0, 0.3)
    sd = tok.state_dict()
    save_checkpoint(str(path), {"model": sd, "ema": sd, "tokenizer_config": dataclasses.asdict(cfg), "step": 1})
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A MergeTok and a G checkpoint (random weights), the MergeTok's codes and latents at K = 36 (8 images,
    flipped too: 16 rows) and of 4 held-out images."""
    d = tmp_path_factory.mktemp("stage2-dit")
    tok, g = tokenizer_checkpoint(d / "mergetok.pt", "mergetok"), tokenizer_checkpoint(d / "g.pt", "g")
    codes, val = str(d / "codes.pt"), str(d / "val.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--num-images", str(IMAGES), "--flip", "--keep", "36",
                              "--amp", "none", "--out", codes]) == 0     # float32: compared with encode below
    assert train_stage2.main(["extract", "--tokenizer", tok, "--num-images", "4", "--split", "val", "--keep", "36",
                              "--out", val]) == 0
    return d, tok, g, codes, val


def train(d, name, codes, *extra):
    out = str(d / name)
    assert train_stage2.main(["train", "--codes", codes, "--model", "dit", "--preset", "tiny", "--batch-size", "4",
                              "--log-every", "1", "--amp", "none", "--out", out, *extra]) == 0
    return out


def test_extract_writes_the_recovered_latents_and_their_statistics(files):
    """Row r = 2 i + v of the latents is image i (v = 1: mirrored) encoded by MergeTok: at grid cell (row a, column
    b) the merged latent of the token that holds position a * g + b (a loop over the cells). The statistics are the
    per-channel mean and std over rows and cells, which scale the latents to mean 0 and std 1; and decoding a
    stored latent through the continuous path gives the tokenizer's own continuous reconstruction."""
    _, tok_path, _, codes, _ = files
    table = torch.load(codes, weights_only=True)
    latents = table["latents"][36]
    assert latents.shape == (2 * IMAGES, 18, 8, 8) and latents.dtype == torch.float32
    tok = load_tokenizer(tok_path)
    ds = ShapesDataset("train", size=32)
    for i in (0, 5):
        for v, x in enumerate((ds[i][0], ds[i][0].flip(-1))):
            with torch.no_grad():
                enc = tok.encode(x[None], K=36)
            expected = torch.empty(18, 8, 8)
            for a in range(8):
                for b in range(8):
                    expected[:, a, b] = enc.latent[0, enc.source[0, a * 8 + b]]
            torch.testing.assert_close(latents[2 * i + v], expected, rtol=1e-4, atol=1e-4)   # batched
    flat = latents.permute(1, 0, 2, 3).reshape(18, -1).double().numpy()     # (C, rows * cells)
    np.testing.assert_allclose(table["latent_mean"][36].numpy(), flat.mean(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(table["latent_std"][36].numpy(), flat.std(axis=1, ddof=1), rtol=1e-5)
    assert (table["latent_std"][36] > 1e-3).all()
    scaled = train_stage2.scaled_latents(table, torch.arange(2 * IMAGES), 36, table["latent_mean"][36],
                                         table["latent_std"][36])
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    torch.testing.assert_close(scaled.std(dim=(0, 2, 3)), torch.ones(18), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        enc = tok.encode(ds[5][0][None], K=36)                              # image 5, not mirrored: row 10
        torch.testing.assert_close(tok.decode_grid_latent(latents[10:11]), tok.decode_latent(enc.latent, enc.source),
                                   rtol=1e-5, atol=1e-5)


def test_latents_only_from_a_continuous_branch(files, tmp_path, capsys):
    """--latents on a G tokenizer, `train --model dit` on codes without latents, and GPT flags given to the DiT are
    one line each (nothing written); --no-latents leaves a MergeTok's latents out."""
    d, tok, g, codes, _ = files
    g_codes = str(tmp_path / "g-codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", g, "--num-images", "4", "--keep", "36", "--out",
                              g_codes]) == 0
    assert "latents" not in torch.load(g_codes, weights_only=True)
    capsys.readouterr()
    cases = [(["extract", "--tokenizer", g, "--latents", "--keep", "36", "--out", str(tmp_path / "x.pt")],
              "has no continuous latents"),
             (["train", "--codes", g_codes, "--model", "dit", "--preset", "tiny", "--out", str(tmp_path / "r")],
              "holds no continuous latents"),
             (["train", "--codes", codes, "--model", "dit", "--preset", "tiny", "--gpt", "tiny", "--out",
               str(tmp_path / "r")], "--gpt: not a setting of --model dit"),
             (["train", "--codes", codes, "--model", "llamagen", "--preset", "tiny", "--dit", "tiny", "--out",
               str(tmp_path / "r")], "--dit: a setting of --model dit")]
    for argv, message in cases:
        assert train_stage2.main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and message in err and not captured.out, (argv, err)
    assert not os.path.exists(tmp_path / "x.pt") and not os.path.exists(tmp_path / "r" / "last.pt")
    plain = str(tmp_path / "no-latents.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--no-latents", "--num-images", "2", "--keep", "36",
                              "--out", plain]) == 0
    assert "latents" not in torch.load(plain, weights_only=True)


def test_train_and_sample_decode_the_ema_latents_through_the_continuous_path(files):
    """A few DiT steps, then `sample`: the .npz holds 2 images per class of the tokenizer's size, the PNG grid is
    written, and the images are the EMA DiT's Euler samples (the sampler's seed, guidance 2, 3 steps) unscaled by
    the training statistics and decoded through W and the decoder - done here by hand. The EMA's zero-initialised
    layers (adaLN, final layer) get random weights in the checkpoint, so its samples differ visibly from the raw
    DiT's: sampling the raw weights, or skipping the unscaling, fails."""
    d, tok_path, _, codes, _ = files
    out = train(d, "dit-sample", codes, "--steps", "3")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    g = torch.Generator().manual_seed(0)
    for name, w in ckpt["ema"].items():
        if "adaLN_modulation" in name or "final_layer" in name:
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    path = os.path.join(d, "dit-sample.pt")
    save_checkpoint(path, ckpt)
    prefix = str(d / "dit-samples")
    assert train_stage2.main(["sample", "--ckpt", path, "--num-per-class", "2", "--num-steps", "3", "--cfg", "2",
                              "--seed", "5", "--out", prefix]) == 0
    f = np.load(prefix + ".npz")
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (20, 32, 32, 3)
    assert f["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert os.path.getsize(prefix + ".png") > 0
    tok = load_tokenizer(tok_path)

    def by_hand(weights):
        dit = DiT(DiTConfig(**ckpt["dit_config"]))
        dit.load_state_dict(weights)
        with torch.no_grad():
            x = sample(dit.eval(), torch.tensor(f["labels"]), num_steps=3, cfg_scale=2.0,
                       generator=torch.Generator().manual_seed(5))         # (20, 18, 8, 8), normalised
            x = x * ckpt["latent_std"].view(18, 1, 1) + ckpt["latent_mean"].view(18, 1, 1)
            z = x.flatten(2).transpose(1, 2)                                # (20, 64, 18): cell a * 8 + b
            return tensor_to_uint8(tok.decode_latent(z, torch.arange(64).expand(20, 64)).clamp(-1, 1)).astype(int)

    assert np.abs(by_hand(ckpt["ema"]) - f["arr_0"].astype(int)).max() <= 1
    assert np.abs(by_hand(ckpt["model"]) - f["arr_0"].astype(int)).max() > 10   # the raw weights draw others


def test_resume_is_exact(files):
    """--stop-at 2 + --resume equals 4 straight steps bit for bit: the weights, the EMA and the logged losses
    (the flow's times, noise and label dropout come from the restored RNG)."""
    d, _, _, codes, _ = files
    straight = train(d, "dit-straight", codes, "--steps", "4")
    split = train(d, "dit-split", codes, "--steps", "4", "--stop-at", "2")
    train(d, "dit-split", codes, "--steps", "4", "--resume", os.path.join(split, "last.pt"))
    a, b = (torch.load(os.path.join(o, "last.pt"), weights_only=True) for o in (straight, split))
    for entry in ("model", "ema"):
        for name in a[entry]:
            assert torch.equal(a[entry][name], b[entry][name]), (entry, name)
    losses = [[float(line.split('"loss": ')[1].split(",")[0]) for line in open(os.path.join(o, "log.jsonl"))]
              for o in (straight, split)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_nll_of_a_dit_is_its_held_out_flow_loss(files, capsys):
    """A DiT that has not moved (lr 1e-30: its final layer is zero, v = 0) has the flow loss E||e - x||^2 per
    element = 1 + E x^2 on latents scaled to unit variance: about 2 on the training rows, with the label or without
    (the label changes nothing yet)."""
    d, _, _, codes, val = files
    out = train(d, "dit-nll", codes, "--steps", "1", "--lr", "1e-30")
    capsys.readouterr()
    assert train_stage2.main(["nll", "--ckpt", os.path.join(out, "last.pt"), "--codes", codes]) == 0
    line = capsys.readouterr().out
    cond = float(line.split("flow loss ")[1].split()[0])
    null = float(line.split("per element with the labels, ")[1].split()[0])
    assert cond == pytest.approx(2.0, abs=0.15) and null == pytest.approx(cond, abs=1e-6)
    assert train_stage2.main(["nll", "--ckpt", os.path.join(out, "last.pt"), "--codes", val]) == 0
    assert "flow loss" in capsys.readouterr().out
