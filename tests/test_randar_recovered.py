"""train_stage2.py train --model randar --tokens grid (old spelling: recovered): Table 3's baseline row, RandAR over
all N grid cells, each holding its recovered code (its slots are the real grid cells), decoded in place with no
Source Recovery Model."""
import os

import numpy as np
import pytest
import torch

import train_stage2
from conftest import random_tokenizer_checkpoint

IMAGES = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("randar_recovered")
    tok = random_tokenizer_checkpoint(d / "stage1.pt", image_size=32, K=16, K_low=0, K_high=1)   # N = 64, K 16 / 25
    codes = str(d / "codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--num-images", str(IMAGES), "--keep", "16",
                              "--out", codes]) == 0
    out = str(d / "randar-recovered")
    assert train_stage2.main(["train", "--codes", codes, "--model", "randar", "--tokens", "recovered", "--preset",
                              "tiny", "--gpt", "tiny", "--batch-size", "4", "--steps", "2", "--out", out]) == 0  # old
    return d, tok, codes, out


def test_the_model_spans_the_N_grid_cells_and_trains_on_the_recovered_codes(files):
    d, tok, codes, out = files
    ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert ckpt["tokens"] == "grid" and ckpt["model_kind"] == "randar"     # the old spelling, recorded as grid
    assert ckpt["gpt_config"]["block_size"] == 64                          # N = 8 x 8 cells, not K = 16 slots


def test_nll_counts_every_recovered_code(files, capsys):
    d, tok, codes, out = files
    assert train_stage2.main(["nll", "--ckpt", os.path.join(out, "last.pt"), "--codes", codes]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("nll |"))
    assert "(64 codes)" in line                                             # per image: N codes, not K tokens


def test_sample_decodes_the_cells_in_place(files):
    d, tok, codes, out = files
    path = str(d / "samples")
    assert train_stage2.main(["sample", "--ckpt", os.path.join(out, "last.pt"), "--num-per-class", "1",
                              "--num-steps", "8", "--out", path]) == 0
    with np.load(path + ".npz") as f:
        assert f["arr_0"].shape == (10, 32, 32, 3) and f["labels"].tolist() == list(range(10))


def test_recovered_tokens_are_refused_where_they_mean_nothing(files, capsys):
    d, tok, codes, out = files
    for argv, message in [
            (["train", "--codes", codes, "--model", "llamagen", "--tokens", "grid", "--preset", "tiny",
              "--out", str(d / "x")], "--tokens grid is for --model randar"),
            (["finetune-recovery", "--ckpt", os.path.join(out, "last.pt"), "--codes", codes,
              "--out", str(d / "y.pt")], "needs no predicted source"),
            (["train", "--codes", codes, "--model", "randar", "--preset", "tiny", "--gpt", "tiny", "--batch-size",
              "4", "--steps", "3", "--out", out, "--resume", os.path.join(out, "last.pt")], "tokens")]:
        assert train_stage2.main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_a_checkpoint_with_the_old_spelling_resumes_with_grid(files, tmp_path):
    """Runs saved before the rename record tokens "recovered": --tokens grid continues them."""
    d, tok, codes, out = files
    old = str(tmp_path / "old")
    argv = ["train", "--codes", codes, "--model", "randar", "--tokens", "grid", "--preset", "tiny", "--gpt", "tiny",
            "--batch-size", "4", "--steps", "2", "--out", old]
    assert train_stage2.main([*argv, "--stop-at", "1"]) == 0
    ckpt = torch.load(os.path.join(old, "last.pt"), map_location="cpu", weights_only=True)
    torch.save({**ckpt, "tokens": "recovered"}, os.path.join(old, "last.pt"))              # as written before
    assert train_stage2.main([*argv, "--resume", os.path.join(old, "last.pt")]) == 0
    assert torch.load(os.path.join(old, "last.pt"), map_location="cpu", weights_only=True)["step"] == 2
