"""train_stage2.py misused as a new user would: nothing is lost and nothing wrong is computed silently. A run
folder is never reused without --resume or --overwrite, no output replaces an input, files that do not belong
together (codes, tokenizer, generator) are refused naming the file, a resume refuses other codes naming the field,
and bad scales, devices and checkpoints are one line. Random-init tiny tokenizers at 32 px (N = 64, K 16 / 25)."""
import json
import os
import shutil

import pytest
import torch

import train_stage2
from common import save_checkpoint
from conftest import random_tokenizer_checkpoint


def tokenizer(d, name, seed, image_size=32):
    return random_tokenizer_checkpoint(d / name, seed, image_size=image_size, K=16, K_low=0, K_high=2)


def extract(d, name, tok, *extra, keep=("16",)):
    out = str(d / name)
    assert train_stage2.main(["extract", "--tokenizer", tok, "--keep", *keep, "--out", out, *extra]) == 0
    return out


def train(d, name, codes, *extra, model="randar"):
    out = str(d / name)
    assert train_stage2.main(["train", "--codes", codes, "--model", model, "--preset", "tiny", "--gpt", "tiny",
                              "--batch-size", "4", "--log-every", "1", "--out", out, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """Two tokenizers of the same shape (a, b: other weights), one of N = 144 (48 px); codes of each; a RandAR
    generator on a's codes."""
    d = tmp_path_factory.mktemp("misuse")
    files = {"dir": d, "tok_a": tokenizer(d, "a.pt", 0), "tok_b": tokenizer(d, "b.pt", 1),
             "tok_n": tokenizer(d, "n.pt", 0, image_size=48)}
    both = ("16", "25")
    files["codes_a"] = extract(d, "codes-a.pt", files["tok_a"], "--num-images", "8", "--flip", keep=both)  # 16 rows
    files["codes_b"] = extract(d, "codes-b.pt", files["tok_b"], "--num-images", "8", "--flip", keep=both)
    files["val_a"] = extract(d, "val-a.pt", files["tok_a"], "--num-images", "4", "--split", "val", keep=both)
    files["codes_n"] = extract(d, "codes-n.pt", files["tok_n"], "--num-images", "4")
    files["randar"] = os.path.join(train(d, "randar", files["codes_a"], "--steps", "1"), "last.pt")
    return files


def error(capsys, *argv):
    """The command's exit code 2 and its one line on stderr."""
    capsys.readouterr()
    code = train_stage2.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, code, err)
    return err


def contents(*paths):
    return [open(p, "rb").read() for p in paths]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_train_refuses_a_folder_that_holds_a_run(f, tmp_path, capsys):
    out = train(tmp_path, "run", f["codes_a"], "--steps", "1", model="llamagen")
    files = [os.path.join(out, name) for name in ("last.pt", "config.json", "log.jsonl")]
    before = contents(*files)
    again = ["train", "--codes", f["codes_a"], "--model", "llamagen", "--preset", "tiny", "--gpt", "tiny",
             "--batch-size", "4", "--steps", "1"]
    err = error(capsys, *again, "--out", out)
    assert "already holds a run" in err and f"--resume {out}/last.pt" in err and "--overwrite" in err, err
    assert "positive and finite" in error(capsys, *again, "--lr", "inf", "--out", out)
    assert "nothing to train" in error(capsys, *again, "--out", out, "--resume", files[0])
    assert contents(*files) == before                                        # config.json included
    stage1 = tmp_path / "stage1"                                             # a stage-1 run: its last.pt is the
    stage1.mkdir()                                                           # tokenizer the codes refer to
    shutil.copy(f["tok_a"], stage1 / "last.pt")
    assert "already holds a run (last.pt)" in error(capsys, *again, "--out", str(stage1))
    assert contents(stage1 / "last.pt") == contents(f["tok_a"])
    train(tmp_path, "run", f["codes_a"], "--steps", "2", "--overwrite", model="llamagen")   # starts over
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_no_output_replaces_an_input(f, tmp_path, capsys):
    tok = str(tmp_path / "tok.pt")
    shutil.copy(f["tok_a"], tok)
    os.symlink(tok, tmp_path / "link.pt")
    gen = torch.load(f["randar"], weights_only=True)
    save_checkpoint(tmp_path / "gen.pt", {**gen, "tokenizer": tok})          # a generator whose tokenizer is tok
    save_checkpoint(tmp_path / "gen.npz", gen)                                # an odd name for a checkpoint
    inputs = [tok, f["codes_a"], f["randar"]]
    before = contents(*inputs)
    for out in [tok, str(tmp_path / "link.pt")]:
        assert "same file as --tokenizer" in error(capsys, "extract", "--tokenizer", tok, "--num-images", "2",
                                                   "--out", out)
    ft = ["finetune-recovery", "--ckpt", str(tmp_path / "gen.pt"), "--codes", f["codes_a"], "--steps", "1",
          "--batch-size", "4"]
    assert "same file as --tokenizer" in error(capsys, *ft, "--tokenizer", tok, "--out", tok)
    assert "already exists and holds a PyTorch file" in error(capsys, *ft, "--out", tok)
    # --overwrite replaces an existing file, never an input: here the generator's stored tokenizer
    assert "same file as the generator's tokenizer" in error(capsys, *ft, "--out", tok, "--overwrite")
    assert "same file as --codes" in error(capsys, *ft, "--out", f["codes_a"])
    assert "same file as --ckpt" in error(capsys, "sample", "--ckpt", str(tmp_path / "gen.npz"), "--out",
                                          str(tmp_path / "gen"), "--num-per-class", "1")
    assert contents(*inputs) == before


def test_extract_checks_its_output_path_before_the_work(f, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    extract = ["extract", "--tokenizer", f["tok_a"], "--num-images", "2"]
    assert "is a folder" in error(capsys, *extract, "--out", str(tmp_path / "folder"))
    err = error(capsys, *extract, "--out", str(tmp_path / "file" / "codes.pt"))
    assert "which is a file" in err, err


def test_a_resume_with_other_codes_is_refused_naming_the_field(f, tmp_path, capsys):
    out = train(tmp_path, "r", f["codes_a"], "--steps", "2", "--stop-at", "1", model="mergear")
    resume = ["train", "--model", "mergear", "--preset", "tiny", "--gpt", "tiny", "--batch-size", "4", "--log-every",
              "1", "--steps", "2", "--resume", os.path.join(out, "last.pt"), "--out", out]
    table = torch.load(f["codes_a"], weights_only=True)
    table["labels"][0] += 1                                                  # the same shape, other content
    table.pop("codes_hash", None)                                            # as a file of an earlier version
    save_checkpoint(tmp_path / "edited.pt", table)
    for codes, field in [(f["codes_b"], "tokenizer_hash"), (f["val_a"], "split"), (f["val_a"], "rows"),
                         (str(tmp_path / "edited.pt"), "hash")]:
        err = error(capsys, *resume, "--codes", codes)
        assert f"{field}: " in err and "other codes" in err and f["codes_a"] in err, (field, err)
    shutil.copy(f["codes_a"], tmp_path / "moved.pt")                         # the same codes elsewhere: fine
    assert train_stage2.main([*resume, "--codes", str(tmp_path / "moved.pt")]) == 0
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["codes_identity"]["tokenizer"] == \
        os.path.abspath(f["tok_a"])


def test_files_that_do_not_belong_together_are_refused(f, tmp_path, capsys):
    ft = ["finetune-recovery", "--ckpt", f["randar"], "--steps", "1", "--batch-size", "4",
          "--out", str(tmp_path / "ft.pt")]
    err = error(capsys, *ft, "--codes", f["codes_b"])                       # another tokenizer of the same shape
    assert "--codes" in err and "not the one" in err, err
    err = error(capsys, *ft, "--codes", f["codes_a"], "--tokenizer", f["tok_b"])
    assert "tokenizer " + f["tok_b"] in err and "not the one" in err, err
    for flag in ["--codes", "--val-codes"]:                                  # another N: one line naming the file
        extra = ["--codes", f["codes_n"]] if flag == "--codes" else ["--codes", f["codes_a"], "--val-codes",
                                                                      f["codes_n"]]
        err = error(capsys, *ft, *extra)
        assert f"{flag} {f['codes_n']}" in err and "N=144" in err, err
    assert not os.path.exists(tmp_path / "ft.pt")
    sample = ["sample", "--ckpt", f["randar"], "--num-per-class", "1", "--num-steps", "2"]
    err = error(capsys, *sample, "--tokenizer", f["tok_b"], "--out", str(tmp_path / "s"))
    assert "not the one" in err, err
    # a tokenizer whose Source Recovery Model alone was fine-tuned decodes the same codes: accepted
    tuned = torch.load(f["tok_a"], weights_only=True)
    tuned["ema"] = {k: v + 1 if k.startswith("recovery.") and v.is_floating_point() else v
                    for k, v in tuned["ema"].items()}
    save_checkpoint(tmp_path / "tuned.pt", tuned)
    assert train_stage2.main([*sample, "--tokenizer", str(tmp_path / "tuned.pt"), "--out", str(tmp_path / "s")]) == 0
    # the stored tokenizer path, its weights replaced since (a stage-1 folder trained further)
    gen = torch.load(f["randar"], weights_only=True)
    shutil.copy(f["tok_b"], tmp_path / "changed.pt")
    save_checkpoint(tmp_path / "gen.pt", {**gen, "tokenizer": str(tmp_path / "changed.pt")})
    err = error(capsys, "sample", "--ckpt", str(tmp_path / "gen.pt"), "--num-per-class", "1", "--num-steps", "2")
    assert "have changed since" in err, err


def test_guidance_scales_that_cannot_work_are_one_line(f, tmp_path, capsys):
    gen = os.path.join(train(tmp_path, "nodrop", f["codes_a"], "--steps", "1", "--class-dropout", "0",
                             model="llamagen"), "last.pt")
    for cfg in ["nan", "inf", "-1"]:
        assert "--cfg must be a finite scale" in error(capsys, "sample", "--ckpt", gen, "--cfg", cfg)
    err = error(capsys, "sample", "--ckpt", gen, "--cfg", "2", "--out", str(tmp_path / "s"))
    assert "--class-dropout 0" in err and "--cfg 1" in err, err
    capsys.readouterr()
    assert train_stage2.main(["sample", "--ckpt", f["randar"], "--cfg", "0", "--num-per-class", "1", "--num-steps",
                              "2", "--out", str(tmp_path / "s")]) == 0
    assert "unconditional" in capsys.readouterr().err


def test_bad_checkpoints_and_devices_are_one_line(f, tmp_path, capsys):
    out = train(tmp_path, "ok", f["codes_a"], "--steps", "2", "--stop-at", "1")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    resume = ["train", "--codes", f["codes_a"], "--model", "randar", "--preset", "tiny", "--gpt", "tiny",
              "--batch-size", "4", "--steps", "2", "--resume", str(tmp_path / "broken.pt")]
    for key, drop in [("model", next(iter(ckpt["model"]))), ("opt", "state")]:
        save_checkpoint(tmp_path / "broken.pt", {**ckpt, key: {k: v for k, v in ckpt[key].items() if k != drop}})
        err = error(capsys, *resume, "--out", str(tmp_path / f"r-{key}"))
        assert "broken.pt" in err and repr(key) in err, err
    save_checkpoint(tmp_path / "two.pt", {**ckpt, "world_size": 2})         # as if written by 2 processes
    capsys.readouterr()
    assert train_stage2.main([*resume[:-1], str(tmp_path / "two.pt"), "--out", str(tmp_path / "w")]) == 0
    assert "saved by 2 process(es), continued by 1" in capsys.readouterr().out
    devices = [("foo", "is not a device")] + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU")])
    for device, message in devices:
        assert message in error(capsys, "sample", "--ckpt", f["randar"], "--device", device)
        assert message in error(capsys, "extract", "--tokenizer", f["tok_a"], "--num-images", "2", "--out",
                                str(tmp_path / "c.pt"), "--device", device)
        assert message in error(capsys, "train", "--codes", f["codes_a"], "--model", "randar", "--preset", "tiny",
                                "--device", device, "--out", str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "c.pt") and not os.path.exists(tmp_path / "d")


def test_nll_evaluates_the_generators_own_count_and_finetune_recovery_its_real_batch(f, tmp_path, capsys):
    """nll: the default K is the one the generator trained at (here --keep 25, not the tokenizer's 16), and a RandAR
    model refuses another --keep; finetune-recovery refuses a batch larger than its codes (it trained on fewer)."""
    gen = os.path.join(train(tmp_path, "k25", f["codes_a"], "--steps", "1", "--keep", "25", model="llamagen"),
                       "last.pt")
    capsys.readouterr()
    assert train_stage2.main(["nll", "--ckpt", gen, "--codes", f["val_a"]]) == 0
    assert "at K=25" in capsys.readouterr().out
    err = error(capsys, "nll", "--ckpt", f["randar"], "--codes", f["val_a"], "--keep", "25")
    assert "--keep 25" in err and "K=16" in err, err
    err = error(capsys, "finetune-recovery", "--ckpt", f["randar"], "--codes", f["codes_a"], "--batch-size", "1000",
                "--out", str(tmp_path / "ft.pt"))
    assert "--batch-size 1000" in err and "16 rows" in err, err
