"""The run config's groups as the library's own settings, built by keyword.

Each setting has one home: the library dataclass that uses it
(:class:`~trackstar.world.corpus.CorpusSpec`,
:class:`~trackstar.evaluation.counterfactual.CounterfactualSettings`,
:class:`~trackstar.attribution.settings.AttributionSettings`,
:class:`~trackstar.lm.config.PretrainConfig`). The Hydra schema
(:mod:`.schema`) and the CLI's flags are derived from those or checked
against them by ``tests/test_settings.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from ..evaluation.counterfactual import CounterfactualSettings
from ..lm.config import PretrainConfig
from ..world.corpus import CorpusSpec
from ..world.profiles import NaturalKnobs, style_knobs


def container(node):
    """A config node as plain Python (resolved); anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def pretrain_config(model_cfg) -> PretrainConfig:
    """The pretraining recipe of ``model`` (the size preset with the group's overrides)."""
    overrides = {
        "family": model_cfg.family,
        "optimizer": model_cfg.optimizer,
        "seed": model_cfg.seed,
        "checkpoint_fractions": tuple(model_cfg.checkpoint_fractions),
    }
    if model_cfg.epochs is not None:
        overrides["epochs"] = model_cfg.epochs
    return PretrainConfig.preset(model_cfg.size, **overrides)


def world_style(world_cfg) -> tuple[str, NaturalKnobs | None]:
    """(style, its knobs or None) of a generated world's group."""
    style = world_cfg.get("style", "templated")
    return style, style_knobs(style, container(world_cfg.natural) if style != "templated" else None)


def corpus_spec(cfg: DictConfig) -> CorpusSpec | None:
    """The run's external corpus, or None when ``corpus.source`` is unset."""
    node = container(cfg.corpus)
    return None if node.get("source") is None else CorpusSpec(**node)


def counterfactual_settings(cfg: DictConfig) -> CounterfactualSettings | None:
    """The run's counterfactual settings, or None when disabled."""
    node = container(cfg.counterfactual)
    if not node.pop("enabled"):
        return None
    return CounterfactualSettings(**node)


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
