"""The curvature stage: R_train, R_eval, the mix and its inverse factor, before and after.

Run:  pytest benchmarks/bench_curvature.py --benchmark-enable -p no:cacheprovider -o addopts="" -s
      (BENCH_CURVATURE_DIMS=4096,16384 adds d = 16,384: about an hour for the
      eigendecomposition alone on a 2-core machine; BENCH_CURVATURE_EIGH_MAX
      caps the d at which the old way is timed, 8192 by default)

Setting: 2,048 training and 120 query feature rows of dimension d (random,
with a decaying spectrum like real gradient features), λ = 0.99, damping 0.1,
one block. "Before" is the stage as it was: the symmetric R^{-1/2} by an
eigendecomposition; "after" is the inverse transposed Cholesky factor. Both
include R_train and R_eval (float64 sums of outer products, the same code).
Reports seconds of each and their ratio (target >= 5 at d = 4096), and checks
that the unit-normalized scores of every query against every training row
agree (max absolute difference) and that the top-10 sets are the same.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from trackstar.attribution.curvature import Whitening, curvature_matrix, mix
from trackstar.attribution.scoring import unit_normalize

N_TRAIN, N_QUERY, LAM, DAMPING, K = 2048, 120, 0.99, 0.1, 10
DIMS = [int(d) for d in os.environ.get("BENCH_CURVATURE_DIMS", "4096").split(",")]
EIGH_MAX = int(os.environ.get("BENCH_CURVATURE_EIGH_MAX", "8192"))


def _rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    scale = torch.arange(1, d + 1, dtype=torch.float32).pow(-0.5)  # a decaying spectrum
    return torch.randn(n, d, generator=gen) * scale


def _stage(train: torch.Tensor, query: torch.Tensor, factor: str) -> Whitening:
    d = train.shape[1]
    r_train = curvature_matrix(train.split(512), d)
    r_eval = curvature_matrix(query.split(512), d)
    return Whitening.build(mix(r_eval, r_train, LAM), [slice(0, d)], DAMPING, LAM, factor)


def _scores(w: Whitening, train: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    return unit_normalize(w.apply(query)) @ unit_normalize(w.apply(train)).T


@pytest.mark.parametrize("d", DIMS)
def test_curvature_stage(benchmark, d):
    gen = torch.Generator().manual_seed(0)
    train, query = _rows(N_TRAIN, d, gen), _rows(N_QUERY, d, gen)
    t = time.perf_counter()
    after = benchmark.pedantic(_stage, args=(train, query, "cholesky"), rounds=1, iterations=1)
    after_s = time.perf_counter() - t
    info = {"d": d, "after_s": after_s}
    line = f"\n[curvature d={d}] Cholesky {after_s:.1f} s"
    if d <= EIGH_MAX:
        t = time.perf_counter()
        before = _stage(train, query, "symmetric")
        before_s = time.perf_counter() - t
        new, old = _scores(after, train, query), _scores(before, train, query)
        diff = float((new - old).abs().max())
        same_top = bool((new.topk(K).indices.sort().values == old.topk(K).indices.sort().values).all())
        info.update(before_s=before_s, ratio=before_s / after_s, max_abs_score_diff=diff, same_top10=same_top)
        line += (f" | eigh {before_s:.1f} s | ratio {before_s / after_s:.1f} (target >= 5) | max |score diff| "
                 f"{diff:.1e} | same top-{K}: {same_top}")
        assert diff < 1e-4 and same_top
    benchmark.extra_info.update(info)
    print(line)
