"""Pretraining a small causal LM on the world's open-set corpus.

Each document is one passage, ``bos + text + eos`` cut to the context length
(:mod:`trackstar.lm.data`); a batch is right-padded and padding is masked from
the loss. The data order is a pure function of (seed, step), so re-running
with the same config and world resumes from the last complete checkpoint and
ends bit-identical to an uninterrupted run (:mod:`trackstar.lm.run` keeps the
run directory).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trackstar.device import resolve_device
from trackstar.io import ensure_writable_dir, remove_stale_partials
from trackstar.lm.checkpoint import load_checkpoint, load_rng_state, restore_rng_state, save_checkpoint
from trackstar.lm.config import PRESETS, PretrainConfig
from trackstar.lm.data import DataOrder, lm_batch, lm_loss, pad_token_id, tokenize_corpus
from trackstar.lm.evaluate import QUERY_EVAL_FILE, evaluate_queries, write_query_eval
from trackstar.lm.models import build_model
from trackstar.lm.optim import build_optimizer, set_learning_rate
from trackstar.lm.run import (
    checkpoint_name,
    checkpoint_steps,
    corpus_tokenizer,
    final_checkpoint,
    is_finished,
    latest_checkpoint,
    run_key,
    run_record,
    write_summary,
)
from trackstar.world.store import read_world

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "PretrainConfig", "final_checkpoint", "pretrain_model", "read_world", "run_key"]


def pretrain_model(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PretrainConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> Path:
    """Pretrain (or resume, or reuse) a model on ``world_dir``'s corpus into ``out_dir``.

    Returns ``out_dir``; its ``pretrain.json`` lists the checkpoints, the last
    of which is the final model with its optimizer state and final learning rate.
    ``device`` (``auto``, ``cpu``, ``cuda[:N]``, ``mps``; None: the CPU) is where
    it trains; checkpoints are loadable anywhere.
    """
    device = resolve_device(device) if device is not None else torch.device("cpu")
    config = config or PretrainConfig()
    manifest, corpus, queries = read_world(world_dir)
    out_dir = ensure_writable_dir(out_dir, "pretraining output directory")
    key = run_key(config, manifest)
    if is_finished(out_dir, key):
        return out_dir
    remove_stale_partials(out_dir)
    texts = [doc["text"] for doc in corpus]
    tokenizer = corpus_tokenizer(out_dir, texts, config.vocab_size)
    examples, n_cut = tokenize_corpus(tokenizer, texts, config.context_length)
    if n_cut:
        warnings.warn(f"{n_cut} of {len(examples)} documents are longer than context_length="
                      f"{config.context_length} tokens and were truncated", stacklevel=2)
    order = DataOrder(len(examples), config.batch_size, config.seed)
    total_steps = config.total_steps(order.steps_per_epoch)
    ckpt_steps = checkpoint_steps(config, total_steps)
    model, optimizer, trainer_state = _start_or_resume(out_dir, key, config, tokenizer, total_steps, device)
    run = run_record(config, key, manifest, world_dir, order, n_cut, model)
    losses, seconds = trainer_state["loss_history"], trainer_state["train_seconds"]
    pad_id = pad_token_id(tokenizer)

    model.train()
    bar = tqdm(total=total_steps, initial=trainer_state["step"], disable=not progress,
               desc=f"pretrain {config.family}-{config.size}", unit="step")
    for step in range(trainer_state["step"], total_steps):
        t0 = time.perf_counter()
        losses.append(train_step(model, optimizer, [examples[i] for i in order.batch_indices(step)], pad_id,
                                 config.learning_rate(step, total_steps), config.grad_clip))
        seconds += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        if step + 1 in ckpt_steps:
            state = {**run, "step": step + 1, "fraction": ckpt_steps[step + 1],
                     "epoch": (step + 1) / order.steps_per_epoch, "loss_history": losses,
                     "train_seconds": seconds}
            _checkpoint(out_dir, model, tokenizer, optimizer, state, queries, config)
    bar.close()
    write_summary(out_dir, config, run, ckpt_steps)
    return out_dir


def train_step(model, optimizer, passages: list[list[int]], pad_id: int, lr: float,
               grad_clip: float | None) -> float:
    """One optimizer step on a batch of passages at learning rate ``lr``; returns its loss.

    The one update rule of pretraining, of counterfactual retraining
    (:mod:`trackstar.lm.retrain`), so a retrain on the whole corpus is the
    pretrained model, and of tail-patch's step on one proponent
    (:mod:`trackstar.evaluation.tail_patch`). The step sees the gradient of
    these passages alone: gradients the model already holds are dropped first,
    and none are left behind.
    """
    set_learning_rate(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss = lm_loss(model, lm_batch(passages, pad_id))
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def fresh_model(config: PretrainConfig, tokenizer, device: torch.device):
    """(model, optimizer) at step 0 of ``config``'s run, and the torch RNG seeded for it."""
    model = build_model(
        config.family, config.size, len(tokenizer), config.context_length, config.seed,
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    ).to(device)
    optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                                config.optimizer_kwargs)
    torch.manual_seed(config.seed)
    return model, optimizer


def _start_or_resume(out_dir: Path, key: str, config: PretrainConfig, tokenizer, total_steps: int,
                     device: torch.device):
    """(model, optimizer, trainer state) on ``device`` from the last checkpoint, or fresh at step 0."""
    resume_from = latest_checkpoint(out_dir, key)
    if resume_from is not None:
        loaded = load_checkpoint(resume_from, device=device)
        restore_rng_state(load_rng_state(resume_from))
        state = {k: loaded.trainer_state[k] for k in ("step", "loss_history", "train_seconds")}
        log.info("resuming pretraining from %s (step %d of %d)", resume_from, state["step"], total_steps)
        return loaded.model, loaded.optimizer, state
    model, optimizer = fresh_model(config, tokenizer, device)
    return model, optimizer, {"step": 0, "loss_history": [], "train_seconds": 0.0}


def _checkpoint(out_dir: Path, model, tokenizer, optimizer, state: dict, queries: list[dict],
                config: PretrainConfig) -> None:
    """Save a checkpoint with the query evaluation of the model it holds."""
    # The saved learning rate is the one the next step would use: at the end,
    # the final learning rate that tail-patch steps with.
    set_learning_rate(optimizer, config.learning_rate(state["step"], state["total_steps"]))
    records = evaluate_queries(model, tokenizer, queries, config.eval_batch_size) if queries else None
    model.train()
    save_checkpoint(
        out_dir / checkpoint_name(state["step"]), model, tokenizer, optimizer, state,
        write_extra=(lambda tmp: write_query_eval(tmp / QUERY_EVAL_FILE, records))
        if records is not None else None,
    )
