"""Paired comparisons: each row's difference from a reference row, over the same queries.

Whether one method beats another is a paired question: every run of a table
scores the same queries, so the difference of their per-query metrics has a
far tighter interval than the two marginal intervals suggest. For each row and
each reference (TrackStar, BM25 and the first-order tail-patch prediction in
the method tables; the default TrackStar row in the ablation tables; the
tail-patch oracle wherever a table has it), the companion table ``<name>_paired`` gives the
mean per-query difference (row minus reference) with a percentile-bootstrap
interval over queries (the runs' own resamples and confidence, seed 0),
computed from the ``per_query.csv`` each run record keeps. Queries are those
the table's means are over (with a gold sentence, in the closed set), matched
by ``example_id``. Two rows are compared only over the same (world, model) seeds:
a row whose seeds differ from the reference's (Table 1's rows over three model
seeds against the oracle's one) gets a blank there, never a mixed difference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..experiment.record import PER_QUERY_FILE
from .aggregate import Column, PaperTable, label_column

#: Per table: the reference rows, as (label, predicate on a table row).
METHOD_REFERENCES = (("TrackStar", lambda r: r["method"] == "trackstar"), ("BM25", lambda r: r["method"] == "bm25"))
#: The first-order prediction of tail-patch (over the attributed matrices, as every method row).
FIRST_ORDER = ("First-order", lambda r: r["method"] == "first_order" and r.get("params", "default") == "default")
#: The tail-patch oracle (exact one-step effects), where a table has it (see .oracle).
ORACLE = ("Oracle", lambda r: r["method"] == "oracle_tail_patch")


def _trackstar(test: Callable[[pd.Series], bool]) -> Callable[[pd.Series], bool]:
    # An ablation table's reference is a TrackStar row, never the borrowed oracle row.
    return lambda r: r["method"] == "trackstar" and test(r)


REFERENCES: dict[str, tuple[tuple[str, Callable[[pd.Series], bool]], ...]] = {
    "table1": (*METHOD_REFERENCES, FIRST_ORDER, ORACLE),
    "table2": (*METHOD_REFERENCES, FIRST_ORDER, ORACLE),
    "table_a6": (*METHOD_REFERENCES, ORACLE),
    "table_c1": (*METHOD_REFERENCES, ("Random scores", lambda r: r["method"] == "random")),
    "table_a3": (("loss", _trackstar(lambda r: r["output_fn"] == "loss")), ORACLE),
    "table_a4": (("d=4096", _trackstar(lambda r: r["projection"] == "gaussian" and int(r["d"]) == 4096)), ORACLE),
    "table_a5": (("TrackStar", _trackstar(lambda r: bool(r["use_v"]) and r["curvature"] == "mix"
                                          and bool(r["unit_norm"]) and str(r["lam"]) == str(r.get("lam_default")))),
                 ORACLE),
}


def per_query(run: str) -> pd.DataFrame | None:
    """The per-query metrics of a local run (None for a W&B run or a run without them)."""
    path = Path(run) / PER_QUERY_FILE
    if run.startswith("wandb:") or not path.is_file():
        return None
    frame = pd.read_csv(path)
    if "has_trex_sentence" in frame:
        frame = frame[frame["has_trex_sentence"].astype(bool)]
    return frame.set_index("example_id")


def worlds(row: pd.Series) -> frozenset:
    """The world seeds behind a table row: queries pair only within one world (their ids
    are positions in it)."""
    seeds = row.get("seed_worlds")
    return frozenset(seeds) if isinstance(seeds, tuple) else frozenset({str(row.get("world_seed"))})


def checkpoints(row: pd.Series) -> frozenset:
    """The (world seed, model seed) pairs behind a table row: two rows pair only over the same
    ones (a row over three model seeds against the oracle's one seed would mix checkpoints)."""
    models = row.get("seed_models") if isinstance(row.get("seed_models"), tuple) and row.get("seed_models") \
        else (str(row.get("model_seed")),)
    return frozenset((w, m) for w in worlds(row) for m in models)


def row_frame(row: pd.Series) -> pd.DataFrame | None:
    """The per-query metrics of a table row: its run's, or for a row over seeds the mean over
    its seeds' runs of each query (none when its seeds include several worlds)."""
    runs = row["seed_runs"] if isinstance(row.get("seed_runs"), tuple) else (row["run"],)
    frames = [per_query(run) for run in runs]
    if any(f is None for f in frames):
        return None
    if len(frames) == 1:
        return frames[0]
    if len(worlds(row)) > 1:
        return frames[0].iloc[0:0]
    shared = frames[0].index
    for f in frames[1:]:
        shared = shared.intersection(f.index)
    return pd.concat([f.loc[shared].select_dtypes("number") for f in frames]).groupby(level=0).mean()


def paired_difference(a: pd.Series, b: pd.Series, confidence: float, resamples: int) -> dict:
    """Mean of a − b over the queries both have, with its percentile-bootstrap interval."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    diff = (both["a"] - both["b"]).to_numpy(dtype=float)
    if len(diff) == 0:
        return {"mean": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": 0}
    if len(diff) == 1 or np.all(diff == diff[0]):
        return {"mean": float(diff.mean()), "ci_low": float(diff[0]), "ci_high": float(diff[0]), "n": len(diff)}
    res = stats.bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=resamples,
                          method="percentile", rng=np.random.default_rng(0))
    return {"mean": float(diff.mean()), "ci_low": float(res.confidence_interval.low),
            "ci_high": float(res.confidence_interval.high), "n": len(diff)}


def paired_table(table: PaperTable) -> PaperTable | None:
    """The companion table of ``table`` (None when it has no reference row or no per-query data)."""
    references = REFERENCES.get(table.name)
    if not references:
        return None
    rows = table.rows
    frames = {r["run"]: row_frame(r) for _, r in rows.iterrows()}
    if any(f is None for f in frames.values()):  # W&B runs, or records without per-query metrics
        return None
    new: dict[str, list] = {}  # the companion's columns, joined once (no fragmented frame)
    columns: list[Column] = []
    for ref_label, is_ref in references:
        matches = [i for i, (_, r) in enumerate(rows.iterrows()) if is_ref(r)]
        if len(matches) != 1:
            continue
        ref = rows.iloc[matches[0]]
        for c in (c for c in table.columns if c.paired and not (c.key in table.series and ref_label == ORACLE[0])):
            key = f"paired/{ref_label}/{c.key}"
            columns.append(Column(f"Δ {c.header} vs {ref_label}", key))
            stats_ = []
            held = table.series.get(c.key)  # per-query values the tables computed (shares of the oracle)
            for _, r in rows.iterrows():
                same = r["run"] == ref["run"]
                if held is not None:
                    a, b = held.get(r["run"]), held.get(ref["run"])
                else:
                    a, b = frames[r["run"]], frames[ref["run"]]
                    a, b = (a[c.key] if c.key in a else None), (b[c.key] if c.key in b else None)
                if (same or a is None or b is None or worlds(r) != worlds(ref) or len(worlds(r)) > 1
                        or checkpoints(r) != checkpoints(ref)):
                    stats_.append({"mean": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": 0})
                else:
                    stats_.append(paired_difference(a, b, float(r.get("confidence") or 0.95),
                                                    int(r.get("bootstrap_resamples") or 1000)))
            new[key] = [s["mean"] for s in stats_]
            for part in ("ci_low", "ci_high", "n"):
                new[f"{key}/{part}"] = [s[part] for s in stats_]
    if not columns:
        return None
    levels = sorted({float(c) for c in rows.get("confidence", pd.Series(dtype=float)).dropna()}) or [0.95]
    level = "/".join(f"{c:.0%}" for c in levels)
    title = f"{table.title}: paired differences (row − reference, same queries, {level} bootstrap)"
    note = ("Each cell is the mean over queries of the row's metric minus the reference row's, with a "
            "percentile-bootstrap interval over queries; an interval that excludes 0 is a difference "
            "these queries support. — marks the reference itself.")
    out = pd.concat([rows, pd.DataFrame(new, index=rows.index)], axis=1)
    return PaperTable(f"{table.name}_paired", title, table.labels, columns,
                      out[[label_column(h) for h in table.labels] + ["run", "git_commit"]
                          + [k for c in columns for k in (c.key, f"{c.key}/ci_low", f"{c.key}/ci_high", f"{c.key}/n")]],
                      note, table.superseded)
