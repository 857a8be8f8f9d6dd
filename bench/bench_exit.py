"""Repeat short 2-process torchrun trainings and count how each one ended (a finished run must exit 0).

A run that finished can still abort at teardown when one rank destroys its process group (and exits) while the
other still has gloo work in flight ("terminate called without an active exception", SIGABRT, torchrun returns 1);
common.teardown_distributed meets every rank at a barrier first. This counts exit codes over many runs.

    python bench/bench_exit.py --runs 40          # about 10 s a run on 2 CPU cores
"""
import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    outcomes, aborts, t0 = collections.Counter(), 0, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            proc = subprocess.run(["torchrun", "--nproc_per_node=2", f"--master_port={29600 + i % 50}",
                                   os.path.join(ROOT, "train_stage1.py"), "--variant", "g", "--preset", "tiny",
                                   "--steps", str(args.steps), "--batch-size", "4", "--sample-every", "100000",
                                   "--out", os.path.join(tmp, f"r{i}")],
                                  cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            outcomes[proc.returncode] += 1
            aborts += "terminate called" in proc.stderr
            print(f"run {i + 1:3d}: exit {proc.returncode}" + ("  (terminate called ...)" if "terminate called"
                                                                in proc.stderr else ""), flush=True)
    print(f"{args.runs} runs in {time.time() - t0:.0f} s: exit codes {dict(outcomes)}, "
          f"'terminate called' in {aborts}")
    return 0 if set(outcomes) == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
