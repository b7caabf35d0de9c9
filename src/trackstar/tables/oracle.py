"""The tail-patch ceiling in the tables: the oracle row and every row's share of it.

The ``oracle_tail_patch`` method (:mod:`trackstar.retrieval.oracle`) ranks each
query's passages by their exact one-step effect, so its tail-patch@k is the
most any top k can reach on that query. A table with tail-patch columns gets

- the oracle row, borrowed from any run of the oracle on the same world,
  checkpoint and corpus when the table has none of its own (its sweep ran it
  under another table's tag: the values are the same, read from one cache);
- for each tail-patch column, a companion ``… share of oracle``: per query,
  the row's tail-patch@k over the oracle's on that query, averaged over the
  queries with a percentile-bootstrap interval. A query whose oracle value is
  not positive (no passage raises its target) has no share; the CSV's ``n``
  says how many queries each share covers. The paired companion compares the
  rows' shares over the same queries too (not against the oracle: its share is 1).

A row over seeds takes, per seed, the oracle of that seed's checkpoint; seeds
without one are left out of its share, and the table's note names the seeds
the oracle covers.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .aggregate import Column, PaperTable, label_column, over_seeds
from .paired import paired_difference, per_query

ORACLE = "oracle_tail_patch"
#: Where the runs of one oracle are interchangeable: one world, checkpoint and corpus.
MATCH = ("world_hash", "checkpoint_hash", "corpus")
_TAIL_PATCH = re.compile(r"^(?:split/(?P<split>[^/]+)/(?P<group>[^/]+)/)?tail_patch@(?P<k>\d+)$")
SHARE_SUFFIX = ", share of oracle"


def share_key(key: str) -> str:
    return f"oracle_share/{key}"


def per_query_share(row: pd.Series, oracle: pd.Series) -> pd.Series:
    """Per query (matched by index): ``row / oracle``, NaN where the oracle's value is not positive."""
    both = pd.concat([row.rename("row"), oracle.rename("oracle")], axis=1, join="inner").dropna()
    ceiling = both["oracle"].where(both["oracle"] > 0)
    return (both["row"] / ceiling).rename("share")


def _match(run: pd.Series) -> tuple:
    return tuple(str(run.get(f)) for f in MATCH)


def _oracles(runs: pd.DataFrame) -> dict[tuple, pd.Series]:
    """The latest finished oracle run per (world, checkpoint, corpus)."""
    found = runs[runs["method"] == ORACLE].sort_values("finished", na_position="first", kind="stable")
    return {_match(r): r for _, r in found.iterrows() if r.get("checkpoint_hash") is not None}


def _seed_runs(row: pd.Series) -> tuple[str, ...]:
    return row["seed_runs"] if isinstance(row.get("seed_runs"), tuple) else (row["run"],)


def attach_oracle(table: PaperTable | None, runs: pd.DataFrame) -> PaperTable | None:
    """``table`` with the oracle row (borrowed if needed) and a share column after each
    tail-patch column; unchanged when no oracle run matches its runs or it has no tail-patch."""
    if table is None:
        return None
    tail = [c for c in table.columns if _TAIL_PATCH.match(c.key)]
    oracles = _oracles(runs)
    by_run = {r["run"]: r for _, r in runs.iterrows()}
    rows = table.rows
    members = {r["run"]: [by_run[x] for x in _seed_runs(r) if x in by_run] for _, r in rows.iterrows()}
    if not tail or not any(_match(m) in oracles for ms in members.values() for m in ms):
        return table
    note = table.note
    if not (rows["method"] == ORACLE).any():
        wanted = list(dict.fromkeys(_match(m) for ms in members.values() for m in ms))
        found = [oracles[w] for w in wanted if w in oracles]
        group = pd.DataFrame(found)
        borrowed = (over_seeds(group, table.columns) if len(group) > 1 else group.iloc[0]).copy()
        for i, header in enumerate(table.labels):
            borrowed[label_column(header)] = borrowed["method_label"] if i == 0 else "—"
        rows = pd.concat([rows, borrowed.to_frame().T], ignore_index=True)
        members[borrowed["run"]] = [oracles[w] for w in wanted if w in oracles]
        note = " ".join(filter(None, [note, f"The oracle row is borrowed from {len(found)} run(s) of "
                                             f"{ORACLE} on the same checkpoint(s) and corpus."]))
    frames: dict[str, pd.DataFrame | None] = {}

    def frame(run: str):
        if run not in frames:
            frames[run] = per_query(run)
        return frames[run]

    columns: list[Column] = []
    new: dict[str, list] = {}
    series: dict[str, dict[str, pd.Series]] = {}
    partial, covered = False, set()
    for c in table.columns:
        columns.append(c)
        m = _TAIL_PATCH.match(c.key)
        if not m:
            continue
        metric = f"tail_patch@{m['k']}"
        key = share_key(c.key)
        columns.append(Column(c.header.replace(" (pp)", "") + SHARE_SUFFIX, key))
        series[key] = {}
        values: dict[str, list] = {k: [] for k in (key, f"{key}/ci_low", f"{key}/ci_high", f"{key}/n")}
        for _, r in rows.iterrows():
            shares = []
            for run in members.get(r["run"], []):
                ceiling = oracles.get(_match(run))
                a, b = (None, None) if ceiling is None else (frame(run["run"]), frame(ceiling["run"]))
                if a is None or b is None or metric not in a or metric not in b:
                    continue
                if m["split"]:
                    a = a[a[m["split"]].astype(str) == m["group"]] if m["split"] in a else a.iloc[0:0]
                shares.append(per_query_share(a[metric], b[metric]))
            partial |= 0 < len(shares) < len(members.get(r["run"], []))
            covered |= {(str(run.get("world_seed")), str(run.get("model_seed"))) for run in members.get(r["run"], [])
                        if _match(run) in oracles}
            if not shares:
                pooled = pd.Series(dtype=float)
            elif len({_match(run)[0] for run in members[r["run"]]}) == 1:
                # Seeds of one world: the same queries, each averaged over its seeds.
                pooled = pd.concat(shares, axis=1).mean(axis=1).dropna()
            else:  # seeds of several worlds: queries differ, each (seed, query) counts once
                pooled = pd.concat(shares).dropna()
            # The mean with the percentile bootstrap every interval of the tables uses (against 0).
            flat = pooled.reset_index(drop=True)
            stat = paired_difference(flat, pd.Series(0.0, index=flat.index), float(r.get("confidence") or 0.95),
                                     int(r.get("bootstrap_resamples") or 1000))
            mean, low, high = stat["mean"], stat["ci_low"], stat["ci_high"]
            if shares and pooled.index.is_unique:
                series[key][r["run"]] = pooled
            for part, v in zip(("", "/ci_low", "/ci_high", "/n"), (mean, low, high, len(pooled)), strict=True):
                values[key + part].append(v if len(pooled) else np.nan)
        new.update(values)
    if partial:
        seeds = ", ".join(f"({w}, {m})" for w, m in sorted(covered))
        note = " ".join(filter(None, [note, f"The oracle ran on the checkpoint(s) of (world, model) seeds {seeds} "
                                            "only: rows over more seeds take their share of oracle from those "
                                            "seeds alone, and their paired difference from the oracle is left "
                                            "blank."]))
    rows = pd.concat([rows.reset_index(drop=True), pd.DataFrame(new)], axis=1)
    return PaperTable(table.name, table.title, table.labels, columns, rows, note, table.superseded,
                      {**table.series, **series})
