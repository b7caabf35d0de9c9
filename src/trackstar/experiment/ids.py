"""Identities of the experiment wing: run ids, config ids and the keys of cached stages.

A *run* is one execution of a cell's config; its directory is named by the
run id (a hash of the config groups that determine its results) and its
*run record* keeps the config id (every setting but runtime ones). Which
settings enter either is decided by the one scheme in :mod:`trackstar.identity`.
Stage keys (worlds, models, retrievals, retrains) name the cached artifacts
that runs share.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ..identity import stable
from ..io import config_hash, read_json
from ..lm.run import run_key
from ..retrieval.records import TIE_ORDER
from ..world.release import release_key
from ..world.store import world_identity

#: Keys that do not change a run's results (left out of its identity).
RUNTIME_KEYS = ("logger", "force", "progress", "results_dir", "table", "stage_threads", "device", "shard", "diagnostics")

#: The ``artifacts_dir`` every config id is computed with (the default's value).
ARTIFACTS_IN_ID = "artifacts"

#: The groups whose ``seed`` is a seed of the run (world, model init and data order, projection).
SEED_GROUPS = ("world", "model", "method")

#: The groups ``ts_run_id`` receives, in the order config.yaml (and default_run_dir) passes them.
RUN_ID_GROUPS = ("world", "model", "method", "eval", "counterfactual", "corpus")


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _stable_groups(groups: dict) -> dict:
    """Each group as it enters an identity: whole groups at their earlier value dropped,
    then each group's later settings at theirs."""
    kept = stable("run", groups)
    return {g: stable(f"run.{g}", part) if isinstance(part, dict) else part for g, part in kept.items()}


def run_id(*nodes) -> str:
    """The run id of the groups :data:`RUN_ID_GROUPS` (the ``ts_run_id`` resolver)."""
    groups = _stable_groups({g: _container(n) for n, g in zip(nodes, RUN_ID_GROUPS)})
    return config_hash(list(groups.values()), 8)


def config_id(cfg: DictConfig, seeds: bool = True) -> str:
    """The hash of everything that determines a run's results; ``seeds=False``: but its
    world, model and projection seeds (runs equal in it are seeds of one table row)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    # Where artifacts live is not what a run is: every id carries the default's value (the
    # one runs made before this rule carried), so a copied, moved or remounted artifacts
    # dir keeps its finished runs.
    resolved["artifacts_dir"] = ARTIFACTS_IN_ID
    if not seeds:
        for group in SEED_GROUPS:
            resolved[group]["seed"] = None
    return config_hash(_stable_groups({k: v for k, v in resolved.items() if k not in RUNTIME_KEYS}))


def table_name(name) -> str:
    """``name`` when it is one plain directory name (run records go to
    ``results_dir/<table>/``); a ValueError naming the fix otherwise (``../x`` would
    write outside ``results_dir``). Also the ``ts_table`` resolver of config.yaml."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"table={name!r} is not a plain name: a run's record goes to results_dir/<table>/, so the "
                         "table names one directory there. Use letters, digits, '_', '-' and '.' (e.g. table=table1 "
                         "or table=my_ablation).")
    return name


def default_run_dir(cfg: DictConfig) -> Path:
    """Where a run outside Hydra lands: as ``trackstar-run`` would put it."""
    ident = run_id(*(cfg[g] for g in RUN_ID_GROUPS))
    return Path(cfg.results_dir) / table_name(cfg.table) / f"{cfg.method.name}-{cfg.eval.corpus}-{ident}"


def world_dir(artifacts: Path, profile: str, seed: int, style: str = "templated", knobs=None) -> Path:
    """Where a generated world lives: ``<profile>-s<seed>`` (templated, as before styles) or
    ``<profile>-natural-<hash of its knobs>-s<seed>``."""
    identity = world_identity(profile, seed, style, knobs)
    if style == "templated":
        return Path(artifacts) / "worlds" / f"{profile}-s{seed}"
    return Path(artifacts) / "worlds" / f"{profile}-{style}-{config_hash(identity)[:8]}-s{seed}"


def release_world_dir(artifacts: Path, release: str | Path, queries_per_bucket: int, seed: int) -> Path:
    """Where the world of a release directory lives, keyed by the release files and the sampling."""
    return Path(artifacts) / "worlds" / f"release-{release_key(release, queries_per_bucket, seed)[:12]}"


def corpus_world_dir(artifacts: Path, world: Path, spec) -> Path:
    """Where ``world`` with the external corpus ``spec`` as its open set lives."""
    return Path(artifacts) / "worlds" / f"{Path(world).name}+corpus-{config_hash(spec.key())[:12]}"


def model_dir(artifacts: Path, world: Path, config) -> Path:
    """Where the pretraining run of ``config`` on ``world`` lives (keyed by its run key)."""
    key = run_key(config, read_json(Path(world) / "manifest.json"))
    return Path(artifacts) / "models" / Path(world).name / f"{config.family}-{config.size}-{config.optimizer}-s{config.seed}-{key[:8]}"


def checkpoint_dir_name(checkpoint_id: str) -> str:
    """A checkpoint id (``<model run>/<checkpoint>`` or ``hf:<name>...``) as one directory name."""
    return checkpoint_id.replace("/", "__").replace(":", "_")


def features_dir(artifacts: Path, checkpoint_id: str, corpus: str) -> Path:
    """Where the gradient rows of one checkpoint and corpus keep feature stores and curvature."""
    return Path(artifacts) / "features" / checkpoint_dir_name(checkpoint_id) / corpus


def retrieval_key(world_manifest: dict, checkpoint_id: str | None, retriever_key: dict, corpus: str, k: int, n_queries) -> str:
    """Identity of one retrieval: the world, the checkpoint (None for text baselines),
    the retriever's own key (its name and resolved settings), the corpus and the queries."""
    return config_hash(
        {"world": world_manifest["content_hash"], "checkpoint": checkpoint_id, "retriever": retriever_key,
         "corpus": corpus, "k": k, "n_queries": n_queries, "ties": TIE_ORDER}
    )


def retrain_key(model_run: Path, keep, run_key: str | None = None) -> str:
    """Identity of a counterfactual retrain: the pretraining run it repeats (its ``run_key``,
    read from ``model_run`` when not given) and the kept passages."""
    keep = np.asarray(keep, dtype=bool)
    run = run_key or read_json(Path(model_run) / "pretrain.json")["run_key"]
    return config_hash({"run": run, "n": int(keep.size), "keep": hashlib.sha256(np.packbits(keep).tobytes()).hexdigest()})
