"""Cached pipeline stages: world -> model -> retrieval (-> retrains), each addressed by
the key of what determines it (:mod:`.ids`).

A sweep over λ reuses the gradients (the feature stores are keyed by what
determines a feature row), a sweep over d reuses the model, and every job of a
table reuses the world. Each stage runs under a file lock named by its key, so
jobs of a sweep that run at once (the joblib launcher) wait for one another
instead of building the same artifact twice or corrupting it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..evaluation.world_card import write_card
from ..io import (
    ArtifactError,
    atomic_directory,
    atomic_write_json,
    atomic_write_json_checked,
    discard_if_damaged,
    read_json,
    read_json_checked,
    read_jsonl,
    sha256_file,
    write_jsonl,
)
from ..lm import load_checkpoint, load_hf_causal_lm
from ..lm.external_optimizer import attach_optimizer_state
from ..lm.pretrain import pretrain_model
from ..lm.retrain import retrain
from ..runtime import compute_stage
from ..world import build_world
from ..world.corpus import corpus_world
from ..world.release import RELEASE_PROFILE, world_from_release
from .ids import corpus_world_dir, model_dir, release_world_dir, retrain_key, world_dir
from .settings import corpus_spec, pretrain_config, world_style

#: Queries per frequency bucket of a release world when the config leaves it unset (the paper's 5.4k / 6).
RELEASE_QUERIES_PER_BUCKET = 900


@contextmanager
def stage_lock(artifacts: Path, key: str):
    locks = Path(artifacts) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"{key}.lock")):
        yield


def world_stage(cfg: DictConfig, artifacts: Path) -> Path:
    """The world directory of a run: the configured world, with the external corpus
    as its open set when ``corpus.source`` is set."""
    world_path = build_world_stage(artifacts, cfg.world)
    spec = corpus_spec(cfg)
    return world_path if spec is None else corpus_world_stage(artifacts, world_path, spec)


def corpus_world_stage(artifacts: Path, world: Path, spec) -> Path:
    """``world`` with the external corpus ``spec`` as its open set (built once, under a lock)."""
    path = corpus_world_dir(artifacts, world, spec)
    with stage_lock(artifacts, f"world-{path.name}"):
        corpus_world(world, spec, path)
        write_card(path)
    return path


def build_world_stage(artifacts: Path, world_cfg) -> Path:
    """The world of ``world_cfg``: an embedded profile, or (``profile: release``) the
    paper's release files in ``world.path``."""
    if world_cfg.profile == RELEASE_PROFILE:
        per_bucket = world_cfg.get("queries_per_bucket") or RELEASE_QUERIES_PER_BUCKET
        release = Path(world_cfg.path).expanduser()
        path = release_world_dir(artifacts, release, per_bucket, world_cfg.seed)
        with stage_lock(artifacts, f"world-{path.name}"):
            world_from_release(release, path, per_bucket, world_cfg.seed)
            write_card(path)
        return path
    style, knobs = world_style(world_cfg)
    path = world_dir(artifacts, world_cfg.profile, world_cfg.seed, style, knobs)
    with stage_lock(artifacts, f"world-{path.name}"):
        build_world(path, world_cfg.profile, world_cfg.seed, style, knobs)
        write_card(path)
    return path


def model_stage(cfg: DictConfig, artifacts: Path, world_path: Path, device):
    """(checkpoint on ``device``, its directory or None for a Hugging Face model, its id),
    pretraining our own model first if it is not there yet."""
    if cfg.model.hf_name_or_path:
        adapter = cfg.model.get("adapter")
        checkpoint = load_hf_causal_lm(cfg.model.hf_name_or_path, device=device, adapter=adapter)
        ident = f"hf:{cfg.model.hf_name_or_path}"
        if adapter:
            ident += f"+adapter-{checkpoint.trainer_state['adapter_hash']}"
        if cfg.model.optimizer_state:
            state = Path(cfg.model.optimizer_state).expanduser()
            attach_optimizer_state(checkpoint, state, cfg.model.learning_rate)
            # V and tail-patch depend on the state and the rate: their caches must too.
            ident += f"+opt-{sha256_file(state)[:12]}-lr{checkpoint.learning_rate!r}"
        return checkpoint, None, ident
    model_run = pretrain_stage(artifacts, world_path, cfg.model, progress=cfg.progress, threads=cfg.stage_threads,
                               device=device)
    ckpt_path = checkpoint_path(model_run, cfg.model.checkpoint)
    return load_checkpoint(ckpt_path, device=device), ckpt_path, f"{model_run.name}/{ckpt_path.name}"


def pretrain_stage(artifacts: Path, world: Path, model_cfg, progress: bool = True, threads: int | None = None,
                   device=None) -> Path:
    """The pretrained run directory (trained now if missing, resumed if killed), trained
    with ``threads`` whatever the job's own thread count (see :mod:`trackstar.runtime`)."""
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


def retrain_stage(artifacts: Path, model_run: Path, world: Path, masks, threads: int | None = None,
                  device=None, progress: bool = False) -> list[dict]:
    """The outcomes of retraining ``model_run`` on each keep mask, each computed once.

    Outcomes are cached per (run, kept passages) under ``artifacts/retrains``
    and shared by every method and job. Jobs running at once share the work:
    each first takes the retrains no other job holds, then waits for the rest,
    so a sweep's jobs under the parallel (or SLURM) launcher retrain in parallel.
    """
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
