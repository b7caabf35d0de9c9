"""Per-example gradients of any HF causal LM (SPEC §1.2).

Fast path (``params: default``): the weight matrices of the linear layers
inside the transformer blocks. Hooks capture, per layer and example, the input
activations A (T×I) and the output gradients B (T×O); the example's weight
gradient is G = Bᵀ A (O×I), which is never formed unless a caller asks. The
weights themselves are frozen during the pass so autograd skips the
weight-gradient products; the input embeddings are made to require grad so the
backward pass still runs.

Dense path (``params: all``): plain per-example autograd over every parameter.

Orientation: every gradient is O×I (output × input). ``nn.Linear`` stores
weights O×I already; HF's GPT-2 ``Conv1D`` stores I×O, so its gradient is
transposed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .fused import fused_activations
from .output import Batch, forward_objective


@dataclass(frozen=True)
class Site:
    """One parameter whose gradient is a feature block, viewed as an O×I matrix."""

    name: str  # the parameter's name in model.named_parameters()
    out_features: int
    in_features: int
    stored_transposed: bool  # True for Conv1D (stored I×O)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def _transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the list holding the most parameters."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[2]:
                best = (name, module, size)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList of transformer blocks, so the "
            "default parameter set cannot be found. Use params='all'."
        )
    return best[0], best[1]


def block_linear_sites(model: nn.Module) -> list[Site]:
    """Default parameter set: weights of every Linear/Conv1D inside the blocks."""
    prefix, blocks = _transformer_blocks(model)
    sites = []
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}.weight"
        if isinstance(module, nn.Linear):
            sites.append(Site(full, module.out_features, module.in_features, False))
        elif isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
            sites.append(Site(full, fan_out, fan_in, True))
    if not sites:
        raise ValueError(
            f"No nn.Linear or Conv1D layer found inside {prefix!r} of {type(model).__name__}; "
            "use params='all' for this model."
        )
    return sites


def all_parameter_sites(model: nn.Module) -> list[Site]:
    """``params: all``: every trainable parameter; vectors are 1×n matrices."""
    conv_weights = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)
    }
    sites = []
    for name, p in model.named_parameters():
        if p.dim() == 1:
            sites.append(Site(name, 1, p.shape[0], False))
        elif p.dim() == 2:
            if name in conv_weights:
                sites.append(Site(name, p.shape[1], p.shape[0], True))
            else:
                sites.append(Site(name, p.shape[0], p.shape[1], False))
        else:
            raise ValueError(
                f"Parameter {name} has shape {tuple(p.shape)}; params='all' supports only "
                "vectors and matrices. Exclude it or reshape the model."
            )
    return sites


def site_modules(model: nn.Module, sites: list[Site]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {s.name: modules[s.name.rsplit(".", 1)[0]] for s in sites}


@contextlib.contextmanager
def frozen_parameters(model: nn.Module, trainable: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Freeze every parameter but ``trainable`` (which require grad) for the duration,
    restoring each flag afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wanted = {id(p) for p in trainable}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class NonFiniteGradientError(FloatingPointError):
    """A per-example gradient holds NaN or inf."""


def check_finite(tensor: torch.Tensor, batch: Batch, site: str) -> None:
    """Raise, naming the example and parameter, if an example's block is not finite.

    NaN/inf in an activation or output gradient always reaches the projected
    block, so checking the (small) block is enough.
    """
    bad = ~torch.isfinite(tensor).flatten(1).all(dim=1)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise NonFiniteGradientError(
            f"The gradient of example {batch.examples[i].name} at parameter {site} contains "
            "NaN or inf. Check the model's weights for NaN/inf, lower the dtype's risk "
            "(use float32), or drop the example."
        )


def layer_factors(
    model: nn.Module,
    batch: Batch,
    sites: list[Site],
    consume: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
    prepare: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (A, B): inputs (n, T, I) and output gradients (n, T, O), float32.

    Σ_t B[i, t]ᵀ A[i, t] over the example's real positions is example i's
    gradient of its own output function. Pad positions are NOT masked here;
    the caller masks after projecting, where the tensors are smallest.

    With ``consume``, each site's pair goes to ``consume(name, A, B)`` during
    the backward pass, as soon as B exists, and is released afterwards, so at
    most about one layer's output gradients are alive at a time; the result is
    then empty. Without it, every pair is returned.

    ``prepare(name, A)``, if given, transforms each site's A (as the model
    computed it, e.g. bfloat16 under autocast) in the forward pass, for example
    into its projection, far smaller than A; what it returns is kept and passed
    on instead of A, so A itself is only kept where the model's own backward
    needs it.
    """
    modules = site_modules(model, sites)
    acts: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if consume is None:
        def consume(name, a, b):
            result[name] = (a, b)

    versions: dict[str, int] = {}

    def make_hook(name):
        def hook(module, inputs, output):
            if name in outputs:
                raise RuntimeError(
                    f"{name}'s layer ran twice in one forward pass (a shared or reused module); its per-example "
                    "gradient is the sum over both calls, which the hook path does not form. Use params='all'."
                )
            a = inputs[0].detach()
            if prepare is not None:
                with torch.no_grad():
                    a = prepare(name, a)
            acts[name] = a
            outputs[name] = output
            versions[name] = output._version

        return hook

    def embed_hook(module, inputs, output):
        # The weights are frozen, so something must require grad for backward
        # to run; the embedding output is the earliest such tensor.
        return output.detach().requires_grad_(True)

    def grad_hook(name):
        def hook(grad):
            if grad is None:  # nothing flowed back to this site: reported below
                return
            consume(name, acts.pop(name).float(), grad.float())

        return hook

    with eval_mode(model), frozen_parameters(model), torch.enable_grad(), fused_activations(model):
        try:
            handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
            for name, module in modules.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            value = forward_objective(model, batch)  # no (n, T, vocab) logits where the model allows
        finally:
            for h in handles:
                h.remove()
        unused = [s.name for s in sites if s.name not in outputs or not outputs[s.name].requires_grad]
        if unused:
            raise RuntimeError(
                f"No output gradient reaches {unused[0]}: the layer is unused by the "
                "forward pass. Exclude it from the parameter set."
            )
        changed = [s.name for s in sites if outputs[s.name]._version != versions[s.name]]
        if changed:
            raise RuntimeError(
                f"The model modifies {changed[0]}'s output in place after the layer, so its output gradient is "
                "not the layer's. Use params='all' for this model, or exclude the parameter."
            )
        for s in sites:
            outputs[s.name].register_hook(grad_hook(s.name))
        # Gradients with respect to the lowest sites' outputs only: autograd runs
        # no part of the backward below them, and every other site lies on the
        # way, so its hook consumes its gradient there and nothing keeps it (the
        # hooks live on the graph, so the outputs themselves need not be kept).
        roots = [outputs[name] for name in _lowest_sites(outputs)]
        outputs.clear()
        torch.autograd.grad(value, roots, allow_unused=True)
        del roots
    missing = [s.name for s in sites if s.name in acts]
    if missing:
        raise RuntimeError(
            f"No output gradient reached {missing[0]}: the layer does not affect the output. "
            "Exclude it from the parameter set."
        )
    return result


def _lowest_sites(outputs: dict[str, torch.Tensor]) -> list[str]:
    """The sites whose output's backward reaches no other site's output.

    Every other site's output gradient is computed on the way to one of these,
    so asking autograd for these alone computes them all. One walk over the
    graph below the sites, iterative (a deep model's graph is deeper than
    Python's recursion limit).
    """
    node_of = {}
    for name, out in outputs.items():
        node_of.setdefault(out.grad_fn, []).append(name)
    below: dict = {}  # node -> whether a site's node lies strictly below it
    for start in node_of:
        if start in below:
            continue
        stack = [(start, iter(start.next_functions))]
        while stack:
            node, children = stack[-1]
            for child, _ in children:
                if child is None:
                    continue
                if child not in below:
                    below[child] = None  # in progress
                    stack.append((child, iter(child.next_functions)))
                    break
            else:
                stack.pop()
                below[node] = any(child is not None and (child in node_of or below.get(child))
                                  for child, _ in node.next_functions)
    return [name for node, names in node_of.items() if not below[node] for name in names]


def dense_gradients(model: nn.Module, batch: Batch, sites: list[Site]) -> dict[str, torch.Tensor]:
    """Per-example gradients by plain autograd, one example at a time.

    Returns, per site, a tensor (n, O, I) oriented O×I (vectors as 1×n).
    Slow; used for ``params: all``.
    """
    params = dict(model.named_parameters())
    missing = [s.name for s in sites if s.name not in params]
    if missing:
        raise ValueError(f"Parameters {missing} are not in {type(model).__name__}.")
    chosen = [params[s.name] for s in sites]
    out = {s.name: [] for s in sites}
    with eval_mode(model), torch.enable_grad():
        for i, example in enumerate(batch.examples):
            keep = batch.attention_mask[i].bool()
            single = Batch(
                batch.input_ids[i, keep][None],
                batch.attention_mask[i, keep][None],
                batch.position_ids[i, keep][None],
                batch.weights[i, keep][None],
                [example],
            )
            value = forward_objective(model, single)
            grads = torch.autograd.grad(value, chosen, allow_unused=True)
            for s, p, g in zip(sites, chosen, grads):
                g = torch.zeros_like(p) if g is None else g.detach().float()
                g = g.reshape(1, -1) if g.dim() == 1 else g
                out[s.name].append(g.T if s.stored_transposed else g)
    result = {name: torch.stack(gs) for name, gs in out.items()}
    for name, g in result.items():
        check_finite(g, batch, name)
    return result
