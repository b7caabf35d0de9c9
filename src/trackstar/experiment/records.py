"""Run records: what one job leaves in its run directory.

    config.yaml        the resolved config
    metrics.json       status, every metric with its interval, splits, timings,
                       artifact paths and hashes, git commit, error if failed
    retrievals.jsonl   the retrieval records (release schema)
    per_query.csv      every per-query metric, for re-aggregation

The local record is always written before anything is sent to W&B.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path

import pandas as pd

from ..evaluation.splits import summarize
from ..io import atomic_write_json, atomic_write_text, read_json

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
RETRIEVALS_FILE = "retrievals.jsonl"
PER_QUERY_FILE = "per_query.csv"
SPLIT_COLUMNS = ("greedy_correct", "c4_frequency_bucket", "relation")


def git_commit(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def finished_record(run_dir: Path, config_id: str) -> dict | None:
    """The finished record of this exact config in ``run_dir``, if any (to skip the job)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    return record if record.get("status") == "finished" and record.get("config_id") == config_id else None


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
    splits = {by: table(scored, by) for by in SPLIT_COLUMNS if by in scored and scored[by].notna().any()}
    if "has_trex_sentence" in per_query and (~per_query["has_trex_sentence"]).any():
        splits["has_trex_sentence"] = table(per_query, "has_trex_sentence")
    return overall, splits


def write_record(run_dir: Path, record: dict) -> Path:
    path = Path(run_dir) / METRICS_FILE
    atomic_write_json(path, record)
    return path


def write_config(run_dir: Path, yaml_text: str) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, yaml_text)


def write_per_query(run_dir: Path, per_query: pd.DataFrame) -> None:
    atomic_write_text(Path(run_dir) / PER_QUERY_FILE, per_query.to_csv(index=False))
