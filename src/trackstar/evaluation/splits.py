"""Averages over queries with 95% bootstrap intervals, overall and per split (SPEC §2.4)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

#: Splits of the paper's analysis: model correctness (Table A.7), frequency
#: bucket, relation.
SPLITS = ("greedy_correct", "c4_frequency_bucket", "relation")


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval over queries.

    Percentile intervals stay defined for constant samples (a metric that is 0
    for every query), where BCa would fail.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(x) == 1 or np.all(x == x[0]):
        return float(x[0]) if len(x) == 1 else float(x.mean()), float(x.min()), float(x.max())
    res = stats.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed)
    )
    return float(x.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


def bootstrap_means(columns: dict[str, Sequence[float]], confidence: float = 0.95, n_resamples: int = 1000,
                    seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """:func:`bootstrap_mean` of every column: the same numbers, bit for bit, at a fraction of
    the cost (a run summarizes ~15 metrics over every split group: ~400 intervals).

    Each :func:`bootstrap_mean` call draws its resample indices from a fresh generator of
    ``seed``, so columns with the same values present draw the same indices: they are drawn
    once per such set of columns, and each column's bootstrap distribution and percentile
    interval are then computed exactly as ``scipy.stats.bootstrap`` computes them for one
    sample (its vectorized statistic over the resampled rows, then ``stats.quantile``).
    ``tests/test_evaluation_metrics.py`` holds the two equal on real and random columns.
    """
    out: dict[str, tuple[float, float, float]] = {}
    together: dict[bytes, list[tuple[str, np.ndarray]]] = {}
    for name, values in columns.items():
        x = np.asarray(values, dtype=float)
        present = ~np.isnan(x)
        y = x[present]
        if len(y) <= 1 or np.all(y == y[0]):
            out[name] = bootstrap_mean(y, confidence, n_resamples, seed)  # no resampling: as it is
        else:
            together.setdefault(present.tobytes(), []).append((name, y))
    for items in together.values():
        n = len(items[0][1])
        index = np.random.default_rng(seed).integers(0, n, (n_resamples, n), dtype="int64")
        for name, y in items:
            theta = np.mean(y[..., index], axis=-1)
            alpha = np.asarray((1 - confidence) / 2, dtype=theta.dtype)
            low, high = stats.quantile(theta, np.stack((alpha, 1 - alpha), axis=-1), axis=-1)
            out[name] = (float(y.mean()), float(low), float(high))
    return {name: out[name] for name in columns}


def summarize(
    per_query: pd.DataFrame,
    metrics: Sequence[str],
    by: str | None = None,
    confidence: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean, interval and query count of each metric, overall or per value of ``by``.

    Returns one row per (group, metric) with columns ``mean``, ``ci_low``,
    ``ci_high``, ``n``.
    """
    missing = [m for m in [*metrics, *([by] if by else [])] if m not in per_query.columns]
    if missing:
        raise KeyError(f"per-query table has no column(s) {missing}; it has {list(per_query.columns)}")
    groups = [("all", per_query)] if by is None else list(per_query.groupby(by, sort=True, dropna=False))
    rows = []
    for key, frame in groups:
        intervals = bootstrap_means({m: frame[m].to_numpy() for m in metrics}, confidence, n_resamples, seed)
        for m in metrics:
            mean, lo, hi = intervals[m]
            rows.append({"split": by or "all", "group": key, "metric": m, "mean": mean, "ci_low": lo, "ci_high": hi, "n": int(frame[m].notna().sum())})
    return pd.DataFrame(rows)


def metric_summary(per_query: pd.DataFrame, metrics: list[str], resamples: int, confidence: float) -> tuple[dict, dict]:
    """(overall, splits): every metric as {mean, ci_low, ci_high, n}, over the scored queries.

    Closed-set queries without a gold sentence are averaged separately
    (``has_trex_sentence``), as the paper does.
    """
    scored = per_query[per_query["has_trex_sentence"]] if "has_trex_sentence" in per_query else per_query

    def table(frame: pd.DataFrame, by: str | None) -> dict:
        out: dict = {}
        for row in summarize(frame, metrics, by=by, confidence=confidence, n_resamples=resamples).to_dict("records"):
            group = str(row["group"])
            out.setdefault(group, {})[row["metric"]] = {k: row[k] for k in ("mean", "ci_low", "ci_high", "n")}
        return out

    overall = table(scored, None)["all"]
    splits = {by: table(scored, by) for by in SPLITS if by in scored and scored[by].notna().any()}
    if "has_trex_sentence" in per_query and (~per_query["has_trex_sentence"]).any():
        splits["has_trex_sentence"] = table(per_query, "has_trex_sentence")
    return overall, splits
