"""From text to token ids, batches and LM loss: the one path every stage takes.

Pretraining, query evaluation, attribution and tail-patch all read text
through these functions, so a passage or a query is the same token sequence
wherever it appears:

- a passage is ``bos + text + eos`` cut to the context length;
- a query is ``bos + prompt + " "target``, prompt and target tokenized apart,
  with the prompt losing tokens from its left end when the two do not fit.

``bos`` / ``eos`` are added only where the tokenizer has them, so real HF
tokenizers work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
PADDING_SIDES = ("right", "left")


def context_length(model) -> int | None:
    """The model's maximum sequence length (GPT-2 ``n_positions``, others ``max_position_embeddings``)."""
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _special(token_id) -> list[int]:
    return [int(token_id)] if token_id is not None else []


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_corpus(
    tokenizer, texts: Sequence[str], max_length: int | None
) -> tuple[list[list[int]], int]:
    """Each text as a passage (see :func:`passage_ids`); also how many were cut.

    The count lets callers say how much text the model never sees.
    """
    bos, eos = _special(tokenizer.bos_token_id), _special(tokenizer.eos_token_id)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    passages = [bos + list(ids) + eos for ids in encoded]
    if max_length is None:
        return passages, 0
    return [ids[:max_length] for ids in passages], sum(len(ids) > max_length for ids in passages)


def passage_ids(tokenizer, text: str, max_length: int | None) -> list[int]:
    """``bos + text + eos`` cut to its first ``max_length`` tokens.

    Cut rather than refused: pretraining trains on exactly the cut passage, so
    the cut passage is the one to attribute and to tail-patch with.
    """
    (ids,), _ = tokenize_corpus(tokenizer, [text], max_length)
    return ids


def query_ids(
    tokenizer, prompt: str, target: str, max_length: int | None, name: str | None = None
) -> tuple[list[int], int]:
    """Token ids of ``[bos] prompt " "target`` and the number of target tokens.

    The target is tokenized on its own so its tokens do not depend on the
    prompt. When the query is longer than ``max_length`` the prompt loses
    tokens from its left end: the words next to the target matter most for
    predicting it. ``name`` identifies the query in errors.
    """
    query = f"Query {name}" if name is not None else f"Query ({prompt!r}, {target!r})"
    prompt_ids = _special(tokenizer.bos_token_id) + _encode(tokenizer, prompt)
    target_ids = _encode(tokenizer, " " + target)
    # A blank target still encodes to a space token with byte-level BPE.
    if not target.strip() or not target_ids:
        raise ValueError(
            f"{query} has a target {target!r} that is blank or empty after tokenization, "
            "so there is nothing to score or attribute. Give a non-empty target."
        )
    if not prompt_ids:
        raise ValueError(
            f"{query} has an empty prompt and the tokenizer has no BOS token, so the first "
            "target token cannot be predicted. Give a non-empty prompt."
        )
    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        keep = max_length - len(target_ids)
        if keep < 1:
            raise ValueError(
                f"{query} has a target {target!r} of {len(target_ids)} tokens, which leaves "
                f"no room for the prompt in the model's {max_length} positions. Shorten the target."
            )
        prompt_ids = prompt_ids[-keep:]
    return prompt_ids + target_ids, len(target_ids)


def pad_token_id(tokenizer) -> int:
    """The id to pad with: any id serves, since padding is masked everywhere."""
    return next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)


def pad(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` padded to the longest sequence.

    Position ids count real tokens only, so with left padding a sequence still
    sits at positions 0..T-1 and its logits are those of the unpadded sequence.
    """
    if side not in PADDING_SIDES:
        raise ValueError(f"Unknown padding side {side!r}; use 'right' or 'left'.")
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        cols = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
        input_ids[row, cols] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, cols] = 1
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def lm_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded passages as :func:`lm_loss` reads them.

    No position ids: with right padding the model's default positions already
    count real tokens, and leaving the model to make them keeps trained
    weights identical to the bit across versions of this code.
    """
    input_ids, attention_mask, _ = pad(sequences, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding tokens of ``batch`` (moved to the model's device)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    shift_logits = logits[:, :-1].float()
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


class DataOrder:
    """Seeded per-epoch permutation; batch ``step`` is a pure function of ``step``.

    So the position in the data is just the step count, and a resumed run sees
    exactly the batches the killed one would have.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = math.ceil(n_examples / batch_size)
        self._cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cache = (epoch, rng.permutation(self.n_examples))
        return self._cache[1]

    def batch_indices(self, step: int) -> list[int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.permutation(epoch)
        return order[within * self.batch_size:(within + 1) * self.batch_size].tolist()
