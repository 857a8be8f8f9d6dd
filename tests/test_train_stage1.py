"""train_stage1.py: one step of every variant, the loss falls, 2 processes == 1 process, exact resume, bad input."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train_stage1
from data import ShapesDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, name, *extra, variant="g"):
    out = str(tmp_path / name)
    train_stage1.main(["--variant", variant, "--preset", "tiny", "--out", out, "--log-every", "1",
                       "--sample-every", "100000", *extra])
    return out


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def params(out, key="model"):
    return torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)[key]


def write_folder(root, n=8, size=64, corrupt=0):
    """A tiny ImageFolder made from the embedded shapes (and `corrupt` junk files)."""
    ds = ShapesDataset("val", size=size)
    for i in range(n):
        img, label = ds[i]
        d = root / f"class_{label}"
        d.mkdir(parents=True, exist_ok=True)
        arr = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i}.png")
    for j in range(corrupt):
        (root / "class_0").mkdir(parents=True, exist_ok=True)
        (root / "class_0" / f"broken_{j}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return str(root)


@pytest.mark.parametrize("variant", ["g", "gr", "r"])
def test_one_training_step_every_variant(tmp_path, variant):
    out = run(tmp_path, variant, "--steps", "1", "--batch-size", "4", "--disc-start", "0", variant=variant)
    row = read_log(out)[-1]
    for term in ["recon", "commit", "entropy", "recovery", "gan_g", "disc", "lecam"]:
        assert np.isfinite(row[term]), term
    ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["variant"] == variant
    assert {"model", "ema", "disc", "lecam", "opt_g", "opt_d", "rng", "tokenizer_config"} <= set(ckpt)


def test_bf16_autocast_training_step(tmp_path):
    # bf16 matmuls and convs are emulated (slow) on CPUs without bf16 units: one small step is enough to catch
    # dtype bugs in every loss term (discriminator on).
    out = run(tmp_path, "bf16", "--steps", "1", "--batch-size", "2", "--disc-start", "0", "--amp", "bf16")
    assert all(np.isfinite(v) for k, v in read_log(out)[-1].items() if isinstance(v, float))
    assert all(torch.isfinite(p).all() for p in params(out).values() if p.is_floating_point())


def test_loss_falls_on_a_fixed_batch(tmp_path):
    data = write_folder(tmp_path / "data", n=8)
    out = run(tmp_path, "fixed", "--data", data, "--steps", "30", "--batch-size", "8", "--keep", "64",
              "--disc-start", "1000", "--lr", "1e-3")
    log = read_log(out)
    first = np.mean([r["recon"] for r in log[:3]])
    last = np.mean([r["recon"] for r in log[-3:]])
    assert last < 0.5 * first, (first, last)        # measured: 0.43 -> 0.12
    assert log[-1]["recovery"] < log[0]["recovery"]


def test_resume_continues_exactly(tmp_path):
    common = ["--steps", "4", "--batch-size", "4", "--disc-start", "1", "--ckpt-every", "2"]
    straight = run(tmp_path, "straight", *common)
    half = run(tmp_path, "half", *common, "--stop-at", "2")         # the same run, interrupted after step 2
    resumed = run(tmp_path, "resumed", *common, "--resume", os.path.join(half, "last.pt"))
    for key in ["model", "ema", "disc"]:
        a, b = params(straight, key), params(resumed, key)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{key}.{name}")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one_process(tmp_path):
    """A 2-process gloo run equals a 1-process run with the same global batch.

    The PatchGAN discriminator is kept off (--disc-start beyond the run): its BatchNorm uses per-process batch
    statistics (as taming and the authors' release do), so with the discriminator on, 2 processes of 2 images and
    1 process of 4 images are different models by design. Everything else is per-sample or all-reduced (the LFQ
    codebook entropy averages the code distribution over ranks), so the two runs agree up to float reduction order.
    """
    args = ["--variant", "g", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--disc-start", "100",
            "--log-every", "1", "--sample-every", "100000", "--lr", "1e-4"]               # the paper's lr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = str(tmp_path / "two")
    subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29533", os.path.join(ROOT, "train_stage1.py"),
                    *args, "--out", two], check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    one = str(tmp_path / "one")
    subprocess.run([sys.executable, os.path.join(ROOT, "train_stage1.py"), *args, "--out", one], check=True,
                   cwd=ROOT, env=env, capture_output=True, timeout=300)
    for r1, r2 in zip(read_log(one), read_log(two)):                  # every loss term of every step
        for term in ["recon", "commit", "entropy", "recovery"]:
            assert r2[term] == pytest.approx(r1[term], rel=1e-4, abs=1e-5), (r1["step"], term)
    # Parameters: Adam divides each gradient by its own running RMS, so a coordinate whose gradient is ~0 turns
    # reduction-order noise into a step of up to lr. Measured at lr 1e-4: max |diff| 6.3e-6 (at lr 1e-3, 1e-4).
    a, b = params(one), params(two)
    far = 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=3e-5, msg=name)
        far += ((a[name] - b[name]).abs() > 1e-5).sum().item()
    assert far < 1e-4 * sum(p.numel() for p in a.values())


# ---- bad input ---------------------------------------------------------------------------------------------


def test_wrong_variant_is_a_clear_cli_error():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_stage1.py"), "--variant", "x"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice: 'x'" in proc.stderr


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_stage1.py"), "--variant", "g", "--preset",
                           "tiny", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    data = write_folder(tmp_path / "data", n=8, corrupt=2)
    run(tmp_path, "c", "--data", data, "--steps", "3", "--batch-size", "4", "--disc-start", "100")
    assert "skipped 2 unreadable image" in capsys.readouterr().out


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    out = run(tmp_path, "ok", "--steps", "1", "--batch-size", "4", "--disc-start", "100")
    ckpt = os.path.join(out, "last.pt")
    with open(ckpt, "rb") as f:
        blob = f.read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        train_stage1.main(["--variant", "g", "--preset", "tiny", "--resume", str(trunc), "--out", str(tmp_path / "t")])
    with pytest.raises(ValueError, match="variant 'g'"):
        train_stage1.main(["--variant", "gr", "--preset", "tiny", "--resume", ckpt, "--out", str(tmp_path / "t2")])
    with pytest.raises(FileNotFoundError):
        train_stage1.main(["--variant", "g", "--preset", "tiny", "--resume", str(tmp_path / "nope.pt")])


def test_non_finite_loss_names_the_term():
    terms = {"recon": torch.tensor(1.0), "entropy": torch.tensor(float("nan"))}
    with pytest.raises(FloatingPointError, match="entropy"):
        train_stage1.check_finite(terms, step=7)


def test_lr_schedules():
    cfg = train_stage1.TRAIN_PRESETS["paper"]["g"]
    assert train_stage1.lr_at(0, 1000, cfg) == pytest.approx(1e-4)
    assert train_stage1.lr_at(899, 1000, cfg) == pytest.approx(1e-4)
    assert train_stage1.lr_at(900, 1000, cfg) == pytest.approx(1e-5)
    cos = train_stage1.TRAIN_PRESETS["paper"]["r"]
    assert train_stage1.lr_at(500, 1000, cos) == pytest.approx(0.5e-4)
    assert train_stage1.lr_at(1000, 1000, cos) == pytest.approx(0.0, abs=1e-12)


def test_cli_defaults_are_table_a1_and_release_flags_override():
    paper = train_stage1.build_train_config(train_stage1.parse_args(["--variant", "gr"]))
    assert (paper.batch_size, paper.lr, paper.betas, paper.grad_clip, paper.ema) == (256, 1e-4, (0.5, 0.9), 5.0, 0.999)
    assert (paper.w_recon, paper.w_perceptual, paper.w_gan, paper.w_align, paper.recon_loss) == (1.0, 0.7, 0.8, 1.0, "l2")
    release = train_stage1.build_train_config(train_stage1.parse_args(
        ["--variant", "g", "--recon-loss", "l1", "--gan-loss", "non-saturating", "--gan-weight", "0.1",
         "--perceptual-weight", "1.0", "--align-loss", "kl"]))
    assert (release.recon_loss, release.gan_loss, release.w_gan, release.w_perceptual, release.align_loss) == \
        ("l1", "non-saturating", 0.1, 1.0, "kl")
