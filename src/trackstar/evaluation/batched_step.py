"""Many one-step tail-patch measurements at once (``torch.func``).

Tail-patch takes one optimizer step on a proponent and measures a query's
target log-probability under the stepped model. One proponent at a time, a
tiny model spends its time in per-operation overhead: a batch-1 forward and
backward, an optimizer step that walks every parameter, a batch-1 query
forward, a restore. Here a chunk of proponents is stepped together:

1. per-example gradients of the chunk's passages with ``vmap(grad(...))``
   over a functional call of the model (passages of one token length per
   chunk, so no padding enters the loss);
2. the optimizer's update applied functionally to each gradient, giving one
   stacked parameter set per proponent (:class:`FunctionalStep`, the same
   arithmetic as ``torch.optim.Adafactor`` / ``AdamW``'s step, checked
   against them in the tests);
3. each (proponent, query) pair's target log-probability in one vmapped
   forward, the query right-padded to a length that depends on the query
   alone (a multiple of :data:`QUERY_WIDTH`): causal attention never lets a
   real token see the padding after it, and the shape of a pair's
   computation never depends on which other pairs share its batch.

Four shortcuts that compute the same functions (:data:`KERNELS` names them):
the vocabulary head runs only at the positions that predict a target token
(``logits_to_keep``, where the model's forward takes it); the input
embedding's rows are looked up outside the vmapped call and their gradient
added into the embedding's at the passage's tokens (batched, the embedding's
own backward zero-fills and scatters a vocabulary-wide matrix per passage);
GPT-2's tanh-GELU and Llama's RMSNorm run as one kernel each
(:func:`~trackstar.attribution.fused.fused_activations`); Adafactor divides
by √row and √col in turn where no product of the two falls below its floor.
:meth:`BatchedTailPatch.probe` checks the first two against the model's own
forward and drops either where the model does not honour it.

The results equal the one-at-a-time step within float tolerance (float32
rounding: the kernels differ). Optimizers without a functional step here, or
models whose forward cannot be vmapped, take the one-at-a-time path.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from ..attribution.fused import fused_activations
from ..lm.data import IGNORE_INDEX, context_length

#: The batched path's values agree with the one-at-a-time step's within float tolerance,
#: not to the bit; this names the kernels behind them, so a cache keeps each version's
#: values apart. 2: the head only at target positions, the input embedding's rows looked
#: up outside the vmapped call, fused tanh-GELU and RMSNorm, Adafactor's update in two
#: passes (values within ~2e-6 in log p of 1's).
KERNELS = "batched-2"
QUERY_WIDTH = 16
PASSAGE_WIDTH = 8
log = logging.getLogger("trackstar")
DEFAULT_MEMORY_BYTES = 1 << 30
MAX_CHUNK = 64
# torch warns when an operation (CPU flash attention) has no vmap rule and runs in a loop:
# correct, and nothing a user can act on.
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching rule"

SUPPORTED = (torch.optim.Adafactor, torch.optim.AdamW, torch.optim.Adam)


class Unsupported(Exception):
    """The batched path cannot reproduce this optimizer's step; use the one-at-a-time path."""


@dataclass(frozen=True)
class _ParamStep:
    """Constants of one parameter's next step (the same for every proponent)."""

    name: str
    kind: str                    # "adafactor" or "adam"
    decay: float                 # multiply the parameter by this first (decoupled weight decay)
    alpha: float                 # Adafactor: max(eps2, RMS(W)) * rho; Adam: lr / bias correction 1
    weight: float                # Adafactor: 1 - beta2_t (lerp weight); Adam: 1 - beta2
    eps1: float
    clip: float                  # Adafactor's d
    beta1: float = 0.0
    bias2_sqrt: float = 1.0
    eps: float = 0.0


class FunctionalStep:
    """The optimizer's next step as a function of the gradient, for stacked gradients.

    Built from the live optimizer at learning rate ``lr`` (the rate the
    one-at-a-time step sets on every group). Parameters that a passage's loss
    does not reach (``frozen``) keep their value, as the imperative step
    leaves a parameter without a gradient alone.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lr: float,
                 frozen: set[str]):
        if type(optimizer) not in SUPPORTED:
            raise Unsupported(f"no functional step for {type(optimizer).__name__} (batched: "
                              f"{', '.join(c.__name__ for c in SUPPORTED)})")
        named = dict(model.named_parameters())
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.base = {n: p.detach() for n, p in named.items()}
        self.steps: dict[str, _ParamStep] = {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for name, param in named.items():
            if not param.requires_grad or name in frozen:
                continue
            group = group_of.get(id(param))
            if group is None:
                raise Unsupported(f"parameter {name} is not in the optimizer")
            state = optimizer.state.get(param)
            if not state or "step" not in state:
                raise Unsupported(f"parameter {name} has no optimizer state yet")
            self.steps[name], self.state[name] = _param_step(name, param, optimizer, group, state, lr)

    @property
    def names(self) -> list[str]:
        return list(self.steps)

    def apply(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stacked parameters (B × shape) after one step on each of the B gradients (consumed)."""
        size = next(iter(grads.values())).shape[0]
        out = {}
        for name, base in self.base.items():
            step = self.steps.get(name)
            if step is None:
                out[name] = base.expand(size, *base.shape)
                continue
            start = base * step.decay if step.decay != 1.0 else base
            if step.kind == "adafactor":
                update = _adafactor_update(grads.pop(name), self.state[name], step)
                flat = update.reshape(size, 1, -1)
                norm = torch.bmm(flat, flat.transpose(1, 2)).view(size).sqrt_() / (math.sqrt(base.numel()) * step.clip)
                scale = step.alpha / torch.clamp(norm, min=1.0)
            else:
                update = _adam_update(grads.pop(name), self.state[name], step)
                scale = torch.full((size,), step.alpha, dtype=update.dtype, device=update.device)
            # start - scale * update, written into the update's own memory
            out[name] = torch.addcmul(start, update, scale.neg().view(-1, *[1] * base.dim()), out=update)
        return out


def _param_step(name, param, optimizer, group, state, lr) -> tuple[_ParamStep, dict]:
    decay_rate = group.get("weight_decay", 0.0)
    decay = 1.0 - lr * decay_rate if decay_rate else 1.0
    step = float(state["step"]) + 1.0
    if group.get("maximize") or group.get("differentiable") or group.get("capturable") \
            or param.is_complex():
        raise Unsupported(f"{type(optimizer).__name__} options maximize/differentiable/capturable/complex")
    if type(optimizer) is torch.optim.Adafactor:
        eps1, eps2 = group["eps"]
        eps1 = torch.finfo(param.dtype).eps if eps1 is None else eps1
        rho = min(lr, 1.0 / math.sqrt(step))
        alpha = max(eps2, float(param.detach().norm(2)) / math.sqrt(param.numel())) * rho
        keys = ("row_var", "col_var") if param.dim() > 1 else ("variance",)
        return (_ParamStep(name, "adafactor", decay, alpha, step ** group["beta2_decay"], eps1, group["d"]),
                {k: state[k] for k in keys})
    if type(optimizer) in (torch.optim.AdamW, torch.optim.Adam):
        if group.get("amsgrad"):
            raise Unsupported("AMSGrad")
        if type(optimizer) is torch.optim.Adam and decay_rate:
            raise Unsupported("Adam's coupled weight decay")
        beta1, beta2 = group["betas"]
        return (_ParamStep(name, "adam", decay, lr / (1.0 - beta1 ** step), 1.0 - beta2, 0.0, 1.0,
                           beta1=beta1, bias2_sqrt=math.sqrt(1.0 - beta2 ** step), eps=group["eps"]),
                {k: state[k] for k in ("exp_avg", "exp_avg_sq")})
    raise Unsupported(type(optimizer).__name__)


def _adafactor_update(g: torch.Tensor, st: dict, step: _ParamStep) -> torch.Tensor:
    """``g / sqrt(V')`` with V' the second moment after this gradient; overwrites ``g``."""
    if g.dim() > 2:  # a matrix (or more): factored second moment over its last two dims
        square = torch.mul(g, g)  # (batched norms along dim -2 are slow; means of squares are not)
        row = st["row_var"].lerp(square.mean(dim=-1, keepdim=True), step.weight)
        col = st["col_var"].lerp(square.mean(dim=-2, keepdim=True), step.weight)
        row = row / row.mean(dim=-2, keepdim=True).clamp_(min=step.eps1)
        floor = step.eps1 * step.eps1
        if float(row.amin()) * float(col.amin()) >= floor:
            # No product falls below the floor, so 1/sqrt(row * col) = 1/sqrt(row) / sqrt(col):
            # two passes over the stacked gradient instead of four (float rounding apart).
            return g.mul_(row.rsqrt_()).mul_(col.rsqrt_())
        var = torch.mul(row, col, out=square)
    else:
        var = st["variance"].lerp(g * g, step.weight)
    return g.mul_(var.clamp_(min=step.eps1 * step.eps1).rsqrt_())


def _adam_update(g: torch.Tensor, st: dict, step: _ParamStep) -> torch.Tensor:
    """Adam's ``m' / (sqrt(v') / sqrt(1 - beta2^t) + eps)`` after this gradient; overwrites ``g``."""
    v = (g * g).mul_(step.weight).add_(st["exp_avg_sq"] * (1.0 - step.weight))
    denom = v.sqrt_().div_(step.bias2_sqrt).add_(step.eps)
    return st["exp_avg"].lerp(g, 1.0 - step.beta1).div_(denom)


def _ones(width: int, device) -> torch.Tensor:
    return torch.ones(1, width, dtype=torch.long, device=device)


class BatchedTailPatch:
    """Stepped parameter sets for chunks of passages, and query log-probabilities under them."""

    def __init__(self, model, optimizer, lr: float, sample_passage: Sequence[int], pad_id: int,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.model, self.pad_id = model, pad_id
        self.max_width = context_length(model)
        self.device = next(model.parameters()).device
        frozen = _unreached(model, sample_passage, self.device)
        self.step = FunctionalStep(model, optimizer, lr, frozen)
        numel = sum(p.numel() * p.element_size() for p in model.parameters())
        # Per proponent: its gradient, its stepped copy, and a gathered copy per pair.
        self.chunk = max(1, min(MAX_CHUNK, memory_bytes // (3 * numel)))

        def loss(params, ids, labels, embeds=None):
            logits = self._call(params, ids[None], embeds=None if embeds is None else embeds[None])[0, :-1].float()
            return torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX)

        def logprob(params, ids, positions, keep):
            # The head only at the positions that predict a target token, where the
            # model's forward can say so (``logits_to_keep``): the full logits' rows
            # (float rounding apart), a quarter of a tiny model's forward saved.
            logits = self._call(params, ids[None], positions if self.keeps_logits else None)[0].float()
            if not self.keeps_logits:
                logits = logits.index_select(0, positions)
            lp = torch.log_softmax(logits, dim=-1).gather(-1, ids.index_select(0, positions + 1)[:, None])[:, 0]
            return torch.where(keep, lp, torch.zeros_like(lp)).double().sum()

        trainable = set(self.step.names)
        self._grads = vmap(grad(lambda p, f, ids, labels: loss({**f, **p}, ids, labels)),
                           in_dims=(None, None, 0, 0))
        self._trainable = trainable
        # The input embedding's per-example gradient, batched, is a dense vocabulary ×
        # width matrix per passage filled by a scatter (and, tied to the head, added to
        # the head's): its rows are looked up here instead, the gradient taken at the
        # looked-up rows and added into the head's gradient (or zeros) at their tokens.
        self.embedding = _plain_embedding(model, trainable)
        self._embed_grads = vmap(grad(lambda p, f, e, ids, labels: loss({**f, **p}, ids, labels, e),
                                      argnums=(0, 2)), in_dims=(None, None, 0, 0, 0))
        self._logprob = vmap(logprob, in_dims=(0, 0, 0, 0))
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def _call(self, params, input_ids, keep=None, embeds=None):
        config = self.model.config
        implementation = getattr(config, "_attn_implementation", None)
        # Fused attention kernels have no vmap rule (torch loops over the batch);
        # the model's plain attention is batched matmuls.
        if implementation not in (None, "eager"):
            config._attn_implementation = "eager"
        kwargs = {"attention_mask": _ones(input_ids.shape[-1], self.device)}
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        if embeds is None:
            kwargs["input_ids"] = input_ids
        else:
            kwargs["inputs_embeds"] = embeds
        try:
            with fused_activations(self.model):
                return functional_call(self.model, params, (), kwargs).logits
        finally:
            if implementation not in (None, "eager"):
                config._attn_implementation = implementation

    def probe(self, passage: Sequence[int]) -> None:
        """Raise (RuntimeError) if this model's forward and backward cannot run under vmap.

        The two shortcuts that lean on the model's forward are checked on the
        passage first and dropped (said in the log) where it does not honour
        them: rows looked up outside must give the loss that token ids give,
        and ``logits_to_keep`` must take a tensor of positions.
        """
        ids = torch.tensor(list(passage), dtype=torch.long, device=self.device)
        if self.embedding is not None:
            name = self.embedding[0]
            with torch.no_grad():
                by_ids = self._call(self.step.base, ids[None]).float()
                by_rows = self._call(self.step.base, ids[None], embeds=self.step.base[name][ids][None]).float()
            if not torch.allclose(by_ids, by_rows, rtol=1e-4, atol=1e-5):
                log.info("tail-patch: %s's forward does not give the same logits for looked-up rows; "
                         "its embedding's gradient is taken in the vmapped call", type(self.model).__name__)
                self.embedding = None
        self._gradients([passage])
        if self.keeps_logits:
            query = [(list(passage[:QUERY_WIDTH]), 1)]
            try:
                kept = self.log_probs(self.base_params(), [0], query)
            except (TypeError, ValueError, IndexError, RuntimeError) as exc:
                log.info("tail-patch: %s's logits_to_keep does not take positions (%s); the head runs "
                         "at every position", type(self.model).__name__, exc)
                self.keeps_logits = False
            else:
                self.keeps_logits = False
                full = self.log_probs(self.base_params(), [0], query)
                self.keeps_logits = math.isclose(kept[0], full[0], rel_tol=1e-4, abs_tol=1e-5)
                if not self.keeps_logits:
                    log.info("tail-patch: %s's logits_to_keep changes the target's log-probability "
                             "(%.6g against %.6g); the head runs at every position",
                             type(self.model).__name__, kept[0], full[0])

    def stepped(self, passages: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Parameters after one step on each passage (all of one padded width), stacked.

        Each passage is right-padded to :func:`passage_width` of its length, the
        padding left out of the loss: causal attention keeps it from every real
        token, so the gradient is the unpadded passage's.
        """
        grads = self._gradients(passages)
        with torch.no_grad():
            return self.step.apply(grads)

    def _gradients(self, passages: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        widths = {passage_width(len(p), self.max_width) for p in passages}
        if len(widths) != 1:
            raise ValueError("BatchedTailPatch.stepped: passages of one chunk must share their padded width")
        width = widths.pop()
        ids = torch.full((len(passages), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(passages), width), IGNORE_INDEX, dtype=torch.long)
        for row, p in enumerate(passages):
            ids[row, :len(p)] = labels[row, :len(p)] = torch.tensor(list(p), dtype=torch.long)
        base = self.step.base
        train = {n: base[n] for n in self._trainable}
        fixed = {n: t for n, t in base.items() if n not in self._trainable}
        ids, labels = ids.to(self.device), labels.to(self.device)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
            if self.embedding is None:
                return self._grads(train, fixed, ids, labels)
            name, padding_idx = self.embedding
            weight = base[name]
            grads, rows = self._embed_grads(train, fixed, weight[ids], ids, labels)
        if padding_idx is not None:  # nn.Embedding leaves its padding row's gradient at zero
            rows = rows.masked_fill_((ids == padding_idx)[..., None], 0.0)
        size, vocab = ids.shape[0], weight.shape[0]
        into = grads[name].contiguous()
        offsets = ids + torch.arange(size, device=ids.device)[:, None] * vocab
        into.view(size * vocab, -1).index_add_(0, offsets.view(-1), rows.reshape(-1, weight.shape[1]))
        grads[name] = into
        return grads

    @torch.no_grad()
    def log_probs(self, params: dict[str, torch.Tensor], index: Sequence[int],
                  queries: Sequence[tuple[Sequence[int], int]]) -> list[float]:
        """log p(target | prompt) of ``queries[j]`` under ``params[index[j]]``; queries of one padded width.

        ``params`` is stacked (from :meth:`stepped`) or :meth:`base_params`.
        """
        widths = {query_width(len(ids), self.max_width) for ids, _ in queries}
        if len(widths) != 1:
            raise ValueError("BatchedTailPatch.log_probs: queries of one call must share their padded width")
        width = widths.pop()
        # Each row's positions whose logits predict its target tokens, padded (and
        # masked out) to the call's longest target by repeating its last one.
        most = max(n_target for _, n_target in queries)
        ids = torch.full((len(queries), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(queries), most), dtype=torch.long)
        keep = torch.zeros((len(queries), most), dtype=torch.bool)
        for row, (q, n_target) in enumerate(queries):
            ids[row, :len(q)] = torch.tensor(list(q), dtype=torch.long)
            first = len(q) - n_target - 1
            positions[row] = torch.arange(first, first + most).clamp_(max=len(q) - 2)
            keep[row, :n_target] = True
        ids, positions, keep = ids.to(self.device), positions.to(self.device), keep.to(self.device)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
            if params is self.step.base:
                # One parameter set for every query, but each query still in a
                # computation of its own shape (vmapped over the set, expanded, not
                # copied), as after a step: a value never depends on its companions.
                params = {n: t.expand(len(queries), *t.shape) for n, t in params.items()}
                return self._logprob(params, ids, positions, keep).tolist()
            first = index[0]
            if list(index) == list(range(first, first + len(index))):  # a run: read in place
                params = {n: t[first:first + len(index)] for n, t in params.items()}
            else:  # a copy of each pair's parameters
                pick = torch.tensor(list(index), dtype=torch.long, device=self.device)
                params = {n: t.index_select(0, pick) for n, t in params.items()}
            return self._logprob(params, ids, positions, keep).tolist()

    def base_params(self) -> dict[str, torch.Tensor]:
        """The checkpoint's own parameters (log_probs then reads them once for every query)."""
        return self.step.base


def _padded(length: int, multiple: int, max_width: int | None) -> int:
    width = multiple * math.ceil(length / multiple)
    return width if max_width is None else max(length, min(width, max_width))


def query_width(length: int, max_width: int | None) -> int:
    """A query's padded length: a multiple of :data:`QUERY_WIDTH` (at most the context), a function of the query alone."""
    return _padded(length, QUERY_WIDTH, max_width)


def passage_width(length: int, max_width: int | None = None) -> int:
    """A passage's padded length: a multiple of :data:`PASSAGE_WIDTH`, a function of the passage alone."""
    return _padded(length, PASSAGE_WIDTH, max_width)


def _plain_embedding(model, trainable: set[str]) -> tuple[str, int | None] | None:
    """(parameter name, padding index) of the model's input embedding where its rows can be
    looked up outside the model (a plain ``nn.Embedding`` whose forward takes
    ``inputs_embeds``, trained in the step), else None."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embedding) is not torch.nn.Embedding or embedding.max_norm is not None \
            or "inputs_embeds" not in inspect.signature(model.forward).parameters:
        return None
    names = [n for n, p in model.named_parameters() if p is embedding.weight]
    if len(names) != 1 or names[0] not in trainable:
        return None
    return names[0], embedding.padding_idx


def _unreached(model, passage: Sequence[int], device) -> set[str]:
    """Parameters that a passage's loss leaves without a gradient (the imperative step skips them)."""
    ids = torch.tensor([list(passage)], dtype=torch.long, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p, g in zip(params, grads, strict=True) if g is None}
