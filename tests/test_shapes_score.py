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
