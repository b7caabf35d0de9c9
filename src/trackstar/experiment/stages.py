"""Cached pipeline stages: world -> model -> retrieval, each addressed by the config that determines it.

A sweep over λ reuses the gradients (the feature stores are keyed by what
determines a feature row), a sweep over d reuses the model, and every job of a
table reuses the world. Each stage runs under a file lock named by its key, so
jobs of a sweep that run at once (the joblib launcher) wait for one another
instead of building the same artifact twice or corrupting it.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from ..io import atomic_directory, atomic_write_json, config_hash, discard_if_damaged, read_json, read_jsonl, write_jsonl


@contextmanager
def stage_lock(artifacts: Path, key: str):
    locks = artifacts / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{key}.lock")):
        yield


def world_dir(artifacts: Path, profile: str, seed: int, style: str = "templated", knobs=None) -> Path:
    """Where a generated world lives: ``<profile>-s<seed>`` (templated, as before styles) or
    ``<profile>-natural-<hash of its knobs>-s<seed>``."""
    from ..world.store import world_identity

    identity = world_identity(profile, seed, style, knobs)
    if style == "templated":
        return Path(artifacts) / "worlds" / f"{profile}-s{seed}"
    return Path(artifacts) / "worlds" / f"{profile}-{style}-{config_hash(identity)[:8]}-s{seed}"


#: Queries per frequency bucket of a release world when the config leaves it unset (the paper's 5.4k / 6).
RELEASE_QUERIES_PER_BUCKET = 900


def release_world_dir(artifacts: Path, release: str | Path, queries_per_bucket: int, seed: int) -> Path:
    """Where the world of a release directory lives, keyed by the release files and the sampling."""
    from ..world.release import release_key

    return Path(artifacts) / "worlds" / f"release-{release_key(release, queries_per_bucket, seed)[:12]}"


def model_dir(artifacts: Path, world: Path, config) -> Path:
    """Where the pretraining run of ``config`` on ``world`` lives (keyed by its run key)."""
    from ..lm.pretrain import run_key

    key = run_key(config, read_json(Path(world) / "manifest.json"))
    return Path(artifacts) / "models" / Path(world).name / f"{config.family}-{config.size}-{config.optimizer}-s{config.seed}-{key[:8]}"


def corpus_world_stage(artifacts: Path, world: Path, spec) -> Path:
    """``world`` with the external corpus ``spec`` as its open set (built once, under a lock)."""
    from ..world.corpus import corpus_world

    from ..evaluation.world_card import write_card

    path = Path(artifacts) / "worlds" / f"{Path(world).name}+corpus-{config_hash(spec.key())[:12]}"
    with stage_lock(artifacts, f"world-{path.name}"):
        corpus_world(world, spec, path)
        write_card(path)
    return path


def pretrain_config(model_cfg):
    from ..lm.pretrain import PretrainConfig

    overrides = {
        "family": model_cfg.family,
        "optimizer": model_cfg.optimizer,
        "seed": model_cfg.seed,
        "checkpoint_fractions": tuple(model_cfg.checkpoint_fractions),
    }
    if model_cfg.epochs is not None:
        overrides["epochs"] = model_cfg.epochs
    return PretrainConfig.preset(model_cfg.size, **overrides)


def build_world_stage(artifacts: Path, world_cfg) -> Path:
    """The world of ``world_cfg``: an embedded profile, or (``profile: release``) the
    paper's release files in ``world.path``."""
    from ..evaluation.world_card import write_card
    from ..world import build_world
    from ..world.profiles import style_knobs
    from ..world.release import RELEASE_PROFILE, world_from_release

    if world_cfg.profile == RELEASE_PROFILE:
        per_bucket = world_cfg.get("queries_per_bucket") or RELEASE_QUERIES_PER_BUCKET
        release = Path(world_cfg.path).expanduser()
        path = release_world_dir(artifacts, release, per_bucket, world_cfg.seed)
        with stage_lock(artifacts, f"world-{path.name}"):
            world_from_release(release, path, per_bucket, world_cfg.seed)
            write_card(path)
        return path
    from omegaconf import OmegaConf

    style = world_cfg.get("style", "templated")
    knobs = style_knobs(style, OmegaConf.to_container(world_cfg.natural) if style != "templated" else None)
    path = world_dir(artifacts, world_cfg.profile, world_cfg.seed, style, knobs)
    with stage_lock(artifacts, f"world-{path.name}"):
        build_world(path, world_cfg.profile, world_cfg.seed, style, knobs)
        write_card(path)
    return path


def pretrain_stage(artifacts: Path, world: Path, model_cfg, progress: bool = True, threads: int | None = None,
                   device=None) -> Path:
    """The pretrained run directory (trained now if missing, resumed if killed), trained
    with ``threads`` whatever the job's own thread count (see :mod:`trackstar.runtime`)."""
    from ..lm.pretrain import pretrain_model
    from ..runtime import compute_stage

    config = pretrain_config(model_cfg)
    out = model_dir(artifacts, world, config)
    with stage_lock(artifacts, f"model-{out.parent.name}-{out.name}"), compute_stage(artifacts, threads):
        pretrain_model(world, out, config, progress=progress, device=device)
    return out


def checkpoint_path(run: Path, fraction: float) -> Path:
    """The checkpoint written at ``fraction`` of training."""
    summary = read_json(Path(run) / "pretrain.json")
    for entry in summary["checkpoints"]:
        if abs(entry["fraction"] - fraction) < 1e-9:
            return Path(run) / entry["name"]
    available = [e["fraction"] for e in summary["checkpoints"]]
    raise ValueError(
        f"model.checkpoint={fraction} is not a checkpoint of {str(run)!r} (it has {available}). "
        "Pick one of those, or add it to model.checkpoint_fractions."
    )


def features_dir(artifacts: Path, checkpoint: str, corpus: str) -> Path:
    """Where the gradient rows of one checkpoint and corpus keep feature stores and curvature."""
    return Path(artifacts) / "features" / checkpoint / corpus


def retrieval_key(world_manifest: dict, checkpoint_id: str | None, retriever_key: dict, corpus: str, k: int, n_queries) -> str:
    """Identity of one retrieval: the world, the checkpoint (None for text baselines),
    the retriever's own key (its name and resolved settings), the corpus and the queries."""
    return config_hash(
        {"world": world_manifest["content_hash"], "checkpoint": checkpoint_id, "retriever": retriever_key,
         "corpus": corpus, "k": k, "n_queries": n_queries}
    )


def retrieval_stage(artifacts: Path, key: str, compute) -> tuple[list[dict], dict]:
    """Cached retrieval records (release schema) and their info, computed once per key."""
    path = Path(artifacts) / "retrievals" / key
    with stage_lock(artifacts, f"retrieval-{key}"):
        if discard_if_damaged(path, "retrieval cache", "recomputing it"):
            return read_jsonl(path / "retrievals.jsonl"), read_json(path / "info.json")
        records, info = compute()
        with atomic_directory(path) as tmp:  # replaces anything incomplete left by a kill
            write_jsonl(tmp / "retrievals.jsonl", records)
            atomic_write_json(tmp / "info.json", info)
        return records, info



def retrain_key(model_run: Path, keep, run_key: str | None = None) -> str:
    """Identity of a counterfactual retrain: the pretraining run it repeats (its ``run_key``,
    read from ``model_run`` when not given) and the kept passages."""
    import numpy as np

    keep = np.asarray(keep, dtype=bool)
    run = run_key or read_json(Path(model_run) / "pretrain.json")["run_key"]
    return config_hash({"run": run, "n": int(keep.size), "keep": hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()})


def retrain_stage(artifacts: Path, model_run: Path, world: Path, masks, threads: int | None = None,
                  device=None, progress: bool = False) -> list[dict]:
    """The outcomes of retraining ``model_run`` on each keep mask, each computed once.

    Outcomes are cached per (run, kept passages) under ``artifacts/retrains``
    and shared by every method and job. Jobs running at once share the work:
    each first takes the retrains no other job holds, then waits for the rest,
    so a sweep's jobs under the parallel (or SLURM) launcher retrain in parallel.
    """
    from filelock import FileLock, Timeout

    from ..io import ArtifactError, atomic_write_json_checked, read_json_checked
    from ..lm.retrain import retrain
    from ..runtime import compute_stage

    out_dir = Path(artifacts) / "retrains" / Path(model_run).name
    out_dir.mkdir(parents=True, exist_ok=True)
    (Path(artifacts) / "locks").mkdir(parents=True, exist_ok=True)
    run_key = read_json(Path(model_run) / "pretrain.json")["run_key"]
    keys = [retrain_key(model_run, m, run_key) for m in masks]
    outcomes: dict[int, dict] = {}

    def cached(path: Path) -> dict | None:
        if not path.is_file():
            return None
        try:
            return read_json_checked(path)
        except ArtifactError as exc:
            logging.getLogger("trackstar").warning("%s; retraining it", exc)
            return None

    pending = list(range(len(masks)))
    bar = tqdm(total=len(pending), disable=not progress, desc="retrains", unit="model")
    for wait in (False, True):  # first what no other job holds, then wait for the rest
        left = []
        for i in pending:
            lock = FileLock(str(Path(artifacts) / "locks" / f"retrain-{keys[i]}.lock"))
            try:
                lock.acquire(timeout=-1 if wait else 0)
            except Timeout:
                left.append(i)
                continue
            try:
                path = out_dir / f"{keys[i]}.json"
                outcome = cached(path)
                if outcome is None:
                    with compute_stage(artifacts, threads):
                        outcome = retrain(model_run, world, masks[i], device=device)
                    atomic_write_json_checked(path, outcome)
                outcomes[i] = outcome
            finally:
                lock.release()
            bar.update(1)
        pending = left
    bar.close()
    return [outcomes[i] for i in range(len(masks))]
