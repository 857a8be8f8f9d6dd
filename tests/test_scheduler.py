"""Nothing lost under a scheduler (docs/runs.md): a stop request is honoured inside a long step, on every rank at
the same point, and the step it cuts short resumes exactly; workers end when their torchrun launcher is killed; one
job at a time in a run folder (a second is refused naming the holder, under torchrun in the first line of output; a
dead holder's lock blocks nothing); no command writes over another run's checkpoint, codes or samples; sample sets
carry their settings in their names; a signal during `sample` or `extract` leaves no partial file; a run that failed
before its first checkpoint reruns without --overwrite. Real commands on tiny presets: a random-init tokenizer at
32 px (N = 64 tokens, K = 16), GPT tiny."""
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

import common
import evaluate
import train_stage1
import train_stage2
from conftest import assert_states_equal, random_tokenizer_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")     # the in-process runs: tiny models, one thread is faster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1, STAGE2 = os.path.join(ROOT, "train_stage1.py"), os.path.join(ROOT, "train_stage2.py")
# what `torchrun --standalone` runs (a free port on this machine)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# stage 1 at 32 px (N = 64 tokens), K = 16, batch 2, no pictures: about 0.1 s a step
SMALL = ["--variant", "g", "--preset", "tiny", "--image-size", "32", "--keep", "16", "--batch-size", "2",
         "--sample-every", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def f(tmp_path_factory):
    """A tokenizer, its codes of 128 images and their mirrors (256 rows), a one-step llamagen run on them."""
    d = tmp_path_factory.mktemp("scheduler")
    tok = random_tokenizer_checkpoint(d / "tok.pt", 0, image_size=32, K=16, K_low=0, K_high=2)
    codes = str(d / "codes.pt")
    assert train_stage2.main(["extract", "--tokenizer", tok, "--keep", "16", "--num-images", "128", "--flip",
                              "--out", codes]) == 0
    gen = train2(d / "gen", codes, "--steps", "1")
    return {"dir": d, "tok": tok, "codes": codes, "gen": os.path.join(gen, "last.pt")}


def train2(out, codes, *extra, model="llamagen"):
    assert train_stage2.main(["train", "--codes", codes, "--model", model, "--preset", "tiny", "--gpt", "tiny",
                              "--batch-size", "4", "--log-every", "1", "--out", str(out), *extra]) == 0
    return str(out)


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def ckpt_step(out):
    return torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["step"]


def wait_for_log_rows(out, n, proc, deadline=240):
    """Until the run's log holds n rows (or its process ended)."""
    log, end = os.path.join(out, "log.jsonl"), time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if os.path.exists(log) and len(open(log).readlines()) >= n:
            return
        time.sleep(0.1)
    for pid in [*workers(proc.pid).values(), proc.pid]:          # nothing lingers after the failure
        os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"{out}: {n} log rows never came (exit {proc.poll()})")


def workers(launcher_pid):
    """{RANK: pid} of a torchrun launcher's worker processes (its children, read from /proc)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        if ppid == launcher_pid and b"RANK" in env:
            found[int(env[b"RANK"])] = int(pid)
    return found


def finish(proc, timeout):
    """proc.communicate(timeout); on a timeout (a hang: the failure this file guards against) the launcher and its
    workers are killed before the test fails, so that none lingers."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*workers(proc.pid).values(), proc.pid]:
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        raise


def ended(pid):
    """Whether a process is gone (or a zombie waiting for a reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def one_line(capsys, main, *argv, code=2):
    capsys.readouterr()
    assert main(list(argv)) == code, argv
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    return err, captured.out


# ---- 1. a stop inside a long step: at once, on every rank, and the dropped step resumes exactly ----------------


def test_sigterm_inside_a_long_step_saves_the_step_before_at_once(f, tmp_path):
    """--grad-accum 256: a step of 256 one-sequence pieces (seconds). SIGTERM once step 1 is logged: the run stops
    after the piece under way and writes step 1's checkpoint; waiting for the end of step 2 would have saved step 2."""
    out = str(tmp_path / "long")
    proc = subprocess.Popen([sys.executable, STAGE2, "train", "--codes", f["codes"], "--model", "llamagen",
                             "--preset", "tiny", "--gpt", "tiny", "--batch-size", "256", "--grad-accum", "256",
                             "--steps", "4", "--log-every", "1", "--out", out],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log_rows(out, 1, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = finish(proc, 240)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM at step 1 (step 2 was under way" in stdout, stdout[-2000:]
    assert ckpt_step(out) == 1 and [r["step"] for r in read_log(out)] == [1]
    assert not os.path.exists(os.path.join(out, "run.lock"))                 # released on the way out


def signal_on_call(monkeypatch, owner, name, call):
    """SIGTERM to this process from inside the `call`-th call of owner.name (a forward inside a step)."""
    original, calls = getattr(owner, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapped)


def test_a_step_stopped_inside_resumes_exactly_stage2(f, tmp_path, monkeypatch, capsys):
    """Stage 2, --grad-accum 2, dropout on: SIGTERM during step 2's first piece. The step is dropped where it stands:
    its dropout draws are put back, so step 1's checkpoint resumed to step 3 equals the straight run bit for bit."""
    args = ["--steps", "3", "--grad-accum", "2", "--dropout", "0.1", "--amp", "none"]
    straight = train2(tmp_path / "straight", f["codes"], *args)
    signal_on_call(monkeypatch, train_stage2.Stage2Loss, "forward", 3)       # step 2, piece 1 of 2
    cut = train2(tmp_path / "cut", f["codes"], *args)
    assert "(step 2 was under way" in capsys.readouterr().out and ckpt_step(cut) == 1
    monkeypatch.undo()
    train2(cut, f["codes"], *args, "--resume", os.path.join(cut, "last.pt"))
    a, b = (torch.load(os.path.join(o, "last.pt"), weights_only=True) for o in (straight, cut))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(cut)]


def test_a_step_stopped_inside_resumes_exactly_stage1(tmp_path, monkeypatch, capsys):
    """Stage 1 with the GAN on: SIGTERM during step 2's forward stops it before the tokenizer's update. That forward
    updated the discriminator's BatchNorm statistics: they are put back, and resumed, the run equals the straight one
    in every state, buffers and RNG states included."""
    args = [*SMALL, "--disc-start", "0", "--steps", "2"]
    assert train_stage1.main([*args, "--out", str(tmp_path / "straight")]) == 0
    signal_on_call(monkeypatch, train_stage1.Stage1Forward, "forward", 2)     # step 2's forward
    cut = str(tmp_path / "cut")
    assert train_stage1.main([*args, "--out", cut]) == 0
    assert "(step 2 was under way" in capsys.readouterr().out and ckpt_step(cut) == 1
    monkeypatch.undo()
    assert train_stage1.main([*args, "--out", cut, "--resume", os.path.join(cut, "last.pt")]) == 0
    a, b = (torch.load(os.path.join(o, "last.pt"), weights_only=True) for o in (str(tmp_path / "straight"), cut))
    for key in ["model", "ema", "disc", "lecam", "opt_g", "opt_d", "rng", "noise_rng"]:
        assert_states_equal(a[key], b[key], key)


def test_a_dropped_step_puts_back_what_it_drew():
    """StopRequest.step: a step cut short at a stop point leaves the global RNG, the given generators (MergeTok's
    noise) and the buffers of the given modules (BatchNorm statistics) as they were when it began."""
    g, bn = torch.Generator().manual_seed(3), torch.nn.BatchNorm1d(4)
    before = (torch.get_rng_state(), g.get_state(), [b.clone() for b in bn.buffers()])
    stopper = common.StopRequest(torch.device("cpu"))
    try:
        def step():
            torch.rand(5), torch.rand(5, generator=g), bn(torch.randn(8, 4))
            stopper.signal = "SIGTERM"                        # as the handler would
            common.stop_point()
            raise AssertionError("the stop point let the step go on")
        assert stopper.step(step, generators=[g], buffers_of=[bn]) is None
    finally:
        stopper.restore()
    assert torch.equal(torch.get_rng_state(), before[0]) and torch.equal(g.get_state(), before[1])
    assert all(torch.equal(b, old) for b, old in zip(bn.buffers(), before[2]))
    assert common.StopRequest.active is None


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_point(f, tmp_path):
    """torchrun, 2 processes (gloo), --grad-accum 128: SIGTERM to rank 1 alone, inside step 2. Rank 0 learns it at
    the next stop point through the all-reduce, both drop step 2 there (none waits in a collective the other left),
    rank 0 saves step 1 and both exit 0 - so torchrun does too."""
    out = str(tmp_path / "two")
    proc = subprocess.Popen([*TORCHRUN, STAGE2, "train", "--codes", f["codes"], "--model",
                             "llamagen", "--preset", "tiny", "--gpt", "tiny", "--batch-size", "256", "--grad-accum",
                             "128", "--steps", "4", "--log-every", "1", "--out", out],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log_rows(out, 1, proc)
    os.kill(workers(proc.pid)[1], signal.SIGTERM)
    stdout, stderr = finish(proc, 240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by a signal on another rank at step 1 (step 2 was under way" in stdout, stdout[-2000:]
    assert ckpt_step(out) == 1 and [r["step"] for r in read_log(out)] == [1]


# ---- 2. no orphans, one job per run folder ----------------------------------------------------------------------


def test_workers_end_with_their_killed_launcher_and_save_first(tmp_path):
    """SIGKILL to the torchrun launcher (a scheduler's hard kill): its workers get SIGTERM from the kernel (parent-death
    signal), save and end within seconds instead of training on as orphans; the checkpoint holds every logged step."""
    out = str(tmp_path / "orphans")
    proc = subprocess.Popen([*TORCHRUN, STAGE1, *SMALL, "--steps", "2000", "--out", out],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log_rows(out, 2, proc)
    pids = workers(proc.pid)
    assert sorted(pids) == [0, 1]
    proc.kill()
    # the workers hold the output pipes: they close when both have ended (an orphan training on keeps them open)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        raise
    deadline = time.time() + 10              # the pipes close during a worker's exit, a moment before it is a zombie
    while not all(ended(pid) for pid in pids.values()) and time.time() < deadline:
        time.sleep(0.1)
    assert all(ended(pid) for pid in pids.values())
    assert "stopped by the launcher's death" in stdout, (stdout[-2000:], stderr[-2000:])
    assert ckpt_step(out) == read_log(out)[-1]["step"] >= 2
    assert not os.path.exists(os.path.join(out, "run.lock"))


def test_one_job_per_run_folder_and_a_dead_holder_blocks_nothing(tmp_path):
    """Job A trains in a folder (then is paused: it holds the folder without using the CPU); a requeued job (--resume
    into it), plain and under torchrun, is refused in one line naming A's pid - under torchrun that line comes first
    and every rank exits without a traceback of its own. A is then killed outright (its run.lock stays, stale): a
    resume starts."""
    out = str(tmp_path / "race")
    a = subprocess.Popen([sys.executable, STAGE1, *SMALL, "--steps", "2000", "--ckpt-every", "1", "--out", out],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log_rows(out, 2, a)                                           # step 1's checkpoint is written
        os.kill(a.pid, signal.SIGSTOP)                                         # A holds the folder, idle
        step = ckpt_step(out)
        requeued = [*SMALL, "--steps", "2000", "--ckpt-every", "1", "--resume", os.path.join(out, "last.pt"),
                    "--stop-at", str(step + 1), "--out", out]                  # one step, if it ran
        plain = subprocess.run([sys.executable, STAGE1, *requeued], cwd=ROOT, env=ENV, capture_output=True,
                               text=True, timeout=240)
        assert plain.returncode == 2 and plain.stdout == "", plain.stdout
        assert plain.stderr.strip().count("\n") == 0 and f"is in use by another job (pid {a.pid} " in plain.stderr
        two = subprocess.run([*TORCHRUN, STAGE1, *requeued], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=240)
        assert two.returncode != 0 and two.stdout == "", two.stdout
        lines = two.stderr.strip().splitlines()
        assert lines[0].startswith("train_stage1.py: error: --out") and f"(pid {a.pid} " in lines[0], lines[:3]
        assert two.stderr.count("train_stage1.py: error") == 1                 # printed once, by rank 0
        assert "train_stage1.py\", line" not in two.stderr                      # no worker traceback
    finally:
        a.kill()
        a.communicate()
    assert os.path.exists(os.path.join(out, "run.lock"))                       # stale: its holder is dead
    resumed = subprocess.run([sys.executable, STAGE1, *requeued], cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ckpt_step(out) == step + 1 and not os.path.exists(os.path.join(out, "run.lock"))


def test_the_lock_names_its_holder_and_a_released_folder_is_free(tmp_path):
    lock = common.RunLock(str(tmp_path / "run")).acquire()
    with pytest.raises(ValueError, match=f"in use by another job \\(pid {os.getpid()} "):
        common.RunLock(str(tmp_path / "run")).acquire()                       # flock: a second open file, refused
    lock.release()
    assert not os.path.exists(tmp_path / "run")                               # it made the folder, left empty
    common.RunLock(str(tmp_path / "run")).acquire().release()


# ---- 3. no output over another run's files; 4. sample sets named by their settings ---------------------------


def test_no_command_writes_over_another_runs_files(f, tmp_path, capsys):
    """A stage-1 run T (its tokenizer), codes of it, a stage-2 run G: extract, sample, finetune-recovery and
    evaluate.py never write into a run's last.pt, --overwrite or not; an existing codes file needs --overwrite; and
    `train --codes <codes of T> --out T --overwrite` is refused (T's run is stage 1, and the codes' tokenizer lives
    there: deleting it would leave a generator that can never be sampled)."""
    T, G = tmp_path / "T", tmp_path / "G"
    T.mkdir()
    G.mkdir()
    shutil.copy(f["tok"], T / "last.pt")
    shutil.copy(f["gen"], G / "last.pt")
    codes_T = str(tmp_path / "codes_T.pt")
    assert train_stage2.main(["extract", "--tokenizer", str(T / "last.pt"), "--keep", "16", "--num-images", "4",
                              "--out", codes_T]) == 0
    before = {p: open(p, "rb").read() for p in (str(T / "last.pt"), str(G / "last.pt"), codes_T)}
    for overwrite in ([], ["--overwrite"]):
        err, _ = one_line(capsys, train_stage2.main, "extract", "--tokenizer", f["tok"], "--num-images", "2",
                          "--out", str(T / "last.pt"), *overwrite)
        assert "is a file of the training run in" in err, err
        err, _ = one_line(capsys, train_stage2.main, "finetune-recovery", "--ckpt", f["gen"], "--codes",
                          f["codes"], "--steps", "1", "--batch-size", "4", "--out", str(G / "last.pt"), *overwrite)
        assert "is a file of the training run in" in err, err
        err, _ = one_line(capsys, evaluate.main, "recon", "--ckpt", f["tok"], "--out", str(T / "last.pt"),
                          "--device", "cpu", *overwrite, code=1)
        assert "is a file of the training run in" in err, err
        err, _ = one_line(capsys, train_stage2.main, "train", "--codes", codes_T, "--model", "llamagen", "--preset",
                          "tiny", "--out", str(T), *overwrite)
        assert ("--overwrite would delete" if overwrite else "already holds a run") in err, err
    assert "stage-1 tokenizer run" in err, err
    err, _ = one_line(capsys, train_stage2.main, "extract", "--tokenizer", f["tok"], "--num-images", "2", "--out",
                      codes_T)
    assert "already exists and holds a PyTorch file" in err and "--overwrite" in err, err
    assert {p: open(p, "rb").read() for p in before} == before
    # --overwrite in a stage-2 folder the codes live in: refused; a stage-1 --overwrite of a stage-2 run: refused
    shutil.copy(codes_T, G / "codes.pt")
    err, _ = one_line(capsys, train_stage2.main, "train", "--codes", str(G / "codes.pt"), "--model", "llamagen",
                      "--preset", "tiny", "--out", str(G), "--overwrite")
    assert f"where --codes {G / 'codes.pt'} lives" in err, err
    err, _ = one_line(capsys, train_stage1.main, *SMALL, "--steps", "1", "--out", str(G), "--overwrite")
    assert "stage-2 generator run" in err, err
    assert open(G / "last.pt", "rb").read() == before[str(G / "last.pt")]
    assert train_stage2.main(["extract", "--tokenizer", f["tok"], "--num-images", "2", "--out", codes_T,
                              "--overwrite"]) == 0                              # named: replaced


def test_sample_sets_carry_their_settings_and_are_never_replaced_silently(f, capsys):
    """Seed 0, then seed 1 at temperature 0.5: two files, each named by what differs; the same command again is
    refused until --overwrite names it."""
    sample = ["sample", "--ckpt", f["gen"], "--num-per-class", "1"]
    assert train_stage2.main(sample) == 0
    assert train_stage2.main([*sample, "--seed", "1", "--temperature", "0.5", "--top-k", "5"]) == 0
    folder = os.path.dirname(f["gen"])
    names = sorted(n for n in os.listdir(folder) if n.endswith(".npz"))
    assert names == ["samples_0000001_cfg1_seed0_1perclass.npz",
                     "samples_0000001_cfg1_seed1_temp0.5_topk5_1perclass.npz"], names
    first = open(os.path.join(folder, names[0]), "rb").read()
    err, _ = one_line(capsys, train_stage2.main, *sample)
    assert names[0] in err and "--overwrite" in err, err
    assert open(os.path.join(folder, names[0]), "rb").read() == first
    assert train_stage2.main([*sample, "--overwrite"]) == 0


# ---- 5. the minor items --------------------------------------------------------------------------------------


def test_bad_input_comes_before_any_output(f, tmp_path, capsys):
    """--temperature inf is refused; a --resume of other settings or other codes stops before the memory estimate
    and the warnings (nothing on stdout); NaN statistics are named before the Inception pass (no weights are given:
    had the network come first, its error would be the line); an empty arr_0 is refused before the shapes
    classifier is trained and written."""
    err, out = one_line(capsys, train_stage2.main, "sample", "--ckpt", f["gen"], "--temperature", "inf")
    assert "finite --temperature" in err and out == ""
    resume = ["train", "--codes", f["codes"], "--model", "llamagen", "--preset", "tiny", "--gpt", "tiny",
              "--batch-size", "4", "--steps", "2", "--resume", f["gen"], "--out", os.path.dirname(f["gen"])]
    err, out = one_line(capsys, train_stage2.main, *resume, "--lr", "0.5")
    assert "lr: " in err and out == "", (err, out)
    shutil.copy(f["tok"], tmp_path / "junk.pt")
    err, out = one_line(capsys, train_stage1.main, *SMALL, "--steps", "2", "--resume", str(tmp_path / "junk.pt"),
                        "--out", str(tmp_path / "s1"))
    assert "junk.pt" in err and out == "" and not os.path.exists(tmp_path / "s1"), (err, out)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.full((2048, 2048), np.nan))
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    err, _ = one_line(capsys, evaluate.main, "fid", str(tmp_path / "images.npz"), str(tmp_path / "stats.npz"),
                      "--is-splits", "2", "--device", "cpu", code=1)
    assert str(tmp_path / "stats.npz") in err and "NaN" in err, err
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 16, 16, 3), np.uint8))
    err, _ = one_line(capsys, evaluate.main, "shapes", str(tmp_path / "empty.npz"), "--device", "cpu",
                      "--classifier", str(tmp_path / "never.pt"), code=1)
    assert "holds no images" in err and not os.path.exists(tmp_path / "never.pt"), err


def kill_self_inside(monkeypatch, owner, name):
    """SIGTERM to this process from inside owner.name, once it has written part of its file."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)                                         # the handler raises here
        return result
    monkeypatch.setattr(owner, name, wrapped)


def test_a_signal_during_sample_or_extract_leaves_no_partial_file(f, tmp_path, monkeypatch, capsys):
    """SIGTERM after the first batch of samples is written to the .npz's temporary file, or in the middle of the
    codes file's save: exit 143, no .tmp<pid> file and no output left, and the line says how to rerun."""
    kill_self_inside(monkeypatch, train_stage2.data_lib.ImageNpzWriter, "write")
    argv = ["sample", "--ckpt", f["gen"], "--num-per-class", "2", "--batch-size", "4", "--out",
            str(tmp_path / "s")]
    err, _ = one_line(capsys, train_stage2.main, *argv, code=143)
    assert "stopped by SIGTERM" in err and "rerun: python train_stage2.py sample --ckpt" in err, err
    monkeypatch.undo()

    def half_a_save(payload, path):                           # torch.save cut short by the signal
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    monkeypatch.setattr(common.torch, "save", half_a_save)
    err, _ = one_line(capsys, train_stage2.main, "extract", "--tokenizer", f["tok"], "--num-images", "2",
                      "--out", str(tmp_path / "codes.pt"), code=143)
    assert "rerun: python train_stage2.py extract" in err, err
    assert os.listdir(tmp_path) == []


def test_a_run_that_failed_before_its_first_checkpoint_reruns_without_overwrite(f, tmp_path, monkeypatch,
                                                                                   capsys):
    """A run that stops at step 1 (here a non-finite loss) leaves config.json but no checkpoint: its folder holds
    no run, and the same command reruns there, replacing that config and log. A config.json no run wrote stays and
    is refused."""
    original = train_stage2.train_step

    def diverged(rows, step, run, device):                    # step 1 logged, step 2 diverges
        if step == 1:
            raise FloatingPointError(f"non-finite loss at step {step}: loss")
        return original(rows, step, run, device)
    monkeypatch.setattr(train_stage2, "train_step", diverged)
    argv = ["train", "--codes", f["codes"], "--model", "llamagen", "--preset", "tiny", "--gpt", "tiny",
            "--batch-size", "4", "--steps", "2", "--log-every", "1", "--out", str(tmp_path / "r")]
    assert train_stage2.main(argv) == 2
    assert sorted(os.listdir(tmp_path / "r")) == ["config.json", "log.jsonl"]
    monkeypatch.undo()
    capsys.readouterr()
    assert train_stage2.main(argv) == 0
    assert "an earlier run that wrote no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in read_log(str(tmp_path / "r"))] == [1, 2]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"learning_rate": 1}')
    err, _ = one_line(capsys, train_stage2.main, *argv[:-1], str(tmp_path / "mine"))
    assert "no run of this code wrote" in err and (tmp_path / "mine" / "config.json").read_text() == \
        '{"learning_rate": 1}'
