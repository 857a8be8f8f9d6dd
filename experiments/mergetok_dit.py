"""MergeTok's tokens under a diffusion and an autoregressive generator, and the ablation of (i), at CPU scale.

The MergeTok abstract claims its tokens are "compatible with both autoregressive and diffusion generators" and that
(i), the merged-token semantic alignment of the VAE branch, helps. One command, from scratch:

    python experiments/mergetok_dit.py --out runs/mergetok-dit

  1. stage 1   two MergeTok tokenizers at the CPU scale, two at a time (one thread each): `train_stage1.py
               --variant mergetok --preset tiny` (32 px, N = 64 merged to K = 36, d = 10 LFQ bits, C = 18 latent
               channels), and the same without (i) (`--sem-weight 0`)
  2. extract   each one's codes and continuous latents at K = 36 of 4000 training images and their mirror images,
               and of 500 held-out images (`train_stage2.py extract --keep 36`)
  3. train     DiT on each tokenizer's continuous latents (`train --model dit --preset tiny`) and LlamaGen on the
               first one's discrete codes (`train --model llamagen --preset tiny`), two at a time
  4. nll       each generator's held-out figure: the DiT's flow loss, LlamaGen's NLL per code
  5. sample    50 per class of each (500 per row): the DiT at guidance --cfg-dit in --euler-steps steps, LlamaGen at
               --cfg-llamagen
  6. score     `evaluate.py shapes` on every sample set and on the ceilings: each tokenizer's reconstructions of 500
               held-out images through its continuous branch (the DiT's ceiling) and its discrete one with the true
               source (LlamaGen's); the bar, (samples - 10%) >= 0.8 x (ceiling - 10%), checked per DiT row

Everything lands in --out (refused if it holds files): the tokenizers, codes, generators, every command's log
(logs/), `table.md` and `table.json` (the rows, their per-class accuracy, the bar, the wall time and the load
average), and `grid_<row>.png` (8 samples per class, one row per class, the class named beside it).
"""
import argparse
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stage2_cpu import phase, python, read_log, run_all, small_grid          # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as data_lib                                                        # noqa: E402

K = 36                                          # MergeTok tiny's target K: the one the generators model
TOKENIZERS = {"mt": ([], "MergeTok"), "mt-nosem": (["--sem-weight", "0"], "MergeTok without (i)")}
GENERATORS = {                                  # row: (tokenizer, train arguments, what the table calls it)
    "dit-mt": ("mt", ["--model", "dit"], "DiT on MergeTok's continuous latents"),
    "llamagen-mt": ("mt", ["--model", "llamagen"], "LlamaGen on MergeTok's discrete codes"),
    "dit-mt-nosem": ("mt-nosem", ["--model", "dit"], "DiT on the continuous latents of MergeTok without (i)"),
}
CHANCE = 0.1                                    # 10 classes


def meets_bar(samples, ceiling):
    """The bar: the samples reach 80% of the ceiling's margin above chance."""
    return samples - CHANCE >= 0.8 * (ceiling - CHANCE)


def held_out_figure(log):
    """The `nll` line of a generator: the DiT's held-out flow loss, LlamaGen's NLL per code."""
    flow = re.search(r"flow loss ([0-9.]+) per element with the labels, ([0-9.]+) with the null class", log)
    if flow:
        return f"flow loss {float(flow.group(1)):.4f} (null class {float(flow.group(2)):.4f})"
    nll = re.search(r"\| ([0-9.]+) nats per code", log)
    return f"NLL {float(nll.group(1)):.3f} nats per code" if nll else "?"


def table_rows(out, logs, cfgs):
    """(name, held-out figure, shapes row, ceiling row or None) of every row of the table, ceilings first."""
    rows, ceilings = [], {}
    for t, (_, title) in TOKENIZERS.items():
        with open(os.path.join(out, f"shapes-{t}.json")) as f:
            rec = json.load(f)["rows"]
        real = rec["held-out real images"]
        cont = next(r for k, r in rec.items() if "continuous" in k)
        disc = next(r for k, r in rec.items() if k.startswith("reconstructions") and "continuous" not in k)
        ceilings[t] = {"continuous": cont, "discrete": disc}
        rows += [(f"{title}: reconstructions, continuous branch (the DiT's ceiling)", "-", cont, None),
                 (f"{title}: reconstructions, discrete branch, true source (LlamaGen's ceiling)", "-", disc, None)]
    rows.insert(0, ("held-out real images", "-", real, None))
    for n, (t, _, title) in GENERATORS.items():
        with open(os.path.join(out, n, "shapes.json")) as f:
            r = next(v for k, v in json.load(f)["rows"].items() if k.startswith("samples"))
        branch = "continuous" if n.startswith("dit") else "discrete"
        rows.append((f"{title} ({cfgs[n]})", held_out_figure(read_log(logs, f"nll-{n}")), r, ceilings[t][branch]))
    return rows


def write_table(out, logs, cfgs, wall, load, per_class=8):
    """table.md, table.json and the grids from the scores in `out`; prints the table."""
    rows = table_rows(out, logs, cfgs)
    lines = ["| row, CPU scale (K = 36) | held-out figure | class accuracy | Frechet distance | bar: (acc - 10%) >= "
             "0.8 x (ceiling - 10%) |", "| --- | --- | --- | --- | --- |"]
    for name, figure, r, ceiling in rows:
        bar = "-" if ceiling is None else (
            f"{'met' if meets_bar(r['accuracy'], ceiling['accuracy']) else 'not met'} ({100 * r['accuracy']:.1f} vs "
            f"{100 * (CHANCE + 0.8 * (ceiling['accuracy'] - CHANCE)):.1f} needed)")
        lines.append(f"| {name} | {figure} | {100 * r['accuracy']:.1f}% | {r['fd']:.2f} | {bar} |")
    lines += ["", "| class accuracy, % | " + " | ".join(data_lib.CLASSES) + " |",
              "| --- |" + " --- |" * len(data_lib.CLASSES)]
    for name, _, r, _ in rows:
        lines.append(f"| {name} | " + " | ".join("-" if a is None else f"{100 * a:.0f}" for a in r["per_class"]) + " |")
    table = "\n".join(lines)
    timing = (f"{wall / 60:.1f} min on {os.cpu_count()} CPU cores; load average (1, 5, 15 min) at the start "
              f"{load[0]}, at the end {load[1]}")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n\n" + timing + "\n")
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"rows": [{"name": n, "held_out": h, **r, "ceiling_accuracy": c and c["accuracy"],
                             "bar_met": c and meets_bar(r["accuracy"], c["accuracy"])} for n, h, r, c in rows],
                   "wall_s": wall, "load_start": load[0], "load_end": load[1]}, f, indent=1)
    for n in GENERATORS:
        small_grid(os.path.join(out, n, "samples.npz"), os.path.join(out, f"grid_{n}.png"), per_class)
    print(table)
    print(f"\nmergetok_dit: {timing}; grids: {out}/grid_*.png (one row per class); logs: {logs}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mergetok-dit", help="everything the command writes (a new folder)")
    p.add_argument("--num-images", type=int, default=4000, help="training images to extract (and their mirrors)")
    p.add_argument("--num-per-class", type=int, default=50, help="samples per class of each generator")
    p.add_argument("--cfg-dit", type=float, default=4.0, help="the DiT's classifier-free guidance scale")
    p.add_argument("--euler-steps", type=int, default=50, help="the DiT's Euler steps")
    p.add_argument("--cfg-llamagen", type=float, default=2.0, help="LlamaGen's guidance scale (constant)")
    p.add_argument("--stage1-args", default="", help="extra `train_stage1.py` arguments, e.g. '--steps 100'")
    p.add_argument("--dit-args", default="", help="extra `train_stage2.py train --model dit` arguments")
    p.add_argument("--llamagen-args", default="", help="extra `train_stage2.py train --model llamagen` arguments")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"mergetok_dit: --out {args.out} already holds files; pass a new --out")
    out, logs = os.path.abspath(args.out), os.path.join(os.path.abspath(args.out), "logs")
    os.makedirs(logs, exist_ok=True)
    t0, load_start = time.time(), tuple(round(x, 2) for x in os.getloadavg())
    tok = {t: os.path.join(out, t, "last.pt") for t in TOKENIZERS}
    codes = {t: os.path.join(out, f"codes-{t}.pt") for t in TOKENIZERS}
    val = {t: os.path.join(out, f"codes-val-{t}.pt") for t in TOKENIZERS}

    phase("1. stage 1: MergeTok and MergeTok without (i), two at a time", t0)
    run_all({f"stage1-{t}": python("train_stage1.py", "--variant", "mergetok", "--preset", "tiny", "--sample-every",
                                   0, *extra, *args.stage1_args.split(), "--out", os.path.join(out, t))
             for t, (extra, _) in TOKENIZERS.items()}, logs)

    phase(f"2. extract: codes and continuous latents at K = {K}", t0)
    jobs = {}
    for t in TOKENIZERS:
        jobs[f"extract-{t}"] = python("train_stage2.py", "extract", "--tokenizer", tok[t], "--keep", K,
                                      "--num-images", args.num_images, "--flip", "--out", codes[t])
        jobs[f"extract-val-{t}"] = python("train_stage2.py", "extract", "--tokenizer", tok[t], "--keep", K,
                                          "--split", "val", "--num-images", 500, "--out", val[t])
    run_all(jobs, logs)

    phase(f"3. train: {', '.join(GENERATORS)}, two at a time", t0)
    extra = {"dit": args.dit_args.split(), "llamagen": args.llamagen_args.split()}
    run_all({f"train-{n}": python("train_stage2.py", "train", "--codes", codes[t], *model, "--preset", "tiny",
                                  *extra[model[1]], "--out", os.path.join(out, n))
             for n, (t, model, _) in GENERATORS.items()}, logs)

    phase("4. nll, 5. sample: each generator", t0)
    jobs, cfgs = {}, {}
    for n, (t, model, _) in GENERATORS.items():
        ckpt = os.path.join(out, n, "last.pt")
        if model[1] == "dit":
            settings, cfgs[n] = ["--cfg", args.cfg_dit, "--num-steps", args.euler_steps], \
                f"cfg {args.cfg_dit:g}, {args.euler_steps} Euler steps"
        else:
            settings, cfgs[n] = ["--cfg", args.cfg_llamagen], f"cfg {args.cfg_llamagen:g}"
        jobs[f"nll-{n}"] = python("train_stage2.py", "nll", "--ckpt", ckpt, "--codes", val[t])
        jobs[f"sample-{n}"] = python("train_stage2.py", "sample", "--ckpt", ckpt, "--num-per-class",
                                     args.num_per_class, *settings, "--out", os.path.join(out, n, "samples"))
    run_all(jobs, logs)

    phase("6. score: evaluate.py shapes on the ceilings, then on the samples", t0)
    run_all({f"shapes-{t}": python("evaluate.py", "shapes", "--reconstructions", tok[t], "--branch", "both",
                                   "--num-images", 500, "--json", os.path.join(out, f"shapes-{t}.json"))
             for t in TOKENIZERS}, logs, 1)            # one at a time: the first trains the classifier if not cached
    run_all({f"shapes-{n}": python("evaluate.py", "shapes", os.path.join(out, n, "samples.npz"), "--json",
                                   os.path.join(out, n, "shapes.json")) for n in GENERATORS}, logs)

    write_table(out, logs, cfgs, time.time() - t0, (load_start, tuple(round(x, 2) for x in os.getloadavg())),
                min(8, args.num_per_class))
    return 0


if __name__ == "__main__":
    sys.exit(main())
