"""Run records as one DataFrame: the only input of the tables and figures.

A run comes from a local run directory (``results/<table>/<run>/metrics.json``)
or from its W&B mirror; both become one row with the same columns:

- identity: ``run`` (the run directory, or ``wandb:entity/project/id``),
  ``table``, ``method``, ``corpus``, ``git_commit``, ``finished``;
- setting: ``world_profile``, ``world_seed``, ``model_size``, ``model_seed``,
  ``checkpoint``, ``hf_name_or_path``, ``dense_model``, and for gradient
  methods the resolved attribution settings ``output_fn``, ``use_v``,
  ``curvature``, ``unit_norm``, ``lam`` (the setting: a number or ``auto``),
  ``lam_used`` (the λ the run used), ``projection``, ``d``;
- metrics, flat, as in the W&B summary: ``mrr``, ``mrr/ci_low``,
  ``mrr/ci_high``, ``mrr/n`` and ``split/<split>/<group>/<metric>`` (a local
  record also gives a split's ``/ci_low``, ``/ci_high`` and ``/n``; W&B only
  has the split's mean).

A method field left null in the config means "the preset's value": a local
record's ``info.settings`` holds the values the run actually used; only when
it is absent (W&B) are the presets consulted.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..experiment.records import METRICS_FILE
from ..io import read_json

SWEEP_HINT = "trackstar-run -m --config-dir sweeps --config-name table1"
METHOD_FIELDS = ("output_fn", "use_v", "curvature", "unit_norm", "lam", "projection", "d")
BASELINE_METHODS = ("bm25", "dense")
UNKNOWN_COMMIT = "unknown"


class TablesError(RuntimeError):
    """The run records cannot make the requested tables."""


class MixedCommitWarning(UserWarning):
    """The runs come from more than one git commit."""


class FailedRunsWarning(UserWarning):
    """Some runs failed and are left out of every table."""


@dataclass
class RunSet:
    """Finished runs (one row each), the failed ones, and where they came from."""

    frame: pd.DataFrame
    source: str
    failed: list[dict] = field(default_factory=list)

    @property
    def commits(self) -> Counter:
        return Counter(self.frame["git_commit"])


def load_local_runs(results: str | Path) -> RunSet:
    """Every run record under ``results`` (recursively)."""
    root = Path(results)
    paths = sorted(root.rglob(METRICS_FILE)) if root.is_dir() else []
    if not paths:
        raise TablesError(
            f"No run records ({METRICS_FILE}) under {str(root)!r}. Run a sweep first, e.g. "
            f"`{SWEEP_HINT}`, or point --results at the directory that holds them."
        )
    rows, failed = [], []
    for path in paths:
        record = read_json(path)
        run_id = str(path.parent)
        if record.get("status") != "finished":
            failed.append({"run": run_id, "status": record.get("status"), "error": record.get("error")})
            continue
        for key in ("table", "method", "metrics"):
            if key not in record:
                raise TablesError(
                    f"{str(path)!r} is a finished run record without {key!r}; it was written by an "
                    "older trackstar. Re-run that job with force=true, or delete its directory."
                )
        rows.append(_row(run_id, record, _flatten(record["metrics"], record.get("splits", {}))))
    return _runset(rows, failed, f"local run records under {root}", f"under {str(root)!r}")


def load_wandb_runs(entity: str, project: str, api=None) -> RunSet:
    """Every run of a W&B project, rebuilt from its config and summary.

    ``api`` defaults to ``wandb.Api()``; tests pass a fake. The git commit is
    the one W&B saw (its run metadata), without a ``-dirty`` mark.
    """
    if not entity or not project:
        raise TablesError("--source wandb needs both --entity and --project (the W&B project the runs were logged to).")
    if api is None:
        import wandb

        api = wandb.Api()
    rows, failed = [], []
    for run in api.runs(f"{entity}/{project}"):
        run_id = "wandb:" + "/".join(run.path)
        config = dict(run.config)
        summary = dict(run.summary.items())
        status = summary.get("status") or run.state
        if status != "finished":
            failed.append({"run": run_id, "status": status, "error": f"W&B run state {run.state!r}; its local run record holds the error"})
            continue
        if not isinstance(config.get("method"), dict) or "table" not in config:
            raise TablesError(
                f"W&B run {run_id} has no resolved trackstar config (keys 'method', 'table'); "
                f"it was not logged by trackstar-run. Move it out of {entity}/{project} or delete it."
            )
        record = {
            "table": config["table"],
            "method": config["method"]["name"],
            "corpus": config.get("eval", {}).get("corpus"),
            "world": config.get("world", {}),
            "model": config.get("model", {}),
            "method_config": config["method"],
            "git_commit": ((run.metadata or {}).get("git") or {}).get("commit"),
            # Only orders re-runs of one table row (the later wins); W&B's start time does that.
            "finished": getattr(run, "created_at", None),
        }
        metrics = {k: v for k, v in summary.items() if not k.startswith(("_", "time/")) and k != "status"}
        rows.append(_row(run_id, record, metrics))
    return _runset(rows, failed, f"W&B project {entity}/{project}", f"in W&B project {entity}/{project}")


def check_commits(runs: RunSet, require_single: bool = False) -> None:
    """Warn (or, with ``require_single``, fail) when the runs span several git commits.

    Distinct strings are distinct commits: a ``-dirty`` run may hold changes
    its commit does not, so it is not merged with its clean sibling.
    """
    commits = runs.commits
    if len(commits) <= 1:
        return
    message = (
        f"The runs come from {len(commits)} different git commits ({describe_commits(commits)}): "
        "the tables may mix results of different code. Re-run the stale sweeps at one commit "
        "(force=true), or move the old run directories away."
    )
    if require_single:
        raise TablesError(message + " (--require-single-commit is set)")
    warnings.warn(message, MixedCommitWarning, stacklevel=2)


def describe_commits(commits: Counter) -> str:
    return ", ".join(f"{c} ({n} run{'s' * (n != 1)})" for c, n in sorted(commits.items()))


def _runset(rows: list[dict], failed: list[dict], source: str, where: str) -> RunSet:
    if failed:
        lines = "\n".join(f"  {f['run']}: {f['status']}: {f['error']}" for f in failed)
        warnings.warn(
            f"{len(failed)} run(s) did not finish and are left out of every table:\n{lines}\n"
            "Fix the error and re-run those jobs (the sweep re-runs only unfinished ones).",
            FailedRunsWarning,
            stacklevel=3,
        )
    if not rows:
        raise TablesError(
            f"No finished runs {where} ({len(failed)} failed). Fix the failures listed above and "
            f"re-run the sweep, e.g. `{SWEEP_HINT}`."
        )
    return RunSet(pd.DataFrame(rows), source, failed)


def _flatten(metrics: dict, splits: dict) -> dict:
    out = {}

    def put(prefix: str, stats: dict) -> None:
        out[prefix] = stats["mean"]
        for part in ("ci_low", "ci_high", "n"):
            if part in stats:
                out[f"{prefix}/{part}"] = stats[part]

    for metric, stats in metrics.items():
        put(metric, stats)
    for split, groups in splits.items():
        for group, by_metric in groups.items():
            for metric, stats in by_metric.items():
                put(f"split/{split}/{group}/{metric}", stats)
    return out


def _row(run_id: str, record: dict, metrics: dict) -> dict:
    world, model = record.get("world", {}), record.get("model", {})
    method_config = record.get("method_config", {})
    info = record.get("info") or {}
    row = {
        "run": run_id,
        "table": record["table"],
        "method": record["method"],
        "corpus": record.get("corpus"),
        "git_commit": record.get("git_commit") or UNKNOWN_COMMIT,
        "finished": record.get("finished"),
        "world_profile": world.get("profile"),
        "world_seed": world.get("seed"),
        "model_size": model.get("size"),
        "model_seed": model.get("seed"),
        "checkpoint": model.get("checkpoint"),
        "hf_name_or_path": model.get("hf_name_or_path"),
        "dense_model": info.get("dense_model") or method_config.get("dense_model"),
        "lam_used": info.get("lambda"),
    }
    row.update(_method_settings(record["method"], record.get("corpus"), method_config, info.get("settings")))
    row.update(metrics)
    return row


def _method_settings(method: str, corpus: str | None, method_config: dict, used: dict | None) -> dict:
    """The attribution settings of a gradient-method run, nulls resolved to the preset."""
    if method in BASELINE_METHODS:
        return dict.fromkeys(METHOD_FIELDS)
    if used:
        return {k: used.get(k) for k in METHOD_FIELDS}
    out = {k: method_config.get(k) for k in METHOD_FIELDS}
    if any(out[k] is None for k in METHOD_FIELDS):
        # Imported here: the presets pull in torch, which a table of local runs never needs.
        from ..attribution.methods import METHODS
        from ..evaluation.fact_tracing import DEFAULT_LAMBDA

        if method not in METHODS:
            raise TablesError(f"Run of unknown method {method!r}: cannot resolve its preset; known: {sorted(METHODS)}.")
        preset = METHODS[method]
        for k in METHOD_FIELDS:
            if out[k] is None:
                out[k] = DEFAULT_LAMBDA.get(corpus, preset.lam) if k == "lam" else getattr(preset, k)
    return out
