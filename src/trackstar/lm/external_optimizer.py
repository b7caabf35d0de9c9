"""A published optimizer state for a public model: exact V and tail-patch without our pretraining.

``attach_optimizer_state(checkpoint, PATH, learning_rate)`` reads a torch
``optimizer.state_dict()`` of Adam/AdamW (torch), Adafactor (torch) or
Adafactor (transformers), rebuilds that optimizer over the model's
parameters and loads the state, so attribution reads V from it and
tail-patch steps with it. The state is matched to parameters

- by name, when its param groups carry ``param_names`` (optimizers built
  over ``model.named_parameters()``, torch >= 2.6);
- by position otherwise: the i-th state entry is the model's i-th parameter
  in ``model.parameters()`` order, group by group (or its i-th trainable
  parameter, where the state covers exactly those: a PEFT adapter's
  optimizer, built on the adapter's weights).

Before loading, every state tensor's shape is checked against its
parameter, and the first mismatch is named with both shapes. Adam and AdamW
keep the same state; the class is AdamW unless the group says
``decoupled_weight_decay: False``. The learning rate tail-patch steps with
is ``learning_rate``, else the state's first group's ``lr`` (a relative-step
transformers Adafactor records none: then it must be given); a transformers
Adafactor then steps with exactly that rate (no relative step or parameter
scaling).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from trackstar.io import ArtifactError

KINDS = ("adam", "torch_adafactor", "hf_adafactor")


class OptimizerStateError(ValueError):
    """An optimizer state that does not fit the model, or that this library cannot read."""


def state_kind(state: dict, group: dict) -> str:
    """Which optimizer wrote one parameter's ``state`` (in ``group``)."""
    if "row_var" in state or ("variance" in state and "beta2_decay" in group):
        return "torch_adafactor"
    if "exp_avg_sq_row" in state or ("exp_avg_sq" in state and "decay_rate" in group):
        return "hf_adafactor"
    if "exp_avg_sq" in state and "betas" in group:
        return "adam"
    raise OptimizerStateError(
        f"unrecognized optimizer state (keys {sorted(state)}, group keys {sorted(group)}); supported: "
        "torch Adam/AdamW, torch Adafactor, transformers Adafactor."
    )


def _expected_shapes(kind: str, state: dict, shape: tuple) -> dict[str, tuple]:
    """The shape each state tensor must have for a parameter of ``shape``."""
    if kind == "adam":
        out = {"exp_avg": shape, "exp_avg_sq": shape}
        return {**out, "max_exp_avg_sq": shape} if "max_exp_avg_sq" in state else out
    if kind == "torch_adafactor":
        if "row_var" in state:
            return {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, shape[-1])}
        return {"variance": shape}
    if "exp_avg_sq_row" in state:
        return {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": (*shape[:-2], shape[-1])}
    return {"exp_avg_sq": shape}


def _group_params(saved: dict, model) -> list[list[tuple[str, torch.nn.Parameter | None]]]:
    """Each saved group's (name, parameter) pairs, matched by name or by position."""
    named = dict(model.named_parameters())
    groups = saved["param_groups"]
    if all("param_names" in g for g in groups):  # a name the model lacks maps to None
        return [[(n, named.get(n)) for n in g["param_names"]] for g in groups]
    order = list(named.items())
    count = sum(len(g["params"]) for g in groups)
    trainable = [(n, p) for n, p in order if p.requires_grad]
    if count != len(order) and count == len(trainable) < len(order):
        order = trainable  # an optimizer built on the trainable parameters alone (an adapter's, say)
    if count != len(order):
        raise OptimizerStateError(
            f"the optimizer state (no parameter names: matched by position) covers {count} parameters, but "
            f"{type(model).__name__} has {len(order)}; it belongs to another model, or was built on a subset "
            "of the parameters. Save it from an optimizer built on model.named_parameters()."
        )
    out, start = [], 0
    for g in groups:
        out.append(order[start:start + len(g["params"])])
        start += len(g["params"])
    return out


def _build(kind: str, saved_groups: list[dict], params: list[list[tuple[str, torch.nn.Parameter]]], lr: float):
    groups = [{"params": [p for _, p in ps], "param_names": [n for n, _ in ps]} for ps in params]
    if kind == "adam":
        decoupled = saved_groups[0].get("decoupled_weight_decay", True)
        return (torch.optim.AdamW if decoupled else torch.optim.Adam)(groups, lr=lr)
    if kind == "torch_adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    # Imported here: transformers.optimization pulls in its trainer utilities (and peft,
    # bitsandbytes where installed), hundreds of MB that an extraction never needs.
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


def attach_optimizer_state(checkpoint, path: str | os.PathLike, learning_rate: float | None = None):
    """``checkpoint`` (a :class:`~trackstar.lm.Checkpoint`) with the optimizer state in ``path``."""
    path = Path(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"model.optimizer_state={str(path)!r}: no such file.") from None
    except pickle.UnpicklingError:
        # torch's own text suggests weights_only=False, which would run code from the file: never.
        raise ArtifactError(f"model.optimizer_state={str(path)!r} is not a file torch can load safely (weights "
                            "only): give the optimizer's state_dict as saved by "
                            "`torch.save(optimizer.state_dict(), PATH)`.") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ArtifactError(f"model.optimizer_state={str(path)!r} could not be read as a torch file ({str(exc).split('. ')[0]}); give the "
                            "optimizer's state_dict as saved by `torch.save(optimizer.state_dict(), PATH)`.") from None
    if not (isinstance(saved, dict) and "state" in saved and "param_groups" in saved):
        raise OptimizerStateError(f"{str(path)!r} is not an optimizer state_dict (a dict with 'state' and "
                                  "'param_groups'); save optimizer.state_dict().")
    model = checkpoint.model
    params = _group_params(saved, model)
    kinds = set()
    for group, pairs in zip(saved["param_groups"], params, strict=True):
        for key, (name, param) in zip(group["params"], pairs, strict=True):
            state = saved["state"].get(key, {})
            if param is None:
                raise OptimizerStateError(
                    f"model.optimizer_state={str(path)!r} names parameter {name!r}, which {type(model).__name__} "
                    "does not have: the state belongs to another model."
                )
            if not state:
                continue
            kind = state_kind(state, group)
            kinds.add(kind)
            for field, want in _expected_shapes(kind, state, tuple(param.shape)).items():
                got = tuple(state[field].shape) if field in state else None
                if got != tuple(want):
                    raise OptimizerStateError(
                        f"model.optimizer_state={str(path)!r}: parameter {name!r} has shape {tuple(param.shape)}, "
                        f"so its {field!r} needs shape {tuple(want)}, but the state has {got}: it belongs to "
                        "another model."
                    )
    if not kinds:
        raise OptimizerStateError(f"{str(path)!r} holds no per-parameter state: the optimizer never stepped.")
    if len(kinds) > 1:
        raise OptimizerStateError(f"{str(path)!r} mixes optimizer kinds {sorted(kinds)}; use one optimizer's state.")
    lr = learning_rate if learning_rate is not None else saved["param_groups"][0].get("lr")
    if lr is None:  # e.g. transformers Adafactor with relative_step=True: its rate is its own schedule
        raise OptimizerStateError(f"{str(path)!r} records no learning rate (relative-step Adafactor); "
                                  "set model.learning_rate, the rate tail-patch should step with.")
    lr = float(lr)
    if not lr > 0:
        raise OptimizerStateError(f"model.learning_rate={lr}: tail-patch needs a positive learning rate.")
    kind = kinds.pop()
    optimizer = _build(kind, saved["param_groups"], params, lr)
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if kind == "hf_adafactor":  # step with exactly lr, not a relative or parameter-scaled rate
            group.update(relative_step=False, scale_parameter=False, warmup_init=False)
    checkpoint.optimizer, checkpoint.learning_rate = optimizer, lr
    checkpoint.trainer_state = {**checkpoint.trainer_state, "optimizer_state": str(path), "learning_rate": lr,
                                "optimizer": kind}
    return checkpoint
