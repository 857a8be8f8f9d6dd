"""Time one ToMe step (matching + size-weighted merge + source update) with cheap vs dense source tracking.

The encoder merges in every one of its 12 attention layers, so source tracking must be cheap. merge.py keeps an
index map (B, N) from original to merged token (`track_source`), the form the source has everywhere;
ToMe's reference keeps the dense (B, N, N) matrix and merges its rows at every layer (`merge_source_matrix`).

    python bench/bench_merge.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from merge import bipartite_soft_matching, merge_source_matrix, merge_wavg, track_source  # noqa: E402


def timeit(fn, repeats=10):
    fn()                                                                  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main():
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'B':>3} {'N':>5} {'r':>3} | {'matching':>9} {'+wavg':>9} | {'assign':>9} {'dense src':>10} | "
          f"{'step w/ assign':>14} {'step w/ dense':>13} {'speed-up':>8}")
    for B, N, r in [(32, 1024, 64), (32, 256, 10)]:
        metric, x = torch.randn(B, N, 64), torch.randn(B, N, 512)
        assign = torch.arange(N).expand(B, N).clone()
        source = torch.eye(N)[None].expand(B, N, N).contiguous()
        t_match = timeit(lambda: bipartite_soft_matching(metric, r))
        merge, _ = bipartite_soft_matching(metric, r)
        t_wavg = timeit(lambda: merge_wavg(merge, x))
        t_assign = timeit(lambda: track_source(merge, assign))
        t_dense = timeit(lambda: merge_source_matrix(merge, x, source))

        def step_with_assignment():
            merge, _ = bipartite_soft_matching(metric, r)
            merge_wavg(merge, x)
            return track_source(merge, assign)

        def step_with_dense_source():
            merge, _ = bipartite_soft_matching(metric, r)
            merge_wavg(merge, x)
            return merge_source_matrix(merge, x, source)

        step_assign, step_dense = timeit(step_with_assignment), timeit(step_with_dense_source)
        print(f"{B:>3} {N:>5} {r:>3} | {t_match * 1e3:7.2f}ms {t_wavg * 1e3:7.2f}ms | {t_assign * 1e3:7.3f}ms "
              f"{t_dense * 1e3:8.2f}ms | {step_assign * 1e3:12.2f}ms {step_dense * 1e3:11.2f}ms "
              f"{step_dense / step_assign:7.1f}x")
    print("source tracking alone is the 'assign' vs 'dense src' columns; a whole step is matching + wavg + tracking")


if __name__ == "__main__":
    main()
