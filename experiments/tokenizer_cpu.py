"""The tokenizer at CPU scale (docs/tokenizer_cpu.md): the README's quick start run and its table, in one command.

For each --variant: the quick start's training, `torchrun --nproc_per_node=2 train_stage1.py --variant V --preset
tiny` (1000 steps on the embedded shapes), then `evaluate.py recon --keep 16 25 36 49 64 --source both` on the
1000 held-out images (Table 4's K sweep up to N, Table 5's true and predicted source), and a markdown table of the
results next to the thumbnail bar: the PSNR of an 8-bit thumbnail that stores the same K x d bits as the codes.

    # the quick start's table (the tiny preset, d = 10 LFQ bits)
    python experiments/tokenizer_cpu.py --out runs/tokenizer-cpu
    # G and MergeTok side by side (--seed 1: a second seed)
    python experiments/tokenizer_cpu.py --variant g mergetok --out runs/g-vs-mergetok

One variant prints K, PSNR with the true and the predicted source, recovery accuracy, the thumbnail's PSNR and
codebook usage; several print the PSNRs side by side (MergeTok: its discrete and its continuous branch). Each run
lands in --out/<variant> (train_stage1.py refuses a folder that holds a run); the table also goes to
--out/table.md. --steps, --max-images and --nproc 1 shorten a check of this script (its figures are then not the
docs' ones).
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tokenizer import TokenizerConfig, get_config                            # noqa: E402

def sweep_Ks(N):
    """The K of the table: five perfect squares from 16 up to N, evenly spaced in sqrt(K) (N = 64: 16, 25, 36, 49,
    64; N = 256: 16, 49, 100, 169, 256)."""
    roots = sorted({round(4 + (math.isqrt(N) - 4) * i / 4) for i in range(5)})
    return [r * r for r in roots]
NAMES = {"g": "G", "gr": "G+R", "r": "R", "mergetok": "MergeTok"}


def run(argv, log):
    """Run one command from the repository root, its output into `log`; stop with one line if it fails."""
    print(f"  $ {' '.join(argv[1:] if argv[0] == sys.executable else argv)}", flush=True)
    with open(log, "w") as f:
        rc = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f"tokenizer_cpu: {os.path.basename(log)} failed (exit {rc}); see {log}")


def train_and_evaluate(variant, out, args):
    """Train one variant (torchrun, --nproc processes) and evaluate it; returns (recon rows, tokenizer config)."""
    run_dir = os.path.join(out, variant)
    train = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "train_stage1.py",
             "--variant", variant, "--preset", "tiny", "--seed", str(args.seed), "--out", run_dir]
    train += ["--lfq-bits", str(args.lfq_bits)] if args.lfq_bits else []
    train += ["--steps", str(args.steps)] if args.steps else []
    run(train, os.path.join(out, f"train-{variant}.log"))
    ckpt, result = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "recon.json")
    Ks = sweep_Ks(get_config(variant, "tiny").num_tokens)
    recon = [sys.executable, "evaluate.py", "recon", "--ckpt", ckpt, "--keep", *map(str, Ks), "--source", "both",
             "--out", result]
    recon += ["--max-images", str(args.max_images)] if args.max_images else []
    run(recon, os.path.join(out, f"recon-{variant}.log"))
    with open(result) as f, open(os.path.join(run_dir, "config.json")) as g:
        return json.load(f)["rows"], json.load(g)["tokenizer"]


def row_label(K, cfg):
    fields = {f.name for f in dataclasses.fields(TokenizerConfig)}
    N = TokenizerConfig(**{k: v for k, v in cfg.items() if k in fields}).num_tokens
    return f"{K} (target)" if K == cfg["K"] else f"{K} (= N)" if K == N else str(K)


def pick(rows, K, source="true", branch="discrete"):
    return next(r for r in rows if r["K"] == K and r["source"] == source and r.get("branch", "discrete") == branch)


def one_table(rows, cfg):
    lines = ["| K | PSNR, true source | PSNR, predicted source | recovery acc. | thumbnail PSNR | codebook usage |",
             "| --- | --- | --- | --- | --- | --- |"]
    for K in sorted({r["K"] for r in rows}):
        t, p = pick(rows, K), pick(rows, K, "predicted")
        psnr = f"**{t['psnr']:.2f}**" if K == cfg["K"] else f"{t['psnr']:.2f}"
        lines.append(f"| {row_label(K, cfg)} | {psnr} | {p['psnr']:.2f} | {p['recovery_accuracy']:.2f} | "
                     f"{t['thumb_psnr']:.2f} | {100 * t['codebook_usage']:.1f}% |")
    return lines


def side_by_side(results, cfg):
    head, sep = ["K"], ["---"]
    for variant, (rows, _) in results.items():
        head.append(f"{NAMES[variant]}{' discrete' if variant == 'mergetok' else ''}, true / predicted source")
        if variant == "mergetok":
            head.append("MergeTok continuous")
    head.append("thumbnail")
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * len(head)) + " |"]
    for K in sorted({r["K"] for r in next(iter(results.values()))[0]}):
        cells = [row_label(K, cfg)]
        for variant, (rows, _) in results.items():
            cells.append(f"{pick(rows, K)['psnr']:.2f} / {pick(rows, K, 'predicted')['psnr']:.2f}")
            if variant == "mergetok":
                cells.append(f"{pick(rows, K, branch='continuous')['psnr']:.2f}")
        cells.append(f"{pick(next(iter(results.values()))[0], K)['thumb_psnr']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", nargs="+", default=["g"], choices=list(NAMES), help="one table column each")
    p.add_argument("--out", default="runs/tokenizer-cpu", help="a new folder: one run folder per variant, logs")
    p.add_argument("--lfq-bits", type=int, default=None, help="train_stage1.py --lfq-bits (the tiny preset: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2, help="training processes (the quick start: 2)")
    p.add_argument("--steps", type=int, default=None, help="fewer steps, to check this script (default: 1000)")
    p.add_argument("--max-images", type=int, default=None, help="fewer held-out images, to check this script")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"tokenizer_cpu: --out {args.out} already holds files; pass a new --out")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0, results = time.time(), {}
    for variant in dict.fromkeys(args.variant):
        results[variant] = train_and_evaluate(variant, out, args)
        print(f"[{time.time() - t0:6.0f} s] {variant}: trained and evaluated", flush=True)
    cfg = next(iter(results.values()))[1]
    lines = one_table(*results[args.variant[0]]) if len(results) == 1 else side_by_side(results, cfg)
    wall = time.time() - t0
    footer = (f"{wall / 60:.1f} min on {os.cpu_count()} CPU cores; {cfg['z_channels']} LFQ bits, seed {args.seed}; "
              f"thumbnail: an 8-bit RGB thumbnail of K x {cfg['z_channels']} bits, bilinearly upsampled")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + f"\n\n{footer}\n")
    print("\n".join(lines) + f"\n\n{footer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
