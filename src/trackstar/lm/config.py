"""What determines a pretrained model: :class:`PretrainConfig` and its presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from trackstar.lm.models import check_family, check_size
from trackstar.lm.optim import LR_DECAYS, check_optimizer, learning_rate_at, optimizer_hyperparameters
from trackstar.lm.tokenizer import MIN_VOCAB_SIZE


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a pretrained model (with the world's content hash).

    ``epochs`` passes over the corpus, unless ``max_steps`` is set, which then
    fixes the number of optimizer steps (the data order wraps over epochs).
    ``checkpoint_fractions`` are fractions of training at which a checkpoint is
    written; 1.0 (the final checkpoint) is always included.
    """

    family: str = "gpt2"
    size: str = "micro"
    optimizer: str = "adafactor"
    lr: float = 1e-2
    final_lr_fraction: float = 0.1
    warmup_fraction: float = 0.05
    lr_decay: str = "cosine"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    context_length: int = 128
    vocab_size: int = 512
    seed: int = 0
    checkpoint_fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    optimizer_kwargs: dict = field(default_factory=dict)
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if not _is_int(self.seed):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        check_family(self.family)
        check_size(self.size)
        check_optimizer(self.optimizer)
        optimizer_hyperparameters(self.optimizer, self.optimizer_kwargs)
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"unknown lr_decay {self.lr_decay!r}; valid: {', '.join(LR_DECAYS)}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 < self.final_lr_fraction <= 1:
            raise ValueError(
                f"final_lr_fraction must be in (0, 1] (tail-patch needs a non-zero final "
                f"learning rate), got {self.final_lr_fraction!r}"
            )
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")
        for name in ("epochs", "batch_size", "context_length", "eval_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.context_length < 4:
            raise ValueError(f"context_length must be at least 4, got {self.context_length}")
        if self.max_steps is not None and (not _is_int(self.max_steps) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None, got {self.max_steps!r}")
        if not _is_int(self.vocab_size) or self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {self.vocab_size!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")
        fractions = tuple(self.checkpoint_fractions)
        bad = [f for f in fractions if not (isinstance(f, (int, float)) and 0 < f <= 1)]
        if bad:
            raise ValueError(f"checkpoint_fractions must lie in (0, 1], got {bad!r}")
        object.__setattr__(self, "checkpoint_fractions", tuple(sorted({float(f) for f in fractions} | {1.0})))
        object.__setattr__(self, "optimizer_kwargs", dict(self.optimizer_kwargs))

    @classmethod
    def preset(cls, name: str, **overrides) -> PretrainConfig:
        """A named preset (see :data:`PRESETS`) with some fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown pretraining preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps or self.epochs * steps_per_epoch

    def warmup_steps(self, total_steps: int) -> int:
        return round(self.warmup_fraction * total_steps)

    def learning_rate(self, step: int, total_steps: int) -> float:
        """The learning rate of update ``step``; at ``total_steps``, the final one tail-patch uses."""
        return learning_rate_at(step, total_steps, self.lr, self.warmup_steps(total_steps),
                                self.final_lr_fraction, self.lr_decay)


# Presets per model size. ``micro`` is for tests; ``tiny`` is the default
# reproduction model, sized for a CPU and a world of a few thousand short
# documents; ``small`` / ``medium`` are for bigger machines.
PRESETS: dict[str, PretrainConfig] = {
    "micro": PretrainConfig(
        size="micro", vocab_size=512, context_length=256, batch_size=16, epochs=4, lr=5e-2,
        warmup_fraction=0.05,
    ),
    "tiny": PretrainConfig(
        size="tiny", vocab_size=2048, context_length=128, batch_size=32, epochs=8, lr=3e-2,
        warmup_fraction=0.03,
    ),
    "small": PretrainConfig(
        size="small", vocab_size=4096, context_length=128, batch_size=32, epochs=10, lr=2e-2,
        warmup_fraction=0.03,
    ),
    "medium": PretrainConfig(
        size="medium", vocab_size=4096, context_length=128, batch_size=32, epochs=10, lr=1e-2,
        warmup_fraction=0.03,
    ),
}
