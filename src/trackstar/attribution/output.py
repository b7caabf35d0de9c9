"""Output functions f and the tokenized examples they are taken on (SPEC §1.1).

An :class:`Example` carries token ids and one weight per position: the weight
of position t multiplies the output value of predicting ``ids[t]`` from
``ids[:t]``. A training passage weighs every predicted token 1/(T-1) (its mean
LM loss); a query weighs only its target tokens. The objective of a batch is
the weighted SUM over examples, so autograd's per-example output gradients are
exactly each example's own dL/d(out), whatever the batch holds.

Sign convention: every f is loss-like (lower = target more probable), so a
positive dot product between a training and a query gradient means that a
gradient-descent step on the training example raises the target probability.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..lm.data import pad, query_ids, tokenize_corpus
from .fused import linear_token_loss, weighted_token_loss


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    weights: tuple[float, ...]
    output_fn: str  # "loss" | "margin" | "logit"
    name: str

    def __len__(self) -> int:
        return len(self.ids)


def training_example(tokenizer, text: str, name: str, limit: int | None) -> Example:
    """A pretraining passage; f = mean LM loss over its T-1 predicted tokens.

    The passage is tokenized and cut as pretraining saw it
    (:func:`trackstar.lm.data.passage_ids`), so f is the loss the model was
    trained on and tail-patch steps on.
    """
    (ids,), n_cut = tokenize_corpus(tokenizer, [text], limit)
    if n_cut:
        warnings.warn(
            f"Training example {name} is longer than the model's {limit} positions; it is "
            f"attributed as its first {limit} tokens, the passage pretraining trains on.",
            stacklevel=2,
        )
    if len(ids) < 2:
        raise ValueError(
            f"Training example {name} ({text!r}) has {len(ids)} token(s); the LM loss "
            "needs at least 2 (one to condition on, one to predict). Drop it or give "
            "a longer passage."
        )
    n = len(ids) - 1
    return Example(tuple(ids), (0.0,) + (1.0 / n,) * n, "loss", name)


def query_example(
    tokenizer,
    prompt: str,
    target: str,
    name: str,
    limit: int | None,
    output_fn: str = "loss",
    reduction: str = "mean",
) -> Example:
    """A query (prompt, target): f over its target tokens only.

    The ids are those query evaluation scores (:func:`trackstar.lm.data.query_ids`),
    an overlong prompt cut from the left alike.
    """
    ids, n_target = query_ids(tokenizer, prompt, target, limit, name)
    w = 1.0 / n_target if reduction == "mean" else 1.0
    weights = (0.0,) * (len(ids) - n_target) + (w,) * n_target
    return Example(tuple(ids), weights, output_fn, name)


def token_outputs(logits: torch.Tensor, labels: torch.Tensor, output_fn: str) -> torch.Tensor:
    """Per-token loss-like output values, shape ``labels.shape``.

    ``logits[..., t, :]`` predicts ``labels[..., t]``.
    loss:   -log p(y)
    margin: -(log p(y) - log(1 - p(y))) = -(z_y - logsumexp_{j != y} z_j)
    logit:  -z_y
    """
    logits = logits.float()
    if output_fn == "loss":  # the fused kernel: fewer passes over the logits
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return flat.view(labels.shape)
    z_y = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if output_fn == "margin":
        others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf"))
        return torch.logsumexp(others, dim=-1) - z_y
    if output_fn == "logit":
        return -z_y
    raise ValueError(f"Unknown output function {output_fn!r}; use 'loss', 'margin' or 'logit'.")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (n, T)
    attention_mask: torch.Tensor  # (n, T)
    position_ids: torch.Tensor  # (n, T)
    weights: torch.Tensor  # (n, T) float32, weight of predicting ids[:, t]
    examples: list[Example]

    def to(self, device: torch.device) -> "Batch":
        if self.input_ids.device == device:
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.weights.to(device), self.examples)


def collate(examples: Sequence[Example], padding_side: str = "right", pad_id: int = 0) -> Batch:
    """Pad to the longest example (:func:`trackstar.lm.data.pad`).

    Padding never changes a gradient: pad positions get weight 0, attention
    never looks at them, and left padding keeps real tokens at positions 0..T-1.
    """
    ids, mask, positions = pad([e.ids for e in examples], pad_id, padding_side)
    weights = torch.zeros(ids.shape, dtype=torch.float32)
    # The mask's ones run row by row over the real tokens in order, whichever side is padded.
    weights[mask.bool()] = torch.tensor([w for e in examples for w in e.weights], dtype=torch.float32)
    return Batch(ids, mask, positions, weights, list(examples))


def _shifted(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and weights aligned with the logits: position t predicts ids[t + 1]; the last gets weight 0."""
    pad = batch.input_ids.new_zeros((batch.input_ids.shape[0], 1))
    labels = torch.cat([batch.input_ids[:, 1:], pad], dim=1)
    w = torch.cat([batch.weights[:, 1:], pad.float()], dim=1)
    return labels, w


def _fn_rows(batch: Batch) -> list[tuple[str, torch.Tensor | None]]:
    """Each output function in the batch with its examples (None: every example)."""
    fns = sorted({e.output_fn for e in batch.examples})
    if len(fns) == 1:
        return [(fns[0], None)]
    return [(fn, torch.tensor([e.output_fn == fn for e in batch.examples], device=batch.input_ids.device))
            for fn in fns]


def objective(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over examples of each example's weighted output: Σ_i f(z_i)."""
    # Shifting the labels and weights rather than slicing the logits avoids
    # copying the (n, T, vocab) tensor forward and zero-filling it in the
    # backward pass.
    labels, w = _shifted(batch)
    total = logits.new_zeros((), dtype=torch.float32)
    for fn, rows in _fn_rows(batch):
        if rows is None:  # the usual case; indexing would copy the logits
            p, y, wr = logits, labels, w
        else:
            p, y, wr = logits[rows], labels[rows], w[rows]
        if fn == "loss":  # the weighted cross-entropy with a one-pass backward
            total = total + weighted_token_loss(p.float(), y, wr)
            continue
        values = token_outputs(p, y, fn)
        # where() rather than a product: a pad position's value may be inf/NaN
        # and 0 * NaN would leak into the sum.
        total = total + torch.where(wr > 0, values * wr, torch.zeros_like(values)).sum()
    return total


#: Causal LMs whose logits are exactly ``get_output_embeddings()(base_model(...).last_hidden_state)``,
#: nothing applied after the head (no soft-capping or scaling, unlike e.g. Gemma 2 or Cohere).
PLAIN_HEAD_MODELS = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                     "Qwen3ForCausalLM", "GPTNeoXForCausalLM", "Olmo2ForCausalLM")


def plain_head(model) -> torch.nn.Linear | None:
    """The output head, where the logits are only that head of the last hidden state and
    nothing needs its gradient (so :func:`forward_objective` may form only the logits it uses)."""
    cls = type(model)
    if cls.__name__ not in PLAIN_HEAD_MODELS or not cls.__module__.startswith("transformers.models."):
        return None  # remote code may reuse a name with another forward
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or any(p.requires_grad for p in head.parameters()):
        return None
    if any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks for m in (model, head)):
        return None  # accelerate's dispatch/offload or a user's hook expects the head module to run
    return head


def forward_objective(model, batch: Batch) -> torch.Tensor:
    """``objective(forward_logits(model, batch), batch)``, with the same gradient below the head.

    Where :func:`plain_head` allows, the logits are formed only at the positions
    of weight > 0, and for the loss output function only a few hundred rows at a
    time (:func:`~.fused.linear_token_loss`), never as an (n, T, vocab) tensor;
    otherwise (any other model, or a head that needs its own gradient) the full
    logits, as the model computes them.
    """
    head = plain_head(model)
    if head is None:
        return objective(forward_logits(model, batch), batch)
    hidden = model.base_model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels, w = _shifted(batch)
    total = hidden.new_zeros((), dtype=torch.float32)
    for fn, rows in _fn_rows(batch):
        keep = w > 0 if rows is None else (w > 0) & rows[:, None]
        at = keep.flatten().nonzero()[:, 0]  # pads and unweighted positions: no logits at all
        h, y, wr = hidden.index_select(0, at), labels.flatten()[at], w.flatten()[at]
        if fn == "loss":
            total = total + linear_token_loss(h, head.weight, head.bias, y, wr)
        else:
            total = total + (token_outputs(head(h), y, fn) * wr).sum()
    return total


def forward_logits(model, batch: Batch) -> torch.Tensor:
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
