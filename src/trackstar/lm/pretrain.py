"""Pretraining a small causal LM on the world's open-set corpus.

Each document is one example, ``bos + text + eos``, cut to the context length;
a batch is right-padded to its longest example and padding is masked from the
loss. The data order is a seeded permutation per epoch, a pure function of
(seed, epoch), so the position in the data is just the step count and a
resumed run sees exactly the batches the killed one would have.

Output directory::

    out_dir/
      tokenizer/                 trained BPE tokenizer (atomic, COMPLETE)
      checkpoint-0000050/        one per checkpoint fraction (atomic, COMPLETE)
      ...
      pretrain.json              written last, when training completes

Re-running with the same config and world resumes from the last complete
checkpoint (partial directories left by a killed run are removed); a run dir
holding a different config or world is refused, never mixed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trackstar.io import (
    ArtifactError,
    atomic_directory,
    atomic_write_json,
    check_complete,
    config_hash,
    ensure_writable_dir,
    is_complete,
    read_json,
    read_jsonl,
    remove_stale_partials,
    verify_complete,
)
from trackstar.lm.checkpoint import (
    TRAINER_STATE_FILE,
    load_checkpoint,
    load_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from trackstar.lm.evaluate import QUERY_EVAL_FILE, accuracy_by_bucket, evaluate_queries, write_query_eval
from trackstar.lm.models import MODEL_SIZES, build_model, check_family, check_size, count_parameters
from trackstar.lm.optim import (
    LR_DECAYS,
    build_optimizer,
    check_optimizer,
    learning_rate_at,
    optimizer_hyperparameters,
    set_learning_rate,
)
from trackstar.lm.tokenizer import MIN_VOCAB_SIZE, train_tokenizer

log = logging.getLogger(__name__)

CORPUS_FILE = "c4_corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "pretrain.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_PREFIX = "checkpoint-"
IGNORE_INDEX = -100


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


# Presets per model size. ``micro`` trains in seconds (tests); ``tiny`` is the
# default reproduction model, a few minutes on 2 CPU cores for a world of a few
# thousand short documents; ``small`` / ``medium`` are for bigger machines.
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


# --------------------------------------------------------------------------- data

def read_world(world_dir: str | os.PathLike) -> tuple[dict, list[dict], list[dict]]:
    """(manifest, corpus documents, queries) of a world directory; queries may be absent."""
    world_dir = Path(world_dir)
    hint = "Build the world first (trackstar world) or pass the right --world directory."
    if not world_dir.is_dir():
        raise ArtifactError(f"world directory {str(world_dir)!r} does not exist. {hint}")
    for name in (MANIFEST_FILE, CORPUS_FILE):
        if not (world_dir / name).is_file():
            raise ArtifactError(f"world directory {str(world_dir)!r} has no {name}. {hint}")
    manifest = read_json(world_dir / MANIFEST_FILE)
    if "content_hash" not in manifest:
        raise ArtifactError(f"{str(world_dir / MANIFEST_FILE)!r} has no content_hash. {hint}")
    corpus = read_jsonl(world_dir / CORPUS_FILE)
    if not corpus:
        raise ArtifactError(f"{str(world_dir / CORPUS_FILE)!r} is empty. {hint}")
    queries = read_jsonl(world_dir / QUERIES_FILE) if (world_dir / QUERIES_FILE).is_file() else []
    return manifest, corpus, queries


def tokenize_corpus(tokenizer, texts: list[str], context_length: int) -> tuple[list[list[int]], int]:
    """Each text as ``bos + ids + eos`` cut to ``context_length``; also the count cut."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples, truncated = [], 0
    for ids in encoded:
        ids = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        if len(ids) > context_length:
            truncated += 1
            ids = ids[:context_length]
        examples.append(ids)
    return examples, truncated


def collate(examples: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are -100 on padding."""
    width = max(len(ids) for ids in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ids in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding tokens of ``batch``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


class DataOrder:
    """Seeded per-epoch permutation; batch ``step`` is a pure function of ``step``."""

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


# --------------------------------------------------------------------------- run

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


def run_key(config: PretrainConfig, manifest: dict) -> str:
    """Content address of a pretraining run: its config and the world's content hash.

    ``eval_batch_size`` changes no weight, so it is left out.
    """
    settings = {k: v for k, v in config.to_dict().items() if k != "eval_batch_size"}
    return config_hash({"pretrain": settings, "world": manifest["content_hash"]})


def _latest_checkpoint(out_dir: Path, key: str) -> Path | None:
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


def _tokenizer(out_dir: Path, texts: list[str], vocab_size: int):
    from transformers import AutoTokenizer

    path = out_dir / TOKENIZER_DIR
    if not is_complete(path):
        if path.exists():
            shutil.rmtree(path)
        with atomic_directory(path) as tmp:
            train_tokenizer(texts, vocab_size).save_pretrained(tmp)
    verify_complete(path, "tokenizer", "Delete it and re-run pretraining.")
    return AutoTokenizer.from_pretrained(path)


def pretrain_model(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: PretrainConfig | None = None,
    progress: bool = True,
) -> Path:
    """Pretrain (or resume, or reuse) a model on ``world_dir``'s corpus into ``out_dir``.

    Returns ``out_dir``; its ``pretrain.json`` lists the checkpoints, the last
    of which is the final model with its optimizer state and final learning rate.
    """
    config = config or PretrainConfig()
    manifest, corpus, queries = read_world(world_dir)
    out_dir = ensure_writable_dir(out_dir, "pretraining output directory")
    key = run_key(config, manifest)
    summary_path = out_dir / SUMMARY_FILE
    if summary_path.exists():
        summary = read_json(summary_path)
        if summary.get("run_key") != key:
            raise ArtifactError(
                f"{str(out_dir)!r} holds a finished pretraining run with other settings or "
                "another world. Choose another output directory or delete this one."
            )
        check_complete(out_dir / summary["final_checkpoint"], "final checkpoint",
                       f"Delete {str(summary_path)!r} and re-run pretraining.")
        return out_dir

    remove_stale_partials(out_dir)
    texts = [doc["text"] for doc in corpus]
    tokenizer = _tokenizer(out_dir, texts, config.vocab_size)
    examples, n_truncated = tokenize_corpus(tokenizer, texts, config.context_length)
    if n_truncated:
        warnings.warn(
            f"{n_truncated} of {len(examples)} documents are longer than context_length="
            f"{config.context_length} tokens and were truncated",
            stacklevel=2,
        )
    order = DataOrder(len(examples), config.batch_size, config.seed)
    total_steps = config.max_steps or config.epochs * order.steps_per_epoch
    warmup_steps = round(config.warmup_fraction * total_steps)
    ckpt_steps = checkpoint_steps(config, total_steps)

    def lr_at(update: int) -> float:
        return learning_rate_at(update, total_steps, config.lr, warmup_steps,
                                config.final_lr_fraction, config.lr_decay)

    resume_from = _latest_checkpoint(out_dir, key)
    if resume_from is not None:
        loaded = load_checkpoint(resume_from)
        model, optimizer = loaded.model, loaded.optimizer
        start_step = loaded.trainer_state["step"]
        loss_history = list(loaded.trainer_state["loss_history"])
        train_seconds = loaded.trainer_state["train_seconds"]
        restore_rng_state(load_rng_state(resume_from))
        log.info("resuming pretraining from %s (step %d of %d)", resume_from, start_step, total_steps)
    else:
        model = build_model(
            config.family, config.size, len(tokenizer), config.context_length, config.seed,
            tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
        )
        optimizer = build_optimizer(model, config.optimizer, config.lr, config.weight_decay,
                                    config.optimizer_kwargs)
        start_step, loss_history, train_seconds = 0, [], 0.0
        torch.manual_seed(config.seed)

    optimizer_spec = {
        "name": config.optimizer,
        "lr": config.lr,
        "weight_decay": config.weight_decay,
        "hyperparameters": optimizer_hyperparameters(config.optimizer, config.optimizer_kwargs),
    }
    base_state = {
        "run_key": key,
        "config": config.to_dict(),
        "seed": config.seed,
        "world": {k: manifest.get(k) for k in ("content_hash", "seed", "profile")},
        "world_dir": str(Path(world_dir).resolve()),
        "total_steps": total_steps,
        "steps_per_epoch": order.steps_per_epoch,
        "warmup_steps": warmup_steps,
        "final_learning_rate": lr_at(total_steps),
        "n_documents": len(examples),
        "n_truncated": n_truncated,
        "n_parameters": count_parameters(model),
        "optimizer": optimizer_spec,
    }

    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=total_steps, initial=start_step, disable=not progress,
               desc=f"pretrain {config.family}-{config.size}", unit="step")
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        set_learning_rate(optimizer, lr_at(step))
        batch = collate([examples[i] for i in order.batch_indices(step)], pad_id)
        loss = lm_loss(model, batch)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_history.append(loss.item())
        train_seconds += time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss_history[-1]:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")

        done = step + 1
        if done in ckpt_steps:
            # The saved learning rate is the one the next step would use: at the
            # end, the final learning rate that tail-patch steps with.
            set_learning_rate(optimizer, lr_at(done))
            state = {
                **base_state,
                "step": done,
                "fraction": ckpt_steps[done],
                "epoch": done / order.steps_per_epoch,
                "loss_history": loss_history,
                "train_seconds": train_seconds,
            }
            records = evaluate_queries(model, tokenizer, queries, config.eval_batch_size) if queries else None
            model.train()
            save_checkpoint(
                out_dir / checkpoint_name(done), model, tokenizer, optimizer, state,
                write_extra=(lambda tmp, r=records: write_query_eval(tmp / QUERY_EVAL_FILE, r))
                if records is not None else None,
            )
    bar.close()

    checkpoints = []
    for step, fraction in ckpt_steps.items():
        path = check_complete(out_dir / checkpoint_name(step), "checkpoint", "Re-run pretraining.")
        state = read_json(path / TRAINER_STATE_FILE)
        entry = {
            "name": path.name,
            "step": step,
            "fraction": fraction,
            "learning_rate": state["learning_rate"],
            "train_loss_last_epoch": float(np.mean(state["loss_history"][-max(1, order.steps_per_epoch):])),
        }
        if (path / QUERY_EVAL_FILE).is_file():
            table = accuracy_by_bucket(read_jsonl(path / QUERY_EVAL_FILE))
            entry["query_accuracy"] = float(table.loc["all", "accuracy"])
            entry["query_mean_target_prob"] = float(table.loc["all", "mean_target_prob"])
        checkpoints.append(entry)
    summary = {
        **{k: base_state[k] for k in ("run_key", "config", "world", "world_dir", "total_steps",
                                      "steps_per_epoch", "n_documents", "n_truncated",
                                      "n_parameters", "final_learning_rate")},
        "model_size": dataclasses.asdict(MODEL_SIZES[config.size]),
        "train_seconds": read_json(out_dir / checkpoints[-1]["name"] / TRAINER_STATE_FILE)["train_seconds"],
        "checkpoints": checkpoints,
        "final_checkpoint": checkpoints[-1]["name"],
    }
    atomic_write_json(summary_path, summary)
    return out_dir


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
