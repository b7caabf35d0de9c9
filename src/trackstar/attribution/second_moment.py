"""The optimizer second moment V and the correction g / sqrt(V) (SPEC §1.3).

Each supported optimizer is corrected exactly as its own update divides:

* ``torch.optim.Adafactor``: g / max(sqrt(V), eps1) with
  V = row_var @ col_var / max(mean(row_var), eps1) (its
  ``rsqrt(clamp(V, eps1²))``); eps1 = group ``eps[0]``, or finfo(dtype).eps
  when None.
* ``transformers.optimization.Adafactor``: g * rsqrt(row / mean(row)) *
  rsqrt(col) (its ``_approx_sq_grad``; its eps[0] is already inside the
  running averages, so there is no clamp).
* Adam / AdamW: g / (sqrt(V̂) + eps), V̂ = exp_avg_sq / (1 - β2^t)
  (``max_exp_avg_sq`` under amsgrad).
* No optimizer state: V = mean over sample batches of the squared mini-batch
  gradient, applied like Adam (eps configurable). Always flagged as estimated.

State is matched to the model by parameter NAME. Factors follow the stored
layout of each weight (HF ``Conv1D`` is I×O), and are swapped into O×I here.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..device import float64_device, model_device
from ..lm.external_optimizer import OptimizerStateError, state_kind
from .gradients import Site, eval_mode, frozen_parameters, site_tensors
from .output import Batch, forward_objective


class SecondMomentError(ValueError):
    """Optimizer state that does not fit the model or cannot give V."""


class EstimatedSecondMomentWarning(UserWarning):
    """V was estimated from gradients, not read from an optimizer."""


class InexactFactoredCorrectionWarning(UserWarning):
    """The factored fast path differs from the optimizer where sqrt(V) < eps1."""


@dataclass
class LayerCorrection:
    """Multiplier of one O×I gradient: G ↦ G ⊙ M.

    ``row``/``col`` (O,), (I,) give M = row colᵀ and let the fast path scale
    output gradients and activations instead of materializing G. ``dense``
    (O, I) is the exact M. At least one form is present.
    """

    name: str
    row: torch.Tensor | None = None
    col: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    # True when row colᵀ differs from the exact multiplier (clamping, rank-1).
    factored_inexact: bool = False

    @property
    def factored(self) -> bool:
        return self.row is not None

    def multiplier(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        return self.row[:, None] * self.col[None, :]


@dataclass
class SecondMoment:
    """Per-parameter corrections plus where they came from (``v_source``)."""

    layers: dict[str, LayerCorrection]
    source: str  # torch_adafactor | hf_adafactor | adam | estimated

    def __getitem__(self, name: str) -> LayerCorrection:
        return self.layers[name]

    def to(self, device: torch.device) -> "SecondMoment":
        """The same corrections on ``device`` (float32; one copy, not one per batch)."""
        def move(t):
            return None if t is None else t.to(device)

        return SecondMoment({n: dataclasses.replace(c, row=move(c.row), col=move(c.col), dense=move(c.dense))
                             for n, c in self.layers.items()}, self.source)


def _named_states(model: nn.Module, optimizer) -> dict[str, tuple[dict, dict]]:
    """name -> (param state, param group) for an optimizer or its state_dict."""
    params = dict(model.named_parameters())
    result: dict[str, tuple[dict, dict]] = {}
    if isinstance(optimizer, torch.optim.Optimizer):
        names = {id(p): n for n, p in params.items()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise SecondMomentError(
                        f"The optimizer holds a parameter of shape {tuple(p.shape)} that is "
                        f"not a parameter of this {type(model).__name__}: the optimizer "
                        "belongs to another model. Pass the optimizer built on this model."
                    )
                result[names[id(p)]] = (optimizer.state.get(p, {}), group)
        return result
    if isinstance(optimizer, dict) and "state" in optimizer and "param_groups" in optimizer:
        for group in optimizer["param_groups"]:
            if "param_names" not in group:
                raise SecondMomentError(
                    "The optimizer state_dict has no 'param_names', so its state cannot be "
                    "matched to parameters by name. Build the optimizer from "
                    "model.named_parameters() or pass the optimizer object itself."
                )
            for idx, name in zip(group["params"], group["param_names"]):
                result[name] = (optimizer["state"].get(idx, {}), group)
        return result
    raise SecondMomentError(
        f"Cannot read optimizer state from a {type(optimizer).__name__}; pass a "
        "torch.optim.Optimizer or its state_dict()."
    )


def site_state(site: Site, state: dict) -> dict:
    """A parameter's optimizer state as it bears on ``site``: an expert's slice of a fused
    experts parameter's state (every per-element or factored statistic has the experts first;
    scalars such as the step count are shared)."""
    if site.expert is None:
        return state
    return {k: v[site.expert] if torch.is_tensor(v) and v.dim() >= 1 else v for k, v in state.items()}


def _oriented(t: torch.Tensor, site: Site) -> torch.Tensor:
    t = t.detach().double()
    t = t.reshape(1, -1) if t.dim() == 1 else t
    return t.T if site.stored_transposed else t


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise SecondMomentError(
            f"Optimizer state {what} of parameter {name} has shape {tuple(tensor.shape)} but "
            f"the model needs {tuple(expected)}: the state is from another model. Load the "
            "optimizer state saved with this checkpoint."
        )


def _torch_adafactor(site: Site, state: dict, group: dict, param: torch.Tensor) -> LayerCorrection:
    eps1 = group["eps"][0]
    if eps1 is None:
        eps1 = torch.finfo(param.dtype).eps
    if "row_var" not in state:
        variance = state["variance"]
        _check_shape(site.name, variance, param.shape, "'variance'")
        v = _oriented(variance, site)
        return LayerCorrection(site.name, dense=(1.0 / v.sqrt().clamp(min=eps1)).float())
    row, col = state["row_var"], state["col_var"]
    _check_shape(site.name, row, (*param.shape[:-1], 1), "'row_var'")
    _check_shape(site.name, col, (*param.shape[:-2], 1, param.shape[-1]), "'col_var'")
    row, col = row.detach().double().reshape(-1), col.detach().double().reshape(-1)
    mean_row = max(row.mean().item(), eps1)
    stored = (row[:, None] @ col[None, :]) / mean_row
    dense = 1.0 / stored.sqrt().clamp(min=eps1)
    r_inv, c_inv = 1.0 / (row / mean_row).sqrt(), 1.0 / col.sqrt()
    clamped = bool((stored < eps1 * eps1).any())
    if site.stored_transposed:
        dense, r_inv, c_inv = dense.T, c_inv, r_inv
    return LayerCorrection(
        site.name, r_inv.float(), c_inv.float(), dense.float(), factored_inexact=clamped
    )


def _hf_adafactor(site: Site, state: dict, param: torch.Tensor) -> LayerCorrection:
    if "exp_avg_sq_row" not in state:
        v = state["exp_avg_sq"]
        _check_shape(site.name, v, param.shape, "'exp_avg_sq'")
        return LayerCorrection(site.name, dense=_oriented(v, site).rsqrt().float())
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    _check_shape(site.name, row, param.shape[:-1], "'exp_avg_sq_row'")
    _check_shape(site.name, col, (*param.shape[:-2], param.shape[-1]), "'exp_avg_sq_col'")
    row, col = row.detach().double(), col.detach().double()
    r_inv, c_inv = (row / row.mean()).rsqrt(), col.rsqrt()
    if site.stored_transposed:
        r_inv, c_inv = c_inv, r_inv
    return LayerCorrection(site.name, r_inv.float(), c_inv.float())


def _adam(site: Site, state: dict, group: dict, param: torch.Tensor, adam_mode: str) -> LayerCorrection:
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    v = state[key]
    _check_shape(site.name, v, param.shape, f"{key!r}")
    step = float(state["step"])
    beta2 = group["betas"][1]
    v_hat = _oriented(v, site) / (1.0 - beta2**step)
    return dense_correction(site.name, 1.0 / (v_hat.sqrt() + group["eps"]), adam_mode)


def rank1(multiplier: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-1 approximation u vᵀ of a positive matrix, both factors positive."""
    u, s, vh = torch.linalg.svd(multiplier.double(), full_matrices=False)
    # Perron–Frobenius: the top singular vectors of a positive matrix have one
    # sign; abs() fixes the arbitrary global sign the SVD returns.
    root = s[0].sqrt()
    return (u[:, 0].abs() * root).float(), (vh[0].abs() * root).float()


def dense_correction(name: str, multiplier: torch.Tensor, adam_mode: str) -> LayerCorrection:
    multiplier = multiplier.float()
    if adam_mode == "rank1" and multiplier.shape[0] > 1:
        r, c = rank1(multiplier)
        return LayerCorrection(name, r, c, None, factored_inexact=True)
    return LayerCorrection(name, dense=multiplier)


def _kind(state: dict, group: dict) -> str:
    try:
        return state_kind(state, group)
    except OptimizerStateError:
        return "unknown"


def second_moment_from_optimizer(
    model: nn.Module, optimizer, sites: Iterable[Site], adam_mode: str = "exact"
) -> SecondMoment:
    """Read V for ``sites`` from an optimizer (or its named state_dict)."""
    named = _named_states(model, optimizer)
    params = dict(model.named_parameters())
    layers, kinds = {}, set()
    for site in sites:
        if site.parameter not in named or not named[site.parameter][0]:
            raise SecondMomentError(
                f"The optimizer has no state for parameter {site.parameter}: it was built on "
                "another model or never stepped. Pass the optimizer saved with this "
                "checkpoint, or use_v=False / omit it to estimate V."
            )
        state, group = named[site.parameter]
        kind = _kind(state, group)
        state, param = site_state(site, state), site.of(params[site.parameter])
        if kind == "torch_adafactor":
            layers[site.name] = _torch_adafactor(site, state, group, param)
        elif kind == "hf_adafactor":
            layers[site.name] = _hf_adafactor(site, state, param)
        elif kind == "adam":
            layers[site.name] = _adam(site, state, group, param, adam_mode)
        else:
            raise SecondMomentError(
                f"Unrecognized optimizer state for parameter {site.name} (keys "
                f"{sorted(state)}); supported: torch Adafactor, transformers Adafactor, "
                "Adam/AdamW."
            )
        kinds.add(kind)
    if len(kinds) != 1:
        raise SecondMomentError(f"Mixed optimizer kinds {sorted(kinds)}; use one optimizer.")
    inexact = [n for n, c in layers.items() if c.factored_inexact and c.dense is not None]
    if inexact:
        warnings.warn(
            f"For {len(inexact)} parameter(s) (first: {inexact[0]}) some sqrt(V) < eps1, "
            "where torch's Adafactor clamps; the factored fast path is inexact there. "
            "Use params='all' for the exact correction.",
            InexactFactoredCorrectionWarning,
            stacklevel=2,
        )
    return SecondMoment(layers, kinds.pop())


def estimate_second_moment(
    model: nn.Module,
    batches: Iterable[Batch],
    sites: list[Site],
    eps: float = 1e-8,
    adam_mode: str = "exact",
) -> SecondMoment:
    """V ≈ mean over batches of (mini-batch mean-loss gradient)², like Adam's V.

    Warns loudly: attribution quality depends on V, and an estimate from a
    few batches is not the optimizer's statistic.
    """
    chosen, which = site_tensors(dict(model.named_parameters()), sites)
    device = model_device(model)
    sums = [torch.zeros(s.shape, dtype=torch.float64, device=float64_device(device)) for s in sites]
    count = 0
    # Only the sites' weights need a gradient: the rest (the output head included, so the
    # loss need not form whole logits: forward_objective) is frozen for the duration.
    with eval_mode(model), frozen_parameters(model, trainable=chosen), torch.enable_grad():
        for batch in batches:
            batch = batch.to(device)
            value = forward_objective(model, batch) / len(batch.examples)
            grads = torch.autograd.grad(value, chosen, allow_unused=True)
            for acc, s, k in zip(sums, sites, which):
                if grads[k] is not None:
                    acc += (_oriented(s.of(grads[k]), s) ** 2).to(acc.device)
            count += 1
    if count == 0:
        raise SecondMomentError("Cannot estimate V from zero batches; give training texts.")
    warnings.warn(
        f"No optimizer state was given: V is ESTIMATED as the mean squared gradient over "
        f"{count} training batch(es), not read from the optimizer. Scores that use V "
        "differ from the paper's; pass the checkpoint's optimizer state to avoid this.",
        EstimatedSecondMomentWarning,
        stacklevel=2,
    )
    layers = {
        s.name: dense_correction(s.name, 1.0 / ((acc / count).sqrt() + eps), adam_mode)
        for s, acc in zip(sites, sums)
    }
    return SecondMoment(layers, "estimated")


