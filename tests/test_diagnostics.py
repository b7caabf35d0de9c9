"""The R diagnostic against a brute-force eigendecomposition."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from trackstar.attribution import METHODS, TrackStar
from trackstar.attribution.diagnostics import curvature_diagnostic

sys.path.insert(0, str(Path(__file__).parent))
from test_attribution import QUERIES, TRAIN, make_gpt2, make_tokenizer, train_adafactor  # noqa: E402


def brute_share(x: torch.Tensor, r: torch.Tensor, k: int) -> float:
    """Mean over rows of the squared-norm share in the span of r's top-k eigenvectors (eigh)."""
    _, vecs = torch.linalg.eigh(r.double())
    top = vecs[:, -k:]
    x = x.double()
    return float(((x @ top).pow(2).sum(1) / x.pow(2).sum(1)).mean())


def test_energy_shares_equal_brute_force_and_find_a_shared_direction():
    gen = torch.Generator().manual_seed(0)
    d, m, n = 24, 10, 60
    common = torch.randn(d, generator=gen)
    queries = 3 * common + 0.3 * torch.randn(m, d, generator=gen)  # the queries share one direction
    train = torch.randn(n, d, generator=gen) * torch.linspace(3, 0.2, d)  # R_train's top: the first axes
    r_train = train.double().T @ train.double() / n
    w = torch.linalg.inv(torch.linalg.cholesky(r_train + torch.eye(d, dtype=torch.float64))).T.float()
    out = curvature_diagnostic(queries, train, r_train, lambda x: x @ w, ks=(1, 3))
    r_eval = queries.double().T @ queries.double() / m
    for k in (1, 3):
        assert out[f"random/top{k}"] == k / d
        for name, x in (("query", queries), ("train", train), ("query_whitened", queries @ w),
                        ("train_whitened", train @ w)):
            assert out[f"{name}/r_eval_top{k}"] == pytest.approx(brute_share(x, r_eval, k), rel=1e-6)
            assert out[f"{name}/r_train_top{k}"] == pytest.approx(brute_share(x, r_train, k), rel=1e-4)
    assert out["query/r_eval_top1"] > 0.9 > 0.5 > out["query/r_train_top1"]  # what R_eval would take out
    assert out["train/r_train_top3"] > out["train/r_eval_top3"]


def test_trackstar_result_carries_the_diagnostic_of_its_own_stores(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_engine_diagnostic(tmp_path)
    finally:
        torch.set_num_threads(before)


def _check_engine_diagnostic(tmp_path):
    tokenizer = make_tokenizer()
    model = make_gpt2(width=8, layers=1)
    opt = train_adafactor(model, tokenizer, lr=0.01)
    settings = METHODS["trackstar"].replace(projection="identity", k=3, lam=0.9)
    engine = TrackStar(model, tokenizer, settings, optimizer=opt, work_dir=tmp_path)
    assert engine.attribute(TRAIN, QUERIES).curvature_diagnostic is None  # only when asked
    result = engine.attribute(TRAIN, QUERIES, diagnose=True)
    diag = result.curvature_diagnostic
    from trackstar.attribution.store import FeatureStore

    train, query = FeatureStore.open(result.train_store), FeatureStore.open(result.query_store)
    g, q = train.rows().double(), query.rows().double()
    assert diag["query/r_train_top1"] == pytest.approx(brute_share(q, g.T @ g / len(TRAIN), 1), rel=1e-4)
    assert diag["train/r_eval_top1"] == pytest.approx(brute_share(g, q.T @ q / len(QUERIES), 1), rel=1e-6)
    assert "query_whitened/r_eval_top1" in diag
    grad_dot = METHODS["grad_dot"].replace(projection="identity", k=3)
    assert TrackStar(model, tokenizer, grad_dot, work_dir=tmp_path).attribute(
        TRAIN, QUERIES, diagnose=True).curvature_diagnostic is None


def test_the_waits_after_extraction_show_progress(tmp_path, capsys):
    """After the feature bars reached 100%, R_train, R_eval, R^-1/2 and scoring printed nothing for
    minutes; each now has a bar, and a cached factor none. With the diagnostic, R^-1/2 itself
    (eigh) is built beside the Cholesky factor scoring uses."""
    tokenizer = make_tokenizer()
    model = make_gpt2(width=8, layers=1)
    opt = train_adafactor(model, tokenizer, lr=0.01)
    settings = METHODS["trackstar"].replace(projection="identity", k=3, lam=0.9)
    TrackStar(model, tokenizer, settings, optimizer=opt, work_dir=tmp_path).attribute(TRAIN, QUERIES, diagnose=True)
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    for bar in ("R_train", "R_eval", "R^-1 factor (1 × Cholesky", "scoring", "R^-1 factor (1 × eigh",
                "R diagnostic"):
        assert any(line.startswith(bar) and "100%" in line for line in lines), bar  # shown, and finished
    TrackStar(model, tokenizer, settings, optimizer=opt, work_dir=tmp_path).attribute(TRAIN, QUERIES)
    err = capsys.readouterr().err
    assert "scoring" in err and "R^-1 factor" not in err and "R_train" not in err  # all cached
