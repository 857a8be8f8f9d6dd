"""Stage 2 on the CPU, end to end: the three generators of Table 3 on the quick start's tokenizer, scored.

One command runs the README's stage-2 commands in order and prints the README's table from their output:

    python experiments/stage2_cpu.py --tokenizer runs/stage1-g-tiny/last.pt

29.7 min on 2 quiet cores (AMD Zen 4, bf16 autocast): extract 3.3 min; training 19.6 min on one core for RandAR
over the recovered codes, 9.2 + 10.0 + 4.5 min on the other for LlamaGen, MergeAR and RandAR on merged tokens;
nll, sampling and scores 2.5 min.

  1. extract   codes of 4000 training images and their mirror images at the tokenizer's kept counts K (MergeAR
               draws K per image, Appendix A.3), and of 500 held-out images for the NLL
  2. train     four generators from a queue, two at a time (one thread each), `train_stage2.py train --preset tiny`:
               LlamaGen and MergeAR (raster order over the N recovered codes), RandAR on the K merged tokens (Sec.
               4.2, decoded through the Source Recovery Model) and RandAR on the N recovered codes (Table 3's
               baseline row: random order over the grid cells, decoded in place)
  3. nll       held-out NLL of each (`train_stage2.py nll`)
  4. sample    50 samples per class of each at cfg 3 (`train_stage2.py sample`), 500 per row of the table
  5. score     `evaluate.py shapes`: the fraction of samples a classifier of the embedded shapes assigns to their
               class (chance 10%) and the Frechet distance of its features to held-out real images; and the
               ceilings: the tokenizer's reconstructions of held-out images with the true and the predicted source

Everything lands in --out (default runs/stage2-cpu, refused if it holds a run): the codes, one folder per generator,
every command's log, `table.md`, `table.json`, and `grid_<model>.png` (8 samples per class, one row per class).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as data_lib                                                      # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATORS = {                      # name: (train arguments, what the table calls it)
    "llamagen": (["--model", "llamagen"], "LlamaGen, raster order over the N recovered codes"),
    "mergear": (["--model", "mergear"], "MergeAR, raster order, compacted KV cache"),
    "randar-recovered": (["--model", "randar", "--tokens", "grid"],
                         "RandAR over the N recovered codes (grid cells), decoded in place"),
    "randar": (["--model", "randar"], "RandAR over the K merged tokens, Source Recovery Model"),
}


def python(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *map(str, args)]


def run_all(jobs, logs_dir, parallel=2, threads=1):
    """Run the commands {name: argv}, at most `parallel` at a time (one thread each), in the given order: a queue,
    so a long job at the front runs beside several short ones. Stop at the first failure, naming its log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    queue, running = list(jobs.items()), {}
    while queue or running:
        while queue and len(running) < parallel:
            name, argv = queue.pop(0)
            log = open(os.path.join(logs_dir, f"{name}.log"), "w")
            print(f"  $ {' '.join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in argv[1:])}",
                  flush=True)
            running[name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log)
        time.sleep(0.5)
        for name, (proc, log) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            log.close()
            del running[name]
            if rc != 0:
                for other, _ in running.values():
                    other.kill()
                sys.exit(f"stage2_cpu: {name} failed (exit {rc}); see {os.path.join(logs_dir, name + '.log')}")


def read_log(logs_dir, name):
    with open(os.path.join(logs_dir, f"{name}.log")) as f:
        return f.read()


def phase(title, t0):
    print(f"[{time.time() - t0:7.0f} s] {title}", flush=True)


def small_grid(npz, out, per_class=8, zoom=2):
    """The first `per_class` samples of every class of an ADM .npz, one row per class, its name written beside it;
    each image enlarged `zoom` times (nearest neighbour: the pixels as they are)."""
    with np.load(npz) as f:
        images, labels = f["arr_0"], f["labels"]
    classes = np.unique(labels)
    rows = [images[labels == c][:per_class] for c in classes]
    x = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 127.5 - 1   # (n, 3, S, S) in [-1, 1]
    x = torch.nn.functional.interpolate(x, scale_factor=zoom, mode="nearest")            # (n, 3, zS, zS)
    data_lib.save_image_grid(x, out, nrow=per_class, row_labels=[data_lib.CLASSES[c] for c in classes])


def write_table(out, logs, names, wall, cfgs):
    """The README's tables from the logs and the shapes scores in `out` (the rows, then each row's accuracy per
    class): table.md, table.json, grid_<model>.png."""
    with open(os.path.join(out, "shapes-reconstructions.json")) as f:
        rec = json.load(f)["rows"]
    ceilings = [("held-out real", "real held-out images"),
                ("true source", "reconstructions, true source: the raster models' ceiling"),
                ("predicted source", "reconstructions, predicted source: the ceiling of RandAR on merged tokens")]
    rows = [(name, "-", r) for part, name in ceilings for key, r in rec.items() if part in key]
    for n in names:
        log = read_log(logs, f"nll-{n}")
        m, cells = re.search(r"\| ([0-9.]+) nats per code", log), re.search(r"cells ([0-9.]+) nats", log)
        nll = f"{float(m.group(1)):.3f} nats per code" if m else "?"
        if m and cells:                                                     # RandAR on merged tokens
            nll = f"{float(m.group(1)):.3f} + {float(cells.group(1)):.3f} (its cell) nats per merged token"
        with open(os.path.join(out, n, "shapes.json")) as f:
            r = next(v for k, v in json.load(f)["rows"].items() if k.startswith("samples"))
        rows.append((f"{GENERATORS[n][1]} (cfg {cfgs[n]:g})", nll, r))
        small_grid(os.path.join(out, n, "samples.npz"), os.path.join(out, f"grid_{n}.png"))
    lines = ["| rows of Table 3, CPU scale | held-out NLL | class accuracy | Frechet distance |",
             "| --- | --- | --- | --- |"]
    for name, nll, r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"| {name} | {nll} | {acc} | {r['fd']:.2f} |")
    lines += ["", "| class accuracy, % | " + " | ".join(data_lib.CLASSES) + " |",
              "| --- |" + " --- |" * len(data_lib.CLASSES)]
    for name, _, r in rows:
        if r.get("per_class"):
            lines.append(f"| {name} | " + " | ".join("-" if a is None else f"{100 * a:.0f}" for a in r["per_class"])
                         + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + f"\n\n{wall / 60:.1f} min on {os.cpu_count()} CPU cores\n")
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"rows": [{"name": n, "nll": nll, **r} for n, nll, r in rows], "wall_s": wall}, f, indent=1)
    print(table)
    print(f"\nstage2_cpu: {wall / 60:.1f} min; samples: {out}/grid_*.png (one row per class); logs: {logs}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="runs/stage1-g-tiny/last.pt", help="the quick start's stage-1 checkpoint")
    p.add_argument("--out", default="runs/stage2-cpu", help="everything the demo writes (a new folder)")
    p.add_argument("--num-images", type=int, default=4000, help="training images to tokenize (and their mirrors)")
    p.add_argument("--num-per-class", type=int, default=50, help="samples per class of each generator")
    p.add_argument("--cfg", type=float, default=2.0,
                   help="classifier-free guidance scale of the raster models' samples (constant)")
    p.add_argument("--cfg-randar", type=float, default=4.0,
                   help="RandAR's end scale of its linear guidance schedule (1 at the first token)")
    p.add_argument("--parallel", type=int, default=2, help="generators trained at the same time (one thread each)")
    p.add_argument("--train-args", default="", help="extra `train_stage2.py train` arguments, e.g. '--steps 100'")
    p.add_argument("--only", nargs="+", choices=list(GENERATORS), default=list(GENERATORS))
    args = p.parse_args(argv)
    if not os.path.isfile(args.tokenizer):
        sys.exit(f"stage2_cpu: --tokenizer {args.tokenizer}: no such file (train it first: the README's quick start)")
    if os.path.exists(args.out) and os.listdir(args.out):
        sys.exit(f"stage2_cpu: --out {args.out} already holds files; pass a new --out")
    out, logs = os.path.abspath(args.out), os.path.join(os.path.abspath(args.out), "logs")
    os.makedirs(logs, exist_ok=True)
    codes_train, codes_val = os.path.join(out, "codes-train.pt"), os.path.join(out, "codes-val.pt")
    t0 = time.time()

    phase("1. extract: codes of the training and the held-out images", t0)
    run_all({"extract-train": python("train_stage2.py", "extract", "--tokenizer", args.tokenizer, "--num-images",
                                     args.num_images, "--flip", "--out", codes_train),
             "extract-val": python("train_stage2.py", "extract", "--tokenizer", args.tokenizer, "--split", "val",
                                   "--num-images", 500, "--out", codes_val)}, logs)

    phase(f"2. train: {', '.join(args.only)}, {args.parallel} at a time", t0)
    names = list(args.only)
    longest_first = sorted(names, key=lambda n: n != "randar-recovered")   # 1 + 2N positions: twice the others'
    run_all({f"train-{n}": python("train_stage2.py", "train", "--codes", codes_train, *GENERATORS[n][0],
                                  "--preset", "tiny", "--out", os.path.join(out, n), *args.train_args.split())
             for n in longest_first}, logs, args.parallel)

    phase("3. nll, 4. sample: each generator", t0)
    jobs = {}
    cfgs = {n: args.cfg_randar if n.startswith("randar") else args.cfg for n in names}
    for n in names:
        ckpt = os.path.join(out, n, "last.pt")
        jobs[f"nll-{n}"] = python("train_stage2.py", "nll", "--ckpt", ckpt, "--codes", codes_val)
        jobs[f"sample-{n}"] = python("train_stage2.py", "sample", "--ckpt", ckpt, "--num-per-class",
                                     args.num_per_class, "--cfg", cfgs[n], "--out", os.path.join(out, n, "samples"))
    run_all(jobs, logs, args.parallel)

    phase("5. score: evaluate.py shapes on the samples and on the reconstructions", t0)
    run_all({"shapes-reconstructions": python("evaluate.py", "shapes", "--reconstructions", args.tokenizer,
                                              "--source", "both", "--num-images", 500, "--json",
                                              os.path.join(out, "shapes-reconstructions.json"))}, logs, 1)
    # after it, not beside it: the first `shapes` trains the classifier when it is not cached yet
    run_all({f"shapes-{n}": python("evaluate.py", "shapes", os.path.join(out, n, "samples.npz"), "--json",
                                   os.path.join(out, n, "shapes.json")) for n in names}, logs, args.parallel)

    write_table(out, logs, names, time.time() - t0, cfgs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
