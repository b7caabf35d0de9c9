"""Optimizers and the learning-rate schedule of pretraining.

Optimizers are built over NAMED parameters (torch >= 2.6), so the saved
``optimizer.state_dict()`` carries each group's ``param_names`` and the
attribution stage can find a weight's second moment by the weight's name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from trackstar.lm.presets import OPTIMIZERS  # defined there, used and exported here

# Defaults of the optimizer constructors we pin so a checkpoint records them all.
DEFAULT_HYPERPARAMETERS: dict[str, dict] = {
    "adafactor": {"beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0},
    "adamw": {"betas": (0.9, 0.95), "eps": 1e-8},
}

LR_DECAYS = ("cosine", "linear")


def check_optimizer(name: str) -> str:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    return name


def optimizer_hyperparameters(name: str, overrides: Mapping | None = None) -> dict:
    """Constructor keyword arguments (besides lr and weight decay) for ``name``."""
    check_optimizer(name)
    params = dict(DEFAULT_HYPERPARAMETERS[name])
    for key, value in (overrides or {}).items():
        if key not in params:
            raise ValueError(
                f"unknown {name} hyperparameter {key!r}; valid ones: {', '.join(params)}"
            )
        params[key] = tuple(value) if isinstance(value, list) else value
    return params


def named_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay, vectors (biases, norms) do not; tied weights appear once."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append((name, param))
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: torch.nn.Module,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    hyperparameters: Mapping | None = None,
) -> torch.optim.Optimizer:
    """``torch.optim.Adafactor`` (the paper's optimizer) or ``torch.optim.AdamW``."""
    kwargs = optimizer_hyperparameters(name, hyperparameters)
    groups = named_param_groups(model, weight_decay)
    cls = torch.optim.Adafactor if name == "adafactor" else torch.optim.AdamW
    return cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)


def param_name_to_index(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameter name -> its integer key in ``optimizer.state_dict()["state"]``."""
    mapping: dict[str, int] = {}
    index = 0
    for group in optimizer.param_groups:
        names = group.get("param_names")
        if names is None:
            raise ValueError("the optimizer was built without parameter names")
        for name in names:
            mapping[name] = index
            index += 1
    return mapping


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def learning_rate_at(
    update: int,
    total_updates: int,
    peak_lr: float,
    warmup_updates: int,
    final_lr_fraction: float,
    decay: str = "cosine",
) -> float:
    """Learning rate of the ``update``-th optimizer step (0-based).

    Linear warmup to ``peak_lr`` over ``warmup_updates`` steps, then cosine or
    linear decay reaching ``final_lr_fraction * peak_lr`` at the last step and
    staying there: the final checkpoint's learning rate, which tail-patch uses,
    is never zero.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"unknown lr decay {decay!r}; valid: {', '.join(LR_DECAYS)}")
    if update < warmup_updates:
        return peak_lr * (update + 1) / warmup_updates
    span = max(1, total_updates - 1 - warmup_updates)
    progress = min(1.0, (update - warmup_updates) / span)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
    return peak_lr * (final_lr_fraction + (1.0 - final_lr_fraction) * shape)
