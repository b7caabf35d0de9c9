"""The names and shapes our own models and optimizers come in, without torch or
transformers: the command line lists them as its choices, and ``trackstar --help``
must not wait for the model code to import (models.py and optim.py use them)."""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("gpt2", "llama")


@dataclass(frozen=True)
class ModelSize:
    """Shape of a transformer: ``n_layer`` blocks of width ``d_model``."""

    n_layer: int
    d_model: int
    n_head: int
    # MLP hidden width. Llama's SwiGLU has three matrices to GPT-2's two, so it
    # gets 2/3 of GPT-2's width for about the same parameter count.
    d_ff_gpt2: int
    d_ff_llama: int


# Approximate parameter counts are with the vocabulary sizes of the presets in
# ``config.PRESETS`` (micro 512, tiny 2048, small and medium 4096).
MODEL_SIZES: dict[str, ModelSize] = {
    "micro": ModelSize(n_layer=2, d_model=32, n_head=2, d_ff_gpt2=128, d_ff_llama=88),  # ~50k
    "tiny": ModelSize(n_layer=4, d_model=128, n_head=4, d_ff_gpt2=512, d_ff_llama=344),  # ~1M
    "small": ModelSize(n_layer=4, d_model=256, n_head=4, d_ff_gpt2=1024, d_ff_llama=688),  # ~4M
    "medium": ModelSize(n_layer=6, d_model=384, n_head=6, d_ff_gpt2=1536, d_ff_llama=1024),  # ~12M
}

OPTIMIZERS = ("adafactor", "adamw")
