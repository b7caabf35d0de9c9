"""The map step of a sharded run (``shard.index`` set): features or ranks of one shard.

It writes into the cell's shared feature directory and no run record; the run
with ``shard.count`` and no index (the reduce) does. See :class:`.schema.ShardConf`.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from ..device import resolve_device
from ..io import ensure_writable_dir
from ..retrieval import RetrievalTask
from ..runtime import compute_stage
from ..world import load_world
from .ids import features_dir
from .stages import model_stage, stage_lock, world_stage
from .validation import ConfigError, validate


def shard_job(cfg: DictConfig) -> Path:
    """Run shard ``shard.index`` of ``shard.count``; returns what it wrote.

    ``shard.step=extract``: one shard of the training features and its part of
    R_train. ``shard.step=score``: once every shard is extracted, the top-k among
    this shard's rows (the query features and R^{-1/2} are written once, under
    the features' lock); the reduce then merges instead of scoring every row.
    """
    retriever = validate(cfg)
    if cfg.shard.index is None:
        raise ConfigError("a shard job needs shard.index (0 to shard.count - 1).")
    device = resolve_device(cfg.device)
    artifacts = ensure_writable_dir(cfg.artifacts_dir, "artifacts_dir")
    world_path = world_stage(cfg, artifacts)
    world = load_world(world_path)
    checkpoint, _, ckpt_id = model_stage(cfg, artifacts, world_path, device)
    features = features_dir(artifacts, ckpt_id, cfg.eval.corpus)
    n = cfg.eval.n_queries
    queries = world.queries if n is None else world.queries[:n]
    task = RetrievalTask(world=world, corpus=cfg.eval.corpus, queries=queries, k=cfg.eval.k, checkpoint=checkpoint,
                         work_dir=features, device=device, shards=cfg.shard.count)
    t = time.perf_counter()
    if cfg.shard.step == "score":
        with stage_lock(artifacts, f"features-{features.parent.name}-{features.name}"), \
                compute_stage(artifacts, cfg.stage_threads):
            retriever.prepare_scoring(task)
        with compute_stage(artifacts, cfg.stage_threads):
            path = retriever.score_shard(task, cfg.shard.index)
        print(f"[shard {cfg.shard.index}/{cfg.shard.count}] ranked in {path} ({time.perf_counter() - t:.1f}s)")
        return path
    with compute_stage(artifacts, cfg.stage_threads):
        shard = retriever.extract_shard(task, cfg.shard.index)
    if "shard" not in shard.meta:
        print(f"[shard {cfg.shard.index}/{cfg.shard.count}] nothing to do: an unsharded run already extracted the "
              f"training features whole, in {shard.path}")
        return shard.path
    start, stop = shard.meta["shard"]["start"], shard.meta["shard"]["stop"]
    print(f"[shard {cfg.shard.index}/{cfg.shard.count}] rows {start}-{stop} in {shard.path} "
          f"({time.perf_counter() - t:.1f}s)")
    return shard.path
