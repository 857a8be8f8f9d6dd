"""MergeTok's ablation at CPU scale (docs/mergetok.md): six 300-step runs, their reconstructions and batch usage.

The abstract of MergeTok (arXiv 2605.30904) claims two supervision signals from token merging, (i) merged-token
semantic alignment and (ii) group-wise constraints on the discrete branch. This script trains, at the tiny preset on
the embedded shapes, 300 steps of batch 16 in one process each (two at a time, one thread each), every step logged:

  G (seeds 0, 1), MergeTok (seeds 0, 1), MergeTok with (i) off (--sem-weight 0), MergeTok with (ii) off
  (--intra-weight 0 --exc-weight 0)

then `evaluate.py recon --keep 64` of each on the 1000 held-out images (MergeTok: the discrete and the continuous
branch), and prints the table: PSNR, SSIM, codebook usage, and the per-step `batch_usage` of log.jsonl (distinct
codes of the batch over min(2^d, its merged tokens)): min / mean / mean of the last 50 steps, steps below 1%
(a collapse) and below 50%.

    python experiments/mergetok_ablation.py --lfq-bits 18 --out runs/mergetok-ablation-d18        # docs' table
    python experiments/mergetok_ablation.py --lfq-bits 18 --out runs/mergetok-ablation-d18 --stage2

--stage2 adds the stage-2 comparison on the seed-0 G and MergeTok checkpoints: codes of 2000 training images and
their mirror images at K = 64 (`train_stage2.py extract`) and of 500 held-out images, a LlamaGen model on each
(--stage2-args='...', by default the recipe of commit 0786991's stage-2 tiny preset: GPT tiny, 600 steps of batch 16, lr
1e-3, label smoothing 0.1, no warm-up), its held-out NLL, 50 samples per class with sampling seeds 0 and 1, and
`evaluate.py shapes` of both sample sets and of the tokenizer's reconstructions (true source, K = 64).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {                                    # name: (variant, extra train_stage1.py arguments, the table's label)
    "g": ("g", ["--seed", "0"], "G, seed 0"),
    "g-seed1": ("g", ["--seed", "1"], "G, seed 1"),
    "mt": ("mergetok", ["--seed", "0"], "MergeTok, seed 0"),
    "mt-seed1": ("mergetok", ["--seed", "1"], "MergeTok, seed 1"),
    "mt-nosem": ("mergetok", ["--sem-weight", "0"], "MergeTok, (i) off (`--sem-weight 0`)"),
    "mt-nogroup": ("mergetok", ["--intra-weight", "0", "--exc-weight", "0"],
                   "MergeTok, (ii) off (`--intra-weight 0 --exc-weight 0`)"),
}
OLD_STAGE2 = "--preset tiny --gpt tiny --batch-size 16 --lr 1e-3 --label-smoothing 0.1 --warmup-steps 0 --steps 600"


def py(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *map(str, args)]


def run_parallel(jobs, logs, parallel):
    """Run {name: argv}, `parallel` at a time, one thread each; stop at the first failure naming its log. Returns
    each job's wall time in seconds."""
    env, walls, items = {**os.environ, "OMP_NUM_THREADS": "1"}, {}, list(jobs.items())
    for i in range(0, len(items), parallel):
        procs = {}
        for name, argv in items[i:i + parallel]:
            print(f"  $ {' '.join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in argv[1:])}",
                  flush=True)
            log = open(os.path.join(logs, f"{name}.log"), "w")
            procs[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log,
                           time.time())
        for name, (proc, log, t0) in procs.items():
            rc = proc.wait()
            walls[name] = time.time() - t0
            log.close()
            if rc != 0:
                for other, _, _ in procs.values():
                    other.kill()
                sys.exit(f"mergetok_ablation: {name} failed (exit {rc}); see {os.path.join(logs, name + '.log')}")
    return walls


def usage_stats(log_jsonl):
    """min / mean / mean of the last 50 steps of batch_usage, steps below 1% and below 50%, steps logged."""
    with open(log_jsonl) as f:
        u = [r["batch_usage"] for r in map(json.loads, f) if "batch_usage" in r]
    last = u[-50:]
    return min(u), sum(u) / len(u), sum(last) / len(last), sum(v < 0.01 for v in u), sum(v < 0.5 for v in u), len(u)


def ablation(args, out, logs):
    train = {}
    for name, (variant, extra, _) in RUNS.items():
        argv = py("train_stage1.py", "--variant", variant, "--preset", "tiny", "--steps", args.steps,
                  "--log-every", 1, "--out", os.path.join(out, name), *extra)
        train[f"train-{name}"] = argv + (["--lfq-bits", str(args.lfq_bits)] if args.lfq_bits else [])
    walls = run_parallel(train, logs, args.parallel)
    recon = {f"recon-{name}": py("evaluate.py", "recon", "--ckpt", os.path.join(out, name, "last.pt"), "--keep", 64,
                                 "--out", os.path.join(out, name, "recon.json"),
                                 *(["--max-images", args.max_images] if args.max_images else []))
             for name in RUNS}
    run_parallel(recon, logs, args.parallel)
    lines = [f"| run ({args.steps} steps) | branch | PSNR, K = 64 | SSIM | codebook usage, held-out images | "
             "batch usage: min / mean / last 50 steps | steps < 1% (collapse) | steps < 50% |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (_, _, label) in RUNS.items():
        with open(os.path.join(out, name, "recon.json")) as f:
            rows = json.load(f)["rows"]
        lo, mean, last, collapsed, below, n = usage_stats(os.path.join(out, name, "log.jsonl"))
        for r in rows:
            if r.get("branch", "discrete") == "discrete":
                lines.append(f"| {label} | discrete | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                             f"{100 * r['codebook_usage']:.2f}% | {lo:.3f} / {mean:.3f} / {last:.3f} | "
                             f"{collapsed} / {n} | {below} / {n} |")
            else:
                lines.append(f"| | continuous | {r['psnr']:.2f} | {r['ssim']:.3f} | - | - | - | - |")
    times = ", ".join(f"{name} {walls['train-' + name]:.0f} s" for name in RUNS)
    return lines, f"training wall times (one thread each, {args.parallel} side by side): {times}"


def stage2(args, out, logs):
    jobs, names = {}, {"g": "G", "mt": "MergeTok, discrete branch"}
    for name in names:
        tok = os.path.join(out, name, "last.pt")
        jobs[f"extract-{name}"] = py("train_stage2.py", "extract", "--tokenizer", tok, "--keep", 64, "--num-images",
                                     args.stage2_images, "--flip", "--out", os.path.join(out, f"codes-{name}.pt"))
        jobs[f"extract-val-{name}"] = py("train_stage2.py", "extract", "--tokenizer", tok, "--keep", 64, "--split",
                                         "val", "--num-images", 500,
                                         "--out", os.path.join(out, f"codes-val-{name}.pt"))
    run_parallel(jobs, logs, args.parallel)
    run_parallel({f"train-llamagen-{name}": py("train_stage2.py", "train", "--codes",
                                               os.path.join(out, f"codes-{name}.pt"), "--model", "llamagen",
                                               "--out", os.path.join(out, f"llamagen-{name}"),
                                               *args.stage2_args.split()) for name in names}, logs, args.parallel)
    jobs = {}
    for name in names:
        ckpt = os.path.join(out, f"llamagen-{name}", "last.pt")
        jobs[f"nll-{name}"] = py("train_stage2.py", "nll", "--ckpt", ckpt, "--codes",
                                 os.path.join(out, f"codes-val-{name}.pt"))
        for seed in (0, 1):
            jobs[f"sample-{name}-seed{seed}"] = py("train_stage2.py", "sample", "--ckpt", ckpt, "--num-per-class",
                                                   args.num_per_class, "--seed", seed, "--out",
                                                   os.path.join(out, f"llamagen-{name}", f"samples_seed{seed}"))
    run_parallel(jobs, logs, args.parallel)
    jobs = {}
    for name in names:
        for seed in (0, 1):
            extra = ["--reconstructions", os.path.join(out, name, "last.pt"), "--keep", 64] if seed == 0 else []
            samples, result = (os.path.join(out, f"llamagen-{name}", f"samples_seed{seed}.npz"),
                               os.path.join(out, f"shapes-{name}-seed{seed}.json"))
            jobs[f"shapes-{name}-seed{seed}"] = py("evaluate.py", "shapes", samples, *extra, "--json", result)
    run_parallel(jobs, logs, 1)                    # the first trains the shapes classifier (cached for the others)
    lines = ["| tokens (tokenizer after the ablation's steps) | held-out NLL, nats per code | samples, seed 0: "
             "accuracy / FD | samples, seed 1: accuracy / FD | reconstructions, true source: accuracy / FD |",
             "| --- | --- | --- | --- | --- |"]
    for name, label in names.items():
        with open(os.path.join(logs, f"nll-{name}.log")) as f:
            m = re.search(r"\| ([0-9.]+) nats per code", f.read())
        cells = [label, f"{float(m.group(1)):.3f}" if m else "?"]
        for seed in (0, 1):
            with open(os.path.join(out, f"shapes-{name}-seed{seed}.json")) as f:
                rows = json.load(f)["rows"]
            sample = next(v for k, v in rows.items() if k.startswith("samples"))
            cells.append(f"{100 * sample['accuracy']:.1f}% / {sample['fd']:.1f}")
            if seed == 0:
                rec = next(v for k, v in rows.items() if k.startswith("reconstructions"))
        cells.append(f"{100 * rec['accuracy']:.1f}% / {rec['fd']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mergetok-ablation", help="a new folder: the six runs, logs, table.md")
    p.add_argument("--lfq-bits", type=int, default=None, help="train_stage1.py --lfq-bits (18: commit 0786991's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--parallel", type=int, default=2, help="runs at the same time (one thread each)")
    p.add_argument("--max-images", type=int, default=None, help="fewer held-out images, to check this script")
    p.add_argument("--stage2", action="store_true", help="also the stage-2 comparison on G's and MergeTok's codes")
    p.add_argument("--stage2-images", type=int, default=2000, help="training images to tokenize (and their mirrors)")
    p.add_argument("--stage2-args", default=OLD_STAGE2,
                   help="`train_stage2.py train` arguments, given as --stage2-args='...' (default: %(default)s)")
    p.add_argument("--num-per-class", type=int, default=50, help="samples per class of each sample set")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"mergetok_ablation: --out {args.out} already holds files; pass a new --out")
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    t0 = time.time()
    lines, times = ablation(args, out, logs)
    if args.stage2:
        lines += [""] + stage2(args, out, logs)
    footer = f"{times}; all: {(time.time() - t0) / 60:.1f} min on {os.cpu_count()} CPU cores"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + f"\n\n{footer}\n")
    print("\n".join(lines) + f"\n\n{footer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
