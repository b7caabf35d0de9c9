"""Language models: tokenizer, text to tokens, model building, pretraining, checkpoints, query evaluation."""

from trackstar.lm.checkpoint import Checkpoint, load_checkpoint, load_hf_causal_lm, save_checkpoint
from trackstar.lm.config import PRESETS, PretrainConfig
from trackstar.lm.data import lm_loss, pad, passage_ids, query_ids
from trackstar.lm.evaluate import accuracy_by_bucket, evaluate_queries, score_targets
from trackstar.lm.models import FAMILIES, MODEL_SIZES, build_model
from trackstar.lm.optim import OPTIMIZERS, build_optimizer
from trackstar.lm.pretrain import pretrain_model
from trackstar.lm.run import final_checkpoint
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
    "pad",
    "passage_ids",
    "pretrain_model",
    "query_ids",
    "save_checkpoint",
    "score_targets",
    "train_tokenizer",
]
