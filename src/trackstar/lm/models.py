"""Small decoder-only language models, randomly initialized from HF configs.

Two families: ``gpt2`` (``GPT2LMHeadModel``; its projections are HF ``Conv1D``,
stored input x output) and ``llama`` (``LlamaForCausalLM``; ``nn.Linear``,
RMSNorm, SwiGLU, rotary positions: closer to the paper's PaLM-style models).
Embeddings are tied to the unembedding, dropout is off, and the initial weights
depend only on ``seed``.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from trackstar.lm.presets import FAMILIES, MODEL_SIZES, ModelSize  # defined there, used and exported here


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid families: {', '.join(FAMILIES)}")
    return family


def check_size(size: str) -> ModelSize:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[size]


def build_config(
    family: str,
    size: str,
    vocab_size: int,
    context_length: int = 128,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """The HF config of a ``family`` model of the named ``size``."""
    check_family(family)
    shape = check_size(size)
    if vocab_size < 1 or context_length < 2:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be positive and context_length ({context_length}) at least 2"
        )
    special = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=context_length,
            n_embd=shape.d_model,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            n_inner=shape.d_ff_gpt2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **special,
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=context_length,
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff_llama,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_head,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        **special,
    )


def build_model(
    family: str,
    size: str,
    vocab_size: int,
    context_length: int = 128,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """A randomly initialized causal LM; the same arguments give the same weights."""
    config = build_config(
        family, size, vocab_size, context_length, bos_token_id, eos_token_id, pad_token_id
    )
    model_cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model


def model_skeleton(family: str, size: str, vocab_size: int, context_length: int = 128) -> PreTrainedModel:
    """The architecture of :func:`build_model` on the meta device: shapes only, no memory,
    for checking settings that depend on them (the projection split) before any work."""
    config = build_config(family, size, vocab_size, context_length)
    model_cls = GPT2LMHeadModel if family == "gpt2" else LlamaForCausalLM
    with torch.device("meta"):
        return model_cls(config)


def hf_skeleton(name_or_path: str) -> PreTrainedModel:
    """A Hugging Face causal LM's architecture on the meta device, from its config alone."""
    config = AutoConfig.from_pretrained(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct trainable parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
