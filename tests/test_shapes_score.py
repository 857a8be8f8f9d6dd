"""evaluate.py shapes: a small classifier of the embedded shapes scores samples without pretrained weights. Held-out
real images are classified well above chance and lie close to the reference features; noise is classified near
chance and lies far away; the classifier is cached by seed (and deterministic); the CLI reads an ADM .npz with
labels. The classifier here is smaller than the CLI's (SHAPES_CLASSIFIER) to keep the test short."""
import json

import numpy as np
import pytest
import torch

import evaluate
import shapes_score
from merge import anchors

SMALL = dict(num_train=2000, epochs=5, num_ref=200, width=16, lr=5e-3)     # 52% held-out accuracy, ~30 s
TINY = dict(num_train=200, epochs=1, num_ref=50, width=8)                   # for the cache: seconds


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shapes") / "cls_seed0.pt")
    model, info, trained = shapes_score.load_shapes_classifier(path, seed=0, **SMALL)
    assert trained
    return path, model, info


def test_real_images_score_well_and_noise_scores_at_chance(classifier):
    _, model, info = classifier
    real, y = shapes_score.shapes_images("val", info["num_ref"], 200)            # outside the reference images
    r = shapes_score.shapes_score(model, info, real, y)
    noise = torch.rand(200, 3, 64, 64) * 2 - 1
    n = shapes_score.shapes_score(model, info, noise, y)
    assert info["val_accuracy"] > 0.4 and r["accuracy"] > 0.4                 # chance: 0.1
    assert n["accuracy"] < 0.2
    assert n["fd"] > 10 * r["fd"], (n["fd"], r["fd"])


def test_the_classifier_is_cached_by_seed_and_deterministic(tmp_path):
    path = str(tmp_path / "seed0.pt")
    model, info, trained = shapes_score.load_shapes_classifier(path, seed=0, **TINY)
    again, info2, trained2 = shapes_score.load_shapes_classifier(path, seed=0, **TINY)
    assert trained and not trained2 and info2["val_accuracy"] == info["val_accuracy"]
    retrained, _, trained = shapes_score.load_shapes_classifier(str(tmp_path / "fresh.pt"), seed=0, **TINY)
    assert trained
    for a, b, c in zip(model.state_dict().values(), again.state_dict().values(), retrained.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)                        # the same seed: the same weights
    other, _, _ = shapes_score.load_shapes_classifier(str(tmp_path / "seed1.pt"), seed=1, **TINY)
    assert not torch.equal(other.head.weight, model.head.weight)


def test_cli_scores_an_adm_npz_with_labels(classifier, tmp_path, capsys):
    path, _, info = classifier
    real, y = shapes_score.shapes_images("val", info["num_ref"], 50)
    arr = ((real.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    np.savez(tmp_path / "s.npz", arr_0=arr, labels=y.numpy())
    out = tmp_path / "r.json"
    assert evaluate.main(["shapes", str(tmp_path / "s.npz"), "--classifier", path, "--num-images", "50",
                          "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    sample = rows[f"samples {tmp_path / 's.npz'}"]
    assert sample["num_images"] == 50
    assert sample["accuracy"] == pytest.approx(rows["held-out real images"]["accuracy"], abs=0.05)
    assert evaluate.main(["shapes", str(tmp_path / "missing.npz"), "--classifier", path]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err


def test_reconstruction_rows_decode_with_the_true_or_the_predicted_source(tmp_path):
    """The ceiling rows: held-out shapes encoded at K and decoded with the encoder's source, or with the source the
    Source Recovery Model predicts from the codes at their anchors (RandAR's only path); a bad source name is one
    error."""
    import dataclasses
    from common import save_checkpoint
    from tokenizer import build_tokenizer, get_config
    cfg = get_config("g", "tiny")
    torch.manual_seed(0)
    tok = build_tokenizer("g", config=cfg).eval()
    ckpt = str(tmp_path / "tok.pt")
    save_checkpoint(ckpt, {"model": tok.state_dict(), "ema": tok.state_dict(),
                           "tokenizer_config": dataclasses.asdict(cfg), "step": 1})
    x, y = shapes_score.shapes_images("val", 7, 3, size=cfg.image_size)
    with torch.no_grad():
        enc = tok.encode(x, K=36)
        predicted = tok.recovery.predict_source(enc.z_q, anchors(enc.source, 36))   # (3, N)
        assert not torch.equal(predicted, enc.source)                     # an untrained recovery model errs
        want = {"true": tok.decode(enc.indices, enc.source), "predicted": tok.decode(enc.indices, predicted)}
    for source, expected in want.items():
        rec, labels, K = shapes_score.shapes_reconstructions(ckpt, 7, 3, K=36, source=source)
        assert K == 36 and torch.equal(labels, y)
        torch.testing.assert_close(rec, expected.clamp(-1, 1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="source must be"):
        shapes_score.shapes_reconstructions(ckpt, 7, 3, source="oracle")


def test_continuous_reconstructions_of_a_mergetok_tokenizer(tmp_path, capsys):
    """--branch continuous: a MergeTok tokenizer's held-out shapes decoded from the merged posterior means with the
    true source (decode_latent, the DiT's ceiling), not from the codes; a tokenizer without that branch, or the
    predicted source, is refused - on the command line with one line before any other output."""
    import dataclasses
    from common import save_checkpoint
    from tokenizer import build_tokenizer, get_config, load_tokenizer
    ckpts = {}
    for variant in ("mergetok", "g"):
        cfg = get_config(variant, "tiny")
        torch.manual_seed(0)
        tok = build_tokenizer(variant, config=cfg).eval()
        ckpts[variant] = str(tmp_path / f"{variant}.pt")
        save_checkpoint(ckpts[variant], {"model": tok.state_dict(), "ema": tok.state_dict(),
                                         "tokenizer_config": dataclasses.asdict(cfg), "step": 1})
    x, y = shapes_score.shapes_images("val", 7, 3, size=32)
    tok_m = load_tokenizer(ckpts["mergetok"])
    with torch.no_grad():
        enc = tok_m.encode(x, K=36)
        continuous = tok_m.decode_latent(enc.latent, enc.source).clamp(-1, 1)
        discrete = tok_m.decode(enc.indices, enc.source).clamp(-1, 1)
    rec, labels, K = shapes_score.shapes_reconstructions(ckpts["mergetok"], 7, 3, K=36, branch="continuous")
    assert K == 36 and torch.equal(labels, y)
    torch.testing.assert_close(rec, continuous, rtol=1e-5, atol=1e-5)
    assert (rec - discrete).abs().max() > 0.1                              # not the codes' reconstruction
    with pytest.raises(ValueError, match="no continuous branch"):
        shapes_score.shapes_reconstructions(ckpts["g"], 7, 3, branch="continuous")
    with pytest.raises(ValueError, match="true source"):
        shapes_score.shapes_reconstructions(ckpts["mergetok"], 7, 3, source="predicted", branch="continuous")
    never = str(tmp_path / "never.pt")                                      # the classifier is never trained
    for argv, message in [(["--reconstructions", ckpts["g"], "--branch", "continuous"], "no continuous branch"),
                          (["--reconstructions", ckpts["mergetok"], "--branch", "continuous", "--source",
                            "predicted"], "true source only")]:
        assert evaluate.main(["shapes", *argv, "--classifier", never, "--device", "cpu"]) != 0
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and message in err and not captured.out, err
    assert not (tmp_path / "never.pt").exists()
