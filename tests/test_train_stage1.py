"""train_stage1.py: one step of every variant, the loss falls, gradients reach only their own networks, 2 processes
== 1 process (discriminator, LeCam and the adaptive weight included), exact resume (embedded data and an
ImageFolder with random crops, with and without workers), a clean stop on SIGTERM, clean exits under torchrun, and
one-line errors for bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import common
import tokenizer
import train_stage1
from conftest import assert_states_equal
from data import ShapesDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "train_stage1.py")


def run(tmp_path, name, *extra, variant="g"):
    out = str(tmp_path / name)
    code = train_stage1.main(["--variant", variant, "--preset", "tiny", "--out", out, "--log-every", "1",
                              "--sample-every", "100000", *extra])
    assert code == 0
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


def assert_same(a_out, b_out, keys=("model", "ema", "disc")):
    for key in keys:
        a, b = params(a_out, key), params(b_out, key)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{key}.{name}")


@pytest.mark.parametrize("variant", ["g", "gr", "r"])
def test_one_training_step_every_variant(tmp_path, variant):
    out = run(tmp_path, variant, "--steps", "1", "--batch-size", "4", "--disc-start", "0", variant=variant)
    row = read_log(out)[-1]
    for term in ["recon", "commit", "entropy", "recovery", "gan_g", "gan_lambda", "disc", "lecam"]:
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
    out = run(tmp_path, "fixed", "--data", data, "--steps", "40", "--batch-size", "8", "--keep", "64",
              "--disc-start", "1000", "--lr", "1e-3")
    log = read_log(out)
    first = np.mean([r["recon"] for r in log[:3]])
    last = np.mean([r["recon"] for r in log[-3:]])
    assert last < 0.5 * first, (first, last)        # measured at 32 px: 0.36 -> 0.11
    assert log[-1]["recovery"] < log[0]["recovery"]


def test_each_loss_reaches_only_its_own_network(tmp_path):
    """The generator's loss never reaches the discriminator, the discriminator's never reaches the tokenizer."""
    args = train_stage1.parse_args(["--variant", "g", "--preset", "tiny", "--batch-size", "2", "--disc-start", "0",
                                    "--out", str(tmp_path / "o")])
    run_ = train_stage1.setup(args, 0, 1, torch.device("cpu"))
    phase, leaks = ["generator"], []
    for p in run_.disc.parameters():
        p.register_hook(lambda g: leaks.append("generator loss -> discriminator") if phase[0] == "generator" else g)
    for p in run_.model.parameters():
        p.register_hook(lambda g: leaks.append("discriminator loss -> tokenizer") if phase[0] == "disc" else g)
    step_g = run_.opt_g.step

    def mark(*a, **k):                                                  # the tokenizer's step ends its phase
        phase[0] = "disc"
        return step_g(*a, **k)
    run_.opt_g.step = mark
    x = torch.stack([ShapesDataset("train", 32)[i][0] for i in range(2)])      # the tiny preset's 32 px
    terms = train_stage1.train_step(x, 36, 0, run_)
    assert {"gan_g", "disc", "lecam"} <= set(terms) and phase[0] == "disc"
    assert all(p.grad is not None for p in run_.disc.parameters())      # the discriminator did learn
    assert leaks == []


def test_resume_continues_exactly(tmp_path):
    args = ["--steps", "4", "--batch-size", "4", "--disc-start", "1", "--ckpt-every", "2"]
    straight = run(tmp_path, "straight", *args)
    half = run(tmp_path, "half", *args, "--stop-at", "2")           # the same run, interrupted after step 2
    resumed = run(tmp_path, "resumed", *args, "--resume", os.path.join(half, "last.pt"))
    assert_same(straight, resumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_on_an_image_folder_with_random_crops(tmp_path, workers):
    """Images of 80 px cropped at random to 64 px and flipped; 8 images, batch 4: 2 steps an epoch, so stopping at
    step 3 resumes in the middle of an epoch. A new loader iterator must not change the crops."""
    data = write_folder(tmp_path / "data", n=8, size=80)
    args = ["--data", data, "--steps", "4", "--batch-size", "4", "--disc-start", "1", "--workers", str(workers)]
    straight = run(tmp_path, "straight", *args)
    half = run(tmp_path, "half", *args, "--stop-at", "3")
    resumed = run(tmp_path, "resumed", *args, "--resume", os.path.join(half, "last.pt"))
    assert_same(straight, resumed)


def test_resume_refuses_other_settings_and_names_the_field(tmp_path, capsys):
    out = run(tmp_path, "ok", "--steps", "2", "--batch-size", "4", "--disc-start", "100")
    ckpt = os.path.join(out, "last.pt")
    for flag, value, field in [("--batch-size", "8", "batch_size"), ("--lr", "0.01", "lr")]:
        code = train_stage1.main(["--variant", "g", "--preset", "tiny", "--steps", "4", "--batch-size", "4",
                                  "--disc-start", "100", "--resume", ckpt, "--out", out, flag, value])
        err = capsys.readouterr().err
        assert code == 2 and f"{field}:" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one_process(tmp_path):
    """A 2-process gloo run equals a 1-process run with the same global batch, the discriminator included: its
    BatchNorm statistics cover the global batch (losses.SyncBatchNorm2d), LeCam's anchors and the adaptive weight's
    gradients are averaged over ranks, the LFQ codebook entropy sums the code distribution over ranks. The runs
    agree up to float reduction order. The 2-process run also shows none of the warnings a user used to see."""
    args = ["--variant", "g", "--preset", "tiny", "--steps", "3", "--batch-size", "4", "--disc-start", "1",
            "--log-every", "1", "--sample-every", "100000", "--lr", "1e-4",               # the paper's lr
            "--amp", "none"]                                  # equal up to float32 reduction order, not bf16's
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = str(tmp_path / "two")
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29533", SCRIPT, *args, "--out", two],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ["Warning", "\r"]:                        # FutureWarning, DDP's grad-stride UserWarning, tqdm in a log
        assert noise not in proc.stderr + proc.stdout, (noise, proc.stderr[-2000:])
    one = str(tmp_path / "one")
    subprocess.run([sys.executable, SCRIPT, *args, "--out", one], check=True, cwd=ROOT, env=env,
                   capture_output=True, timeout=300)
    log1, log2 = read_log(one), read_log(two)
    assert {"gan_g", "gan_lambda", "disc", "lecam"} <= set(log1[-1])
    for r1, r2 in zip(log1, log2):                                       # every loss term of every step
        for term in ["recon", "commit", "entropy", "recovery", "gan_g", "gan_lambda", "disc", "lecam"]:
            # the adaptive weight is a ratio of two gradient norms: it amplifies float noise (measured 4e-4 rel.);
            # computed from each process's own half batch it would differ by far more
            rel = 2e-3 if term == "gan_lambda" else 1e-4
            if term in r1:
                assert r2[term] == pytest.approx(r1[term], rel=rel, abs=1e-5), (r1["step"], term)
    # Parameters: Adam divides each gradient by its own running RMS, so a coordinate whose gradient is ~0 turns
    # reduction-order noise into a step of up to lr. Measured at lr 1e-4: max |diff| 6.3e-6 (at lr 1e-3, 1e-4).
    # The discriminator takes 2 Adam steps of lr 1e-4: a coordinate with a ~0 gradient may move by up to ~lr each
    # (measured max |diff| 4.4e-5, on 4e-6 of its parameters); a wrong BatchNorm or LeCam moves all of them.
    for key, atol in [("model", 3e-5), ("disc", 2e-4)]:
        a, b = params(one, key), params(two, key)
        far = 0
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=atol, msg=f"{key}.{name}")
            far += ((a[name] - b[name]).abs() > 1e-5).sum().item()
        assert far < 1e-4 * sum(p.numel() for p in a.values())
    for name, value in params(one, "lecam").items():
        torch.testing.assert_close(value, params(two, "lecam")[name], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_finished_torchrun_runs_exit_zero_and_count_skipped_files_once(tmp_path):
    """Short 2-process runs, repeated: every one exits 0 (a run that finished must never abort at teardown), and
    2 unreadable files are reported as 2, not once per rank."""
    data = write_folder(tmp_path / "data", n=8, corrupt=2)
    for i in range(2):
        proc = subprocess.run(["torchrun", "--nproc_per_node=2", f"--master_port={29540 + i}", SCRIPT, "--variant",
                               "g", "--preset", "tiny", "--data", data, "--steps", "2", "--batch-size", "4",
                               "--sample-every", "100000", "--out", str(tmp_path / f"r{i}")],
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "skipped 2 unreadable image(s)" in proc.stdout, proc.stdout[-2000:]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "term")
    args = [sys.executable, SCRIPT, "--variant", "g", "--preset", "tiny", "--batch-size", "2", "--steps", "500",
            "--disc-start", "1000", "--log-every", "1", "--sample-every", "100000", "--out", out]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "Traceback" not in stderr
    step = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["step"]
    assert step == read_log(out)[-1]["step"] >= 2                     # the checkpoint holds every logged step


def test_stale_temporary_checkpoints_are_removed(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "last.pt.tmp99999999").write_bytes(b"half a checkpoint")    # above any pid_max: a dead process
    (out / "last.pt.tmpnotes").write_text("not ours")                  # only <name>.tmp<pid> files are ours
    (out / f"last.pt.tmp{os.getppid()}").write_text("a live job's")      # a process that runs: its file stays
    run(tmp_path, "o", "--steps", "1", "--batch-size", "2", "--disc-start", "100")
    assert sorted(os.listdir(out)) == ["config.json", "last.pt", f"last.pt.tmp{os.getppid()}", "last.pt.tmpnotes",
                                       "log.jsonl", "samples_0000001.png"]
    assert "removed 1 unfinished checkpoint" in capsys.readouterr().out


# ---- bad input: one line on stderr, exit code 2, nothing trained ----------------------------------------------


def one_line_error(capsys, *argv):
    code = train_stage1.main(["--variant", "g", "--preset", "tiny", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = ["--out", str(tmp_path / "o")]
    assert "--steps must be at least 1, got 0" in one_line_error(capsys, "--steps", "0", *out)
    assert "--steps must be at least 1, got -3" in one_line_error(capsys, "--steps", "-3", *out)
    assert "--batch-size must be at least 1" in one_line_error(capsys, "--batch-size", "0", *out)
    assert "--log-every must be at least 1" in one_line_error(capsys, "--log-every", "0", *out)
    assert "--ckpt-every must be at least 1" in one_line_error(capsys, "--ckpt-every", "0", *out)
    assert "--lfq-bits must be at least 1" in one_line_error(capsys, "--lfq-bits", "0", *out)
    assert "--lfq-bits must be at most 24" in one_line_error(capsys, "--lfq-bits", "25", *out)
    assert "is an existing file" in one_line_error(capsys, "--out", str(tmp_path / "file"))
    assert "no such folder" in one_line_error(capsys, "--data", str(tmp_path / "nowhere"), *out)
    assert not os.path.exists(tmp_path / "o")                          # nothing was started


def test_paper_preset_without_a_gpu_stops_at_once(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = train_stage1.main(["--variant", "g", "--out", "/nonexistent/never-written"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no GPU" in err and "--preset tiny" in err and "--run-anyway" in err



def test_memory_estimate_is_printed_and_counts_mergetok_collision_blocks(capsys):
    """The paper MergeTok at 32 images per process (8 GPUs): the code-collision tables in blocks stay under 0.5 GB
    where one whole (B, N, N, d) float32 table is 32 * 1024^2 * 18 * 4 bytes = 2.4 GB; the estimate is printed."""
    cfg = train_stage1.build_tokenizer_config(train_stage1.parse_args(["--variant", "mergetok"]))
    parts = train_stage1.memory_estimate("mergetok", cfg, 32, "bf16", 0)
    assert cfg.num_tokens == 1024 and 0 < parts["collision"] < 0.5e9 < 32 * 1024 ** 2 * 18 * 4
    g = train_stage1.memory_estimate("g", train_stage1.build_tokenizer_config(
        train_stage1.parse_args(["--variant", "g"])), 32, "bf16", 0)
    assert "collision" not in g and parts["activations"] > g["activations"]     # two branches decoded
    train_stage1.main(["--variant", "mergetok", "--out", "/nonexistent/never-written"])
    out = capsys.readouterr().out
    assert "memory estimate per process" in out and "code-collision" in out

def test_bad_checkpoints_are_one_line_errors(tmp_path, capsys):
    out = run(tmp_path, "ok", "--steps", "1", "--batch-size", "4", "--disc-start", "100")
    ckpt = os.path.join(out, "last.pt")
    blob = open(ckpt, "rb").read()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint at all")
    new = ["--out", str(tmp_path / "t")]
    assert "truncated, corrupt" in one_line_error(capsys, "--resume", str(tmp_path / "trunc.pt"), *new)
    assert "empty (0 bytes)" in one_line_error(capsys, "--resume", str(tmp_path / "empty.pt"), *new)
    assert "junk.pt" in one_line_error(capsys, "--resume", str(tmp_path / "junk.pt"), *new)
    assert "no such file" in one_line_error(capsys, "--resume", str(tmp_path / "nope.pt"), *new)
    code = train_stage1.main(["--variant", "gr", "--preset", "tiny", "--resume", ckpt, *new])
    assert code == 2 and "variant 'g'" in capsys.readouterr().err


# ---- helpers and configuration ----------------------------------------------------------------------------


def test_non_finite_loss_names_the_term():
    terms = {"recon": torch.tensor(1.0), "entropy": torch.tensor(float("nan"))}
    with pytest.raises(FloatingPointError, match="entropy"):
        common.check_finite(terms, step=7)


def test_lr_schedules_and_ema_warm_up():
    assert common.lr_at(0, 1000, 1e-4, "step", (0.9,)) == pytest.approx(1e-4)
    assert common.lr_at(899, 1000, 1e-4, "step", (0.9,)) == pytest.approx(1e-4)
    assert common.lr_at(900, 1000, 1e-4, "step", (0.9,)) == pytest.approx(1e-5)
    assert common.lr_at(500, 1000, 1e-4, "cosine") == pytest.approx(0.5e-4)
    assert common.lr_at(1000, 1000, 1e-4, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert common.lr_at(4, 1000, 1e-4, "cosine", warmup=10) == pytest.approx(0.5e-4)
    assert common.ema_decay(0, 0.999) == pytest.approx(0.1)
    assert common.ema_decay(90, 0.999) == pytest.approx(0.91)
    assert common.ema_decay(10 ** 6, 0.999) == 0.999


def test_cli_defaults_are_table_a1_and_release_flags_override():
    paper = train_stage1.build_train_config(train_stage1.parse_args(["--variant", "gr"]))
    assert (paper.batch_size, paper.lr, paper.betas, paper.grad_clip, paper.ema) == (256, 1e-4, (0.5, 0.9), 5.0, 0.999)
    assert (paper.w_recon, paper.w_perceptual, paper.w_gan, paper.w_align, paper.recon_loss) == (1.0, 0.7, 0.8, 1.0, "l2")
    release = train_stage1.build_train_config(train_stage1.parse_args(
        ["--variant", "g", "--recon-loss", "l1", "--gan-loss", "non-saturating", "--gan-weight", "0.1",
         "--perceptual-weight", "1.0", "--align-loss", "kl"]))
    assert (release.recon_loss, release.gan_loss, release.w_gan, release.w_perceptual, release.align_loss) == \
        ("l1", "non-saturating", 0.1, 1.0, "kl")
    g = train_stage1.build_tokenizer_config(train_stage1.parse_args(["--variant", "g"]))
    assert (g.K, g.K_low, g.K_high, g.K_sampling) == (256, 0, 7, "exponential")       # Eq. (15): 256..529
    g_release = train_stage1.build_tokenizer_config(train_stage1.parse_args(
        ["--variant", "g", "--keep-sampling", "gaussian", "--keep-offsets", "-1", "7"]))
    assert (g_release.K_low, g_release.K_high, g_release.K_sampling) == (-1, 7, "gaussian")  # 225..529
    for variant in ["g", "mergetok"]:                   # --lfq-bits 18: the CPU figures measured before d = 10
        tiny = ["--variant", variant, "--preset", "tiny"]
        bits = [train_stage1.build_tokenizer_config(train_stage1.parse_args(tiny + flag)).z_channels
                for flag in [[], ["--lfq-bits", "18"], ["--lfq-bits", "7"]]]
        assert bits == [tokenizer.PRESETS["tiny"]["g"].z_channels, 18, 7]


# ---- nothing lost: run folders, the last step's checkpoint, exact resume of every variant ----------------------

# N = 64 (g) or 16 tokens, no sample pictures (a test that wants one asks for it after SMALL)
SMALL = ["--image-size", "32", "--keep", "16", "--batch-size", "2", "--disc-start", "1", "--sample-every", "0"]


def file_bytes(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}


def test_a_folder_that_holds_a_run_is_refused_unless_continued_or_overwritten(tmp_path, capsys):
    out = run(tmp_path, "a", *SMALL, "--steps", "2", "--stop-at", "1", "--sample-every", "1")
    before = file_bytes(out)
    for extra in [[], ["--lr", "inf"], ["--steps", "5"]]:                   # rerun, a bad lr, another length
        err = one_line_error(capsys, *SMALL, "--steps", "2", "--out", out, *extra)
        assert file_bytes(out) == before, extra                              # nothing rewritten, nothing appended
    assert "already holds a run" in err and f"--resume {out}/last.pt" in err and "--overwrite" in err, err
    other = run(tmp_path, "b", *SMALL, "--steps", "1")                        # continuing b's run into a's folder
    err = one_line_error(capsys, *SMALL, "--steps", "2", "--out", out, "--resume", os.path.join(other, "last.pt"))
    assert "holds another run" in err and file_bytes(out) == before, err
    err = one_line_error(capsys, *SMALL, "--steps", "2", "--out", out, "--resume", os.path.join(out, "last.pt"),
                         "--overwrite")
    assert "would delete --resume" in err and file_bytes(out) == before, err
    # continuing the run in its own folder appends; --overwrite starts over: the old log rows and pictures go
    run(tmp_path, "a", *SMALL, "--steps", "2", "--resume", os.path.join(out, "last.pt"))
    assert [r["step"] for r in read_log(out)] == [1, 2]
    finished = file_bytes(out)                                               # nothing left to train: nothing written
    err = one_line_error(capsys, *SMALL, "--steps", "2", "--out", out, "--resume", os.path.join(out, "last.pt"))
    assert "nothing to train" in err and file_bytes(out) == finished, err
    run(tmp_path, "a", *SMALL, "--steps", "1", "--overwrite")
    assert [r["step"] for r in read_log(out)] == [1]
    assert sorted(os.listdir(out)) == ["config.json", "last.pt", "log.jsonl"]          # the old picture is gone


def test_the_last_step_writes_its_checkpoint_before_its_picture_at_counts_the_tokenizer_reaches(tmp_path,
                                                                                                 monkeypatch):
    """At 32 px a G tokenizer has N = 64 tokens: the picture shows K = 16 (--keep) and 64, not the target's larger
    candidates (K = 144 > N stopped the run before its checkpoint). Its rows are captioned in a left margin."""
    out = run(tmp_path, "pic", *SMALL, "--steps", "1", "--sample-every", "1")
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["step"] == 1
    picture = Image.open(os.path.join(out, "samples_0000001.png"))
    rows = 1 + 2 + 1                                                          # original, K = 16 and 64, groups
    tile = 2 * 32 + 2                                                         # 32 px shown twice as large, 2 px gap
    assert picture.height == rows * tile + 2 and picture.width > 8 * tile + 2 + 20  # and a caption margin
    margin = np.asarray(picture.convert("L"))[:, :picture.width - (8 * tile + 2)]
    assert (margin < 128).sum() > 50                                          # black caption text

    def broken(*args):
        raise RuntimeError("the picture failed")
    monkeypatch.setattr(train_stage1, "write_samples", broken)
    with pytest.raises(RuntimeError, match="the picture failed"):
        train_stage1.main(["--variant", "g", "--preset", "tiny", *SMALL, "--steps", "1", "--sample-every", "1",
                           "--out", str(tmp_path / "broken")])
    assert torch.load(tmp_path / "broken" / "last.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("variant", ["g", "gr", "r", "mergetok"])
def test_resume_is_exact_for_every_variant(tmp_path, variant):
    """2 steps straight = 1 step, then --resume for 1, bit for bit: weights, EMA, discriminator, both optimizers.
    MergeTok's posterior noise draws from its own generator, saved in the checkpoint (it used to share the global
    RNG with the new DataLoader iterator a resume builds, and drifted by up to 1.8e-3)."""
    args = [*SMALL, "--steps", "2"]                                          # the GAN starts at the resumed step
    straight = run(tmp_path, "straight", *args, variant=variant)
    half = run(tmp_path, "half", *args, "--stop-at", "1", variant=variant)
    run(tmp_path, "half", *args, "--resume", os.path.join(half, "last.pt"), variant=variant)
    a, b = (torch.load(os.path.join(o, "last.pt"), weights_only=True) for o in (straight, half))
    for key in ["model", "ema", "disc", "lecam", "opt_g", "opt_d"]:
        assert_states_equal(a[key], b[key], key)


def test_resume_checks_every_entry_and_says_when_the_number_of_processes_changed(tmp_path, capsys):
    """A checkpoint lacking a weight or an optimizer entry is one line naming the file and the entry (it used to be
    load_state_dict's traceback); a checkpoint of 2 processes resumed by 1 says so in the printed log."""
    out = run(tmp_path, "ok", *SMALL, "--steps", "2", "--stop-at", "1")
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    for key, drop in [("model", next(iter(ckpt["model"]))), ("opt_g", "state"), ("lecam", "*")]:
        broken = {**ckpt, key: {k: v for k, v in ckpt[key].items() if k != drop and drop != "*"}}
        common.save_checkpoint(tmp_path / "broken.pt", broken)
        err = one_line_error(capsys, *SMALL, "--steps", "2", "--resume", str(tmp_path / "broken.pt"),
                             "--out", str(tmp_path / f"r-{key}"))
        assert "broken.pt" in err and repr(key) in err, err
    common.save_checkpoint(tmp_path / "two.pt", {**ckpt, "world_size": 2})   # as if written by 2 processes
    run(tmp_path, "w2", *SMALL, "--steps", "2", "--resume", str(tmp_path / "two.pt"))
    assert "saved by 2 process(es), continued by 1" in capsys.readouterr().out


def test_unusable_output_paths_and_devices_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "which is a file" in one_line_error(capsys, *SMALL, "--out", str(tmp_path / "file" / "run"))
    assert "is not a device" in one_line_error(capsys, *SMALL, "--device", "foo", "--out", str(tmp_path / "o"))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in one_line_error(capsys, *SMALL, "--device", "cuda", "--out", str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_sigterm_to_torchrun_saves_and_torchrun_reports_the_signal(tmp_path):
    """What a scheduler sees (docs/runs.md says it): the workers end their step, save and exit 0, and torchrun itself,
    once signalled, exits 1 with a SignalException; the checkpoint holds every logged step."""
    out = str(tmp_path / "term")
    proc = subprocess.Popen(["torchrun", "--nproc_per_node=2", "--master_port=29547", SCRIPT, "--variant", "g",
                             "--preset", "tiny", *SMALL, "--steps", "500", "--log-every", "1", "--out", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert "stopped by SIGTERM" in stdout, stdout[-2000:]
    assert proc.returncode == 1 and "SignalException" in stderr, (proc.returncode, stderr[-2000:])
    step = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["step"]
    assert step == read_log(out)[-1]["step"] >= 2
