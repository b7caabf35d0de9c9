"""Which of a model's weights an attribution covers, said on every run.

The engine attributes the parameters of its sites (by default every linear
layer inside the transformer blocks). On most causal LMs those are all the
blocks' matrices, a mixture-of-experts block's fused expert matrices
included (one site per expert, :mod:`.gradients`); a model with weights the
hooks cannot reach (a remote-code experts module of unknown layout, say) would
be scored on the rest with nothing to tell. :func:`coverage` counts, per kind of weight
(attention, MLP, experts, router, embeddings, norms and biases, other), the
parameters the sites attribute; :func:`check_coverage` refuses a model whose
main weights (an MLP's or its experts' matrices) are left out, naming them,
unless a partial set is asked for (``allow_partial``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .gradients import adapter_parameters, split_site_name

KINDS = ("attention", "mlp", "experts", "router", "embeddings", "norm/bias", "other")
#: Kinds whose matrices are a block's main weights: leaving them out is refused.
MAIN_KINDS = ("mlp", "experts")


class PartialCoverageError(ValueError):
    """The attributed weights leave out a model's main weights."""


def _kind(name: str, param: nn.Parameter, module: nn.Module, parent: nn.Module | None, embeddings: set[int]) -> str:
    lowered = name.lower()
    if id(param) in embeddings or isinstance(module, nn.Embedding):
        return "embeddings"
    if param.dim() < 2 or lowered.endswith("bias"):  # an experts module's biases are (experts x out)
        return "norm/bias"
    if "router" in lowered or "router" in type(module).__name__.lower() or (
            lowered.endswith(".gate.weight") and parent is not None and hasattr(parent, "experts")):
        return "router"
    if "expert" in lowered:
        return "experts"
    if any(k in lowered for k in ("attn", "attention")):
        return "attention"
    if any(k in lowered for k in ("mlp", "ffn", "feed_forward", "feedforward")):
        return "mlp"
    return "other"


def coverage(model: nn.Module, site_names: Sequence[str], unused: Sequence[str] = ()) -> dict:
    """What the sites attribute: parameter counts and shares overall, of matrices, and by kind,
    and the main weights left out (``unattributed_main``: parameter names). ``unused``: weights
    the forward pass does not use (zero gradient), listed and never counted as left out."""
    modules = dict(model.named_modules())
    embeddings = {id(p) for m in (model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None,
                                  model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
                  if m is not None for p in m.parameters()}
    # A PEFT model's attribution is over its adapter: the scope is the adapter's parameters.
    adapter = adapter_parameters(model)
    scope = None if adapter is None else set(adapter)
    # Elements attributed per parameter: a whole parameter, or an expert's slice of a fused one.
    params = dict(model.named_parameters())
    counts: dict[str, int] = {}
    for site in site_names:
        name, expert = split_site_name(site)
        if expert is not None and name in params:
            counts[name] = counts.get(name, 0) + params[name][0].numel()
        elif site in params:
            counts[site] = params[site].numel()
    by_kind = {k: {"parameters": 0, "attributed": 0} for k in KINDS}
    total = done = matrices = matrices_done = 0
    left_out = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen or (scope is not None and name not in scope):  # tied weights count once
            continue
        seen.add(id(param))
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        parent = modules.get(owner.rsplit(".", 1)[0]) if "." in owner else None
        kind = _kind(name, param, modules.get(owner, model), parent, embeddings)
        n = param.numel()
        hit = min(counts.get(name, 0), n)
        by_kind[kind]["parameters"] += n
        by_kind[kind]["attributed"] += hit
        total += n
        done += hit
        if param.dim() >= 2:
            matrices += n
            matrices_done += hit
        if hit < n and name not in unused and (scope is not None or (kind in MAIN_KINDS and param.dim() >= 2)):
            left_out.append(name)  # every adapter weight is a main weight: it is what was trained
    return {
        "architecture": type(model).__name__, "scope": "model" if scope is None else "adapter",
        "sites": len(set(site_names)), "parameters": total, "attributed": done,
        "share": done / total if total else 0.0,
        "matrix_parameters": matrices, "matrix_share": matrices_done / matrices if matrices else 0.0,
        "by_kind": {k: v for k, v in by_kind.items() if v["parameters"]},
        "unattributed_main": left_out,
        "unused": list(unused),
    }


def check_coverage(report: dict, allow_partial: bool) -> None:
    """Raise :class:`PartialCoverageError` if ``report`` leaves out main weights and a partial set
    was not asked for."""
    missing = report["unattributed_main"]
    if not missing or allow_partial:
        return
    kinds = {k: v for k, v in report["by_kind"].items() if k in MAIN_KINDS and v["attributed"] < v["parameters"]}
    what = "; ".join(f"{k}: {v['parameters'] - v['attributed']:,} of {v['parameters']:,} parameters left out"
                     for k, v in kinds.items())
    fused = [n for n in missing if "expert" in n.lower()]
    if report.get("scope") == "adapter":
        raise PartialCoverageError(
            f"{report['architecture']}: attribution would leave out {len(missing)} of the adapter's weights "
            f"(e.g. {', '.join(missing[:3])}), which are not linear layers the hook path differentiates. Attribute "
            "the adapter by plain autograd (params='all'), or score the partial set with allow_partial=True.")
    raise PartialCoverageError(
        f"{report['architecture']}: attribution would cover {report['attributed']:,} of its {report['parameters']:,} "
        f"parameters ({report['share']:.1%}) and leave out {len(missing)} main weight(s) ({what}), e.g. "
        f"{', '.join(missing[:3])}. Scores over such a partial set look normal but are not the model's."
        + (" Its experts are fused parameters of a module without transformers' declared experts layout "
           "(@use_experts_implementation: num_experts, has_gate, is_transposed), which attribution cannot compute "
           "expert by expert." if fused else " Attribute every parameter with params='all'.")
        + " To score the partial set anyway, say so: allow_partial=True (Hydra: +method.options.allow_partial=true)."
    )
