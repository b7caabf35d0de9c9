"""Language models: tokenizer, text to tokens, model building, pretraining, checkpoints, query evaluation."""

import importlib

# Loaded on first use (PEP 562): importing one submodule (trackstar.lm.data, say, as
# the attribution engine does) must not load the model, training and checkpoint code
# and the transformers modules behind them.
_EXPORTS = {
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "load_hf_causal_lm": "checkpoint",
    "save_checkpoint": "checkpoint", "PRESETS": "config", "PretrainConfig": "config", "lm_loss": "data",
    "pad": "data", "passage_ids": "data", "query_ids": "data", "accuracy_by_bucket": "evaluate",
    "evaluate_queries": "evaluate", "score_targets": "evaluate", "FAMILIES": "presets", "MODEL_SIZES": "presets",
    "build_model": "models", "OPTIMIZERS": "presets", "build_optimizer": "optim", "pretrain_model": "pretrain",
    "final_checkpoint": "run", "train_tokenizer": "tokenizer",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"trackstar.lm.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trackstar.lm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "FAMILIES",
    "MODEL_SIZES",
    "OPTIMIZERS",
    "PRESETS",
    "Checkpoint",
    "PretrainConfig",
    "accuracy_by_bucket",
    "build_model",
    "build_optimizer",
    "evaluate_queries",
    "final_checkpoint",
    "lm_loss",
    "load_checkpoint",
    "load_hf_causal_lm",
    "pad",
    "passage_ids",
    "pretrain_model",
    "query_ids",
    "save_checkpoint",
    "score_targets",
    "train_tokenizer",
]
