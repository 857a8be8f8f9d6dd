"""Time and peak memory of the exact LFQ entropy terms at d = 18, against a naive chunked enumeration.

8192 tokens = the G variant's batch of 32 images x 256 merged tokens. Each measurement runs in a fresh
subprocess so that its peak resident memory (ru_maxrss) can be read.

    python bench/bench_lfq.py
"""
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENS, DIM, INV_T = 8192, 18, 100.0


def naive_entropy_terms(z, inv_temperature, chunk=8192):
    """Enumerate all 2^d codes in chunks: two passes (log-normaliser, then entropies). Never (T x 2^d) at once."""
    import torch
    d = z.shape[1]
    codes_of = lambda lo, hi: (((torch.arange(lo, hi)[:, None] >> torch.arange(d)) & 1).float() * 2 - 1)
    lse = torch.full((z.shape[0],), -float("inf"))
    for lo in range(0, 2 ** d, chunk):                                      # pass 1: log sum_c exp(logit)
        logits = 2 * inv_temperature * z @ codes_of(lo, min(lo + chunk, 2 ** d)).T   # (T, chunk)
        lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
    per_sample, avg_parts = torch.zeros(()), []
    for lo in range(0, 2 ** d, chunk):                                      # pass 2: entropies
        logp = 2 * inv_temperature * z @ codes_of(lo, min(lo + chunk, 2 ** d)).T - lse[:, None]
        p = logp.exp()
        per_sample -= (p * logp).sum()
        avg_parts.append(p.mean(dim=0))
    avg = torch.cat(avg_parts)
    return per_sample / z.shape[0], -(avg * avg.clamp_min(1e-30).log()).sum()


def child(which):
    import torch
    from lfq import entropy_terms
    torch.manual_seed(0)
    z = torch.randn(TOKENS, DIM) * 0.01
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = entropy_terms if which == "exact" else naive_entropy_terms
    fn(z[:256], INV_T)                                                      # warm-up on a slice
    t0 = time.perf_counter()
    ps, cb = fn(z, INV_T)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{which},{dt:.4f},{(peak - base) / 1024:.1f},{ps.item():.6f},{cb.item():.6f}")


def main():
    if len(sys.argv) > 1:
        child(sys.argv[1])
        return
    print(f"entropy_terms at d={DIM}, {TOKENS} tokens, inv_temperature={INV_T}")
    rows = {}
    for which in ("exact", "naive"):
        out = subprocess.run([sys.executable, __file__, which], capture_output=True, text=True, check=True).stdout
        name, dt, mem, ps, cb = out.strip().split(",")
        rows[name] = (float(dt), float(mem), float(ps), float(cb))
        print(f"  {name:>5}: {float(dt):8.3f} s   peak memory above baseline {float(mem):8.1f} MB   "
              f"per-sample {float(ps):.5f}  codebook {float(cb):.5f}")
    print(f"  speed-up {rows['naive'][0] / rows['exact'][0]:.0f}x, "
          f"values agree to {abs(rows['naive'][3] - rows['exact'][3]):.2e} (codebook term)")


if __name__ == "__main__":
    main()
