"""Counterfactual retraining: a finished pretraining run's recipe on part of its corpus.

A retrain keeps everything of the run it repeats (tokenizer, config, seed,
data order, learning-rate schedule) and only drops passages: each step's batch
is the run's batch without the dropped passages, and a step whose whole batch
was dropped makes no update while the schedule still advances. Two retrains
therefore differ only in the passages they saw, which is what a
counterfactual asks, and a retrain that keeps every passage is the pretrained
model itself (a test checks it).

Keeping the run's data order rather than reshuffling the kept passages is a
choice: a reshuffle adds the noise of a new data order to every comparison,
and with our small worlds that noise is larger than the effect of removing ten
passages. Each epoch still passes once over every kept passage.

The outcome is each query's target log-probability under the retrained model
(no weights are kept: a retrain is cheap to repeat and its outcome is small).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from trackstar.device import resolve_device
from trackstar.io import ArtifactError, read_json
from trackstar.lm.config import PretrainConfig
from trackstar.lm.data import DataOrder, pad_token_id, tokenize_corpus
from trackstar.lm.evaluate import evaluate_queries
from trackstar.lm.pretrain import fresh_model, train_step
from trackstar.lm.run import SUMMARY_FILE, TOKENIZER_DIR
from trackstar.world.store import read_world

FINISHED, DIVERGED = "finished", "diverged"


def keep_mask(keep: Sequence[int] | np.ndarray | None, n_documents: int) -> np.ndarray:
    """A boolean mask over the corpus from kept document indices (None keeps all)."""
    if keep is None:
        return np.ones(n_documents, dtype=bool)
    keep = np.asarray(keep)
    if keep.dtype == bool:
        if keep.shape != (n_documents,):
            raise ValueError(f"a keep mask needs one entry per document ({n_documents}), got shape {keep.shape}")
        return keep.copy()
    if keep.size and (keep.min() < 0 or keep.max() >= n_documents):
        raise ValueError(f"kept document indices must lie in [0, {n_documents}); got {keep.min()}..{keep.max()}")
    mask = np.zeros(n_documents, dtype=bool)
    mask[keep.astype(np.int64)] = True
    return mask


def retrain(run_dir: str | os.PathLike, world_dir: str | os.PathLike, keep=None,
            device: str | torch.device | None = None, progress: bool = False) -> dict:
    """Retrain the run in ``run_dir`` from scratch on the kept documents of ``world_dir``.

    ``keep``: document indices (positions in the world's corpus) or a boolean
    mask; None keeps all. Returns the outcome: ``status`` (``finished``, or
    ``diverged`` when the loss became NaN or infinite, with no log-probabilities),
    ``target_logprob`` (example id -> log p(target | prompt)), ``n_kept``,
    ``skipped_steps``, ``final_loss`` (mean loss of the last ``steps_per_epoch`` updates) and ``seconds``.
    """
    device = resolve_device(device) if device is not None else torch.device("cpu")
    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise ArtifactError(f"{str(run_dir)!r} has no {SUMMARY_FILE}: only a finished pretraining run can be "
                            "retrained. Finish pretraining first.")
    summary = read_json(summary_path)
    config = PretrainConfig(**{**summary["config"], "checkpoint_fractions": (1.0,)})
    manifest, corpus, queries = read_world(world_dir)
    if manifest.get("content_hash") != summary["world"]["content_hash"]:
        raise ArtifactError(f"{str(world_dir)!r} is not the world {str(run_dir)!r} was trained on "
                            "(its content hash differs). Give the run's own world.")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / TOKENIZER_DIR)
    examples, _ = tokenize_corpus(tokenizer, [doc["text"] for doc in corpus], config.context_length)
    mask = keep_mask(keep, len(examples))
    order = DataOrder(len(examples), config.batch_size, config.seed)
    total_steps = config.total_steps(order.steps_per_epoch)
    model, optimizer = fresh_model(config, tokenizer, device)
    pad_id = pad_token_id(tokenizer)
    model.train()
    losses: list[float] = []
    skipped = 0
    t0 = time.perf_counter()
    outcome = {"n_documents": len(examples), "n_kept": int(mask.sum()), "total_steps": total_steps}
    for step in tqdm(range(total_steps), disable=not progress, desc="retrain", unit="step"):
        batch = [examples[i] for i in order.batch_indices(step) if mask[i]]
        if not batch:
            skipped += 1
            continue
        loss = train_step(model, optimizer, batch, pad_id, config.learning_rate(step, total_steps), config.grad_clip)
        if not math.isfinite(loss):
            return {**outcome, "status": DIVERGED, "diverged_at_step": step, "target_logprob": {},
                    "skipped_steps": skipped, "final_loss": loss, "seconds": time.perf_counter() - t0}
        losses.append(loss)
    records = evaluate_queries(model, tokenizer, queries, config.eval_batch_size)
    last_epoch = losses[-order.steps_per_epoch:]
    return {
        **outcome,
        "status": FINISHED,
        "target_logprob": {r["example_id"]: r["target_logprob"] for r in records},
        "skipped_steps": skipped,
        "final_loss": float(np.mean(last_epoch)) if last_epoch else float("nan"),
        "seconds": time.perf_counter() - t0,
    }
