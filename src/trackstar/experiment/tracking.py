"""Weights & Biases mirror of a run record.

W&B is never the only copy: the run record is written first, and a W&B
failure (not logged in, unreachable) becomes a warning in the record, not a
lost result. Mode ``auto`` logs online when credentials exist and offline
otherwise; ``WANDB_MODE=offline`` or ``disabled`` overrides any mode. An online
run that cannot reach the server within ``logger.init_timeout`` seconds is
logged offline instead. Offline runs sync later with
``wandb sync results/*/*/wandb/offline-run-*`` (which also finds the tables run of
``trackstar-tables --wandb``, kept under ``results/paper-tables/tables/``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..evaluation.counterfactual import is_counterfactual_metric
from ..evaluation.metrics import RETRIEVAL_METRICS, proponent_correctness
from ..wandb_mode import MODES, logged_in, resolve_mode  # noqa: F401 (re-exported)
from .record import WANDB_CONFIG_KEY, RunRecord

log = logging.getLogger(__name__)

TOP_IN_TABLE = 3


def wandb_summary(record: RunRecord) -> dict:
    """The W&B summary: the record's flat metrics, its timings as ``time/…``, its status."""
    cover = (record.info or {}).get("coverage") or {}
    coverage = {f"coverage/{k}": cover[k] for k in ("scope", "sites", "attributed", "share", "matrix_share")
                if k in cover}
    return {**record.flat_metrics(), **{f"time/{k}": v for k, v in record.timings.items()}, **coverage,
            "status": record.status}


def per_query_rows(retrievals: Sequence[dict], per_query: pd.DataFrame) -> tuple[list[str], list[list]]:
    """Columns and rows of the per-query table: prompt, target, top proponents, metrics."""
    metrics = [c for c in per_query.columns if c in (*RETRIEVAL_METRICS, "greedy_correct")
               or c.startswith("tail_patch@") or is_counterfactual_metric(c)]
    by_id = per_query.set_index("example_id")
    columns = ["example_id", "prompt", "target", "relation", "bucket", *metrics]
    for i in range(TOP_IN_TABLE):
        columns += [f"top{i + 1}", f"top{i + 1}_correct", f"top{i + 1}_score"]
    rows = []
    for rec in retrievals:
        q = by_id.loc[rec["example_id"]]
        correct = proponent_correctness(rec)
        row = [rec["example_id"], rec["inputs_plaintext"], rec["targets_plaintext"], rec.get("relation"), rec.get("c4_frequency_bucket")]
        row += [None if pd.isna(q[m]) else (bool(q[m]) if m == "greedy_correct" else float(q[m])) for m in metrics]
        for i in range(TOP_IN_TABLE):
            if i < len(rec["proponents"]):
                row += [rec["proponents"][i], bool(correct[i]) if i < len(correct) else None, float(rec["proponent_scores"][i])]
            else:
                row += [None, None, None]
        rows.append(row)
    return columns, rows


def log_to_wandb(
    run_dir: Path,
    config: dict,
    record: RunRecord,
    retrievals: Sequence[dict],
    per_query: pd.DataFrame | None,
    logger_cfg,
    group: str,
    tags: Sequence[str],
    name: str,
) -> dict:
    """Mirror a run record into one W&B run; returns what to note in the record.

    The config is the resolved Hydra config plus the record's header (under
    ``run_record``), the summary :func:`wandb_summary`: together they rebuild
    the record (:func:`trackstar.tables.load_wandb_runs`).
    """
    mode = resolve_mode(logger_cfg.mode)
    if mode == "disabled":
        return {"mode": "disabled"}
    try:
        import wandb

        def log_run(mode: str) -> dict:
            with wandb.init(
                project=logger_cfg.project,
                entity=logger_cfg.entity,
                group=group,
                tags=list(tags),
                name=name,
                config={**config, WANDB_CONFIG_KEY: record.header()},
                dir=str(run_dir),
                mode=mode,
                reinit="create_new",
                settings=wandb.Settings(console="off", silent=True, init_timeout=float(logger_cfg.init_timeout)),
            ) as run:
                run.summary.update(wandb_summary(record))
                if per_query is not None and len(retrievals):
                    columns, rows = per_query_rows(retrievals, per_query)
                    limit = logger_cfg.max_table_rows
                    run.log({"per_query": wandb.Table(columns=columns, data=rows[:limit] if limit else rows)})
                return {"mode": mode, "run_id": run.id, "dir": str(Path(run.dir).parent), "project": logger_cfg.project,
                        "group": group}

        try:
            return log_run(mode)
        except Exception as exc:  # noqa: BLE001 - unreachable or refused: keep the run offline instead
            if mode != "online":
                raise
            log.warning("W&B online logging failed (%s); logging this run offline (sync it later with "
                        "`wandb sync`)", exc)
            return {**log_run("offline"), "online_error": f"{type(exc).__name__}: {exc}"}
    except Exception as exc:  # noqa: BLE001 - W&B trouble must never lose the local record
        log.warning("W&B logging failed (%s); the local run record in %s is complete", exc, run_dir)
        return {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}
