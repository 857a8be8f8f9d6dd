"""What every training and evaluation script shares: processes, progress, data order, RNG, checkpoints, EMA,
learning-rate schedules, the non-finite check, a prompt clean stop on SIGTERM / SIGINT, one job per run folder and
outputs that never replace another run's files (docs/runs.md).

One code path for one process and many: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK, plain python is rank 0 of 1.
nccl on GPUs, gloo on the CPU. Rank 0 alone prints and writes; every collective here is entered by every rank.
Under torchrun every worker ends when its launcher dies (end_with_launcher).

    from common import setup_distributed, teardown_distributed, rank0_print   # used by train_stage1.py, evaluate.py
"""
import ctypes
import fnmatch
import hashlib
import json
import math
import os
import random
import shlex
import signal
import socket
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from tqdm import tqdm

try:
    import fcntl                                                # the run folder's lock (POSIX)
except ImportError:                                             # Windows: no lock, one line says so
    fcntl = None

# ----------------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------------


def dist_info():
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device=None):
    """Start the process group under torchrun (nothing for a single process). Returns (rank, world_size, device).

    device: None picks cuda:LOCAL_RANK when a GPU exists, else the CPU; "cuda" without an index is cuda:LOCAL_RANK
    (torch.cuda.set_device and DDP's device_ids need the index)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:                  # `--device cuda`: this process's GPU
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    end_with_launcher()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# The launcher's pid, under torchrun (end_with_launcher): a worker whose parent changed has lost its launcher.
_LAUNCHER = None
PR_SET_PDEATHSIG = 1                                            # <linux/prctl.h>


def end_with_launcher():
    """Under torchrun: this worker gets SIGTERM when its launcher dies (Linux prctl(PR_SET_PDEATHSIG)), so a killed
    torchrun (SIGKILL, a lost node agent) leaves no workers training on in its place (orphans that a requeued job
    would race in the same folder). A training script's StopRequest turns that SIGTERM into a checkpoint and an exit
    (within ORPHAN_GRACE_S); any other script ends at once. Where prctl is missing, StopRequest compares
    os.getppid() with the launcher's pid at every stop point. Plain `python` runs are left alone: their parent is a
    shell, and `nohup python ... &` must outlive it."""
    global _LAUNCHER
    if "TORCHELASTIC_RUN_ID" not in os.environ or _LAUNCHER is not None:
        return
    _LAUNCHER = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):                           # not Linux: the getppid check alone
        pass
    if os.getppid() != _LAUNCHER:                               # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def launcher_gone():
    """Whether this torchrun worker's launcher has died (its parent pid changed); False outside torchrun."""
    return _LAUNCHER is not None and os.getppid() != _LAUNCHER


def teardown_distributed(failed=False):
    """End the process group: after a run that finished, meet every rank first; after a failure, at once.

    The barrier after a finished run: without it one rank can destroy its group (and exit) while the other still has
    gloo work in flight; the survivor's gloo threads are then torn down mid-operation and the C++ runtime aborts
    ("terminate called without an active exception", SIGABRT) after a run that finished.
    failed=True (this rank raised: out of memory, an unreadable file): no barrier. The other ranks wait in some other
    collective (the step's all-reduce); nccl would pair the two mismatched collectives and hang until its watchdog
    fires (10 minutes and more). This rank ends its group and its process exits non-zero; torchrun then stops the
    others (with gloo their collective fails at once: the peer is gone).
    """
    if dist.is_available() and dist.is_initialized():
        if failed:
            dist.destroy_process_group()
            return
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def run_distributed(work, device, check=None, prog=None):
    """setup_distributed(device), work(rank, world, device), teardown_distributed: the barrier only when work
    returned, a failing rank ends its group at once (see teardown_distributed). Returns work's result.

    check: the input's checks, run on every rank before work (checked_on_every_rank: bad input is one line, printed
    once by rank 0 before anything else, and every rank stops with InputError). A --device this machine lacks is one
    of them: the process group then starts on the CPU so that every rank can say so. What check returns (a RunLock)
    is released when work ends, however it ends."""
    if check is not None:
        try:
            check_device(device)
        except ValueError:
            device = "cpu"
    rank, world, device = setup_distributed(device)
    held = None
    try:
        if check is not None:
            held = checked_on_every_rank(check, prog)
        result = work(rank, world, device)
    except InputError:
        teardown_distributed()                                  # every rank stopped at the same place
        raise
    except BaseException:
        teardown_distributed(failed=True)
        raise
    finally:
        if StopRequest.active is not None:                      # work raised: the signal handlers go back
            StopRequest.active.restore()
        if held is not None:
            held.release()
    teardown_distributed()
    return result


class InputError(ValueError):
    """Bad input every rank stopped for (checked_on_every_rank); rank 0 has printed its line."""


def checked_on_every_rank(check, prog):
    """check() on every rank, before anything is printed or built. When it fails on any rank (ValueError,
    FileNotFoundError, OSError: bad input), rank 0 prints the first failing rank's message as one line on stderr,
    `<prog>: error: <message>`, every rank meets it there (under torchrun that line comes first, before torchrun's
    report of the exit) and raises InputError. Returns check's result (what it holds is released on failure)."""
    try:
        result, problem = check(), None
    except (ValueError, FileNotFoundError, OSError) as e:
        result, problem = None, " ".join(str(e).split())
    problems = [p for p in all_gather_objects(problem) if p is not None]
    if not problems:
        return result
    if hasattr(result, "release"):                              # a run folder this rank locked: free again
        result.release()
    if is_main():
        print(f"{prog}: error: {problems[0]}", file=sys.stderr, flush=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    raise InputError(problems[0])


def use_deterministic_algorithms():
    """--deterministic: the GPU kernels that are deterministic where torch has them (PyTorch's "Reproducibility"
    notes). On the CPU the kernels this project uses are (a resumed run repeats the uninterrupted one). On CUDA, float
    atomics (index_add_, scatter_add, the gather in the backward), attention's backward and cuDNN's autotuned
    convolutions sum in a varying order; discrete merges and LFQ's sign turn such last-bit differences into other
    codes, so two runs part ways. With this flag cuBLAS uses a fixed workspace (CUBLAS_WORKSPACE_CONFIG, which must be
    set before the first cuBLAS call: call this first), cuDNN its deterministic algorithms without autotuning, and
    torch its deterministic kernels; an op that has none still runs and torch warns, naming it (warn_only: a paper
    run does not die at its first step over one op). Slower; 2 runs on the same GPUs, software and world size
    then agree. Different GPUs, versions or world sizes still differ in the last bits (sums in another order)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def is_main():
    return dist_info()[0] == 0


def rank0_print(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t):
    """The mean of t over all ranks (in place; t itself in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all-reduce (sum). Forward: the sum over ranks; backward: the incoming gradients summed
    over ranks, so each rank's input receives d(sum_r L_r) / d(input), where L_r is rank r's loss."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_differentiable(t):
    """sum over ranks of t, with gradients; t itself in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(t)
    return t


def all_gather_rows(t):
    """Stack a (R, ...) tensor of every rank along a new dim 1 -> (R, world, ...). R must be equal on all ranks."""
    rank, world = dist_info()
    if world == 1:
        return t.unsqueeze(1)                                                  # (R, 1, ...)
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    src = t.to(comm).contiguous()
    parts = [torch.empty_like(src) for _ in range(world)]
    dist.all_gather(parts, src)
    return torch.stack(parts, dim=1).to(t.device)                              # (R, world, ...)


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] in one process."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Progress: a bar on a terminal, plain lines in a log
# ----------------------------------------------------------------------------------------------------------------


def progress_bar(total, initial=0, desc=None):
    """tqdm on rank 0 when stderr is a terminal. In a log file (a scheduler, CI, `> log`) a bar would write
    thousands of carriage-return updates: it is off there and the scripts print their log rows as lines."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not (is_main() and
                                                                                          sys.stderr.isatty()))


def bar_is_live(bar):
    return not bar.disable


class TrainingLog:
    """Running means of a training loop's named loss terms. `add(terms)` every step; `write(head, tail)` all-reduces
    the means over ranks (every rank calls it) into the row {**head, **means, **tail}, and rank 0 appends it to a
    JSONL file and shows it: on the progress bar on a terminal, as a printed line in a log."""

    def __init__(self, path, bar):
        self.path, self.bar, self.sums, self.count = path, bar, {}, 0

    def add(self, terms):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()
        self.count += 1

    def write(self, head, tail=None):
        if not self.count:                       # no step since the last row (a stop inside the next step)
            return None
        names = sorted(self.sums)
        values = all_reduce_mean(torch.stack([self.sums[k] / self.count for k in names]))
        row = {**head, **{k: round(v, 5) for k, v in zip(names, values.tolist())}, **(tail or {})}
        self.sums, self.count = {}, 0
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if bar_is_live(self.bar):
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("step", "lr")})
            else:
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                      flush=True)
        return row


# ----------------------------------------------------------------------------------------------------------------
# Data order: a sampler that can start mid-epoch; loader workers
# ----------------------------------------------------------------------------------------------------------------


def memory_available(device):
    """Bytes this process may use: the GPU's total memory, or the machine's available RAM shared by the processes
    torchrun started on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        total = kb * 1024
    except (OSError, StopIteration):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return total / int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def format_bytes(n):
    """A memory size for people: '3.2 GB' (2^30 bytes), below 1 GB '35.0 MB'."""
    return f"{n / 2**30:.1f} GB" if n >= 2 ** 30 else f"{n / 2**20:.1f} MB"


def loader_workers(requested, device):
    """DataLoader workers of an extraction or evaluation pass (--num-workers): the number asked for; by default none
    on the CPU (workers would take the cores the model computes on) and, on a GPU, up to 8 of the cores this
    process has beside itself (decoding JPEGs in the main process would keep the GPU waiting)."""
    if requested is not None:
        return requested
    if torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, the same permutation on every rank for an epoch) that can start mid-epoch,
    so a resumed run sees exactly the samples the uninterrupted run would have seen."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self):
        return self.num_samples - self.start


# ----------------------------------------------------------------------------------------------------------------
# RNG capture / restore
# ----------------------------------------------------------------------------------------------------------------


def rng_state():
    """torch, python and numpy (and CUDA) generator states as tensors (they pass torch.load(weights_only=True))."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()[1],
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, one-line errors on read
# ----------------------------------------------------------------------------------------------------------------


def save_checkpoint(path, payload):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written checkpoint,
    and a failed write (disk full, a signal) removes its temporary file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def pid_alive(pid):
    """Whether a process of this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):                 # none, or beyond any pid
        return False
    except PermissionError:                                     # another user's process
        return True
    return True


def remove_stale_temporaries(path):
    """Delete `<path>.tmp<pid>` files a killed save left behind (a killed process never reaches its finally); a
    temporary file of a process that still runs here (another job writing the same path) stays."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    if os.path.isdir(folder):
        for entry in os.listdir(folder):
            pid = entry[len(name) + 4:]
            if entry.startswith(name + ".tmp") and pid.isdigit() and not pid_alive(int(pid)):
                os.remove(os.path.join(folder, entry))
                removed.append(entry)
    return removed


def clear_stale_temporaries(path):
    """remove_stale_temporaries for a one-file command's output, with a note on stderr when it removed any."""
    removed = remove_stale_temporaries(path)
    if removed:
        print(f"note: removed {len(removed)} unfinished file(s) of an interrupted write: {', '.join(removed)}",
              file=sys.stderr, flush=True)


# torch.save writes a zip archive (the default since torch 1.6) or, in the legacy format, a pickle (protocol >= 2
# opens with the PROTO opcode 0x80). Anything else is not a PyTorch file.
TORCH_FILE_HEADERS = (b"PK\x03\x04", b"\x80")


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def prepare_out_dir(out_dir, config, replace=()):
    """Rank 0 at the start of a run: the output folder, its config.json, and no `last.pt.tmp<pid>` left by a killed
    save (reported). replace: the files of an earlier run in the folder to delete first (the names check_run_folder
    returned: --overwrite, or the config and log of a run that never wrote a checkpoint), reported."""
    os.makedirs(out_dir, exist_ok=True)
    if replace:
        for name in replace:
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
        why = "--overwrite" if "last.pt" in replace else "an earlier run that wrote no checkpoint"
        print(f"deleted the earlier run's {', '.join(replace)} in {out_dir} ({why})", flush=True)
    removed = remove_stale_temporaries(os.path.join(out_dir, "last.pt"))
    if removed:
        print(f"removed {len(removed)} unfinished checkpoint file(s) of an interrupted save: {', '.join(removed)}")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# Outputs: a run never writes over another run, an output never replaces an input
# ----------------------------------------------------------------------------------------------------------------

RUN_FILES = ("last.pt", "config.json", "log.jsonl")        # a training run's files; its last.pt makes it a run
RUN_KINDS = {"stage-1": "a stage-1 tokenizer run (train_stage1.py)", "stage-2": "a stage-2 generator run "
             "(train_stage2.py train)"}


def same_path(a, b):
    """Whether two paths name the same file or folder (symbolic links resolved; hard links where both exist)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path, folder):
    """Whether `path` lies in `folder` (or below it), links resolved."""
    path, folder = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(folder))
    return os.path.commonpath([path, folder]) == folder


def check_output_path(path, flag, folder=False):
    """One line when `path` cannot be written where it is: a folder where a file is meant (or the reverse), or an
    existing file among its parents (makedirs would fail after all the work)."""
    path = os.path.abspath(os.fspath(path))
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is an existing file, not a folder")
    if not folder and os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder: name the file to write")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent, above = os.path.dirname(parent), parent
        if parent == above:
            break
    if parent and os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"{flag} {path} lies under {parent}, which is a file, not a folder")


def holds_archive(path):
    """What an existing file holds when it is a checkpoint, codes or samples - a PyTorch file or an .npz (both zip
    archives, or torch's legacy pickle) - else None (a JSON, a picture, text)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    if not head.startswith(TORCH_FILE_HEADERS):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "a PyTorch file (a checkpoint or codes)"
    if any(n.endswith("data.pkl") for n in names):
        return "a PyTorch file (a checkpoint or codes)"
    return "an .npz archive (samples or statistics)" if any(n.endswith(".npy") for n in names) else "a zip archive"


def check_output_file(path, flag, overwrite=False):
    """Before any work, for a file a command writes whole (codes, samples, a checkpoint, results): one line when it
    cannot be written (check_output_path), when it is one of a training run's own files (the last.pt, config.json
    or log.jsonl of a folder that holds a run: written by that run alone, never by another command, --overwrite or
    not), or when it exists and holds a checkpoint, codes or samples (holds_archive) and --overwrite does not say to
    replace it. Other existing files (JSON results, pictures) are replaced as before."""
    check_output_path(path, flag)
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    if name in RUN_FILES and any(os.path.isfile(os.path.join(folder, n)) for n in RUN_FILES):
        raise ValueError(f"{flag} {path} is a file of the training run in {folder}: only that run writes it; "
                         f"choose another path")
    what = holds_archive(path) if os.path.isfile(path) else None
    if what and not overwrite:
        raise ValueError(f"{flag} {path} already exists and holds {what}: choose another path, or pass --overwrite "
                         f"to replace it")


def run_kind(folder):
    """What the run in `folder` is, from its last.pt: "stage-1" (a tokenizer), "stage-2" (a generator), or a
    description of anything else it holds."""
    path = os.path.join(folder, "last.pt")
    try:
        ckpt = read_checkpoint(path, "checkpoint", mmap=True)      # memory-mapped: its entry names, not its tensors
    except (ValueError, FileNotFoundError) as e:
        return f"a file that is no checkpoint of this code ({_first_line(e)})"
    if "model_kind" in ckpt:
        return "stage-2"
    if "tokenizer_config" in ckpt and "ema" in ckpt:
        return "stage-1"
    return "codes" if "Ks" in ckpt and "indices" in ckpt else f"a file of entries {', '.join(list(ckpt)[:4])}"


def _written_by_a_run(path):
    """Whether a config.json or log.jsonl is one a training run of this code wrote (a JSON object with its "args";
    JSON rows with a "step"): only those are deleted without --overwrite."""
    try:
        with open(path) as f:
            first = json.loads(f.read() if path.endswith(".json") else (f.readline() or "{}"))
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and ("args" in first if path.endswith(".json") else "step" in first or not first)


def check_run_folder(out, resume=None, overwrite=False, extra_patterns=(), kind=None, inputs=()):
    """A training run's --out. A folder holds a run when it holds a last.pt: refused with one line, unless the run
    continues there (--resume of a checkpoint in that folder) or --overwrite says to start over - and --overwrite
    itself is refused for a run of another kind than `kind` ("stage-1" / "stage-2", run_kind) and when one of the
    `inputs` ((flag, path) pairs: --codes, the tokenizer the codes came from, ...) lives in the folder. Returns the
    names of the files to delete before the run starts (prepare_out_dir, after every input has been checked):
    under --overwrite the earlier run's RUN_FILES and files matching extra_patterns (e.g. samples_*.png); in a folder
    without a last.pt, the config.json and log.jsonl of a run that failed before its first checkpoint (nothing there
    to continue from, so its rerun needs no --overwrite; a config.json or log.jsonl no run wrote is refused)."""
    check_output_path(out, "--out", folder=True)
    held = sorted(name for name in os.listdir(out) if name in RUN_FILES or
                  any(fnmatch.fnmatch(name, p) for p in extra_patterns)) if os.path.isdir(out) else []
    ckpt = os.path.join(out, "last.pt")
    if "last.pt" not in held:
        for name in [n for n in held if n in RUN_FILES and not _written_by_a_run(os.path.join(out, n))]:
            raise ValueError(f"--out {out} holds a {name} that no run of this code wrote: choose another --out")
        return [n for n in held if n in RUN_FILES]
    if overwrite:
        if resume and any(same_path(resume, os.path.join(out, name)) for name in held):
            raise ValueError(f"--overwrite would delete --resume {resume}, the checkpoint to continue from: without "
                             f"--overwrite the run continues in {out}")
        found = run_kind(out)
        if kind is not None and found != kind:
            raise ValueError(f"--overwrite would delete {ckpt}, which holds {RUN_KINDS.get(found, found)}, not "
                             f"{RUN_KINDS[kind]}: choose another --out")
        for flag, path in inputs:
            if path is not None and os.path.exists(path) and _inside(path, out):
                raise ValueError(f"--overwrite would delete the run in {out}, where {flag} {path} lives (an input "
                                 f"of this command): choose another --out")
        return held
    if resume and same_path(os.path.dirname(os.path.abspath(resume)), out):
        return []                                                          # the run continues in its own folder
    files = ", ".join(name for name in held if name in RUN_FILES)
    if resume:
        raise ValueError(f"--out {out} holds another run ({files}) than --resume {resume}: continue in the "
                         f"checkpoint's folder (--out {os.path.dirname(resume) or '.'}), choose a new --out, or pass "
                         f"--overwrite to replace that run")
    raise ValueError(f"--out {out} already holds a run ({files}): continue it with --resume {ckpt}, choose a new "
                     f"--out, or pass --overwrite to start over (it deletes that run's files)")


class RunLock:
    """One job at a time in a run folder: an exclusive flock on `<folder>/run.lock`, held for the run's life
    (rank 0 holds it for all ranks), the file naming its holder (pid, host, start, command). A second job is refused
    with one line naming the holder. The kernel drops a flock when its process dies, however it dies: a stale
    run.lock of a killed job blocks nothing (the next job takes it and rewrites it). Release deletes the file while
    still holding the lock; a job that opened the old file before then sees it is no longer the folder's
    (its inode differs from the path's) and takes the new one. flock works on local disks and on NFS (Linux emulates
    it with byte-range locks); Lustre needs its -o flock mount option.

        lock = RunLock(out).acquire()      # ValueError naming the holder when another job holds it
        ...
        lock.release()
    """

    NAME = "run.lock"

    def __init__(self, folder):
        self.folder, self.path, self.fd, self.made = folder, os.path.join(folder, self.NAME), None, []

    def acquire(self):
        if fcntl is None:
            print(f"note: no file locks on this system: nothing keeps a second job out of {self.folder}",
                  file=sys.stderr, flush=True)
            return self
        folder = os.path.abspath(self.folder)
        while not os.path.exists(folder):                        # the folders made here, deepest first
            self.made.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(self.folder, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "a job that is starting"
                os.close(fd)
                raise ValueError(f"--out {self.folder} is in use by another job ({holder}): one job at a time "
                                 f"writes a run folder; wait for it to end or stop it (SIGTERM saves its checkpoint),"
                                 f" then continue with --resume {os.path.join(self.folder, 'last.pt')}") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self.fd = fd
            else:                                               # released and deleted meanwhile: take the new file
                os.close(fd)
        launcher = f", launcher pid {_LAUNCHER}" if _LAUNCHER is not None else ""
        holder = (f"pid {os.getpid()}{launcher} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join([os.path.basename(sys.executable), *sys.argv])}")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, (holder[:2000] + "\n").encode())
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        for folder in self.made:                                # a run that never started leaves no empty folders
            if os.listdir(folder):
                break
            os.rmdir(folder)


def refuse_output_over_inputs(outputs, inputs):
    """outputs, inputs: {name: path} or (name, path) pairs (None paths skipped). One line when an output resolves to
    one of the inputs: writing it would destroy the input (e.g. `extract --out X --tokenizer X`)."""
    outputs = list(outputs.items() if isinstance(outputs, dict) else outputs)
    inputs = list(inputs.items() if isinstance(inputs, dict) else inputs)
    for out_name, out in outputs:
        for in_name, src in inputs:
            if out is not None and src is not None and os.path.exists(src) and same_path(out, src):
                raise ValueError(f"{out_name} {out} is the same file as {in_name} {src}: writing it would destroy "
                                 f"that input; choose another output path")


def last_step(step, total, stop_at=None):
    """The step a run ends at: the total, or --stop-at if it comes first; one line if nothing is left to train."""
    end = min(total, stop_at) if stop_at else total
    if step >= end:
        raise ValueError(f"nothing to train: the run is at step {step} and would stop at {end} (--steps / --stop-at)")
    return end


def print_run_end(step, total, stopped_by, elapsed, seen, unit, ckpt_path, interrupted=False):
    """Rank 0 at the end of a run: how it ended, its speed, and where to continue from. interrupted: a stop request
    ended the next step before its update (its work is dropped and redone on resume)."""
    if stopped_by and not os.path.exists(ckpt_path):
        print(f"stopped by {stopped_by} before step {step + 1} finished, in {elapsed:.1f} s: nothing trained, no "
              f"checkpoint; rerun the command to start", flush=True)
        return
    how = f"stopped by {stopped_by} at step {step}" if stopped_by else f"done: {step} steps"
    if interrupted:
        how += f" (step {step + 1} was under way: dropped, a resume redoes it)"
    print(f"{how} in {elapsed:.1f} s ({seen / max(elapsed, 1e-9):.1f} {unit}/s); checkpoint {ckpt_path}"
          + (f" (continue with --resume {ckpt_path})" if step < total else ""), flush=True)


def read_checkpoint(path, what="checkpoint", required=(), mmap=False):
    """torch.load(weights_only=True) of a file the user passed, with one-line errors: missing, empty, truncated
    or corrupt, not a dict, or lacking the `required` entries. Returns the dict.

    mmap: the tensors of a zip-format file (torch.save's default) stay in the file, memory-mapped (pages are read
    when touched and shared between the processes of a machine: 8 ranks reading one 20 GB codes table hold it once,
    in the page cache). A legacy pickle-format file is read whole."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): an interrupted copy or write?")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(TORCH_FILE_HEADERS):               # torch.load would blame weights_only: misleading
        raise ValueError(f"{what} {path} is not a PyTorch file: torch.save writes a zip archive or a pickle, and "
                         f"this file starts with neither (first bytes {head!r})")
    try:
        mapped = {"mmap": True} if mmap and head.startswith(b"PK") else {}
        ckpt = torch.load(path, map_location="cpu", weights_only=True, **mapped)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{what} {path} cannot be read: truncated, corrupt or not a PyTorch file "
                         f"({_first_line(e)})") from None
    except Exception as e:                                     # weights_only refuses pickled code, ...
        raise ValueError(f"{what} {path} is not a plain tensor checkpoint ({type(e).__name__}: "
                         f"{_first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{what} {path} holds a {type(ckpt).__name__}, not a dict of entries")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise ValueError(f"{what} {path} lacks the entries {', '.join(missing)}: not a file of this kind")
    return ckpt


def download_weights(url, what, file_name=None, hash_prefix=None):
    """The published file at `url` in the torch.hub cache (<hub dir>/checkpoints/), downloaded there first if
    missing (its SHA-256 prefix checked when given). Returns the path; a failed download is one line.
    torch.hub.download_url_to_file writes a temporary file and renames it when complete, so a failed download leaves
    nothing behind; its progress bar shows on a terminal only."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name or os.path.basename(url))
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=sys.stderr.isatty())
        except Exception as e:                                # offline (URLError), a proxy's HTTPError, a bad hash
            raise ValueError(f"{what}: the download of {url} failed ({type(e).__name__}: {_first_line(e)}); "
                             f"download the file by hand and pass its local path") from None
    return path


def resolve_weights(weights, url, what, file_name=None, hash_prefix=None):
    """weights: a state dict, a local path, or "download" (the official `url`, cached) -> a state dict, with
    one-line errors for a missing, empty, truncated or junk file and a failed download."""
    if isinstance(weights, dict):
        return weights
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"{what}: weights must be a path, a state dict or 'download', got {type(weights).__name__}")
    path = (download_weights(url, what, file_name, hash_prefix) if os.fspath(weights) == "download"
            else os.fspath(weights))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist: pass a local copy of {url} or 'download'")
    return read_checkpoint(path, what)


def load_strict(module, state_dict, what):
    """load_state_dict(strict=True) with a one-line error naming what is missing, unexpected or misshapen."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} (file {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
                   for k, v in expected.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong_shape:
        def show(items):
            return ", ".join(items[:4]) + (f" ... ({len(items)} in all)" if len(items) > 4 else "") if items else "-"
        raise ValueError(f"{what} does not match the model (is it the right file?): missing keys {show(missing)}; "
                         f"unexpected keys {show(unexpected)}; wrong shapes {show(wrong_shape)}")
    module.load_state_dict(state_dict, strict=True)


def load_entries(state, ckpt, path):
    """Resume: each entry of `state` (modules, optimizers) from the checkpoint's entry of that name. Modules through
    load_strict; an optimizer state that does not fit (a lacking key, another number of parameters) is one line."""
    for name, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            load_strict(obj, ckpt[name], f"checkpoint {path}, entry {name!r},")
            continue
        try:
            obj.load_state_dict(ckpt[name])
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as e:
            raise ValueError(f"checkpoint {path}: its entry {name!r} does not fit this run's optimizer "
                             f"({type(e).__name__}: {_first_line(e)})") from None


def content_hash(tensors):
    """A short hash (32 hex digits, BLAKE2b) of tensors' dtypes, shapes and bytes, in the given order: whether two
    files hold the same weights or the same codes."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy() if t.numel() else b"")
    return h.hexdigest()


def check_device(name, flag="--device"):
    """One line for a --device torch cannot parse or this machine lacks (CUDA without a GPU); None passes."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name!r} is not a device: e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {name}: this machine has no CUDA GPU (torch {torch.__version__}); use --device "
                             f"cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"{flag} {name}: no {device.type} device on this machine; use --device cpu")


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX, e.g. AMD Zen 4, Intel Sapphire Rapids): there
    bf16 autocast is the fast path, elsewhere the CPU emulates it and float32 is faster."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def default_amp(device):
    """The --amp a run takes when none is given: bf16 autocast on a GPU and on a CPU that computes bf16 natively
    (so the precision path a GPU runs is the one CPU runs and CI exercise), else none (float32)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "none"


def config_mismatch(saved, current):
    """Names of the fields whose values differ between two config dicts, as 'field: saved -> current'."""
    keys = sorted(set(saved) | set(current))
    fmt = lambda v: list(v) if isinstance(v, tuple) else v                     # noqa: E731 (tuples load as lists)
    return [f"{k}: {fmt(saved.get(k))!r} -> {fmt(current.get(k))!r}" for k in keys
            if fmt(saved.get(k)) != fmt(current.get(k))]


# ----------------------------------------------------------------------------------------------------------------
# EMA, learning-rate schedules, the non-finite check
# ----------------------------------------------------------------------------------------------------------------


def ema_decay(step, max_decay):
    """EMA decay with a warm-up, as TF's ExponentialMovingAverage(num_updates): (1 + t) / (10 + t) up to max_decay,
    so a short run's EMA is not mostly its random initialisation (0.999^600 = 0.55)."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def lr_at(step, total, lr, schedule="step", drops=(0.9,), warmup=0):
    """The learning rate of a step: a linear warm-up over `warmup` steps, then constant ("constant"), x0.1 at every
    fraction of training in `drops` ("step"), or cosine to 0 ("cosine")."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))
    if schedule == "step":
        return lr * 0.1 ** sum(step >= int(f * total) for f in drops)
    if schedule == "constant":
        return lr
    raise ValueError(f"unknown lr schedule {schedule!r}: step, cosine or constant")


def check_finite(terms, step):
    """Stop every rank with a message naming the loss term when a loss is NaN or infinite."""
    names = list(terms)
    values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
    flags = (~torch.isfinite(values)).float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags)
    bad = [n for n, f in zip(names, flags.tolist()) if f > 0]
    if bad:
        raise FloatingPointError(f"non-finite loss at step {step}: {', '.join(bad)} "
                                 f"(values on this rank: {[terms[n].item() for n in bad]}); stopping")


# ----------------------------------------------------------------------------------------------------------------
# A clean stop: SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C)
# ----------------------------------------------------------------------------------------------------------------


# A worker whose launcher died has this long to save and exit, then SIGALRM ends it: its peers may be gone too, and
# a collective with a dead peer can wait far longer (nccl: 10 minutes). torchrun gives its workers 30 s as well.
ORPHAN_GRACE_S = 30


class StepInterrupted(Exception):
    """A stop request noticed inside a training step, before its update (stop_point)."""


class StopRequest:
    """A prompt, clean stop: SIGTERM (a scheduler's preemption, torchrun passing one on, a dead launcher:
    end_with_launcher) or SIGINT (Ctrl-C) only sets a flag; the training loop asks at its stop points - the end of
    every step (`requested()`) and, inside a step, before every forward (`stop_point()`: stage 2 before each
    --grad-accum piece, stage 1 also before the tokenizer's update) - and saves a checkpoint at once. Every rank asks
    at the same points and they agree through one all-reduce (MAX), so all stop at the same point and none waits in
    a collective the others left. A stop inside a step drops that step (`step()` puts the random states and buffers
    back where it began), so the checkpoint of the step before resumes exactly. Repeated signals are ignored while
    the first is honoured: torchrun forwards a terminal's Ctrl-C as a second signal, and the save must not be cut
    short (torchrun kills the workers itself if they take too long: 30 s, its --shutdown_timeout). docs/runs.md
    gives the bound: the longest stretch between two stop points plus one save."""

    active = None                                               # the request stop_point() asks

    def __init__(self, device):
        self.signal, self.device, self._previous = None, device, {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        StopRequest.active = self

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            self._check_launcher()

    def _check_launcher(self):
        """A dead launcher is a stop request too (where no parent-death signal came; where one came, the stop says
        why); the orphan gets a deadline."""
        if launcher_gone() and "launcher" not in (self.signal or ""):
            self.signal = "the launcher's death" + (f" ({self.signal})" if self.signal else "")
            signal.alarm(ORPHAN_GRACE_S)                        # SIGALRM's default action ends the process

    def requested(self):
        """Whether any rank was asked to stop (a collective: every rank calls it at the same point)."""
        self._check_launcher()
        flag = torch.tensor([1.0 if self.signal else 0.0], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signal is None:
            self._check_launcher()                              # its own signal may still be on its way
            self.signal = self.signal or "a signal on another rank"
        return flag.item() > 0

    def step(self, train_step, *args, generators=(), buffers_of=()):
        """train_step(*args) -> its loss terms, or None when a stop request ended it at a stop point before its
        update: the global random states, `generators` (torch.Generator) and the buffers of `buffers_of` (modules
        whose forward changes them: BatchNorm statistics) are then back where the step began."""
        rng, states = rng_state(), [g.get_state() for g in generators]
        buffers = [[b.clone() for b in m.buffers()] for m in buffers_of]
        try:
            return train_step(*args)
        except StepInterrupted:
            set_rng_state(rng)
            for g, state in zip(generators, states):
                g.set_state(state)
            with torch.no_grad():
                for m, saved in zip(buffers_of, buffers):
                    for b, old in zip(m.buffers(), saved):
                        b.copy_(old)
            return None

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        StopRequest.active = None


def stop_point():
    """Inside a training step, before a forward (or an update): raise StepInterrupted when any rank was asked to
    stop (StopRequest.step catches it). Every rank must reach the same stop points. Nothing without an active
    StopRequest (a test calling a train_step directly)."""
    if StopRequest.active is not None and StopRequest.active.requested():
        raise StepInterrupted


# ----------------------------------------------------------------------------------------------------------------
# Commands that write one file (extract, sample, evaluate): a signal leaves no partial file
# ----------------------------------------------------------------------------------------------------------------


class Stopped(BaseException):
    """SIGTERM or SIGINT during a one-file command (signals_raise). A BaseException, like KeyboardInterrupt: no
    `except Exception` holds it up; every `with` and `finally` on the way out runs (removing temporary files)."""

    def __init__(self, name):
        super().__init__(name)
        self.signal = name


class signals_raise:
    """Within this block SIGTERM and SIGINT raise Stopped (the first one; later ones are ignored, so that the clean-up
    it triggers is not cut short). A scheduler's SIGTERM would otherwise end the process where it stands, leaving
    its `<out>.tmp<pid>` file."""

    def __enter__(self):
        self.fired, self.previous = False, {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._raise)
        return self

    def _raise(self, signum, frame):
        if not self.fired:
            self.fired = True
            raise Stopped(signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False
