"""Language models: tokenizer, model building, pretraining, checkpoints, query evaluation."""

from trackstar.lm.checkpoint import Checkpoint, load_checkpoint, load_hf_causal_lm, save_checkpoint
from trackstar.lm.evaluate import accuracy_by_bucket, evaluate_queries, score_targets, target_probability
from trackstar.lm.models import FAMILIES, MODEL_SIZES, build_model
from trackstar.lm.optim import OPTIMIZERS, build_optimizer
from trackstar.lm.pretrain import PRESETS, PretrainConfig, final_checkpoint, lm_loss, pretrain_model
from trackstar.lm.tokenizer import train_tokenizer

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
    "pretrain_model",
    "save_checkpoint",
    "score_targets",
    "target_probability",
    "train_tokenizer",
]
