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

Mixture-of-experts blocks: transformers keeps a block's experts as fused 3-D
parameters (``gate_up_proj``/``up_proj`` and ``down_proj``, one matrix per
expert) inside an experts module, which no linear-layer hook sees. Each
expert's matrix is its own site (``<parameter>[<expert>]``), so V, the
projection and R apply per expert matrix as they do per layer matrix. For the
duration of an extraction the experts module computes each expert's products
one expert at a time (the arithmetic of transformers' own ``batched_mm``
implementation, from the module's declared layout: gate, bias, transposition,
post-expert norm), which exposes each expert's inputs A and output gradients B
for the tokens routed to it; the rows of the other tokens are zero, so
Σ_t Bᵀ A is the expert's per-example gradient. Routers (a block's
``*TopKRouter`` with the logits as first output) are sites when asked
(``routers=True``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .fused import fused_activations
from .output import Batch, forward_objective


@dataclass(frozen=True)
class Site:
    """One parameter whose gradient is a feature block, viewed as an O×I matrix."""

    name: str  # the parameter's name in model.named_parameters(); an expert's: "<parameter>[<expert>]"
    out_features: int
    in_features: int
    stored_transposed: bool  # True for Conv1D (stored I×O) and experts stored I×O
    #: The expert's index in its fused 3-D parameter (``name`` is then "<parameter>[<expert>]").
    expert: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def parameter(self) -> str:
        """The name of the parameter in ``model.named_parameters()`` this site is (a slice of)."""
        return self.name if self.expert is None else self.name.rsplit("[", 1)[0]

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This site's part of a tensor shaped like its parameter (the parameter itself, its
        gradient, an optimizer state), as stored."""
        return tensor if self.expert is None else tensor[self.expert]


_EXPERT_SITE = re.compile(r"^(.*)\[(\d+)\]$")


def split_site_name(name: str) -> tuple[str, int | None]:
    """(parameter, expert) of a site name: ``"...down_proj[3]"`` -> ("...down_proj", 3)."""
    match = _EXPERT_SITE.match(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module with fused 3-D expert weights and a declared layout
    (``@use_experts_implementation``)."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, nn.Parameter) and down.dim() == 3 and hasattr(module, "num_experts")
            and hasattr(module, "has_gate") and hasattr(module, "is_transposed"))


def _expert_parameters(module: nn.Module) -> list[str]:
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def expert_sites(prefix: str, module: nn.Module) -> list[Site]:
    """One site per expert and fused matrix of an experts module, parameter by parameter."""
    sites = []
    for pname in _expert_parameters(module):
        param = getattr(module, pname)
        if param.dim() != 3 or param.shape[0] != module.num_experts:
            raise ValueError(
                f"{prefix}.{pname} of {type(module).__name__} has shape {tuple(param.shape)}, not "
                f"(num_experts={module.num_experts}, out, in); its experts cannot be attributed. "
                "Use allow_partial=True to score without them.")
        rows, cols = param.shape[1:]
        out_f, in_f = (cols, rows) if module.is_transposed else (rows, cols)
        sites += [Site(f"{prefix}.{pname}[{e}]", out_f, in_f, bool(module.is_transposed), e)
                  for e in range(module.num_experts)]
    return sites


def is_router(module: nn.Module, parent: nn.Module | None) -> bool:
    """A mixture-of-experts block's router: a ``*Router`` module beside an experts module, whose
    ``weight`` (num_experts × hidden) makes the logits it returns first."""
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear) and type(module).__name__.endswith("Router")
            and isinstance(weight, nn.Parameter) and weight.dim() == 2
            and parent is not None and hasattr(parent, "experts"))


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


def block_linear_sites(model: nn.Module, routers: bool = False) -> list[Site]:
    """Default parameter set: weights of every Linear/Conv1D inside the blocks, every expert's
    matrices of a mixture-of-experts block, and (``routers``) its router's weight."""
    prefix, blocks = _transformer_blocks(model)
    modules = dict(blocks.named_modules())
    sites = []
    for name, module in blocks.named_modules():
        full = f"{prefix}.{name}.weight"
        if isinstance(module, nn.Linear):
            sites.append(Site(full, module.out_features, module.in_features, False))
        elif isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
            sites.append(Site(full, fan_out, fan_in, True))
        elif is_experts_module(module):
            sites += expert_sites(f"{prefix}.{name}", module)
        elif routers and is_router(module, modules.get(name.rsplit(".", 1)[0] if "." in name else "")):
            sites.append(Site(full, *module.weight.shape, False))
    if not sites:
        raise ValueError(
            f"No nn.Linear or Conv1D layer found inside {prefix!r} of {type(model).__name__}; "
            "use params='all' for this model."
        )
    return sites


def adapter_parameters(model: nn.Module) -> list[str] | None:
    """The parameters of a PEFT model's active adapters, in model order (None: not a PEFT model).

    An adapter's weights are what fine-tuning trained, so they are what attribution
    differentiates: LoRA's ``lora_A``/``lora_B`` (and any other tuner's adapter layers)
    and the trainable copies of ``modules_to_save``. A LoRA variant that uses the adapter
    weights outside their modules' forward (DoRA's weight norm) and prompt learning are
    refused on the hook path; ``params='all'`` attributes them by plain autograd.
    """
    if not hasattr(model, "peft_config"):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    active = model.active_adapters if hasattr(model, "active_adapters") else [model.active_adapter]
    wanted: set[str] = set()
    for mname, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                holder = getattr(module, attr, None)
                for key in module.active_adapters if holder is not None else ():
                    if key in holder:
                        prefix = f"{mname}.{attr}.{key}"
                        item = holder[key]
                        wanted.update([prefix] if isinstance(item, nn.Parameter)
                                      else (f"{prefix}.{n}" for n, _ in item.named_parameters()))
    names = [n for n, _ in model.named_parameters()
             if n in wanted or any(f".modules_to_save.{key}." in n for key in active)]
    if not names:
        kind = next(iter(model.peft_config.values())).peft_type
        raise ValueError(
            f"{type(model).__name__} holds a {kind} adapter with no adapter layer attribution can differentiate "
            "(prompt learning keeps its weights in a prompt encoder outside the model's layers). Merge the adapter "
            "into the model (merge_and_unload()) and attribute the merged model instead.")
    return names


def adapter_sites(model: nn.Module, names: list[str]) -> list[Site]:
    """The linear layers among a PEFT model's adapter parameters (LoRA's A and B matrices)."""
    variants = [n for n, m in model.named_modules() if getattr(m, "lora_variant", None)]
    if variants:
        raise ValueError(
            f"{variants[0]} uses a LoRA variant (e.g. DoRA) that reads its adapter weights outside the adapter's "
            "linear layers, so the hook path would miss part of their gradient. Attribute the adapter by plain "
            "autograd: params='all'.")
    wanted = set(names)
    sites = []
    for name, module in model.named_modules():
        full = f"{name}.weight"
        if isinstance(module, nn.Linear) and full in wanted:
            sites.append(Site(full, module.out_features, module.in_features, False))
        elif isinstance(module, Conv1D) and full in wanted:
            sites.append(Site(full, module.weight.shape[1], module.weight.shape[0], True))
    return sites


def attribution_sites(model: nn.Module, params: str = "default", routers: bool = False,
                      unused: list[str] | None = None) -> list[Site]:
    """The sites a setting attributes: ``params='all'`` every parameter, else the blocks' matrices
    that the forward pass uses (the others' names are appended to ``unused``); a PEFT model's
    adapter alone."""
    adapter = adapter_parameters(model)
    if adapter is not None:
        if params == "all":
            wanted = set(adapter)
            return [s for s in all_parameter_sites(model) if s.parameter in wanted]
        return adapter_sites(model, adapter)
    if params == "all":
        return all_parameter_sites(model)
    sites = block_linear_sites(model, routers)
    dropped = unused_sites(model, sites)
    if unused is not None:
        unused += dropped
    return [s for s in sites if s.name not in dropped]


def unused_sites(model: nn.Module, sites: list[Site]) -> list[str]:
    """The sites whose weights the forward pass does not use at all (a causal-LM decoder's
    cross-attention with no encoder, say): their gradient is zero for every input.

    Found by one forward pass over a few tokens: a site whose module did not run and whose
    weight autograd finds no path to is unused. A module that did not run but whose weight
    is used (read outside the module's forward) is kept: extraction refuses it by name. If
    the probe itself fails, nothing is dropped (extraction reports the failure in context).
    """
    modules = site_modules(model, sites)
    plain = [s for s in sites if s.expert is None]
    ran: set[str] = set()
    handles = [modules[s.name].register_forward_hook(lambda m, i, o, name=s.name: ran.add(name)) for s in plain]
    params = dict(model.named_parameters())
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or 2
    ids = (torch.arange(1, 9) % vocab)[None].to(next(model.parameters()).device)
    try:
        with eval_mode(model), frozen_parameters(model, trainable=[params[s.name] for s in plain]), \
                torch.enable_grad():
            logits = model(input_ids=ids).logits
            idle = [s.name for s in plain if s.name not in ran]
            if not idle:
                return []
            grads = torch.autograd.grad(logits.float().sum(), [params[n] for n in idle], allow_unused=True)
    except Exception:  # noqa: BLE001 - a probe; extraction reports any real failure with its context
        return []
    finally:
        for h in handles:
            h.remove()
    return [name for name, g in zip(idle, grads) if g is None]


def all_parameter_sites(model: nn.Module) -> list[Site]:
    """``params: all``: every trainable parameter; vectors are 1×n matrices."""
    conv_weights = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)
    }
    experts = {f"{n}.{pname}": (n, m) for n, m in model.named_modules() if is_experts_module(m)
               for pname in _expert_parameters(m)}
    sites = []
    for name, p in model.named_parameters():
        if name in experts:
            owner, module = experts[name]
            sites += [s for s in expert_sites(owner, module) if s.parameter == name]
        elif p.dim() == 1:
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
    return {s.name: modules[s.parameter.rsplit(".", 1)[0]] for s in sites}


def site_tensors(params: dict[str, torch.Tensor], sites: list[Site]) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct parameters behind ``sites`` and, per site, the index of its parameter
    among them (an experts parameter is behind one site per expert)."""
    order: dict[str, int] = {}
    for s in sites:
        order.setdefault(s.parameter, len(order))
    return [params[name] for name in order], [order[s.parameter] for s in sites]


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


class AttributionError(RuntimeError):
    """The model's forward or backward could not be attributed; the message names the model,
    the site and the shapes, and what to do."""


def _context(model: nn.Module, batch: Batch, phase: str, trace: dict, exc: BaseException) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    arch = type(model).__name__ + (f" (model_type {kind!r})" if kind else "")
    n, t = batch.input_ids.shape
    where = (f"the last site it reached was {trace['site']} (input {trace['input']}, output {trace['output']})"
             if trace else "before it reached any site being attributed")
    return (
        f"{arch}: the {phase} pass failed while attributing a batch of {n} example(s) x {t} tokens; {where}. "
        f"{type(exc).__name__}: {exc}\n"
        "What to do: check that the model runs a plain forward and backward on such a batch "
        "(model(input_ids=ids).logits.sum().backward()). If it does, the attribution hooks do not fit this "
        "architecture at that site: attribute every parameter by plain autograd (params='all'), or leave the "
        "site out (allow_partial=True where it is a main weight), and report the architecture to us."
    )


def _expert_forward(module: nn.Module, names: dict[tuple[str, int], str], capture: Callable) -> Callable:
    """An experts module's forward computed one expert at a time, calling
    ``capture(site, inputs, outputs, tokens)`` for each expert matrix that is a site.

    The arithmetic is that of transformers' ``batched_mm`` experts implementation,
    from the module's declared layout (gate, bias, transposition, post-expert norm):
    every implementation of an experts module computes the same function.
    """
    up_name = "gate_up_proj" if module.has_gate else "up_proj"

    def linear(x, pname, e, tokens):
        weight = getattr(module, pname)[e]
        out = x @ weight if module.is_transposed else nn.functional.linear(x, weight)
        if (pname, e) in names:
            capture(names[(pname, e)], x, out, tokens)
        if module.has_bias:  # out of place: the captured product keeps its version
            out = out + getattr(module, f"{pname}_bias")[e]
        return out

    def forward(hidden_states, top_k_index=None, top_k_weights=None, **kwargs):
        top_k_index = kwargs.pop("router_indices", top_k_index)
        top_k_weights = kwargs.pop("routing_weights", top_k_weights)
        if kwargs or top_k_index is None or top_k_weights is None or hidden_states.dim() != 2:
            raise AttributionError(
                f"{type(module).__name__} was called as forward({', '.join(kwargs) or 'hidden_states, ...'}) with "
                f"hidden states of shape {tuple(hidden_states.shape)}; attribution computes experts called as "
                "transformers' experts modules are (tokens x hidden, top-k indices, top-k weights).")
        final = torch.zeros_like(hidden_states)
        for e in range(module.num_experts):
            tokens, slot = torch.where(top_k_index == e)
            if tokens.numel() == 0:
                continue
            h = linear(hidden_states[tokens], up_name, e, tokens)
            h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
            h = linear(h, "down_proj", e, tokens)
            if module.has_post_expert_norm:
                h = module.post_expert_norm(h)
            h = h * top_k_weights[tokens, slot, None]
            final.index_add_(0, tokens, h.to(final.dtype))
        return final

    return forward


@contextlib.contextmanager
def _experts_computed_per_expert(model: nn.Module, sites: list[Site], capture: Callable) -> Iterator[None]:
    """For the duration, each experts module holding sites runs :func:`_expert_forward`."""
    groups: dict[str, dict[tuple[str, int], str]] = {}
    for s in sites:
        if s.expert is not None:
            owner, pname = s.parameter.rsplit(".", 1)
            groups.setdefault(owner, {})[(pname, s.expert)] = s.name
    if not groups:
        yield
        return
    modules = dict(model.named_modules())
    patched = []
    try:
        for owner, names in groups.items():
            module = modules[owner]
            patched.append((module, module.__dict__.get("forward")))
            module.forward = _expert_forward(module, names, capture)
        yield
    finally:
        for module, before in patched:
            if before is None:
                del module.forward
            else:
                module.forward = before


def layer_factors(
    model: nn.Module,
    batch: Batch,
    sites: list[Site],
    consume: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
    prepare: Callable[[tuple[str, ...], torch.Tensor], Sequence[torch.Tensor]] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (A, B): inputs (n, T, I) and output gradients (n, T, O), float32.

    Σ_t B[i, t]ᵀ A[i, t] over the example's real positions is example i's
    gradient of its own output function. Pad positions are NOT masked here;
    the caller masks after projecting, where the tensors are smallest. A layer
    that sees the batch's tokens flattened (n·T, ·), as a mixture-of-experts
    block's shared expert does, is viewed as (n, T, ·); an expert's A and B are
    zero at the tokens not routed to it (and wholly zero when none is).

    With ``consume``, each site's pair goes to ``consume(name, A, B)`` during
    the backward pass, as soon as B exists, and is released afterwards, so at
    most about one layer's output gradients are alive at a time; the result is
    then empty. Without it, every pair is returned.

    ``prepare(names, A)``, if given, transforms A (as the model computed it,
    e.g. bfloat16 under autocast) in the forward pass, for example into each
    site's projection, far smaller than A; it returns one tensor per name,
    which is kept and passed on instead of A, so A itself is only kept where the
    model's own backward needs it. Sites whose layers read one and the same
    input tensor, one after the other (a Llama block's q/k/v projections, its
    gate and up projections), come in one call, so their products with A can
    be computed together.

    A failure inside the model's forward or backward is raised as an
    :class:`AttributionError` naming the architecture, the last site reached and
    its shapes.
    """
    n, t = batch.input_ids.shape
    modules = site_modules(model, sites)
    acts: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}  # an expert site's tokens (flat indices into n·T)
    trace: dict = {}
    handles = []
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if consume is None:
        def consume(name, a, b):
            result[name] = (a, b)

    versions: dict[str, int] = {}

    def per_token(name: str, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.dim() == 3 and tuple(x.shape[:2]) == (n, t):
            return x
        if x.dim() == 2 and x.shape[0] == n * t:
            return x.reshape(n, t, x.shape[1])
        raise AttributionError(
            f"{type(model).__name__}: the {what} of {name} has shape {tuple(x.shape)}, neither (examples={n}, "
            f"tokens={t}, ...) nor (examples x tokens={n * t}, ...): the layer runs on a subset or a reshaping of "
            "the batch's tokens (a per-expert module, say), whose per-example gradient the hook path cannot "
            "form. Attribute it by plain autograd (params='all'), or leave it out (allow_partial=True).")

    def scatter(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(n * t, x.shape[-1]).index_copy_(0, tokens, x).view(n, t, x.shape[-1])

    # Sites whose layers have read one input tensor, in a row: [input, its version, names].
    # Prepared together when the next layer reads another tensor, or the forward ends.
    shared: list = []

    def prepared(names: tuple[str, ...], a: torch.Tensor) -> None:
        if prepare is None:
            acts.update(dict.fromkeys(names, a))
            return
        with torch.no_grad():
            acts.update(zip(names, prepare(names, a), strict=True))

    def flush() -> None:
        if shared:
            a, _, names = shared
            shared.clear()
            prepared(tuple(names), per_token(names[0], a.detach(), "input"))

    def capture(name, a, output, tokens=None):
        if name in outputs:
            raise AttributionError(
                f"{name}'s layer ran twice in one forward pass (a shared or reused module); its per-example "
                "gradient is the sum over both calls, which the hook path does not form. Use params='all'."
            )
        trace.update(site=name, input=tuple(a.shape), output=tuple(output.shape))
        outputs[name] = output
        versions[name] = output._version
        if tokens is not None:  # an expert's rows of the batch: its own
            flush()
            rows[name] = tokens
            prepared((name,), scatter(a.detach(), tokens))
        elif shared and shared[0] is a and shared[1] == a._version:
            shared[2].append(name)
        else:
            flush()
            shared[:] = [a, a._version, [name]]

    def make_hook(name):
        def hook(module, inputs, output):
            capture(name, inputs[0], output if torch.is_tensor(output) else output[0])

        return hook

    def embed_hook(module, inputs, output):
        # The weights are frozen, so something must require grad for backward
        # to run; the embedding output is the earliest such tensor. Not a leaf
        # itself: some models scale it in place (CTRL), which a leaf forbids.
        return output.detach().requires_grad_(True).clone()

    def grad_hook(name):
        def hook(grad):
            if grad is None:  # nothing flowed back to this site: reported below
                return
            trace.update(site=name, input=tuple(acts[name].shape), output=tuple(grad.shape))
            grad = grad.float()
            b = scatter(grad, rows.pop(name)) if name in rows else per_token(name, grad, "output gradient")
            consume(name, acts.pop(name).float(), b)

        return hook

    experts = [s for s in sites if s.expert is not None]
    with eval_mode(model), frozen_parameters(model), torch.enable_grad(), fused_activations(model), \
            _experts_computed_per_expert(model, experts, capture):
        try:
            handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
            for s in sites:
                if s.expert is None:
                    handles.append(modules[s.name].register_forward_hook(make_hook(s.name)))
            try:
                value = forward_objective(model, batch)  # no (n, T, vocab) logits where the model allows
                flush()
            except AttributionError:
                raise
            except Exception as exc:
                raise AttributionError(_context(model, batch, "forward", trace, exc)) from exc
        finally:
            for h in handles:
                h.remove()
        unrouted = [s for s in experts if s.name not in outputs]  # no token chose the expert
        unused = [s.name for s in sites if s.expert is None and
                  (s.name not in outputs or not outputs[s.name].requires_grad)]
        if unused:
            raise AttributionError(
                f"No output gradient reaches {unused[0]}: its module did not run in the forward pass, "
                "yet the model uses its weight (read outside the module's forward, as Mamba's dt_proj is), "
                "so no hook sees its gradient. Attribute by plain autograd (params='all')."
            )
        changed = [name for name, out in outputs.items() if out._version != versions[name]]
        if changed:
            raise AttributionError(
                f"The model modifies {changed[0]}'s output in place after the layer, so its output gradient is "
                "not the layer's. Use params='all' for this model, or exclude the parameter."
            )
        for name, out in outputs.items():
            out.register_hook(grad_hook(name))
        # Gradients with respect to the lowest sites' outputs only: autograd runs
        # no part of the backward below them, and every other site lies on the
        # way, so its hook consumes its gradient there and nothing keeps it (the
        # hooks live on the graph, so the outputs themselves need not be kept).
        roots = [outputs[name] for name in _lowest_sites(outputs)]
        outputs.clear()
        trace.clear()
        try:
            torch.autograd.grad(value, roots, allow_unused=True)
        except AttributionError:
            raise
        except Exception as exc:
            raise AttributionError(_context(model, batch, "backward", trace, exc)) from exc
        del roots
    missing = [s.name for s in sites if s.name in acts]
    if missing:
        raise AttributionError(
            f"No output gradient reached {missing[0]}: the layer does not affect the output. "
            "Exclude it from the parameter set."
        )
    for s in unrouted:  # a zero gradient, in the form every site takes
        zeros = torch.zeros((n, t, s.in_features), device=batch.input_ids.device)
        prepared((s.name,), zeros)
        consume(s.name, acts.pop(s.name).float(), torch.zeros((n, t, s.out_features), device=zeros.device))
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
    missing = [s.name for s in sites if s.parameter not in params]
    if missing:
        raise ValueError(f"Parameters {missing} are not in {type(model).__name__}.")
    chosen, which = site_tensors(params, sites)
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
            for s, k in zip(sites, which):
                g = torch.zeros_like(chosen[k]) if grads[k] is None else grads[k].detach().float()
                g = s.of(g)
                g = g.reshape(1, -1) if g.dim() == 1 else g
                out[s.name].append(g.T if s.stored_transposed else g)
    result = {name: torch.stack(gs) for name, gs in out.items()}
    for name, g in result.items():
        check_finite(g, batch, name)
    return result
