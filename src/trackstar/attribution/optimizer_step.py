"""The optimizer's own step on one training example, as a per-layer map on its features.

Tail-patch (SPEC §2.3) takes one optimizer step on a passage and measures the
change in a query's target log-probability. To first order that change is
``∇log p_q · Δθ_i``, and ``Δθ_i`` is what the optimizer makes of the passage's
gradient. The training features of a ``use_v`` store are already
``P(g_i / sqrt(V))``; what is left of the step is per weight matrix:

* torch ``Adafactor``: ``Δθ = -ρ · max(eps2, RMS(W)) · u / max(1, RMS(u) / d)``
  with ``u = g / sqrt(V)`` and ``ρ = min(lr, 1 / sqrt(step + 1))``;
* transformers ``Adafactor``: the same clipping by ``clip_threshold``, and the
  step scaled by ``max(eps2, RMS(W))`` when ``scale_parameter``;
* Adam / AdamW: ``Δθ ∝ lr · u``, the same factor for every matrix.

RMS(u) of the unprojected matrix is read from the projected block's norm
(Gaussian projections keep E‖Pu‖² = ‖u‖²; exact with ``projection=identity``).
Left out, as second order: the step's own update of V by g², and momentum (the
same for every passage, so it does not change a ranking).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .gradients import Site
from .second_moment import SecondMomentError, _kind, _named_states


@dataclass(frozen=True)
class LayerStep:
    """One weight matrix's share of the step: ``scale · u / max(1, RMS(u) / clip)``."""

    name: str
    scale: float
    numel: int
    clip: float | None  # None: the optimizer does not clip the update


@dataclass(frozen=True)
class OptimizerStep:
    kind: str
    layers: tuple[LayerStep, ...]

    def apply(self, x: torch.Tensor, slices: Sequence[tuple[str, slice]]) -> torch.Tensor:
        """The step's features from training features ``x`` (rows × d) laid out as ``slices``."""
        by_name = {layer.name: layer for layer in self.layers}
        out = x.float().clone()
        for name, sl in slices:
            layer = by_name[name]
            block = out[:, sl]
            factor = torch.full((x.shape[0],), layer.scale, dtype=out.dtype, device=out.device)
            if layer.clip is not None:
                rms = block.norm(dim=1) / math.sqrt(layer.numel)
                factor = factor / torch.clamp(rms / layer.clip, min=1.0)
            block.mul_(factor[:, None])
        return out


def _rms(param: torch.Tensor) -> float:
    return float(param.detach().float().norm() / math.sqrt(param.numel()))


def optimizer_step(model: torch.nn.Module, optimizer, sites: Sequence[Site], learning_rate: float | None) -> OptimizerStep:
    """The per-matrix geometry of the optimizer's next step for ``sites``.

    ``learning_rate``: the rate tail-patch steps with (the checkpoint's final
    one); None takes each parameter group's ``lr``.
    """
    if optimizer is None:
        raise SecondMomentError(
            "train_side='optimizer_step' predicts the optimizer's own step, so it needs the optimizer "
            "state saved with the checkpoint (a Hugging Face model needs model.optimizer_state)."
        )
    named = _named_states(model, optimizer)
    params = dict(model.named_parameters())
    layers, kinds = [], set()
    for site in sites:
        state, group = named.get(site.parameter, ({}, {}))
        if not state:
            raise SecondMomentError(f"The optimizer has no state for parameter {site.name}; it cannot predict its step.")
        kind = _kind(state, group)
        if site.expert is not None and kind != "adam":
            raise SecondMomentError(
                f"train_side='optimizer_step' cannot predict {kind}'s step of the expert matrix {site.name}: "
                f"Adafactor scales and clips the update of the whole fused parameter {site.parameter}, all experts "
                "together, which no per-expert site sees. Use the default train_side='features' for this model.")
        lr = group.get("lr") if learning_rate is None else learning_rate
        param = site.of(params[site.parameter])
        if lr is None and not (kind == "hf_adafactor" and group.get("relative_step")):
            raise SecondMomentError(f"No learning rate for {site.name}: give learning_rate (the rate tail-patch steps with).")
        if kind == "torch_adafactor":
            step = float(state["step"]) + 1.0
            eps2 = group["eps"][1]
            scale = min(float(lr), 1.0 / math.sqrt(step)) * max(eps2, _rms(param))
            layers.append(LayerStep(site.name, scale, param.numel(), float(group["d"])))
        elif kind == "hf_adafactor":
            if group.get("relative_step"):
                step = float(state.get("step", 0)) + 1.0
                base = 1e-6 * step if group.get("warmup_init") else 1e-2
                lr = min(base, 1.0 / math.sqrt(step))
            scale = float(lr) * (max(group["eps"][1], _rms(param)) if group.get("scale_parameter", True) else 1.0)
            layers.append(LayerStep(site.name, scale, param.numel(), float(group.get("clip_threshold", 1.0))))
        elif kind == "adam":
            layers.append(LayerStep(site.name, float(lr), param.numel(), None))
        else:
            raise SecondMomentError(f"Unrecognized optimizer state for parameter {site.name} (keys {sorted(state)}).")
        kinds.add(kind)
    if len(kinds) != 1:
        raise SecondMomentError(f"Mixed optimizer kinds {sorted(kinds)}; use one optimizer.")
    return OptimizerStep(kinds.pop(), tuple(layers))
