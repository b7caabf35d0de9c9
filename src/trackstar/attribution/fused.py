"""Fused kernels for the extraction's forward and backward: the same functions, fewer passes.

On a CPU, and on a GPU at small widths, per-example gradient extraction spends
much of its time in elementwise passes over (examples × tokens × width) and
(tokens × vocabulary) tensors rather than in matrix products. Two of those
are written out op by op where one kernel computes the same function:

* GPT-2's ``gelu_new`` (transformers' ``NewGELUActivation`` and
  ``FastGELUActivation``): 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in seven
  elementwise ops forward and more backward; ``F.gelu(x, approximate="tanh")``
  is that formula in one kernel each way (transformers' own ``GELUTanh``).
* Llama-style RMSNorm (pow, mean, rsqrt, two products): ``F.rms_norm`` gives
  the same float32 numbers bit for bit, in one kernel each way.
  :func:`fused_activations` swaps both in for the duration of an extraction and
  restores the model's modules after; training and the one-at-a-time tail-patch
  never see them (the batched tail-patch's vmapped calls do).
* The loss output function, Σ w·(logsumexp(z) − z_y): cross-entropy's backward
  zero-fills a vocabulary-wide tensor, scatters into it and reads it with the
  log-probabilities again. :func:`weighted_token_loss` forms
  w·(softmax(z) − onehot(y)) in place over the forward's log-probabilities,
  with no vocabulary-wide tensor of its own.
* The output head and the loss together: with the head's weights frozen, the
  only gradient the head passes down is dL/dh = w·(softmax(z) − onehot(y)) W,
  which :func:`linear_token_loss` computes in the forward pass, a few hundred
  rows of logits at a time, so the (tokens × vocabulary) logits never exist
  whole: each chunk is formed, used and dropped while it is in cache, and
  memory no longer grows with the vocabulary (a 128k vocabulary at 4096
  tokens is 2 GB of float32 logits).

All agree with the op-by-op versions to float32 rounding (the brute-force
tests in ``tests/test_attribution.py`` hold them to it).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

#: transformers' op-by-op tanh-GELUs (by class name, so this module does not import transformers).
TANH_GELUS = ("NewGELUActivation", "FastGELUActivation")
#: transformers' RMSNorms that compute x·rsqrt(mean(x²) + eps)·weight, in float32 for float32 input
#: (not Gemma's, whose scale is 1 + weight).
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Olmo2RMSNorm")


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.float32 and module.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
    return type(module).forward(module, x)  # other dtypes: the module's own rounding


def _fused_forward(module: nn.Module):
    name = type(module).__name__
    if "forward" in vars(module):
        return None  # already swapped (or patched by someone else): left alone
    if name in TANH_GELUS:
        return _gelu_tanh
    if name in RMS_NORMS and hasattr(module, "variance_epsilon"):
        return functools.partial(_rms_norm, module)
    return None


@contextlib.contextmanager
def fused_activations(model: nn.Module) -> Iterator[int]:
    """Within the block, every tanh-GELU and RMSNorm module of ``model`` runs the fused
    kernel (``F.gelu(approximate="tanh")``, ``F.rms_norm``: equal to the op-by-op forward,
    RMSNorm bit for bit); yields how many were swapped."""
    swapped = []
    try:
        for m in model.modules():
            forward = _fused_forward(m)
            if forward is not None:
                m.forward = forward
                swapped.append((m, forward))
        yield len(swapped)
    finally:
        for m, forward in swapped:
            if vars(m).get("forward") is forward:
                del m.forward


def _loss_grad_(log_probs: torch.Tensor, labels: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """coef · (softmax − onehot(labels)), the loss's gradient in the logits, in place over ``log_probs``."""
    out = log_probs.exp_()
    out.mul_(coef[:, None])
    out.scatter_add_(-1, labels[:, None], -coef[:, None])
    return out


class _WeightedTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)  # one fused pass per row
        values = -log_probs.gather(-1, labels[:, None])[:, 0]
        # where() rather than a product: a pad position's value may be inf/NaN.
        total = torch.where(weights > 0, weights * values, torch.zeros_like(values)).sum()
        ctx.save_for_backward(log_probs, labels, weights)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        log_probs, labels, weights = ctx.saved_tensors
        coef = torch.where(weights > 0, grad * weights, torch.zeros_like(weights))
        # In place over the saved log-probabilities (used once: the graph is not retained
        # for a second backward).
        out = _loss_grad_(log_probs, labels, coef)
        out.masked_fill_((coef == 0)[:, None], 0.0)  # pads: exactly 0, even where their logits were not finite
        return out, None, None


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ over positions with weight > 0 of weight · (−log softmax(logits)[label]), as one scalar.

    ``logits`` (..., vocab) float32, ``labels`` and ``weights`` (...); equal to the
    weighted sum of cross-entropies, with a one-pass backward (see the module doc).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    return _WeightedTokenLoss.apply(flat, labels.reshape(-1), weights.reshape(-1).to(flat.dtype))


#: Logit bytes per chunk of :func:`linear_token_loss`: in cache on a CPU; on a GPU, big enough to fill it.
CHUNK_BYTES = {"cpu": 8 << 20}
DEFAULT_CHUNK_BYTES = 512 << 20
#: Rows per chunk at least: each chunk reads the whole head, so a huge vocabulary must not mean tiny chunks.
MIN_CHUNK_ROWS = 128


class _LinearTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES.get(device, DEFAULT_CHUNK_BYTES) // (4 * weight.shape[0]))
        # The head in the dtype the model's own would run in (autocast's, if on), cast once rather
        # than per chunk (autocast does not cache casts of frozen weights); then autocast off.
        autocast = torch.is_autocast_enabled(device)
        compute = torch.get_autocast_dtype(device) if autocast else weight.dtype
        head_w = weight.to(compute)
        head_b = None if bias is None else bias.to(compute)
        h = hidden.to(compute)
        weights = weights.float()  # the loss in float32, as weighted_token_loss of .float() logits
        want_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            for start in range(0, h.shape[0], rows):
                part = slice(start, start + rows)
                log_probs = torch.log_softmax(F.linear(h[part], head_w, head_b).float(), dim=-1)
                y, w = labels[part, None], weights[part]
                total = total - (w * log_probs.gather(-1, y)[:, 0]).sum()
                if want_grad:  # then through the head, as the linear's backward would
                    grad_hidden[part] = _loss_grad_(log_probs, labels[part], w).to(compute) @ head_w
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.to(grad_hidden.dtype), None, None, None, None


def linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights[i] · (−log softmax(hidden[i] Wᵀ + b)[labels[i]]), differentiable in ``hidden`` only.

    ``hidden`` (m, H), ``labels`` and ``weights`` (m,): the positions to score, every weight
    > 0 (select them first: a position of weight 0 costs nothing here). The head's ``weight``
    and ``bias`` must not require grad (it has none to give them). Equal, to float32 rounding
    (bit for bit on the CPUs we test), to :func:`weighted_token_loss` of the full logits.
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_token_loss gives no gradient to the head's weight or bias; freeze them first "
                         "(or use weighted_token_loss on the logits).")
    return _LinearTokenLoss.apply(hidden, weight, bias, labels, weights)
