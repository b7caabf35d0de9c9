"""The run record: what one job leaves behind, and the only thing the tables read.

A run directory holds::

    config.yaml        the resolved config
    metrics.json       the :class:`RunRecord` (status, every metric with its
                       interval, splits, timings, artifacts, git commit, error)
    retrievals.jsonl   the retrieval records (release schema)
    per_query.csv      every per-query metric, for re-aggregation
    attempts/          one record per attempt (finished or failed), kept

``metrics.json`` always holds the last *finished* record once there is one: a
later attempt that fails (a ``force=true`` re-run, say) is kept in
``attempts/`` and does not replace it, and a new finished record replaces it
only after its retrievals and per-query metrics are written.

The record carries everything a reader needs to place a run in a table: the
method's label, its row rank and its resolved settings, written by the run
itself. Readers therefore never import the stages that produced it (this
module imports no other part of trackstar but :mod:`trackstar.io`). The local
record is always written before anything is sent to W&B, and W&B gets the
same record: its header as config, :meth:`RunRecord.flat_metrics` as summary.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, atomic_write_text, read_json

SCHEMA_VERSION = 2
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
RETRIEVALS_FILE = "retrievals.jsonl"
PER_QUERY_FILE = "per_query.csv"
#: Tail-patch per (query, proponent): example_id, rank, proponent_id, p_before, p_after, delta_pp, ...
TAIL_PATCH_FILE = "tail_patch.csv"
ATTEMPTS_DIR = "attempts"
#: Where :meth:`RunRecord.header` goes in a W&B run's config.
WANDB_CONFIG_KEY = "run_record"
STATS = ("mean", "ci_low", "ci_high", "n")
SPLIT_PREFIX = "split/"
#: Table-row columns of the R diagnostic a gradient run with R records in its info.
#: Flat run-table columns of the tail-patch oracle's rank agreement (info.rank_agreement).
AGREEMENT_PREFIX = "agreement/"
DIAGNOSTIC_PREFIX = "rdiag/"
UNKNOWN_COMMIT = "unknown"


class RecordSchemaError(ValueError):
    """A run record of another schema version, or not a run record at all."""


@dataclass
class MethodInfo:
    """The method of a run, as the run itself resolved it."""

    name: str
    label: str
    family: str  # baseline | gradient
    rank: float  # row position in the tables (lower first)
    #: Every value that determines the method's results (nulls in the config
    #: resolved to the preset's or corpus default's value).
    settings: dict = field(default_factory=dict)


@dataclass
class RunRecord:
    config_id: str
    table: str
    corpus: str
    method: MethodInfo
    world: dict
    model: dict
    eval: dict
    git_commit: str | None
    started: str
    run_dir: str
    status: str = "running"
    finished: str | None = None
    #: metric -> {mean, ci_low, ci_high, n}
    metrics: dict = field(default_factory=dict)
    #: split -> group -> metric -> {mean, ci_low, ci_high, n}
    splits: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)
    #: What the method decided on its own (λ when auto, where V came from, stores).
    info: dict = field(default_factory=dict)
    n_queries: int | None = None
    error: str | None = None
    traceback: str | None = None
    wandb: dict | None = None
    #: The config id without the world, model and projection seeds: runs that share it
    #: differ only in seeds, and the tables make them one row over seeds.
    seedless_id: str | None = None
    #: Where it computed (trackstar.device.environment): CPU and instruction sets, GPU, library
    #: versions. Empty in records written before it was kept.
    environment: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # --- serialization --------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "run record") -> RunRecord:
        version = data.get("schema_version", 1) if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise RecordSchemaError(
                f"{source} has run-record schema {version}, this trackstar reads schema {SCHEMA_VERSION}. "
                "Re-run its job (the sweep re-runs it: its config id changed) or move the old run directory away."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in data]
        if missing:
            raise RecordSchemaError(f"{source} lacks {missing}; it is not a complete run record.")
        values = {k: v for k, v in data.items() if k in names}
        values["method"] = MethodInfo(**data["method"])
        _check_numbers(values.get("metrics") or {}, source, "metrics")
        for split, groups in (values.get("splits") or {}).items():
            for group, metrics in groups.items():
                _check_numbers(metrics, source, f"splits.{split}.{group}")
        return cls(**values)

    def header(self) -> dict:
        """The record without its metrics: what a W&B config carries."""
        return {k: v for k, v in self.to_dict().items() if k not in ("metrics", "splits", "timings", "traceback")}

    @classmethod
    def from_header(cls, header: dict, flat: dict, source: str) -> RunRecord:
        """Rebuild a record from :meth:`header` and :meth:`flat_metrics` (a W&B run)."""
        metrics, splits = unflatten_metrics(flat)
        return cls.from_dict({**header, "metrics": metrics, "splits": splits}, source)

    # --- the one flattening -------------------------------------------------------------
    def flat_metrics(self) -> dict:
        """``mrr``, ``mrr/ci_low`` …, ``split/<split>/<group>/<metric>[/<stat>]``."""
        return flatten_metrics(self.metrics, self.splits)

    @property
    def world_style(self) -> str:
        """templated, natural, or release (the paper's files: no style of ours)."""
        if self.world.get("profile") == "release":
            return "release"
        return self.world.get("style") or "templated"

    def setting(self) -> dict:
        """Everything that determines the run's numbers except its seeds (world, model and
        projection): runs of one table row must agree on all of it."""
        return {"world": _without(self.world, "seed", "path"), "model": _without(self.model, "seed"),
                "eval": dict(self.eval), "corpus": self.corpus,
                "method": {"name": self.method.name, **_without(self.method.settings, "seed")}}

    def table_row(self, run_id: str) -> dict:
        """One row of the tables' DataFrame: identity, settings, flat metrics."""
        setting = self.setting()
        row = {
            "run": run_id,
            "table": self.table,
            "method": self.method.name,
            "method_label": self.method.label,
            "method_rank": self.method.rank,
            "seedless_id": self.seedless_id,
            "family": self.method.family,
            "corpus": self.corpus,
            "git_commit": self.git_commit or UNKNOWN_COMMIT,
            "finished": self.finished,
            "world_profile": self.world.get("profile"),
            "world_style": self.world_style,
            "world_seed": self.world.get("seed"),
            "model_size": self.model.get("size"),
            "model_seed": self.model.get("seed"),
            "checkpoint": self.model.get("checkpoint"),
            "model_epochs": self.model.get("epochs"),
            "hf_name_or_path": self.model.get("hf_name_or_path"),
            "lam_used": self.info.get("lambda"),
            "lam_default": self.info.get("lambda_default"),
            "confidence": self.eval.get("confidence"),
            "bootstrap_resamples": self.eval.get("bootstrap_resamples"),
            "wandb_group": (self.wandb or {}).get("group"),
            "environment": environment_label(self.environment),
            # What the tables check before putting runs side by side (see tables.aggregate).
            "world_hash": (self.artifacts.get("world") or {}).get("content_hash"),
            "checkpoint_hash": (self.artifacts.get("checkpoint") or {}).get("hash"),
            "world_setting": canonical(setting["world"]),
            "model_config": canonical(self.model),
            "setting": canonical(setting),
        }
        row.update({k: v for k, v in self.method.settings.items() if k not in row})
        row.update({f"{DIAGNOSTIC_PREFIX}{k}": v for k, v in (self.info.get("curvature_diagnostic") or {}).items()})
        for spec, stats in (self.info.get("rank_agreement") or {}).items():  # the tail-patch oracle's
            row.update({f"{AGREEMENT_PREFIX}{spec}/{k}": stats.get(k) for k in ("label", "mean", "median", "min", "max",
                                                                                  "queries")})
        row.update(self.flat_metrics())
        return row


#: The tables' label of a run whose record predates the environment field.
UNRECORDED_ENVIRONMENT = "not recorded"


def environment_label(env: dict | None) -> str:
    """One line for provenance: ``AMD EPYC (torch AVX2, numpy AVX2); torch 2.13.0, numpy 2.4.6, ...``."""
    if not env:
        return UNRECORDED_ENVIRONMENT
    where = f"{env.get('cpu', '?')} (torch {env.get('torch_cpu_capability', '?')}, numpy {env.get('numpy_simd', '?')})"
    if env.get("gpu"):
        where += f", {env['gpu']}"
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items())
    return f"{where}; Python {env.get('python', '?')}" + (f"; {packages}" if packages else "")


def _without(mapping: dict, *keys: str) -> dict:
    return {k: v for k, v in (mapping or {}).items() if k not in keys}


def canonical(value) -> str:
    """``value`` as one comparable string (sorted keys)."""
    return json.dumps(value, sort_keys=True, default=str)


def flatten_metrics(metrics: dict, splits: dict) -> dict:
    out: dict[str, Any] = {}

    def put(prefix: str, stats: dict) -> None:
        out[prefix] = stats["mean"]
        for part in STATS[1:]:
            if part in stats:
                out[f"{prefix}/{part}"] = stats[part]

    for metric, stats in metrics.items():
        put(metric, stats)
    for split, groups in splits.items():
        for group, by_metric in groups.items():
            for metric, stats in by_metric.items():
                put(f"{SPLIT_PREFIX}{split}/{group}/{metric}", stats)
    return out


def unflatten_metrics(flat: dict) -> tuple[dict, dict]:
    """The inverse of :func:`flatten_metrics`; keys it cannot have written (W&B's own
    ``_runtime``, timings ``time/…``, ``status``) are ignored."""
    metrics: dict = {}
    splits: dict = {}
    for key, value in flat.items():
        if key.startswith(("_", "time/")) or isinstance(value, (str, bool)) or value is None:
            continue
        parts = key.split("/")
        stat = "mean"
        if parts[-1] in STATS[1:]:
            stat, parts = parts[-1], parts[:-1]
        if parts[0] == SPLIT_PREFIX.rstrip("/") and len(parts) == 4:
            _, split, group, metric = parts
            splits.setdefault(split, {}).setdefault(group, {}).setdefault(metric, {})[stat] = value
        elif len(parts) == 1:
            metrics.setdefault(parts[0], {})[stat] = value
    return metrics, splits


def _check_numbers(metrics: dict, source: str, where: str) -> None:
    for name, stats in metrics.items():
        if not isinstance(stats, dict):
            raise RecordSchemaError(f"{source}: {where}.{name} is {stats!r}, not a table of statistics {STATS}.")
        for stat, value in stats.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise RecordSchemaError(
                    f"{source}: {where}.{name}.{stat} is {value!r}, not a number. The record was edited or "
                    "damaged; re-run its job with force=true, or restore the record from attempts/."
                )


# --- run directories -----------------------------------------------------------------------

#: Tracked files a run regenerates, which do not make the code "dirty": the committed
#: tables (`trackstar quick` rewrites them between its sweeps).
GENERATED_DIRS = ("paper_tables",)


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD's commit, with ``-dirty`` when a tracked file other than the regenerated
    tables differs from it."""
    exclude = [f":(top,exclude){d}" for d in GENERATED_DIRS]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *exclude], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_record(path: str | Path) -> RunRecord:
    """The run record at ``path`` (a ``metrics.json``); RecordSchemaError for another schema."""
    return RunRecord.from_dict(read_json(path), f"{str(path)!r}")


def finished_record(run_dir: Path, config_id: str) -> RunRecord | None:
    """The finished record of this exact config in ``run_dir``, if any (to skip the job)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    try:
        record = read_record(path)
    except RecordSchemaError:
        return None
    return record if record.status == "finished" and record.config_id == config_id else None


def attempt_name(record: RunRecord) -> str:
    """A new attempt's file name: when it started, then a random suffix."""
    stamp = "".join(c for c in record.started.split("+")[0] if c.isalnum())
    return f"{stamp}-{uuid.uuid4().hex[:8]}.json"


def write_record(run_dir: Path, record: RunRecord, attempt: str | None = None) -> Path:
    """Write ``record`` as its attempt's entry in ``attempts/`` (``attempt``, a name from
    :func:`attempt_name`; a new one if None) and, unless it failed while a finished
    record is there, as ``metrics.json``; returns the attempt's file."""
    run_dir = Path(run_dir)
    attempt = run_dir / ATTEMPTS_DIR / (attempt or attempt_name(record))
    atomic_write_json(attempt, record.to_dict())
    current = run_dir / METRICS_FILE
    if record.status != "finished" and _holds_finished(current):
        return attempt
    atomic_write_json(current, record.to_dict())
    return attempt


def _holds_finished(path: Path) -> bool:
    try:
        return path.is_file() and read_json(path).get("status") == "finished"
    except Exception:  # noqa: BLE001 - an unreadable record is not one to keep
        return False


def attempts(run_dir: Path) -> list[RunRecord]:
    """Every attempt recorded in ``run_dir``, oldest first."""
    return [read_record(p) for p in sorted((Path(run_dir) / ATTEMPTS_DIR).glob("*.json"))]


def write_config(run_dir: Path, yaml_text: str) -> None:
    atomic_write_text(Path(run_dir) / CONFIG_FILE, yaml_text)


def write_per_query(run_dir: Path, per_query) -> None:
    atomic_write_text(Path(run_dir) / PER_QUERY_FILE, per_query.to_csv(index=False))


def write_tail_patch(run_dir: Path, pairs) -> None:
    """The run's tail-patch per (query, proponent), when it measured any (the report shows them)."""
    if pairs is not None and len(pairs):
        atomic_write_text(Path(run_dir) / TAIL_PATCH_FILE, pairs.to_csv(index=False))
