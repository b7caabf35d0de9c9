"""The Hydra entry point: one method on one (world, model) setting, one run record.

    trackstar-run method=bm25 eval=open
    trackstar-run -m method=trackstar method.lam=0.5,0.9,auto
    trackstar-run -m --config-dir sweeps --config-name table1

Only missing stages run (see :mod:`trackstar.experiment.stages`); a job whose
finished run record exists is skipped; a failed job records status=failed with
its error and, under multirun, does not stop the sweep.
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

import hydra
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..io import config_hash, read_jsonl, sha256_file, write_jsonl
from . import records as rec
from .schema import register
from .stages import (
    build_world_stage,
    checkpoint_path,
    pretrain_stage,
    retrieval_key,
    retrieval_stage,
    stage_lock,
)
from .tracking import log_to_wandb

log = logging.getLogger("trackstar")

#: Keys that do not change a run's results (left out of its identity).
RUNTIME_KEYS = ("logger", "force", "progress", "results_dir", "table")


def _run_id(*nodes) -> str:
    return config_hash([OmegaConf.to_container(n, resolve=True) if isinstance(n, DictConfig) else n for n in nodes], 8)


OmegaConf.register_new_resolver("ts_run_id", _run_id, replace=True)
register()


def config_id(cfg: DictConfig) -> str:
    return config_hash({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in RUNTIME_KEYS})


def method_overrides(method_cfg) -> dict:
    """The attribution settings a run sets on top of its method preset."""
    keys = ("output_fn", "use_v", "curvature", "unit_norm", "lam")
    out = {k: method_cfg[k] for k in keys if method_cfg[k] is not None}
    if "lam" in out and out["lam"] != "auto":
        out["lam"] = float(out["lam"])
    out.update({k: method_cfg[k] for k in ("projection", "d", "seed", "damping", "block_diagonal", "batch_size")})
    return out


def validate(cfg: DictConfig) -> None:
    """Check every value before any work starts (types were checked at composition)."""
    from ..attribution.methods import METHODS, method_settings
    from ..evaluation.fact_tracing import check_method
    from ..lm.models import check_family, check_size
    from ..lm.optim import check_optimizer
    from ..world import get_profile
    from ..world.store import check_seed
    from .tracking import resolve_mode

    get_profile(cfg.world.profile)
    check_seed(cfg.world.seed)
    if not cfg.model.hf_name_or_path:
        check_family(cfg.model.family)
        check_size(cfg.model.size)
        check_optimizer(cfg.model.optimizer)
        if not any(abs(cfg.model.checkpoint - f) < 1e-9 for f in [*cfg.model.checkpoint_fractions, 1.0]):
            raise ValueError(
                f"model.checkpoint={cfg.model.checkpoint} is not in model.checkpoint_fractions="
                f"{list(cfg.model.checkpoint_fractions)}; add it there or pick one of them."
            )
    check_method(cfg.method.name)
    if cfg.method.name in METHODS:
        method_settings(cfg.method.name, **method_overrides(cfg.method))
    if cfg.eval.corpus not in ("closed", "open"):
        raise ValueError(f"eval.corpus={cfg.eval.corpus!r}: use closed (T-REx-like sentences) or open (pretraining corpus).")
    if cfg.eval.k < max(cfg.eval.tail_patch_ks, default=1):
        raise ValueError(f"eval.k={cfg.eval.k} is smaller than max(eval.tail_patch_ks)={max(cfg.eval.tail_patch_ks)}; raise k.")
    resolve_mode(cfg.logger.mode)


def execute(cfg: DictConfig, run_dir: Path) -> tuple[dict, list[dict], pd.DataFrame]:
    """All stages of one run: (record fields, retrieval records, per-query metrics)."""
    from ..evaluation.fact_tracing import BASELINES, evaluate, metric_columns, retrieve
    from ..lm import evaluate_queries, load_checkpoint, load_hf_causal_lm
    from ..world import load_world

    artifacts = Path(cfg.artifacts_dir)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    world_path = build_world_stage(artifacts, cfg.world)
    world = load_world(world_path)
    timings["world"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.model.hf_name_or_path:
        checkpoint = load_hf_causal_lm(cfg.model.hf_name_or_path)
        ckpt_path, ckpt_id = None, f"hf:{cfg.model.hf_name_or_path}"
        query_eval = evaluate_queries(checkpoint.model, checkpoint.tokenizer, world.queries)
    else:
        run = pretrain_stage(artifacts, world_path, cfg.model, progress=cfg.progress)
        ckpt_path = checkpoint_path(run, cfg.model.checkpoint)
        checkpoint = load_checkpoint(ckpt_path)
        ckpt_id = f"{run.name}/{ckpt_path.name}"
        query_eval = read_jsonl(ckpt_path / "query_eval.jsonl")
    timings["model"] = time.perf_counter() - t

    queries = world.queries[: cfg.eval.n_queries] if cfg.eval.n_queries else world.queries
    method = OmegaConf.to_container(cfg.method, resolve=True)
    if cfg.method.name in BASELINES:
        method = {"name": method["name"], "dense_model": method["dense_model"]} if cfg.method.name == "dense" else {"name": "bm25"}
    key = retrieval_key(world.manifest, ckpt_id, method, cfg.eval.corpus, cfg.eval.k, cfg.eval.n_queries)
    features = artifacts / "features" / ckpt_id.replace("/", "__").replace(":", "_") / cfg.eval.corpus

    def compute():
        if cfg.method.name in BASELINES:
            return _retrieve()
        # Gradient methods of one checkpoint and corpus share feature stores
        # (e.g. exp2 and exp4); parallel jobs take turns writing them.
        with stage_lock(artifacts, f"features-{features.parent.name}-{features.name}"):
            return _retrieve()

    def _retrieve():
        return retrieve(
            cfg.method.name, world, cfg.eval.corpus, checkpoint=checkpoint, queries=queries, k=cfg.eval.k,
            settings_overrides=None if cfg.method.name in BASELINES else method_overrides(cfg.method),
            dense_model=cfg.method.dense_model, work_dir=features,
        )

    t = time.perf_counter()
    retrievals, info = retrieval_stage(artifacts, key, compute)
    timings["retrieval"] = time.perf_counter() - t

    t = time.perf_counter()
    can_patch = cfg.eval.tail_patch and checkpoint.optimizer is not None
    if cfg.eval.tail_patch and not can_patch:
        log.warning("tail-patch skipped: %s has no optimizer state", ckpt_id)
    per_query = evaluate(
        retrievals, checkpoint if can_patch else None, query_eval,
        tuple(cfg.eval.tail_patch_ks) if can_patch else (), progress=cfg.progress,
        cache_dir=artifacts / "tailpatch" / ckpt_id.replace("/", "__").replace(":", "_"),
    )
    timings["evaluation"] = time.perf_counter() - t

    overall, splits = rec.metric_summary(per_query, metric_columns(per_query), cfg.eval.bootstrap_resamples, cfg.eval.confidence)
    rec.write_per_query(run_dir, per_query)
    write_jsonl(run_dir / rec.RETRIEVALS_FILE, retrievals)
    artifacts_used = {
        "world": {"path": str(world_path), "content_hash": world.manifest["content_hash"]},
        "checkpoint": {"id": ckpt_id, "path": str(ckpt_path) if ckpt_path else None,
                       "hash": sha256_file(ckpt_path / "model.safetensors") if ckpt_path and (ckpt_path / "model.safetensors").is_file() else None},
        "retrievals": {"key": key, "path": str(artifacts / "retrievals" / key)},
    }
    return {
        "metrics": overall,
        "splits": splits,
        "timings": timings,
        "artifacts": artifacts_used,
        "info": info,
        "n_queries": int(len(per_query)),
    }, retrievals, per_query


def run_job(cfg: DictConfig, run_dir: Path, multirun: bool) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    cid = config_id(cfg)
    done = None if cfg.force else rec.finished_record(run_dir, cid)
    if done is not None:
        log.info("skipping %s: a finished run record exists (force=true re-runs it)", run_dir)
        print(f"[skip] {run_dir} is finished")
        return done
    resolved = OmegaConf.to_container(cfg, resolve=True)
    rec.write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
    base = {
        "config_id": cid,
        "table": cfg.table,
        "method": cfg.method.name,
        "corpus": cfg.eval.corpus,
        "world": resolved["world"],
        "model": resolved["model"],
        "method_config": resolved["method"],
        "eval": resolved["eval"],
        "git_commit": rec.git_commit(Path(__file__).parent),
        "started": rec.now(),
        "run_dir": str(run_dir),
    }
    t0 = time.perf_counter()
    retrievals, per_query = [], None
    try:
        result, retrievals, per_query = execute(cfg, run_dir)
        record = {**base, **result, "status": "finished", "error": None}
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised outside multirun
        record = {**base, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        log.error("run failed: %s", record["error"])
        if not multirun:
            record["finished"] = rec.now()
            rec.write_record(run_dir, record)
            raise
    record["finished"] = rec.now()
    record["timings"] = {**record.get("timings", {}), "total": time.perf_counter() - t0}
    rec.write_record(run_dir, record)
    sweep = HydraConfig.get().sweep.dir if multirun else None
    record["wandb"] = log_to_wandb(
        run_dir, resolved, record, retrievals, per_query, cfg.logger,
        group=f"{cfg.table}" if sweep is None else f"{cfg.table}:{Path(sweep).name}",
        tags=[cfg.table, cfg.method.name, cfg.eval.corpus], name=run_dir.name,
    )
    rec.write_record(run_dir, record)
    status = record["status"]
    summary = ", ".join(f"{m}={v['mean']:.3f}" for m, v in record.get("metrics", {}).items() if m in ("mrr", "recall@10", "tail_patch@10"))
    print(f"[{status}] {run_dir} {summary or record.get('error', '')}")
    return record


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    try:
        validate(cfg)
    except ValueError as exc:
        raise SystemExit(f"trackstar-run: invalid config: {exc}") from None
    run_job(cfg, Path(hc.runtime.output_dir), multirun=hc.mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    main()
