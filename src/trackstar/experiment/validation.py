"""Every check of a run's config, before any work starts.

Composition already checked keys and types (the schema); :func:`validate`
checks values, naming the key and the fix, including those that need the
model's shape (on a meta-device skeleton: no weights, no training). It returns
the configured retriever, so a valid config goes straight to the stages.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..attribution.store import check_shard
from ..device import resolve_device
from ..evaluation.judge import JUDGES
from ..lm.models import check_family, check_size, hf_skeleton, model_skeleton
from ..lm.optim import check_optimizer
from ..retrieval import Retriever, get_retriever, retriever_class
from ..runtime import stage_threads
from ..wandb_mode import resolve_mode
from ..world import get_profile
from ..world.profiles import style_knobs
from ..world.release import FACTS_FILE, RELEASE_PROFILE
from ..world.store import check_seed
from .ids import table_name
from .settings import container, corpus_spec, counterfactual_settings, method_options, pretrain_config

#: What a shard job (shard.index set) does: extract its features, or rank its rows.
SHARD_STEPS = ("extract", "score")


class ConfigError(ValueError):
    """A config value is invalid; raised before any work starts."""


def validate(cfg: DictConfig):
    """Check every value before any work starts; returns the configured retriever."""
    try:
        table_name(cfg.table)
        _check_world(cfg.world)
        _check_model(cfg.model)
        retriever = _configured_retriever(cfg)
        _check_eval(cfg.eval)
        if retriever.family == "gradient" or cfg.model.hf_name_or_path:  # a Hugging Face model must load for any method
            retriever.check_model(_skeleton(cfg.model))
        resolve_mode(cfg.logger.mode)
        stage_threads(cfg.stage_threads)
        resolve_device(cfg.device)
        _check_counterfactual(cfg, retriever)
        spec = corpus_spec(cfg)
        if spec is not None:
            spec.check_paths()
        _check_shard(cfg, retriever)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return retriever


def _check_world(world_cfg) -> None:
    check_seed(world_cfg.seed)
    if world_cfg.profile != RELEASE_PROFILE:
        get_profile(world_cfg.profile)
        style_knobs(world_cfg.style, container(world_cfg.natural))
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


def _check_model(model_cfg) -> None:
    if not model_cfg.hf_name_or_path:
        check_family(model_cfg.family)
        check_size(model_cfg.size)
        check_optimizer(model_cfg.optimizer)
        if not any(abs(model_cfg.checkpoint - f) < 1e-9 for f in [*model_cfg.checkpoint_fractions, 1.0]):
            raise ValueError(
                f"model.checkpoint={model_cfg.checkpoint} is not in model.checkpoint_fractions="
                f"{list(model_cfg.checkpoint_fractions)}; add it there or pick one of them."
            )
    _check_optimizer_state(model_cfg)
    adapter = model_cfg.get("adapter")
    if adapter is not None:
        if not model_cfg.hf_name_or_path:
            raise ValueError("model.adapter is a PEFT adapter for a Hugging Face base model: give "
                             "model.hf_name_or_path too (our own models take no adapter).")
        if not (Path(adapter).expanduser() / "adapter_config.json").is_file():
            raise ValueError(f"model.adapter={adapter!r} has no adapter_config.json; give the directory the "
                             "adapter was saved to (PeftModel.save_pretrained).")


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


def _configured_retriever(cfg: DictConfig):
    method = OmegaConf.to_container(cfg.method, resolve=True)
    retriever = get_retriever(cfg.method.name, method_options(method, retriever_class(cfg.method.name).family),
                              cfg.eval.corpus)
    if retriever.settings.get("train_side") == "optimizer_step" and cfg.model.hf_name_or_path \
            and not cfg.model.optimizer_state:
        raise ValueError(f"method={cfg.method.name} predicts the optimizer's own step: a Hugging Face model needs "
                         "model.optimizer_state (its published optimizer state) for it.")
    return retriever


def _check_eval(eval_cfg) -> None:
    n = eval_cfg.n_queries
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"eval.n_queries={n!r}: give a positive number of queries, or null for all of them.")
    if eval_cfg.k < max(eval_cfg.tail_patch_ks, default=1):
        raise ValueError(f"eval.k={eval_cfg.k} is smaller than max(eval.tail_patch_ks)={max(eval_cfg.tail_patch_ks)}; "
                         "raise k.")
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


def _check_counterfactual(cfg: DictConfig, retriever) -> None:
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


def _check_shard(cfg: DictConfig, retriever) -> None:
    if cfg.shard.step not in SHARD_STEPS:
        raise ValueError(f"shard.step={cfg.shard.step!r}: use one of {SHARD_STEPS}.")
    if cfg.shard.count != 1 or cfg.shard.index is not None:
        check_shard(0 if cfg.shard.index is None else cfg.shard.index, cfg.shard.count, "shard")
        if retriever.family != "gradient":
            raise ValueError(f"shard.count={cfg.shard.count}: sharding splits gradient feature extraction; "
                             f"method {cfg.method.name!r} has none. Leave shard unset for it.")


def _skeleton(model_cfg):
    """The configured model's architecture on the meta device (no weights, no training)."""
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


def check_against_world(cfg: DictConfig, world, name: str) -> None:
    """The checks that need the built world (its queries and corpus sizes): run right after
    the world stage, before any model is trained or loaded."""
    n = cfg.eval.n_queries
    if n is not None and n > len(world.queries):
        raise ConfigError(f"eval.n_queries={n}, but the world {name} has {len(world.queries)} queries; "
                          "lower it, or use null for all of them.")
    size = len(world.sentences) if cfg.eval.corpus == "closed" else len(world.corpus)
    if cfg.eval.k > size:
        raise ConfigError(f"eval.k={cfg.eval.k}, but the {cfg.eval.corpus} set of the world {name} has {size} "
                          f"passages; lower eval.k to at most {size} (and eval.tail_patch_ks and counterfactual.k "
                          "with it).")
