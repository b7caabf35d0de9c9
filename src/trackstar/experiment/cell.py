"""One cell of a paper table as a plain function: config in, run record out.

    from trackstar.experiment import compose_config, run_cell
    record = run_cell(compose_config(["method=bm25", "eval=open"]))

``run_cell`` runs the pipeline of one (world, model, method, corpus) setting,
world -> model -> retrieval -> evaluation -> run record (+ W&B), reusing every
cached stage (see :mod:`.stages`). ``trackstar-run`` (Hydra, one call per job
of a multirun) and ``trackstar run`` are thin shells around it. A job whose
finished record exists is skipped; a failed job records ``status: failed``
with its error and, under multirun, does not stop the sweep.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..io import ArtifactError, config_hash, ensure_writable_dir, read_jsonl, sha256_file, write_jsonl
from . import record as rec
from .record import MethodInfo, RunRecord
from .schema import register as register_schema
from .stages import (
    build_world_stage,
    checkpoint_path,
    features_dir,
    pretrain_config,
    pretrain_stage,
    retrieval_key,
    retrieval_stage,
    stage_lock,
)

log = logging.getLogger("trackstar")

#: What a shard job (shard.index set) does: extract its features, or rank its rows.
SHARD_STEPS = ("extract", "score")

#: Keys that do not change a run's results (left out of its identity).
RUNTIME_KEYS = ("logger", "force", "progress", "results_dir", "table", "stage_threads", "device", "shard", "diagnostics")


class ConfigError(ValueError):
    """A config value is invalid; raised before any work starts."""


def _container(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


#: Keys added to a config group after runs existed, with their defaults: at the
#: default they are left out of run identities, so those runs keep their
#: directories and ids.
LATER_KEYS = {"world": {"path": None, "queries_per_bucket": None},
              "model": {"optimizer_state": None, "learning_rate": None},
              "eval": {"judge": "exact", "judge_model": None, "judge_threshold": 0.5}}


#: Groups whose whole block is left out of a run's identity while it is off.
OFF_WHEN = {"counterfactual": ("enabled", False), "corpus": ("source", None)}

#: The groups ``ts_run_id`` receives, in the order config.yaml (and default_run_dir) passes them.
RUN_ID_GROUPS = ("world", "model", "method", "eval", "counterfactual", "corpus")


#: World keys that only a generated natural world has: left out of the identity of
#: templated and release worlds, so their runs keep the ids they had before styles.
STYLE_KEYS = ("style", "natural")


def _stable(part, group: str):
    """``part``, the config of ``group``, as it enters a run's identity (see LATER_KEYS,
    STYLE_KEYS and OFF_WHEN); None: left out entirely."""
    if not isinstance(part, dict):
        return part
    if group == "world" and (part.get("style", "templated") == "templated" or part.get("profile") == "release"):
        part = {k: v for k, v in part.items() if k not in STYLE_KEYS}
    if group in OFF_WHEN:
        key, off = OFF_WHEN[group]
        if part.get(key, off) == off:
            return None
    later = LATER_KEYS.get(group, {})
    return {k: v for k, v in part.items() if not (k in later and v == later[k])}


def _run_id(*nodes) -> str:
    parts = [_stable(_container(n), g) for n, g in zip(nodes, RUN_ID_GROUPS)]
    return config_hash([p for p in parts if p is not None], 8)


OmegaConf.register_new_resolver("ts_run_id", _run_id, replace=True)
register_schema()


def config_id(cfg: DictConfig, seeds: bool = True) -> str:
    """The hash of everything that determines a run's results; ``seeds=False``: but its
    world, model and projection seeds (runs equal in it are seeds of one table row)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if not seeds:
        for group in SEED_GROUPS:
            resolved[group]["seed"] = None
    stable = {k: _stable(v, k) for k, v in resolved.items() if k not in RUNTIME_KEYS}
    return config_hash({k: v for k, v in stable.items() if v is not None})


#: The groups whose ``seed`` is a seed of the run (world, model init and data order, projection).
SEED_GROUPS = ("world", "model", "method")


def counterfactual_settings(cfg: DictConfig):
    """The run's :class:`~trackstar.evaluation.counterfactual.CounterfactualSettings`, or None when disabled."""
    from ..evaluation.counterfactual import CounterfactualSettings

    node = _container(cfg.counterfactual)
    if not node.pop("enabled"):
        return None
    return CounterfactualSettings(**node)


def compose_config(overrides: Sequence[str] = (), config_name: str = "config", config_dir: str | Path | None = None) -> DictConfig:
    """The resolved config of ``overrides`` without a Hydra app (for Python and the CLI)."""
    from hydra import compose, initialize_config_dir

    search = []
    if config_dir is None:
        config_dir = Path(__file__).resolve().parents[1] / "conf"
    else:
        search = ["hydra.searchpath=[pkg://trackstar.conf]"]
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*search, *overrides], return_hydra_config=False)


def method_options(method: Mapping, family: str) -> dict:
    """What the method's retriever is configured with.

    ``method.options`` for every method; a gradient row also takes the shared
    attribution fields of ``method`` (d, lam, output_fn, …) that are set.
    """
    options = dict(method.get("options") or {})
    if family == "gradient":
        shared = {k: v for k, v in method.items() if k not in ("name", "options") and v is not None}
        options = {**shared, **options}
    return options


def validate(cfg: DictConfig):
    """Check every value before any work starts; returns the configured retriever.

    Types were checked at composition; this checks values, naming the key.
    """
    from ..lm.models import check_family, check_size
    from ..lm.optim import check_optimizer
    from ..retrieval import get_retriever, retriever_class
    from ..attribution.store import check_shard
    from ..device import resolve_device
    from ..runtime import stage_threads
    from ..world.store import check_seed
    from .tracking import resolve_mode

    try:
        _check_world(cfg.world)
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
        method = OmegaConf.to_container(cfg.method, resolve=True)
        retriever = get_retriever(cfg.method.name, method_options(method, retriever_class(cfg.method.name).family),
                                  cfg.eval.corpus)
        n = cfg.eval.n_queries
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"eval.n_queries={n!r}: give a positive number of queries, or null for all of them.")
        _check_optimizer_state(cfg.model)
        if retriever.settings.get("train_side") == "optimizer_step" and cfg.model.hf_name_or_path \
                and not cfg.model.optimizer_state:
            raise ValueError(f"method={cfg.method.name} predicts the optimizer's own step: a Hugging Face model needs "
                             "model.optimizer_state (its published optimizer state) for it.")
        if retriever.family == "gradient" or cfg.model.hf_name_or_path:  # a Hugging Face model must load for any method
            retriever.check_model(_skeleton(cfg.model))
        if cfg.eval.k < max(cfg.eval.tail_patch_ks, default=1):
            raise ValueError(f"eval.k={cfg.eval.k} is smaller than max(eval.tail_patch_ks)={max(cfg.eval.tail_patch_ks)}; raise k.")
        resolve_mode(cfg.logger.mode)
        stage_threads(cfg.stage_threads)
        resolve_device(cfg.device)
        _check_counterfactual(cfg, retriever)
        spec = corpus_spec(cfg)
        if spec is not None:
            spec.check_paths()
        _check_judge(cfg.eval)
        if cfg.shard.step not in SHARD_STEPS:
            raise ValueError(f"shard.step={cfg.shard.step!r}: use one of {SHARD_STEPS}.")
        if cfg.shard.count != 1 or cfg.shard.index is not None:
            check_shard(0 if cfg.shard.index is None else cfg.shard.index, cfg.shard.count, "shard")
            if retriever.family != "gradient":
                raise ValueError(f"shard.count={cfg.shard.count}: sharding splits gradient feature extraction; "
                                 f"method {cfg.method.name!r} has none. Leave shard unset for it.")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return retriever


def _check_world(world_cfg) -> None:
    from ..world import get_profile
    from ..world.profiles import style_knobs
    from ..world.release import FACTS_FILE, RELEASE_PROFILE

    if world_cfg.profile != RELEASE_PROFILE:
        get_profile(world_cfg.profile)
        style_knobs(world_cfg.style, _container(world_cfg.natural))
        return
    if OmegaConf.is_missing(world_cfg, "path") or not world_cfg.path:
        raise ValueError("world=release needs world.path=DIR, the directory of the release's trex_facts.jsonl "
                         "and trex_sentences.jsonl-* files.")
    if not (Path(world_cfg.path).expanduser() / FACTS_FILE).is_file():
        raise ValueError(f"world.path={world_cfg.path!r} has no {FACTS_FILE}; give the directory of the "
                         "release's files.")
    n = world_cfg.queries_per_bucket
    if n is not None and (isinstance(n, bool) or n < 1):
        raise ValueError(f"world.queries_per_bucket={n!r}: give a positive number, or null for 900.")


def _check_judge(eval_cfg) -> None:
    from ..evaluation.judge import JUDGES

    if eval_cfg.judge not in JUDGES:
        raise ValueError(f"eval.judge={eval_cfg.judge!r}: use one of {JUDGES}.")
    if eval_cfg.judge == "nli":
        if eval_cfg.corpus != "open":
            raise ValueError("eval.judge=nli judges open-set passages; the closed set has exact annotations "
                             "(use eval=open, or eval.judge=exact).")
        if not eval_cfg.judge_model:
            raise ValueError("eval.judge=nli needs eval.judge_model: an NLI model's hub name or local path.")
    if not 0 < eval_cfg.judge_threshold <= 1:
        raise ValueError(f"eval.judge_threshold={eval_cfg.judge_threshold!r}: give a probability in (0, 1].")


def _check_optimizer_state(model_cfg) -> None:
    if model_cfg.optimizer_state is None and model_cfg.learning_rate is None:
        return
    if not model_cfg.hf_name_or_path:
        raise ValueError("model.optimizer_state and model.learning_rate are for a Hugging Face model "
                         "(model.hf_name_or_path); our own models carry their optimizer state.")
    if model_cfg.optimizer_state is not None and not Path(model_cfg.optimizer_state).expanduser().is_file():
        raise ValueError(f"model.optimizer_state={model_cfg.optimizer_state!r}: no such file.")
    if model_cfg.learning_rate is not None and not model_cfg.learning_rate > 0:
        raise ValueError(f"model.learning_rate={model_cfg.learning_rate!r}: give a positive learning rate.")
    if model_cfg.optimizer_state is None:
        raise ValueError("model.learning_rate needs model.optimizer_state: tail-patch steps with the optimizer.")


def _check_counterfactual(cfg: DictConfig, retriever) -> None:
    from ..retrieval import Retriever

    if counterfactual_settings(cfg) is None:
        return
    if cfg.eval.corpus != "open":
        raise ValueError("counterfactual.enabled=true needs eval=open: LDS and leave-top-k-out retrain on the "
                         "pretraining corpus, so the methods must score its passages.")
    if cfg.model.hf_name_or_path:
        raise ValueError("counterfactual.enabled=true retrains the model from scratch, which only works for our "
                         "own models; leave model.hf_name_or_path unset.")
    if abs(cfg.model.checkpoint - 1.0) > 1e-9:
        raise ValueError(f"counterfactual.enabled=true compares retrains with the final model; model.checkpoint="
                         f"{cfg.model.checkpoint} must be 1.0.")
    if cfg.eval.k < cfg.counterfactual.k:
        raise ValueError(f"eval.k={cfg.eval.k} is smaller than counterfactual.k={cfg.counterfactual.k}; "
                         "raise eval.k so the top-k proponents can be left out.")
    if type(retriever).subset_sums is Retriever.subset_sums:
        raise ValueError(f"method {cfg.method.name!r} cannot score every passage, which LDS needs; "
                         "leave it out of the counterfactual sweep.")


def _skeleton(model_cfg):
    """The configured model's architecture on the meta device (no weights, no training)."""
    from ..lm.models import hf_skeleton, model_skeleton

    if model_cfg.hf_name_or_path:
        name = str(model_cfg.hf_name_or_path)
        looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1  # a hub name is owner/model
        if looks_local and not Path(name).expanduser().exists():
            raise ValueError(f"model.hf_name_or_path={name!r}: no such directory. Give a saved model's "
                             "directory or a Hugging Face hub name (owner/model).")
        try:
            return hf_skeleton(model_cfg.hf_name_or_path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model.hf_name_or_path={model_cfg.hf_name_or_path!r} cannot be loaded: {exc}") from None
    preset = pretrain_config(model_cfg)
    return model_skeleton(preset.family, preset.size, preset.vocab_size, preset.context_length)


def corpus_spec(cfg: DictConfig):
    """The run's external corpus (:class:`~trackstar.world.corpus.CorpusSpec`), or None."""
    from ..world.corpus import CorpusSpec

    node = _container(cfg.corpus)
    return None if node.get("source") is None else CorpusSpec(**node)


def _world(cfg: DictConfig, artifacts: Path) -> Path:
    """The world directory of the run: the configured world, with the external corpus
    as its open set when ``corpus.source`` is set."""
    from .stages import corpus_world_stage

    world_path = build_world_stage(artifacts, cfg.world)
    spec = corpus_spec(cfg)
    return world_path if spec is None else corpus_world_stage(artifacts, world_path, spec)


def _stage_dir_name(checkpoint_id: str) -> str:
    return checkpoint_id.replace("/", "__").replace(":", "_")


def _model(cfg: DictConfig, artifacts: Path, world_path: Path, device):
    """(checkpoint on ``device``, its directory or None for a Hugging Face model, its id),
    pretraining our own model first if it is not there yet."""
    from ..lm import load_checkpoint, load_hf_causal_lm

    if cfg.model.hf_name_or_path:
        checkpoint, ident = load_hf_causal_lm(cfg.model.hf_name_or_path, device=device), f"hf:{cfg.model.hf_name_or_path}"
        if cfg.model.optimizer_state:
            from ..lm.external_optimizer import attach_optimizer_state

            attach_optimizer_state(checkpoint, Path(cfg.model.optimizer_state).expanduser(), cfg.model.learning_rate)
            # V and tail-patch depend on the state and the rate: their caches must too.
            ident += f"+opt-{sha256_file(Path(cfg.model.optimizer_state).expanduser())[:12]}-lr{checkpoint.learning_rate!r}"
        return checkpoint, None, ident
    model_run = pretrain_stage(artifacts, world_path, cfg.model, progress=cfg.progress, threads=cfg.stage_threads,
                               device=device)
    ckpt_path = checkpoint_path(model_run, cfg.model.checkpoint)
    return load_checkpoint(ckpt_path, device=device), ckpt_path, f"{model_run.name}/{ckpt_path.name}"


def shard_job(cfg: DictConfig) -> Path:
    """A map step of a sharded run (``shard.index`` set), into the cell's shared feature
    directory; it writes no run record, the run with ``shard.count`` and no index does.

    ``shard.step=extract``: one shard of the training features and its part of
    R_train. ``shard.step=score``: once every shard is extracted, the top-k among
    this shard's rows (the query features and R^{-1/2} are written once, under
    the features' lock); the reduce then merges instead of scoring every row.
    """
    from ..device import resolve_device
    from ..retrieval import RetrievalTask
    from ..runtime import compute_stage
    from ..world import load_world

    retriever = validate(cfg)
    if cfg.shard.index is None:
        raise ConfigError("a shard job needs shard.index (0 to shard.count - 1).")
    device = resolve_device(cfg.device)
    artifacts = ensure_writable_dir(cfg.artifacts_dir, "artifacts_dir")
    world_path = _world(cfg, artifacts)
    world = load_world(world_path)
    checkpoint, _, ckpt_id = _model(cfg, artifacts, world_path, device)
    features = features_dir(artifacts, _stage_dir_name(ckpt_id), cfg.eval.corpus)
    n = cfg.eval.n_queries
    queries = world.queries if n is None else world.queries[:n]
    task = RetrievalTask(world, cfg.eval.corpus, queries, cfg.eval.k, checkpoint, features, device, cfg.shard.count)
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
    start, stop = shard.meta["shard"]["start"], shard.meta["shard"]["stop"]
    print(f"[shard {cfg.shard.index}/{cfg.shard.count}] rows {start}-{stop} in {shard.path} "
          f"({time.perf_counter() - t:.1f}s)")
    return shard.path


def execute(cfg: DictConfig, retriever, record: RunRecord) -> tuple[list[dict], object]:
    """The stages of one cell; fills ``record`` and returns (retrievals, per-query metrics)."""
    from ..evaluation.fact_tracing import evaluate, metric_columns
    from ..evaluation.splits import metric_summary
    from ..lm import evaluate_queries
    from ..retrieval import RetrievalTask, run
    from ..world import load_world

    from ..device import resolve_device
    from ..runtime import compute_stage

    device = resolve_device(cfg.device)
    artifacts = Path(cfg.artifacts_dir)
    timings = record.timings

    def numeric():
        return compute_stage(artifacts, cfg.stage_threads)

    t = time.perf_counter()
    world_path = _world(cfg, artifacts)
    world = load_world(world_path)
    timings["world"] = time.perf_counter() - t

    t = time.perf_counter()
    checkpoint, ckpt_path, ckpt_id = _model(cfg, artifacts, world_path, device)
    if ckpt_path is None:
        with numeric():
            query_eval = evaluate_queries(checkpoint.model, checkpoint.tokenizer, world.queries)
    else:
        query_eval = read_jsonl(ckpt_path / "query_eval.jsonl")
    timings["model"] = time.perf_counter() - t

    n = cfg.eval.n_queries
    if n is not None and n > len(world.queries):
        raise ConfigError(f"eval.n_queries={n}, but the world {world_path.name} has {len(world.queries)} queries; "
                          "lower it, or use null for all of them.")
    queries = world.queries if n is None else world.queries[:n]
    gradient = retriever.family == "gradient"
    key = retrieval_key(world.manifest, ckpt_id if gradient else None, retriever.cache_key(), cfg.eval.corpus,
                        cfg.eval.k, cfg.eval.n_queries)
    features = features_dir(artifacts, _stage_dir_name(ckpt_id), cfg.eval.corpus)
    task = RetrievalTask(world, cfg.eval.corpus, queries, cfg.eval.k, checkpoint if gradient else None,
                         features if gradient else None, device, cfg.shard.count, diagnose=cfg.diagnostics)

    def compute():
        if not gradient:
            with numeric():
                return run(retriever, task)
        # Gradient rows of one checkpoint and corpus share feature stores and
        # curvature (e.g. exp2 and exp4); parallel jobs take turns writing them.
        with stage_lock(artifacts, f"features-{features.parent.name}-{features.name}"), numeric():
            return run(retriever, task)

    t = time.perf_counter()
    retrievals, record.info = retrieval_stage(artifacts, key, compute)
    if (cfg.diagnostics and gradient and retriever.settings.get("curvature") != "none"
            and not retriever.settings.get("block_diagonal") and "curvature_diagnostic" not in record.info):
        # Cached by a run that did not ask for it: score again (the features and R are cached).
        record.info = {**record.info, **{k: v for k, v in compute()[1].items() if k == "curvature_diagnostic"}}
    timings["retrieval"] = time.perf_counter() - t

    if cfg.eval.judge == "nli":
        from ..evaluation.judge import NLIJudge

        t = time.perf_counter()
        with numeric():
            retrievals = NLIJudge(cfg.eval.judge_model, device=device, cache_dir=artifacts,
                                  progress=cfg.progress).label(retrievals)
        timings["judge"] = time.perf_counter() - t

    t = time.perf_counter()
    can_patch = cfg.eval.tail_patch and checkpoint.optimizer is not None
    if cfg.eval.tail_patch and not can_patch:
        log.warning("tail-patch skipped: %s has no optimizer state", ckpt_id)
    with numeric():
        per_query = evaluate(
            retrievals, checkpoint if can_patch else None, query_eval,
            tuple(cfg.eval.tail_patch_ks) if can_patch else (), progress=cfg.progress,
            cache_dir=artifacts / "tailpatch" / _stage_dir_name(ckpt_id), ais_threshold=cfg.eval.judge_threshold,
        )
    timings["evaluation"] = time.perf_counter() - t

    settings = counterfactual_settings(cfg)
    if settings is not None:
        from ..evaluation.counterfactual import counterfactual
        from ..retrieval.records import Corpus
        from .stages import retrain_stage

        def subset_sums(masks):
            if not gradient:
                with numeric():
                    return retriever.subset_sums(task, masks)
            with stage_lock(artifacts, f"features-{features.parent.name}-{features.name}"), numeric():
                return retriever.subset_sums(task, masks)

        def retrain_many(masks):
            return retrain_stage(artifacts, ckpt_path.parent, world_path, masks, cfg.stage_threads, device,
                                 cfg.progress)

        t = time.perf_counter()
        effects, record.info["counterfactual"] = counterfactual(
            retrievals, Corpus.from_world(world, cfg.eval.corpus).ids, subset_sums, retrain_many, settings)
        per_query = per_query.merge(effects, on="example_id", how="left")
        timings["counterfactual"] = time.perf_counter() - t

    record.metrics, record.splits = metric_summary(
        per_query, metric_columns(per_query), cfg.eval.bootstrap_resamples, cfg.eval.confidence)
    record.n_queries = int(len(per_query))
    weights = ckpt_path / "model.safetensors" if ckpt_path else None
    record.artifacts = {
        "world": {"path": str(world_path), "content_hash": world.manifest["content_hash"]},
        "checkpoint": {"id": ckpt_id, "path": str(ckpt_path) if ckpt_path else None,
                       "hash": sha256_file(weights) if weights and weights.is_file() else None},
        "retrievals": {"key": key, "path": str(artifacts / "retrievals" / key)},
        "device": str(device),
    }
    return retrievals, per_query


def default_run_dir(cfg: DictConfig) -> Path:
    """Where a run outside Hydra lands: as ``trackstar-run`` would put it."""
    ident = _run_id(cfg.world, cfg.model, cfg.method, cfg.eval, cfg.counterfactual, cfg.corpus)
    return Path(cfg.results_dir) / cfg.table / f"{cfg.method.name}-{cfg.eval.corpus}-{ident}"


def _writable(cfg: DictConfig, run_dir: Path) -> None:
    try:
        ensure_writable_dir(cfg.artifacts_dir, "artifacts_dir")
        ensure_writable_dir(run_dir, "The run directory (under results_dir)")
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from None


def _invalid(cfg: DictConfig, run_dir: Path, exc: ConfigError) -> RunRecord:
    """The failed record of a multirun job whose config is invalid (no work was done)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    log.error("invalid config: %s", exc)
    started = rec.now()
    record = RunRecord(
        config_id=config_id(cfg), table=cfg.table, corpus=cfg.eval.corpus,
        method=MethodInfo(cfg.method.name, cfg.method.name, "unknown", 1e9, {}),
        world=resolved["world"], model=resolved["model"], eval=resolved["eval"],
        git_commit=rec.git_commit(Path(__file__).parent), started=started, run_dir=str(run_dir),
        status="failed", error=f"ConfigError: {exc}", finished=started,
    )
    rec.write_record(run_dir, record)
    print(f"[failed] {run_dir} invalid config: {exc}")
    return record


def run_cell(cfg: DictConfig, run_dir: str | Path | None = None, multirun: bool = False,
             wandb_group: str | None = None) -> RunRecord:
    """Run (or skip, when finished) one cell and write its run record; see the module doc.

    Raises :class:`ConfigError` before any work for an invalid config (under
    ``multirun``, records it as a failed job instead, so the sweep goes on). A
    failure after that is recorded; it is raised again unless ``multirun``.
    """
    from .tracking import log_to_wandb

    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    try:
        retriever = validate(cfg)
    except ConfigError as exc:
        if not multirun:
            raise
        _writable(cfg, run_dir)
        return _invalid(cfg, run_dir, exc)  # one bad grid point must not stop the sweep
    _writable(cfg, run_dir)
    cid = config_id(cfg)
    kept = rec.finished_record(run_dir, cid)  # a force=true re-run must not lose it if it fails
    done = None if cfg.force else kept
    if done is not None:
        log.info("skipping %s: a finished run record exists (force=true re-runs it)", run_dir)
        print(f"[skip] {run_dir} is finished")
        return done
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if not (run_dir / rec.METRICS_FILE).is_file():
        rec.write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
    record = RunRecord(
        config_id=cid, seedless_id=config_id(cfg, seeds=False), table=cfg.table, corpus=cfg.eval.corpus,
        method=MethodInfo(retriever.name, retriever.label, retriever.family, retriever.rank, retriever.settings),
        world=resolved["world"], model=resolved["model"], eval=resolved["eval"],
        git_commit=rec.git_commit(Path(__file__).parent), started=rec.now(), run_dir=str(run_dir),
    )
    attempt = rec.attempt_name(record)
    t0 = time.perf_counter()
    retrievals, per_query = [], None
    try:
        retrievals, per_query = execute(cfg, retriever, record)
        rec.write_per_query(run_dir, per_query)
        write_jsonl(run_dir / rec.RETRIEVALS_FILE, retrievals)
        rec.write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
        record.status = "finished"
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised outside multirun
        record.status, record.error, record.traceback = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
        if multirun:  # otherwise the caller reports the exception
            log.error("run failed: %s", record.error)
        if kept is not None:
            log.warning("the finished record of %s is kept in %s; this attempt is in %s/", kept.finished,
                        run_dir / rec.METRICS_FILE, run_dir / rec.ATTEMPTS_DIR)
        if not multirun:
            record.finished = rec.now()
            rec.write_record(run_dir, record, attempt)
            raise
    record.finished = rec.now()
    record.timings["total"] = time.perf_counter() - t0
    rec.write_record(run_dir, record, attempt)
    record.wandb = log_to_wandb(
        run_dir, resolved, record, retrievals, per_query, cfg.logger, group=wandb_group or cfg.table,
        tags=[cfg.table, cfg.method.name, cfg.eval.corpus], name=run_dir.name,
    )
    rec.write_record(run_dir, record, attempt)
    headline = ("mrr", "recall@10", f"tail_patch@{max(cfg.eval.tail_patch_ks, default=10)}", "lds",
                f"loo_drop@{cfg.counterfactual.k}")
    summary = ", ".join(f"{m}={record.metrics[m]['mean']:.3f}" for m in headline if m in record.metrics)
    print(f"[{record.status}] {run_dir} {summary or record.error or ''}")
    return record
