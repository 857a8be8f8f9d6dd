"""The scripts on a real GPU (cuda:0), tiny presets: a GPU user runs this file first. Skipped without CUDA.

One step of each training script (stage 1 with the GAN and the sample picture under the default bf16 autocast;
stage 2 for each generator; finetune-recovery), `sample` of each generator, `recon`; `--device cuda` without an
index and --deterministic; with two GPUs, a 2-process nccl step and a failing rank that ends the job.

    python -m pytest tests/test_cuda.py -q

tests/test_devices.py runs the same paths on the CPU with tensors on "another device" (tests/other_device.py), which
catches tensors and generators on the wrong device; this file catches what only a GPU shows (CUDA's kernels, bf16
autocast on CUDA, nccl)."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import evaluate
import train_stage1
import train_stage2
from conftest import random_tokenizer_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2 or
                              shutil.which("torchrun") is None, reason="needs 2 CUDA GPUs and torchrun")


@pytest.mark.parametrize("variant", ["g", "mergetok"])
def test_stage1_step_on_cuda(tmp_path, variant):
    """A step with the GAN on, the sample picture at the last step, the checkpoint: bf16 autocast by default."""
    out = str(tmp_path / variant)
    assert train_stage1.main(["--variant", variant, "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                              "--disc-start", "0", "--sample-every", "1", "--device", "cuda:0", "--out", out]) == 0
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert all(np.isfinite(row["recon"]) for row in rows)
    assert os.path.isfile(os.path.join(out, "samples_0000002.png"))
    assert torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["step"] == 2


def test_stage1_with_device_cuda_and_deterministic(tmp_path):
    """`--device cuda` (no index: cuda:LOCAL_RANK) and --deterministic (torch warns for a kernel without a
    deterministic version; the run goes on)."""
    try:
        assert train_stage1.main(["--variant", "g", "--preset", "tiny", "--steps", "1", "--batch-size", "4",
                                  "--sample-every", "100000", "--device", "cuda", "--deterministic",
                                  "--out", str(tmp_path / "det")]) == 0
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def stage2_files(tmp_path_factory):
    """A random-weight tiny tokenizer at 32 px (N = 64 tokens, K = 16) and the codes of 8 images."""
    d = tmp_path_factory.mktemp("cuda")
    tok = random_tokenizer_checkpoint(d / "stage1.pt", image_size=32, K=16, K_low=0, K_high=1)
    codes = str(d / "codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--num-images", "8", "--keep", "16",
                              "--device", "cuda:0", "--out", codes]) == 0
    return d, tok, codes


@pytest.mark.parametrize("kind", ["llamagen", "mergear", "randar"])
def test_stage2_step_and_sample_on_cuda(stage2_files, kind):
    """A training step (bf16 autocast) and `sample` with guidance (cached decoding on CUDA, a CUDA generator)."""
    d, _, codes = stage2_files
    out = str(d / kind)
    assert train_stage2.main(["train", "--codes", codes, "--model", kind, "--preset", "tiny", "--batch-size", "4",
                              "--steps", "2", "--device", "cuda:0", "--out", out]) == 0
    assert train_stage2.main(["sample", "--ckpt", os.path.join(out, "last.pt"), "--num-per-class", "1",
                              "--cfg", "2.0", "--device", "cuda:0", "--out", str(d / f"{kind}-samples")]) == 0
    assert np.load(d / f"{kind}-samples.npz")["arr_0"].shape == (10, 32, 32, 3)


def test_finetune_recovery_on_cuda(stage2_files):
    d, _, codes = stage2_files
    gen = str(d / "randar-ft")
    assert train_stage2.main(["train", "--codes", codes, "--model", "randar", "--preset", "tiny", "--batch-size",
                              "4", "--steps", "1", "--device", "cuda:0", "--out", gen]) == 0
    assert train_stage2.main(["finetune-recovery", "--ckpt", os.path.join(gen, "last.pt"), "--codes", codes,
                              "--val-codes", codes, "--steps", "2", "--batch-size", "4", "--device", "cuda:0",
                              "--out", str(d / "tuned.pt")]) == 0


def test_recon_on_cuda(stage2_files):
    d, tok, _ = stage2_files
    assert evaluate.main(["recon", "--ckpt", tok, "--max-images", "4", "--keep", "16", "--source", "both",
                          "--device", "cuda:0", "--out", str(d / "recon.json")]) == 0
    rows = json.loads((d / "recon.json").read_text())["rows"]
    assert len(rows) == 2 and all(np.isfinite(r["psnr"]) for r in rows)


@two_gpus
def test_two_processes_with_nccl(tmp_path):
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29581", "train_stage1.py", "--variant",
                           "g", "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--disc-start", "0",
                           "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


@two_gpus
def test_a_failing_rank_ends_an_nccl_job(tmp_path):
    """Rank 1 raises in step 2 while rank 0 is in that step's all-reduce: the job must end (non-zero) well before
    nccl's watchdog (10 minutes), not hang in a barrier."""
    from test_devices import FAILING_RANK
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=ROOT))
    proc = subprocess.run(["torchrun", "--nproc_per_node=2", "--master_port=29583", str(script), "--variant", "g",
                           "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--sample-every", "100000",
                           "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "a failure on rank 1 only" in proc.stderr, proc.stderr[-2000:]
