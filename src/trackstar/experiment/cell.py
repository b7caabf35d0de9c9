"""One cell of a paper table as a plain function: config in, run record out.

    from trackstar.experiment import compose_config, run_cell
    record = run_cell(compose_config(["method=bm25", "eval=open"]))

``run_cell`` runs the stages of one (world, model, method, corpus) setting,
:data:`STAGES`: world -> model -> retrieval -> judge -> evaluation ->
counterfactual, then writes the run record (+ W&B), reusing every cached stage
(see :mod:`.stages`). ``trackstar-run`` (Hydra, one call per job of a
multirun) and ``trackstar run`` are thin shells around it. A job whose
finished record exists is skipped; a failed job records ``status: failed``
with its error and, under multirun, does not stop the sweep.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..device import environment, resolve_device
from ..evaluation.counterfactual import counterfactual
from ..evaluation.fact_tracing import evaluate_with_pairs, metric_columns
from ..evaluation.judge import NLIJudge
from ..evaluation.splits import metric_summary
from ..io import ArtifactError, ensure_writable_dir, read_jsonl, sha256_file, write_jsonl
from ..lm import evaluate_queries
from ..retrieval import Corpus, RetrievalTask, run
from ..retrieval.registry import CHECKPOINT_FAMILIES
from ..runtime import compute_stage
from ..world import load_world
from . import record as rec
from .ids import checkpoint_dir_name, config_id, default_run_dir, features_dir, retrieval_key
from .record import MethodInfo, RunRecord
from .settings import counterfactual_settings
from .stages import model_stage, retrain_stage, retrieval_stage, stage_lock, world_stage
from .tracking import log_to_wandb
from .validation import ConfigError, check_against_world, validate

log = logging.getLogger("trackstar")


@dataclass
class CellState:
    """What the stages of one cell hand on to one another."""

    cfg: DictConfig
    retriever: object
    record: RunRecord
    device: object = None
    artifacts: Path = None
    world_path: Path | None = None
    world: object = None
    checkpoint: object = None
    ckpt_path: Path | None = None
    ckpt_id: str | None = None
    query_eval: list = field(default_factory=list)
    task: RetrievalTask | None = None
    key: str | None = None
    retrievals: list = field(default_factory=list)
    per_query: object = None
    #: Tail-patch per (query, proponent), when measured.
    tail_patch_pairs: object = None

    @property
    def gradient(self) -> bool:
        return self.retriever.family == "gradient"

    @property
    def needs_checkpoint(self) -> bool:
        """Gradient rows and the tail-patch oracle score with the model."""
        return self.retriever.family in CHECKPOINT_FAMILIES

    @property
    def tail_patch_cache(self) -> Path:
        """The checkpoint's tail-patch cache: the evaluation and the oracle share it."""
        return self.artifacts / "tailpatch" / checkpoint_dir_name(self.ckpt_id)

    def numeric(self):
        """The compute slot every numeric stage runs in (see :mod:`trackstar.runtime`)."""
        return compute_stage(self.artifacts, self.cfg.stage_threads)

    def scoring(self) -> ExitStack:
        """Where the retriever scores: gradient rows of one checkpoint and corpus share
        feature stores and curvature (e.g. exp2 and exp4), so parallel jobs take turns
        (the stage lock is always taken before the compute slot)."""
        stack = ExitStack()
        if self.needs_checkpoint:  # the oracle scores gradient rows too (its rank agreement)
            work = self.task.work_dir
            stack.enter_context(stage_lock(self.artifacts, f"features-{work.parent.name}-{work.name}"))
        stack.enter_context(self.numeric())
        return stack


def world_step(cell: CellState) -> None:
    """The world (built, or reused)."""
    cell.world_path = world_stage(cell.cfg, cell.artifacts)
    cell.world = load_world(cell.world_path)
    check_against_world(cell.cfg, cell.world, cell.world_path.name)


def model_step(cell: CellState) -> None:
    """The checkpoint (pretrained first if missing) and its answers to the queries."""
    cell.checkpoint, cell.ckpt_path, cell.ckpt_id = model_stage(cell.cfg, cell.artifacts, cell.world_path, cell.device)
    if cell.ckpt_path is None:
        cell.record.model = foreign_model(cell.cfg.model, cell.checkpoint)
        with cell.numeric():
            cell.query_eval = evaluate_queries(cell.checkpoint.model, cell.checkpoint.tokenizer, cell.world.queries)
    else:
        cell.query_eval = read_jsonl(cell.ckpt_path / "query_eval.jsonl")


def foreign_model(model_cfg, checkpoint) -> dict:
    """The run record's ``model`` for a Hugging Face model: what ran (its architecture,
    size and optimizer state), not the defaults of our own models' config group."""
    return {"hf_name_or_path": model_cfg.hf_name_or_path, "family": checkpoint.model.config.model_type,
            "parameters": sum(p.numel() for p in checkpoint.model.parameters()), "size": None, "seed": None,
            "optimizer": checkpoint.trainer_state.get("optimizer"), "optimizer_state": model_cfg.optimizer_state,
            "learning_rate": checkpoint.learning_rate, "checkpoint": None, "checkpoint_fractions": None,
            "epochs": None, "adapter": model_cfg.get("adapter"),
            "adapter_parameters": checkpoint.trainer_state.get("adapter_parameters")}


def retrieval_step(cell: CellState) -> None:
    """The top-k proponents of every query (cached by the retrieval key)."""
    cfg, world = cell.cfg, cell.world
    n = cfg.eval.n_queries
    queries = world.queries if n is None else world.queries[:n]
    features = features_dir(cell.artifacts, cell.ckpt_id, cfg.eval.corpus)
    cell.task = RetrievalTask(world=world, corpus=cfg.eval.corpus, queries=queries, k=cfg.eval.k,
                              checkpoint=cell.checkpoint if cell.needs_checkpoint else None,
                              work_dir=features if cell.needs_checkpoint else None, device=cell.device,
                              shards=cfg.shard.count, diagnose=cfg.diagnostics,
                              tail_patch_cache=cell.tail_patch_cache if cell.needs_checkpoint else None)
    cell.key = retrieval_key(world.manifest, cell.ckpt_id if cell.needs_checkpoint else None, cell.retriever.cache_key(),
                             cfg.eval.corpus, cfg.eval.k, cfg.eval.n_queries)

    def compute():
        with cell.scoring():
            return run(cell.retriever, cell.task)

    cell.retrievals, cell.record.info = retrieval_stage(cell.artifacts, cell.key, compute)
    settings = cell.retriever.settings
    if (cfg.diagnostics and cell.gradient and settings.get("curvature") != "none"
            and not settings.get("block_diagonal") and "curvature_diagnostic" not in cell.record.info):
        # Cached by a run that did not ask for it: score again (the features and R are cached).
        diagnostic = {k: v for k, v in compute()[1].items() if k == "curvature_diagnostic"}
        cell.record.info = {**cell.record.info, **diagnostic}


def judge_step(cell: CellState) -> bool:
    """Open-set proponents labelled by an NLI model (``eval.judge=nli``); False: not asked."""
    cfg = cell.cfg
    if cfg.eval.judge != "nli":
        return False
    with cell.numeric():
        cell.retrievals = NLIJudge(cfg.eval.judge_model, device=cell.device, cache_dir=cell.artifacts,
                                   progress=cfg.progress).label(cell.retrievals)
    return True


def evaluation_step(cell: CellState) -> None:
    """Per-query MRR, recall and (with an optimizer state) tail-patch."""
    cfg = cell.cfg
    can_patch = cfg.eval.tail_patch and cell.checkpoint.optimizer is not None
    if cfg.eval.tail_patch and not can_patch:
        log.warning("tail-patch skipped: %s has no optimizer state", cell.ckpt_id)
    with cell.numeric():
        cell.per_query, cell.tail_patch_pairs = evaluate_with_pairs(
            cell.retrievals, cell.checkpoint if can_patch else None, cell.query_eval,
            tuple(cfg.eval.tail_patch_ks) if can_patch else (), progress=cfg.progress,
            cache_dir=cell.tail_patch_cache,
            ais_threshold=cfg.eval.judge_threshold,
        )


def counterfactual_step(cell: CellState) -> bool:
    """LDS and leave-top-k-out against retrains (``counterfactual.enabled``); False: off."""
    settings = counterfactual_settings(cell.cfg)
    if settings is None:
        return False

    def subset_sums(masks):
        with cell.scoring():
            return cell.retriever.subset_sums(cell.task, masks)

    def retrain_many(masks):
        return retrain_stage(cell.artifacts, cell.ckpt_path.parent, cell.world_path, masks, cell.cfg.stage_threads,
                             cell.device, cell.cfg.progress)

    ids = Corpus.from_world(cell.world, cell.cfg.eval.corpus).ids
    effects, cell.record.info["counterfactual"] = counterfactual(cell.retrievals, ids, subset_sums, retrain_many,
                                                                 settings)
    cell.per_query = cell.per_query.merge(effects, on="example_id", how="left")
    return True


#: A cell's stages in order; each one's wall time is recorded under its name
#: (a stage that returns False did not apply and records none).
STAGES = (("world", world_step), ("model", model_step), ("retrieval", retrieval_step), ("judge", judge_step),
          ("evaluation", evaluation_step), ("counterfactual", counterfactual_step))


def execute(cfg: DictConfig, retriever, record: RunRecord) -> tuple[list[dict], object, object]:
    """The stages of one cell; fills ``record`` and returns (retrievals, per-query metrics,
    per-(query, proponent) tail-patch or None)."""
    cell = CellState(cfg, retriever, record, device=resolve_device(cfg.device), artifacts=Path(cfg.artifacts_dir))
    record.environment = environment(cell.device)
    for name, step in STAGES:
        t = time.perf_counter()
        if step(cell) is not False:
            record.timings[name] = time.perf_counter() - t
    record.metrics, record.splits = metric_summary(
        cell.per_query, metric_columns(cell.per_query), cfg.eval.bootstrap_resamples, cfg.eval.confidence)
    record.n_queries = int(len(cell.per_query))
    record.artifacts = _artifacts(cell)
    return cell.retrievals, cell.per_query, cell.tail_patch_pairs


def _artifacts(cell: CellState) -> dict:
    """Where the run's world, checkpoint and retrievals are, with their content ids."""
    weights = cell.ckpt_path / "model.safetensors" if cell.ckpt_path else None
    return {
        "world": {"path": str(cell.world_path), "content_hash": cell.world.manifest["content_hash"]},
        "checkpoint": {"id": cell.ckpt_id, "path": str(cell.ckpt_path) if cell.ckpt_path else None,
                       "hash": sha256_file(weights) if weights and weights.is_file() else None},
        "retrievals": {"key": cell.key, "path": str(cell.artifacts / "retrievals" / cell.key)},
        "device": str(cell.device),
    }


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
        method=MethodInfo(name=cfg.method.name, label=cfg.method.name, family="unknown", rank=1e9, settings={}),
        world=resolved["world"], model=resolved["model"], eval=resolved["eval"],
        git_commit=rec.git_commit(Path(__file__).parent), started=started, run_dir=str(run_dir),
        status="failed", error=f"ConfigError: {exc}", finished=started,
    )
    rec.write_record(run_dir, record)
    print(f"[failed] {run_dir} invalid config: {exc}")
    return record


def _new_record(cfg: DictConfig, retriever, run_dir: Path, cid: str) -> RunRecord:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return RunRecord(
        config_id=cid, seedless_id=config_id(cfg, seeds=False), table=cfg.table, corpus=cfg.eval.corpus,
        method=MethodInfo(name=retriever.name, label=retriever.label, family=retriever.family, rank=retriever.rank,
                          settings=retriever.settings),
        world=resolved["world"], model=resolved["model"], eval=resolved["eval"],
        git_commit=rec.git_commit(Path(__file__).parent), started=rec.now(), run_dir=str(run_dir),
    )


def run_cell(cfg: DictConfig, run_dir: str | Path | None = None, multirun: bool = False,
             wandb_group: str | None = None) -> RunRecord:
    """Run (or skip, when finished) one cell and write its run record; see the module doc.

    Raises :class:`ConfigError` before any work for an invalid config (under
    ``multirun``, records it as a failed job instead, so the sweep goes on). A
    failure after that is recorded; it is raised again unless ``multirun``.
    """
    try:
        run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    except ValueError as exc:  # a table name that would leave results_dir: no record is written anywhere
        raise ConfigError(str(exc)) from None
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
    if kept is not None and not cfg.force:
        log.info("skipping %s: a finished run record exists (force=true re-runs it)", run_dir)
        print(f"[skip] {run_dir} is finished")
        return kept
    if not (run_dir / rec.METRICS_FILE).is_file():
        rec.write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
    record = _new_record(cfg, retriever, run_dir, cid)
    attempt = rec.attempt_name(record)
    t0 = time.perf_counter()
    retrievals, per_query = [], None
    try:
        retrievals, per_query, pairs = execute(cfg, retriever, record)
        rec.write_per_query(run_dir, per_query)
        rec.write_tail_patch(run_dir, pairs)
        write_jsonl(run_dir / rec.RETRIEVALS_FILE, retrievals)
        rec.write_config(run_dir, OmegaConf.to_yaml(cfg, resolve=True))
        record.status = "finished"
    except Exception as exc:  # noqa: BLE001 - recorded, then re-raised outside multirun
        _failed(record, exc, kept, run_dir, multirun)
        if not multirun:
            record.finished = rec.now()
            rec.write_record(run_dir, record, attempt)
            raise
    record.finished = rec.now()
    record.timings["total"] = time.perf_counter() - t0
    rec.write_record(run_dir, record, attempt)
    _log_and_print(cfg, record, run_dir, attempt, retrievals, per_query, wandb_group)
    return record


def _failed(record: RunRecord, exc: Exception, kept: RunRecord | None, run_dir: Path, multirun: bool) -> None:
    record.status, record.error, record.traceback = "failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()
    if multirun:  # otherwise the caller reports the exception
        log.error("run failed: %s", record.error)
    if kept is not None:
        log.warning("the finished record of %s is kept in %s; this attempt is in %s/", kept.finished,
                    run_dir / rec.METRICS_FILE, run_dir / rec.ATTEMPTS_DIR)


def _log_and_print(cfg: DictConfig, record: RunRecord, run_dir: Path, attempt: str, retrievals, per_query,
                   wandb_group: str | None) -> None:
    """Mirror the record to W&B (the record then names the W&B run) and print its headline."""
    resolved = {**OmegaConf.to_container(cfg, resolve=True), "model": record.model}  # the model that ran
    record.wandb = log_to_wandb(
        run_dir, resolved, record, retrievals, per_query, cfg.logger, group=wandb_group or cfg.table,
        tags=[cfg.table, cfg.method.name, cfg.eval.corpus], name=run_dir.name,
    )
    rec.write_record(run_dir, record, attempt)
    headline = ("mrr", "recall@10", f"tail_patch@{max(cfg.eval.tail_patch_ks, default=10)}", "lds",
                f"loo_drop@{cfg.counterfactual.k}")
    summary = ", ".join(f"{m}={record.metrics[m]['mean']:.3f}" for m in headline if m in record.metrics)
    cover = (record.info or {}).get("coverage")
    if cover:  # which weights the scores are over
        of = "the adapter's" if cover.get("scope") == "adapter" else "the"
        summary += (f" (attributed: {cover['sites']} weight matrices, {cover['share']:.1%} of {of} parameters, "
                    f"{cover['matrix_share']:.1%} of {of} matrices' parameters)")
    print(f"[{record.status}] {run_dir} {summary or record.error or ''}")
