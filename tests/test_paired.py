"""Paired differences between table rows over the same queries, against a brute-force bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_tables import record, write

from trackstar.tables import load_local_runs
from trackstar.tables.aggregate import table1
from trackstar.tables.paired import PER_QUERY_CACHE, paired_table
from trackstar.tables.render import to_csv, to_markdown

N = 60


def _per_query(rng, base: np.ndarray, shift: float, noise: float) -> pd.DataFrame:
    mrr = np.clip(base + shift + rng.normal(0, noise, N), 0, 1)
    return pd.DataFrame({"example_id": [f"Q{i:03d}" for i in range(N)], "has_trex_sentence": [i % 10 != 0 for i in range(N)],
                         "mrr": mrr, "recall@10": (mrr > 0.5).astype(float), "tail_patch@10": 10 * mrr})


@pytest.fixture
def runs(tmp_path):
    PER_QUERY_CACHE.clear()
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, N)  # per-query difficulty shared by every method: what pairing removes
    frames = {}
    for method, shift in (("bm25", 0.15), ("grad_cosine", -0.02), ("trackstar", 0.0)):
        run_dir = write(tmp_path / "results", record("table1", method, 0.5))
        frames[method] = _per_query(rng, base, shift, 0.03)
        frames[method].to_csv(run_dir / "per_query.csv", index=False)
    return load_local_runs(tmp_path / "results").frame, frames


def brute_force(a: pd.DataFrame, b: pd.DataFrame, metric: str, resamples=20000, seed=7):
    keep = a["has_trex_sentence"]
    d = (a.loc[keep, metric] - b.loc[keep, metric]).to_numpy()
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    return d.mean(), np.quantile(means, 0.025), np.quantile(means, 0.975), len(d)


def test_paired_differences_equal_a_brute_force_bootstrap(runs):
    frame, frames = runs
    table = table1(frame)
    paired = paired_table(table)
    assert paired.name == "table1_paired"
    rows = {r["label:Method"]: r for _, r in paired.rows.iterrows()}
    for method, label in (("bm25", "BM25"), ("grad_cosine", "Gradient cosine")):
        for metric in ("mrr", "tail_patch@10"):
            mean, low, high, n = brute_force(frames[method], frames["trackstar"], metric)
            key = f"paired/TrackStar/{metric}"
            got = rows[label]
            assert got[key] == pytest.approx(mean, abs=1e-12) and got[f"{key}/n"] == n == 54
            scale = high - low
            assert got[f"{key}/ci_low"] == pytest.approx(low, abs=0.05 * scale)
            assert got[f"{key}/ci_high"] == pytest.approx(high, abs=0.05 * scale)
    # The reference itself has no difference; the other reference (BM25) has its own columns.
    assert np.isnan(rows["TrackStar"]["paired/TrackStar/mrr"]) and np.isnan(rows["BM25"]["paired/BM25/mrr"])
    assert rows["TrackStar"]["paired/BM25/mrr"] == pytest.approx(-rows["BM25"]["paired/TrackStar/mrr"])


def test_pairing_resolves_what_marginal_intervals_cannot(runs):
    frame, frames = runs
    paired = paired_table(table1(frame))
    cosine = paired.rows[paired.rows["label:Method"] == "Gradient cosine"].iloc[0]
    # Marginal 95% intervals of the two methods' MRR overlap widely ...
    spread = frames["trackstar"]["mrr"].std() / np.sqrt(N) * 1.96
    assert spread > abs(cosine["paired/TrackStar/mrr"])
    # ... while the paired interval excludes 0: the shared per-query difficulty cancels.
    assert cosine["paired/TrackStar/mrr/ci_high"] < 0
    markdown, csv = to_markdown(paired), to_csv(paired)
    assert "Δ MRR vs TrackStar" in markdown and "Δ MRR vs BM25" in markdown and "| TrackStar | — |" in markdown
    assert "Δ MRR vs TrackStar ci_low" in csv


def test_no_companion_without_per_query_metrics(tmp_path):
    PER_QUERY_CACHE.clear()
    for method in ("bm25", "trackstar"):
        write(tmp_path / "results", record("table1", method, 0.5))
    assert paired_table(table1(load_local_runs(tmp_path / "results").frame)) is None
