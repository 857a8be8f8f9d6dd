"""How long a stop takes: the checkpoint save of each preset, and a real SIGTERM inside a long step.

A stop request (SIGTERM, Ctrl-C, a dead torchrun launcher) is honoured at the next stop point - before every forward
of a step (stage 2: before each --grad-accum piece; stage 1: before the tokenizer's forward and before its update)
and at the end of every step - and then the checkpoint is written at once. So a stop takes at most the longest
stretch between two stop points plus one save (docs/runs.md). This prints the second part for the tiny and the
paper presets of both stages: the payload the training script's snapshot() builds (weights, EMA, both optimizers'
AdamW moments - one step of zero gradients creates them -, discriminator, RNG states), built on the CPU, written by
common.save_checkpoint as a stop writes it (into the page cache: no fsync), then the fsync that makes it durable.
One preset at a time (the paper GPT-L with AdamW needs about 7 GB of RAM while it is built). `--stop` also runs the
tiny stage-2 preset with --grad-accum 512 (a step of seconds) and measures SIGTERM -> exit against the step.

    python bench/bench_save.py                                   # the four presets, then the stop
    python bench/bench_save.py --only stage1-tiny stage2-tiny --repeats 5
"""
import argparse
import copy
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import losses  # noqa: E402
import train_stage1  # noqa: E402
import train_stage2  # noqa: E402
from tokenizer import build_tokenizer, count_parameters, get_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("stage1-tiny", "stage1-paper", "stage2-tiny", "stage2-paper")


def with_adam_state(opt, params):
    """The AdamW moments a running optimizer holds: one step on zero gradients."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p in params:
        p.grad = None
    return opt


def stage1_payload(preset):
    """train_stage1.snapshot of the G tokenizer at `preset`: model, EMA, discriminator, LeCam, both AdamW."""
    args = train_stage1.parse_args(["--variant", "g", "--preset", preset])
    cfg, tok_cfg = train_stage1.build_train_config(args), train_stage1.build_tokenizer_config(args)
    model, disc = build_tokenizer("g", config=tok_cfg), losses.NLayerDiscriminator()
    opt_g = with_adam_state(torch.optim.AdamW(model.parameters(), lr=cfg.lr), list(model.parameters()))
    opt_d = with_adam_state(torch.optim.AdamW(disc.parameters(), lr=cfg.lr), list(disc.parameters()))
    run = argparse.Namespace(state={"model": model, "ema": copy.deepcopy(model), "disc": disc, "lecam": losses.LeCam(),
                                    "opt_g": opt_g, "opt_d": opt_d},
                             tok_cfg=tok_cfg, cfg=cfg, noise=torch.Generator(), world=1)
    n = count_parameters(model) + count_parameters(disc)
    return train_stage1.snapshot(run, 1, args), f"G tokenizer ({tok_cfg.image_size} px) + PatchGAN, {n / 1e6:.2f}M"


def stage2_payload(preset):
    """train_stage2.snapshot of the preset's GPT (the paper: GPT-L, the factorized 2^18-code head of the paper
    tokenizer, N = its tokens; tiny: GPT tiny on the tiny tokenizer's codes) with its AdamW."""
    tok_cfg = get_config("g", preset)
    args = train_stage2.build_parser().parse_args(["train", "--codes", "codes.pt", "--model", "llamagen",
                                                   "--preset", preset])
    cfg = train_stage2.build_train_config(args)
    table = {"tokenizer_config": {"z_channels": tok_cfg.z_channels}, "Ks": torch.tensor([tok_cfg.K]),
             "source": {tok_cfg.K: torch.empty(1, tok_cfg.num_tokens)}, "num_classes": 1000 if preset == "paper"
             else 10, "tokenizer": "tokenizer.pt"}
    model = train_stage2.build_generator("llamagen", cfg, table, tok_cfg.K)
    opt = with_adam_state(torch.optim.AdamW(train_stage2.optimizer_groups(model, cfg.weight_decay), lr=cfg.lr),
                          [p for p in model.parameters()])
    run = argparse.Namespace(state={"model": model, "opt": opt}, model=model, cfg=cfg, table=table, world=1,
                             codes_identity={"path": "codes.pt"})
    return (train_stage2.snapshot(run, 1, args), f"GPT-{cfg.gpt}, N = {tok_cfg.num_tokens}, 2^{tok_cfg.z_channels} "
            f"codes, {count_parameters(model) / 1e6:.2f}M")


def time_save(payload, folder, repeats):
    """(seconds of each common.save_checkpoint, seconds of each fsync after it, the file's bytes)."""
    path, saves, syncs = os.path.join(folder, "last.pt"), [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        common.save_checkpoint(path, payload)
        saves.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        syncs.append(time.perf_counter() - t0)
    size = os.path.getsize(path)
    os.remove(path)
    return saves, syncs, size


def stop_latency(folder, grad_accum=512):
    """The tiny stage-2 preset on codes of a random 32 px tokenizer, batch = --grad-accum 512 one-sequence pieces:
    SIGTERM once step 1 is logged -> (the seconds of step 1, the seconds from the signal to the exit, its output)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import random_tokenizer_checkpoint
    tok = random_tokenizer_checkpoint(os.path.join(folder, "tok.pt"), 0, image_size=32, K=16, K_low=0, K_high=2)
    codes, out = os.path.join(folder, "codes.pt"), os.path.join(folder, "run")
    subprocess.run([sys.executable, os.path.join(ROOT, "train_stage2.py"), "extract", "--tokenizer", tok, "--keep",
                    "16", "--num-images", str(grad_accum // 2), "--flip", "--out", codes], check=True,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_stage2.py"), "train", "--codes", codes,
                             "--model", "llamagen", "--preset", "tiny", "--gpt", "tiny", "--batch-size",
                             str(grad_accum), "--grad-accum", str(grad_accum), "--steps", "5", "--log-every", "1",
                             "--out", out], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(out, "log.jsonl")
    while not (os.path.exists(log) and open(log).read().strip()):
        time.sleep(0.05)
    seqs_per_s = json.loads(open(log).readline())["seqs_per_s"]
    time.sleep(0.5 * grad_accum / seqs_per_s)                  # the middle of step 2
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate()
    return grad_accum / seqs_per_s, time.time() - t0, stdout.strip().splitlines()[-1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stop", action="store_true", help="also measure a real SIGTERM inside a long step")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'preset':<13} {'what':<52} {'file':>9} {'save (median, max)':>20} {'+ fsync':>9}", flush=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(ROOT, "runs") if os.path.isdir(os.path.join(ROOT, "runs"))
                                     else None) as folder:
        for name in args.only:
            stage, preset = name.split("-")
            payload, what = (stage1_payload if stage == "stage1" else stage2_payload)(preset)
            saves, syncs, size = time_save(payload, folder, args.repeats)
            del payload
            print(f"{name:<13} {what:<52} {common.format_bytes(size):>9} {statistics.median(saves):>9.2f} s, "
                  f"{max(saves):5.2f} s {statistics.median(syncs):>7.2f} s", flush=True)
        if args.stop:
            step, stop, line = stop_latency(folder)
            print(f"stop: tiny stage 2, a step of 512 pieces takes {step:.1f} s; SIGTERM in its middle -> exit in "
                  f"{stop:.2f} s ({line})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
