"""Run records as one DataFrame: the only input of the tables and figures.

A run comes from a local run directory (``results/<table>/<run>/metrics.json``)
or from its W&B mirror; both are a :class:`~trackstar.experiment.record.RunRecord`
and become one row through :meth:`RunRecord.table_row`, so both give the same
columns:

- identity: ``run`` (the run directory, or ``wandb:entity/project/id``),
  ``table``, ``method``, ``method_label``, ``method_rank``, ``family``,
  ``corpus``, ``git_commit``, ``finished``;
- setting: ``world_profile``, ``world_style``, ``world_seed``, ``model_size``, ``model_seed``,
  ``checkpoint``, ``hf_name_or_path``, ``lam_used`` (the λ the run used), and
  the method's resolved settings as the run wrote them (for gradient rows
  ``output_fn``, ``use_v``, ``curvature``, ``unit_norm``, ``lam``,
  ``projection``, ``d`` …; for ``dense`` its ``model``);
- metrics, flat: ``mrr``, ``mrr/ci_low``, ``mrr/ci_high``, ``mrr/n`` and
  ``split/<split>/<group>/<metric>`` with the same suffixes.

Records of another schema version (or damaged ones) are left out with a warning naming them
(an error under ``--strict``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..experiment.record import METRICS_FILE, WANDB_CONFIG_KEY, RecordSchemaError, RunRecord, read_record

#: A gradient run's settings that the tables key or filter rows by.
GRADIENT_COLUMNS = ("output_fn", "use_v", "curvature", "unit_norm", "lam", "projection", "d")
SWEEP_HINT = "trackstar-run -m --config-dir sweeps --config-name table1"


class TablesError(RuntimeError):
    """The run records cannot make the requested tables."""


class MixedCommitWarning(UserWarning):
    """The runs come from more than one git commit."""


class FailedRunsWarning(UserWarning):
    """Some runs failed and are left out of every table."""


class StaleRecordsWarning(UserWarning):
    """Some run records are of another schema version and are left out."""


def check_one_style(frame: pd.DataFrame, source: str) -> str:
    """The one world style of the runs; runs of several styles are an error: a table over
    them would pair queries of one world with another's."""
    counts = frame["world_style"].fillna("templated").value_counts().to_dict() if "world_style" in frame else {}
    styles = sorted(counts)
    if len(styles) > 1:
        raise TablesError(
            f"{source} holds runs of {len(styles)} world styles ({', '.join(f'{k}: {v} runs' for k, v in counts.items())}); "
            "a table is of one world. Give each style its own results directory (results_dir=...) and compare "
            "them with `trackstar-tables --results DIR --compare LABEL=OTHER_DIR`.")
    return styles[0] if styles else "templated"


@dataclass
class RunSet:
    """Finished runs (one row each), the failed ones, and where they came from."""

    frame: pd.DataFrame
    source: str
    failed: list[dict] = field(default_factory=list)
    #: Records of another schema version, left out ("<run>: <reason>").
    stale: list[str] = field(default_factory=list)

    @property
    def commits(self) -> Counter:
        return Counter(self.frame["git_commit"])


def load_local_runs(results: str | Path, strict: bool = False) -> RunSet:
    """Every run record under ``results`` (recursively)."""
    root = Path(results)
    paths = sorted(root.rglob(METRICS_FILE)) if root.is_dir() else []
    if not paths:
        raise TablesError(
            f"No run records ({METRICS_FILE}) under {str(root)!r}. Run a sweep first, e.g. "
            f"`{SWEEP_HINT}`, or point --results at the directory that holds them."
        )
    rows, failed, stale = [], [], []
    for path in paths:
        run_id = str(path.parent)
        try:
            record = read_record(path)
        except RecordSchemaError as exc:
            stale.append(f"{run_id}: {exc}")
            continue
        if record.status != "finished":
            failed.append({"run": run_id, "status": record.status, "error": record.error})
            continue
        rows.append(record.table_row(run_id))
    return _runset(rows, failed, stale, strict, f"local run records under {root}", f"under {str(root)!r}")


def load_wandb_runs(entity: str, project: str, api=None, strict: bool = False) -> RunSet:
    """Every run of a W&B project, rebuilt from the record header in its config and its summary.

    ``api`` defaults to ``wandb.Api()``; tests pass a fake. The git commit is
    the one W&B saw (its run metadata), without a ``-dirty`` mark.
    """
    if not entity or not project:
        raise TablesError("--source wandb needs both --entity and --project (the W&B project the runs were logged to).")
    if api is None:
        import wandb  # heavy, and only --source wandb needs it

        api = wandb.Api()
    rows, failed, stale = [], [], []
    for run in api.runs(f"{entity}/{project}"):
        run_id = "wandb:" + "/".join(run.path)
        config = dict(run.config)
        summary = dict(run.summary.items())
        status = summary.get("status") or run.state
        if status != "finished":
            failed.append({"run": run_id, "status": status, "error": f"W&B run state {run.state!r}; its local run record holds the error"})
            continue
        header = config.get(WANDB_CONFIG_KEY)
        if not isinstance(header, dict):
            stale.append(f"{run_id}: its config has no {WANDB_CONFIG_KEY!r}; it was not logged by this trackstar's trackstar-run")
            continue
        commit = ((run.metadata or {}).get("git") or {}).get("commit")
        # Only orders re-runs of one table row (the later wins); W&B's start time does that.
        header = {**header, "git_commit": commit, "finished": getattr(run, "created_at", None)}
        try:
            record = RunRecord.from_header(header, summary, f"W&B run {run_id}")
        except RecordSchemaError as exc:
            stale.append(f"{run_id}: {exc}")
            continue
        rows.append({**record.table_row(run_id), "wandb_group": getattr(run, "group", None)})
    return _runset(rows, failed, stale, strict, f"W&B project {entity}/{project}", f"in W&B project {entity}/{project}")


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


def _runset(rows: list[dict], failed: list[dict], stale: list[str], strict: bool, source: str, where: str) -> RunSet:
    if stale:
        message = (
            f"{len(stale)} run record(s) of another schema, or damaged, are left out of every table:\n  " + "\n  ".join(stale)
            + "\nRe-run their sweeps (they re-run: their config ids changed) and move the old directories away."
        )
        if strict:
            raise TablesError(message + " (--strict is set)")
        warnings.warn(message, StaleRecordsWarning, stacklevel=3)
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
            f"No finished runs {where} ({len(failed)} failed, {len(stale)} of another schema or damaged). Fix the "
            f"failures listed above and re-run the sweep, e.g. `{SWEEP_HINT}`."
        )
    frame = pd.DataFrame(rows)
    # Results of baselines only have no gradient settings: the tables still find the columns.
    missing = [c for c in GRADIENT_COLUMNS if c not in frame]
    return RunSet(frame.reindex(columns=[*frame.columns, *missing]), source, failed, stale)
