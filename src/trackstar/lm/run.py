"""The bookkeeping of a pretraining run directory: its key, checkpoints and summary.

Output directory::

    out_dir/
      tokenizer/                 trained BPE tokenizer (atomic, COMPLETE)
      checkpoint-0000050/        one per checkpoint fraction (atomic, COMPLETE)
      ...
      pretrain.json              written last, when training completes

A run directory holds one run: its checkpoints carry the run's key, and a
directory holding another config or world is refused, never mixed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from trackstar.io import (
    ArtifactError,
    atomic_directory,
    atomic_write_json,
    check_complete,
    config_hash,
    is_complete,
    read_json,
    read_jsonl,
    verify_complete,
)
from trackstar.lm.checkpoint import TRAINER_STATE_FILE
from trackstar.lm.config import PretrainConfig
from trackstar.lm.data import DataOrder
from trackstar.lm.evaluate import QUERY_EVAL_FILE, accuracy_by_bucket
from trackstar.lm.models import MODEL_SIZES, count_parameters
from trackstar.lm.optim import optimizer_hyperparameters
from trackstar.lm.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

SUMMARY_FILE = "pretrain.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_PREFIX = "checkpoint-"
# What pretrain.json repeats from the trainer state of every checkpoint.
SUMMARY_KEYS = ("run_key", "config", "world", "world_dir", "total_steps", "steps_per_epoch",
                "n_documents", "n_truncated", "n_parameters", "final_learning_rate")


def run_key(config: PretrainConfig, manifest: dict) -> str:
    """Content address of a pretraining run: its config and the world's content hash.

    ``eval_batch_size`` changes no weight, so it is left out.
    """
    settings = {k: v for k, v in config.to_dict().items() if k != "eval_batch_size"}
    return config_hash({"pretrain": settings, "world": manifest["content_hash"]})


def checkpoint_steps(config: PretrainConfig, total_steps: int) -> dict[int, float]:
    """Step -> fraction of training, for each checkpoint (distinct steps, >= 1)."""
    steps: dict[int, float] = {}
    # Largest fraction first, so when two fractions round to one step the later
    # one names it and the final step is always fraction 1.0.
    for fraction in sorted(config.checkpoint_fractions, reverse=True):
        steps.setdefault(max(1, round(fraction * total_steps)), fraction)
    return dict(sorted(steps.items()))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def is_finished(out_dir: Path, key: str) -> bool:
    """Whether ``out_dir`` holds this run, finished; another finished run is refused."""
    summary_path = out_dir / SUMMARY_FILE
    if not summary_path.exists():
        return False
    summary = read_json(summary_path)
    if summary.get("run_key") != key:
        raise ArtifactError(
            f"{str(out_dir)!r} holds a finished pretraining run with other settings or "
            "another world. Choose another output directory or delete this one."
        )
    names = [entry["name"] for entry in summary["checkpoints"]]
    for i, name in enumerate(names):
        try:
            check_complete(out_dir / name, "checkpoint", "")
        except ArtifactError as exc:
            # Deterministic from its key: resume from the last good checkpoint before it, as
            # the load error's hint (delete the damaged checkpoint and re-run) promises.
            log.warning("%s; pretraining resumes from the last complete checkpoint before it", exc)
            for later in names[i:]:
                shutil.rmtree(out_dir / later, ignore_errors=True)
            summary_path.unlink()
            return False
    return True


def latest_checkpoint(out_dir: Path, key: str) -> Path | None:
    """The last complete checkpoint of this run; refuse checkpoints of another run."""
    latest = None
    for path in sorted(out_dir.glob(f"{CHECKPOINT_PREFIX}*")):
        if not is_complete(path):
            log.warning("removing incomplete checkpoint %s left by a killed run", path)
            shutil.rmtree(path, ignore_errors=True)
            continue
        state = read_json(path / TRAINER_STATE_FILE)
        if state.get("run_key") != key:
            raise ArtifactError(
                f"{str(path)!r} belongs to another pretraining run (other settings or world); "
                f"{str(out_dir)!r} must hold a single run. Choose another output directory "
                "or delete this one."
            )
        latest = path
    return latest


def corpus_tokenizer(out_dir: Path, texts: list[str], vocab_size: int):
    """The run's tokenizer, trained on ``texts`` once and then read back."""
    path = out_dir / TOKENIZER_DIR
    if not is_complete(path):
        if path.exists():
            shutil.rmtree(path)
        with atomic_directory(path) as tmp:
            train_tokenizer(texts, vocab_size).save_pretrained(tmp)
    verify_complete(path, "tokenizer", "Delete it and re-run pretraining.")
    return AutoTokenizer.from_pretrained(path)


def run_record(config: PretrainConfig, key: str, manifest: dict, world_dir: str | os.PathLike,
               order: DataOrder, n_cut: int, model) -> dict:
    """What every checkpoint's trainer state says about the run it belongs to."""
    total_steps = config.total_steps(order.steps_per_epoch)
    return {
        "run_key": key,
        "config": config.to_dict(),
        "seed": config.seed,
        "world": {k: manifest.get(k) for k in ("content_hash", "seed", "profile")},
        "world_dir": str(Path(world_dir).resolve()),
        "total_steps": total_steps,
        "steps_per_epoch": order.steps_per_epoch,
        "warmup_steps": config.warmup_steps(total_steps),
        "final_learning_rate": config.learning_rate(total_steps, total_steps),
        "n_documents": order.n_examples,
        "n_truncated": n_cut,
        "n_parameters": count_parameters(model),
        "optimizer": {
            "name": config.optimizer,
            "lr": config.lr,
            "weight_decay": config.weight_decay,
            "hyperparameters": optimizer_hyperparameters(config.optimizer, config.optimizer_kwargs),
        },
    }


def write_summary(out_dir: Path, config: PretrainConfig, run: dict, ckpt_steps: dict[int, float]) -> None:
    """``pretrain.json``: the run, and per checkpoint its loss and query accuracy."""
    checkpoints = []
    for step, fraction in ckpt_steps.items():
        path = check_complete(out_dir / checkpoint_name(step), "checkpoint", "Re-run pretraining.")
        state = read_json(path / TRAINER_STATE_FILE)
        last_epoch = state["loss_history"][-max(1, run["steps_per_epoch"]):]
        entry = {
            "name": path.name,
            "step": step,
            "fraction": fraction,
            "learning_rate": state["learning_rate"],
            "train_loss_last_epoch": float(np.mean(last_epoch)),
        }
        if (path / QUERY_EVAL_FILE).is_file():
            table = accuracy_by_bucket(read_jsonl(path / QUERY_EVAL_FILE))
            entry["query_accuracy"] = float(table.loc["all", "accuracy"])
            entry["query_mean_target_prob"] = float(table.loc["all", "mean_target_prob"])
        checkpoints.append(entry)
    final_state = read_json(out_dir / checkpoints[-1]["name"] / TRAINER_STATE_FILE)
    atomic_write_json(out_dir / SUMMARY_FILE, {
        **{k: run[k] for k in SUMMARY_KEYS},
        "model_size": dataclasses.asdict(MODEL_SIZES[config.size]),
        "train_seconds": final_state["train_seconds"],
        "checkpoints": checkpoints,
        "final_checkpoint": checkpoints[-1]["name"],
    })


def final_checkpoint(out_dir: str | os.PathLike) -> Path:
    """Path of the final checkpoint of a finished pretraining run."""
    out_dir = Path(out_dir)
    summary_path = out_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise ArtifactError(
            f"{str(out_dir)!r} has no {SUMMARY_FILE}: pretraining did not finish there. "
            "Re-run pretraining; it resumes from the last complete checkpoint."
        )
    return out_dir / read_json(summary_path)["final_checkpoint"]
