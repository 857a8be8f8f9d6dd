"""What changes on a GPU, checked without one.

Device mistakes: tests/other_device.py gives tensors on "another device" that compute on the CPU and refuse to be
mixed with CPU tensors, as CUDA refuses (and generators on the wrong device). The scripts run there end to end with
`--device meta` (the other device's name): a stage-1 training step with the GAN and the sample picture, a stage-2
training step and `sample` of each generator, `finetune-recovery`, `recon`; and the DINOv2 weight selection. Where
a run draws random numbers, its results equal the CPU run's (the same generator stream).

Processes and settings: `--device cuda` takes its index from LOCAL_RANK; a rank that fails ends the job instead of
waiting in a barrier; `evaluate.py probe` ends the process group before rank 0 trains alone; --deterministic.
tests/test_cuda.py runs the scripts on a real GPU (skipped without one)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

import common
import evaluate
import losses
import train_stage1
import train_stage2
from conftest import random_tokenizer_checkpoint
from other_device import OTHER, on_other_device
from tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# conftest.py: one thread. The other device runs every op through Python; with a second thread on a busy 2-core
# machine each small op waits for it (a stage-1 step: 27 s instead of 4 s).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# The other device itself
# ----------------------------------------------------------------------------------------------------------------


def test_the_other_device_refuses_what_cuda_refuses(tmp_path):
    with on_other_device():
        x = torch.arange(4.0).to(OTHER)
        assert x.device == OTHER and (x * 2).cpu().tolist() == [0.0, 2.0, 4.0, 6.0]   # values: the CPU's
        assert torch.zeros(2, device=x.device).device == OTHER
        assert (x + torch.tensor(1.0)).cpu().tolist() == [1.0, 2.0, 3.0, 4.0]        # a 0-d CPU scalar: as CUDA
        assert x[torch.tensor([0, 3])].cpu().tolist() == [0.0, 3.0]                   # a CPU index: as CUDA
        for stray in (lambda: x + torch.ones(4), lambda: x.index_select(0, torch.tensor([1])),
                      lambda: torch.cat([x, torch.ones(1)]), lambda: torch.ones(4)[x.long()]):
            with pytest.raises(RuntimeError, match="same device"):      # both messages say so
                stray()
        with pytest.raises(RuntimeError, match="generator on cpu"):
            torch.multinomial(x + 1, 1, generator=torch.Generator().manual_seed(0))
        draw = torch.multinomial(x + 1, 2, generator=torch.Generator(OTHER).manual_seed(0))
        assert draw.device == OTHER
        torch.save({"x": x}, tmp_path / "x.pt")
    on_cpu = torch.multinomial(torch.arange(4.0) + 1, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw.cpu(), on_cpu)                                    # the same stream
    assert torch.load(tmp_path / "x.pt", weights_only=True)["x"].device.type == "cpu"


# ----------------------------------------------------------------------------------------------------------------
# Stage 1 on the other device
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["g", "mergetok"])
def test_stage1_step_and_sample_picture_on_another_device(tmp_path, variant):
    """The tokenizer's forward and loss, the discriminator's step and the sample picture (which mixes the batch with
    data.overlay's CPU pictures) on the other device; the checkpoint loads on the CPU."""
    out = str(tmp_path / variant)
    with on_other_device():
        code = train_stage1.main(["--variant", variant, "--preset", "tiny", "--image-size", "32", "--keep", "16",
                                  "--steps", "1", "--batch-size", "2", "--disc-start", "0" if variant == "g" else "100",
                                  "--device", "meta", "--out", out])
    assert code == 0
    assert os.path.isfile(os.path.join(out, "samples_0000001.png"))
    ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())
    with open(os.path.join(out, "log.jsonl")) as f:
        row = json.loads(f.readline())
    assert np.isfinite(row["recon"]) and ("disc" in row) == (variant == "g")


def test_dinov2_weight_selection_on_another_device():
    """The teacher's weights and the encoder on the other device: the index of the selection follows them."""
    torch.manual_seed(0)
    teacher = losses.DINOv2(embed_dim=96, depth=4, num_heads=4, img_size=56)
    on_cpu = build_tokenizer("g", "tiny", embed_dim=64, ch=16, enc_heads=4)
    elsewhere = build_tokenizer("g", "tiny", embed_dim=64, ch=16, enc_heads=4)
    on_cpu.load_dinov2_selection(teacher.state_dict())
    with on_other_device():
        elsewhere.to(OTHER)
        loaded = elsewhere.load_dinov2_selection(teacher.to(OTHER).state_dict())
        got = {k: v.cpu() for k, v in elsewhere.encoder.state_dict().items()}
    assert "blocks.0.attn.qkv.weight" in loaded
    for key in loaded:
        assert torch.equal(got[key], on_cpu.encoder.state_dict()[key]), key


# ----------------------------------------------------------------------------------------------------------------
# Stage 2 on the other device: a training step and `sample` of each generator, finetune-recovery
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2_files(tmp_path_factory):
    """A random-weight tiny tokenizer at 16 px (N = 16 tokens, K = 4) and the codes of 4 images."""
    d = tmp_path_factory.mktemp("devices")
    tok = random_tokenizer_checkpoint(d / "stage1.pt", image_size=16, K=4, K_low=0, K_high=1)
    codes = str(d / "codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--num-images", "4", "--keep", "4", "--out", codes]) == 0
    return d, tok, codes


@pytest.mark.parametrize("kind", ["llamagen", "mergear", "randar"])
def test_stage2_step_and_sampling_on_another_device(stage2_files, kind):
    """One training step of each generator on the other device, then `sample` there: every draw takes a generator
    on the device it draws on (randar's orders, the tokens), and the images equal those sampled on the CPU."""
    d, _, codes = stage2_files
    out = str(d / kind)
    with on_other_device():
        assert train_stage2.main(["train", "--codes", codes, "--model", kind, "--preset", "tiny", "--batch-size",
                                  "2", "--steps", "1", "--device", "meta", "--out", out]) == 0
        assert train_stage2.main(["sample", "--ckpt", os.path.join(out, "last.pt"), "--num-per-class", "1",
                                  "--device", "meta", "--out", str(d / f"{kind}-other")]) == 0
    assert train_stage2.main(["sample", "--ckpt", os.path.join(out, "last.pt"), "--num-per-class", "1",
                              "--device", "cpu", "--out", str(d / f"{kind}-cpu")]) == 0
    other, cpu = np.load(d / f"{kind}-other.npz"), np.load(d / f"{kind}-cpu.npz")
    assert np.array_equal(other["labels"], cpu["labels"])
    # the same codes: at most a pixel's rounding apart (the attention kernels differ in the last bits; another code
    # would change a whole patch)
    diff = np.abs(other["arr_0"].astype(int) - cpu["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_finetune_recovery_on_another_device(stage2_files, capsys):
    """finetune-recovery draws the generator's tokens (and recovery_accuracy its held-out ones) on the model's
    device; the accuracies equal the CPU run's, and so do the fine-tuned weights up to float noise."""
    d, _, codes = stage2_files
    gen = str(d / "randar-ft")
    assert train_stage2.main(["train", "--codes", codes, "--model", "randar", "--preset", "tiny", "--batch-size",
                              "2", "--steps", "1", "--out", gen]) == 0
    args = ["finetune-recovery", "--ckpt", os.path.join(gen, "last.pt"), "--codes", codes, "--val-codes", codes,
            "--steps", "2", "--batch-size", "2"]
    accuracies = {}
    for where in ("other", "cpu"):
        capsys.readouterr()
        with on_other_device() if where == "other" else contextlib.nullcontext():
            assert train_stage2.main(args + ["--device", "meta" if where == "other" else "cpu",
                                             "--out", str(d / f"ft-{where}.pt")]) == 0
        accuracies[where] = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line]
    assert len(accuracies["cpu"]) == 2 and accuracies["other"] == accuracies["cpu"]
    other, cpu = (torch.load(d / f"ft-{w}.pt", weights_only=True)["ema"] for w in ("other", "cpu"))
    for key in cpu:
        # the attention kernels differ in the last bits, and AdamW divides each gradient by its own size: measured
        # 4e-7 after a step (lr 1e-4); another draw would change the data and the weights by far more
        torch.testing.assert_close(other[key], cpu[key], rtol=1e-4, atol=1e-5, msg=key)


def test_recon_on_another_device(stage2_files):
    """evaluate.py recon (the predicted source too) on the other device gives the CPU's figures."""
    d, tok, _ = stage2_files
    args = ["recon", "--ckpt", tok, "--max-images", "2", "--keep", "4", "--source", "both", "--batch-size", "2"]
    with on_other_device():
        assert evaluate.main(args + ["--device", "meta", "--out", str(d / "recon-other.json")]) == 0
    assert evaluate.main(args + ["--device", "cpu", "--out", str(d / "recon-cpu.json")]) == 0
    other, cpu = (json.loads((d / f"recon-{w}.json").read_text())["rows"] for w in ("other", "cpu"))
    for a, b in zip(other, cpu):
        for key in ("psnr", "ssim", "recovery_accuracy", "thumb_psnr"):
            if b[key] is None:                                              # recovery accuracy of a true-source row
                assert a[key] is None, key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


# ----------------------------------------------------------------------------------------------------------------
# Processes: the GPU index, a failing rank, probe's rank 0, --deterministic
# ----------------------------------------------------------------------------------------------------------------


def test_device_cuda_without_index_takes_local_rank(monkeypatch):
    """`--device cuda` on the process of LOCAL_RANK 1: cuda:1 (torch.cuda.set_device and DDP need the index)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    _, _, device = common.setup_distributed("cuda")
    assert device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    _, _, device = common.setup_distributed("cuda:0")
    assert device == torch.device("cuda", 0)


@pytest.mark.parametrize("avx512_bf16, amx, want", [(True, False, "bf16"), (False, True, "bf16"),
                                                     (False, False, "none")])
def test_default_amp_is_bf16_where_the_device_computes_it(monkeypatch, avx512_bf16, amx, want):
    """No --amp: bf16 autocast on a GPU and on a CPU with AVX512-BF16 or AMX (the GPU's precision path on every
    such CPU run); float32 on a CPU that would emulate bf16, and on any other device."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert common.default_amp(torch.device("cpu")) == want
    assert common.default_amp(torch.device("cuda", 0)) == "bf16"
    assert common.default_amp(torch.device("meta")) == "none"


@pytest.mark.parametrize("native", [True, False])
def test_training_scripts_take_the_default_amp(stage2_files, tmp_path, monkeypatch, native):
    """Without --amp, stage 1 and stage 2 train under the autocast common.default_amp picks for the CPU; --amp
    none wins over it."""
    monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
    want = "bf16" if native else "none"
    _, _, codes = stage2_files
    cpu = torch.device("cpu")
    for extra, expected in [([], want), (["--amp", "none"], "none")]:
        args = train_stage1.parse_args(["--variant", "g", "--preset", "tiny", "--batch-size", "2", *extra,
                                        "--out", str(tmp_path / f"s1{len(extra)}")])
        assert train_stage1.setup(args, 0, 1, cpu).amp == expected
        args = train_stage2.build_parser().parse_args(["train", "--codes", codes, "--model", "llamagen", "--preset",
                                                       "tiny", "--batch-size", "2", *extra,
                                                       "--out", str(tmp_path / f"s2{len(extra)}")])
        assert train_stage2.setup(args, 0, 1, cpu).amp == expected


FAILING_RANK = """
import sys
sys.path.insert(0, {root!r})
import train_stage1
real_step = train_stage1.train_step


def train_step(x, K, step, run):                      # rank 1 fails in its second step, rank 0 goes on
    if run.rank == 1 and step == 1:
        raise RuntimeError("CUDA out of memory (a failure on rank 1 only)")
    return real_step(x, K, step, run)


train_stage1.train_step = train_step
sys.exit(train_stage1.main(sys.argv[1:]))
"""


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_a_failing_rank_ends_the_job(tmp_path):
    """Rank 1 raises in step 2 while rank 0 is in that step's collectives. It must not wait in a barrier (nccl would
    pair it with rank 0's all-reduce and hang until the watchdog): the job ends, non-zero, in seconds."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=ROOT))
    proc = subprocess.Popen(["torchrun", "--nproc_per_node=2", "--master_port=29571", str(script), "--variant", "g",
                             "--preset", "tiny", "--image-size", "32", "--keep", "16", "--steps", "4", "--batch-size",
                             "4", "--sample-every", "100000", "--out", str(tmp_path / "run")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:                  # the hang this guards against: end torchrun and its workers
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a rank failed and the job hung instead of ending (a barrier after the failure?)")
    assert proc.returncode != 0 and "a failure on rank 1 only" in stderr, stderr[-2000:]


def _probe_worker(rank, world, port, ckpt, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    seen = []
    real_probe = evaluate.linear_probe

    def linear_probe(*args, **kwargs):                # what rank 0 sees when it starts training alone
        seen.append(dist.is_available() and dist.is_initialized())
        return real_probe(*args, **kwargs)
    evaluate.linear_probe = linear_probe
    code = evaluate.main(["probe", "--ckpt", ckpt, "--max-images", "4", "--epochs", "1", "--extract-batch-size", "2",
                          "--device", "cpu", "--out", f"{result}.json"])
    torch.save({"code": code, "group_alive_in_probe": seen}, f"{result}.{rank}")


def test_probe_ends_the_process_group_before_rank_0_trains(stage2_files, tmp_path):
    """The other ranks must not wait in a barrier while rank 0 trains the probe (90 epochs on ImageNet: past nccl's
    timeout): every rank ends the group after the features are gathered, and rank 0 trains with none."""
    _, tok, _ = stage2_files
    torch.multiprocessing.spawn(_probe_worker, args=(2, 29573, tok, str(tmp_path / "probe")), nprocs=2, join=True)
    results = [torch.load(f"{tmp_path / 'probe'}.{r}") for r in (0, 1)]
    assert [r["code"] for r in results] == [0, 0]
    assert results[0]["group_alive_in_probe"] == [False] and results[1]["group_alive_in_probe"] == []
    assert json.loads((tmp_path / "probe.json").read_text())["num_train"] == 4


def test_deterministic_flag(tmp_path, monkeypatch):
    """--deterministic: deterministic kernels (warn where torch has none), cuBLAS's fixed workspace, cuDNN without
    autotuning. A CPU run with it trains without a warning (none of its kernels is flagged). Stage 2's train too."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert train_stage1.main(["--variant", "g", "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                                      "--disc-start", "0", "--sample-every", "100000", "--deterministic",
                                      "--out", str(tmp_path / "det")]) == 0
        assert not [str(w.message) for w in caught]
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
    assert train_stage2.build_parser().parse_args(["train", "--codes", "c.pt", "--model", "randar",
                                                   "--deterministic"]).deterministic
