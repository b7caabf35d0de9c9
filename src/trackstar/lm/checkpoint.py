"""Checkpoints: model + tokenizer + optimizer state + trainer state, written atomically.

A checkpoint directory holds

- the HF model (``config.json``, ``model.safetensors``) and tokenizer files,
- ``optimizer.pt``: ``optimizer.state_dict()``, whose groups carry
  ``param_names`` (so second moments can be matched by parameter name),
- ``trainer_state.json``: step, learning rate, optimizer name and
  hyperparameters, the param-name -> optimizer-index map, world hash, seed,
  loss history,
- ``rng_state.pt``: torch / numpy / python RNG states for exact resumption,
- optionally ``query_eval.jsonl`` (see :mod:`trackstar.lm.evaluate`),
- ``COMPLETE``: the content hash, written last (see :mod:`trackstar.io`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging as hf_logging

from trackstar.device import resolve_device
from trackstar.io import ArtifactError, atomic_directory, atomic_write_json, read_json, verify_complete
from trackstar.lm.optim import build_optimizer, param_name_to_index

OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_STATE_FILE = "rng_state.pt"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", OPTIMIZER_FILE, TRAINER_STATE_FILE)

REBUILD_HINT = (
    "Delete this checkpoint directory and re-run pretraining with the same settings (the "
    "run's own command, or pretrain_model): it resumes from the last complete checkpoint "
    "before it and writes it again."
)


@dataclass
class Checkpoint:
    """A loaded causal LM with, for our own checkpoints, its optimizer state.

    ``optimizer`` and ``learning_rate`` are ``None`` for a model loaded through
    :func:`load_hf_causal_lm`, which has no optimizer state.
    """

    model: PreTrainedModel
    tokenizer: Any
    optimizer: torch.optim.Optimizer | None = None
    learning_rate: float | None = None
    trainer_state: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def step(self) -> int | None:
        return self.trainer_state.get("step")

    def optimizer_state_by_name(self) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state of each parameter keyed by parameter name.

        Adafactor: ``row_var`` / ``col_var`` (factored, for matrices) or
        ``variance``, and ``step``; AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``.
        Tensors are the optimizer's own (not copies).
        """
        if self.optimizer is None:
            raise ArtifactError(
                f"checkpoint {str(self.path)!r} has no optimizer state (it was loaded as a "
                "plain HF model); use a checkpoint written by pretraining, or estimate V."
            )
        params = {id(p): name for group in self.optimizer.param_groups
                  for name, p in zip(group["param_names"], group["params"], strict=True)}
        return {params[id(p)]: state for p, state in self.optimizer.state.items()}


def capture_rng_state() -> dict:
    """torch / numpy / python RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian),
        "python": (version, torch.tensor(internal, dtype=torch.int64), gauss_next),
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss_next))


@contextlib.contextmanager
def _without_hf_progress_bars() -> Iterator[None]:
    """Keep transformers' per-shard save/load bars out of the training log."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    path: str | os.PathLike,
    model: PreTrainedModel,
    tokenizer,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically; ``write_extra(tmp_dir)`` adds more files."""
    path = Path(path)
    state = dict(trainer_state)
    state["learning_rate"] = optimizer.param_groups[0]["lr"]
    state["param_name_to_index"] = param_name_to_index(optimizer)
    with atomic_directory(path) as tmp, _without_hf_progress_bars():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(capture_rng_state(), tmp / RNG_STATE_FILE)
        atomic_write_json(tmp / TRAINER_STATE_FILE, state)
        if write_extra is not None:
            write_extra(tmp)
    return path


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Raise :class:`ArtifactError` unless ``path`` is a complete, intact checkpoint."""
    path = Path(path)
    if path.is_dir():
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise ArtifactError(
                f"checkpoint {str(path)!r} is missing {', '.join(missing)}: it is partial "
                f"or corrupted. {REBUILD_HINT}"
            )
    return verify_complete(path, "checkpoint", REBUILD_HINT)


def load_checkpoint(
    path: str | os.PathLike, with_optimizer: bool = True, verify: bool = True,
    device: str | torch.device | None = None,
) -> Checkpoint:
    """Load a pretraining checkpoint: model, tokenizer, optimizer with its state, lr.

    The optimizer is rebuilt over the model's parameters from the recorded name
    and hyperparameters, and its saved state (second moments, step counts,
    learning rate) loaded exactly. ``verify`` re-hashes the directory against
    its ``COMPLETE`` marker. ``device`` places the model (and so the optimizer
    state) there; None keeps the CPU.
    """
    path = Path(path)
    if verify:
        check_checkpoint(path)
    state = read_json(path / TRAINER_STATE_FILE)
    try:
        with _without_hf_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"checkpoint {str(path)!r} could not be loaded ({exc}). {REBUILD_HINT}") from exc
    model.eval()
    if device is not None:
        model.to(resolve_device(device))  # before the optimizer is built: its state follows the parameters
    optimizer = None
    learning_rate = state.get("learning_rate")
    if with_optimizer:
        optimizer = _load_optimizer(path, model, state)
        learning_rate = optimizer.param_groups[0]["lr"]
    return Checkpoint(model, tokenizer, optimizer, learning_rate, state, path)


def _load_optimizer(path: Path, model: PreTrainedModel, state: dict) -> torch.optim.Optimizer:
    spec = state["optimizer"]
    optimizer = build_optimizer(
        model, spec["name"], spec["lr"], spec["weight_decay"], spec["hyperparameters"]
    )
    try:
        saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ArtifactError(
            f"{str(path / OPTIMIZER_FILE)!r} could not be read ({exc}). {REBUILD_HINT}"
        ) from exc
    built_names = [g["param_names"] for g in optimizer.param_groups]
    saved_names = [g.get("param_names") for g in saved["param_groups"]]
    if built_names != saved_names:
        raise ArtifactError(
            f"optimizer state in {str(path)!r} is for other parameters than the model "
            f"(saved groups {saved_names!r}). {REBUILD_HINT}"
        )
    optimizer.load_state_dict(saved)
    return optimizer


def load_rng_state(path: str | os.PathLike) -> dict:
    return torch.load(Path(path) / RNG_STATE_FILE, map_location="cpu", weights_only=True)


def load_hf_causal_lm(name_or_path: str | os.PathLike, device: str | torch.device | None = None,
                      adapter: str | os.PathLike | None = None, **from_pretrained_kwargs) -> Checkpoint:
    """Any HF causal LM and its tokenizer, by hub name or local path (no optimizer state).

    ``device`` places the model there (None: the CPU). ``adapter``: a PEFT adapter
    directory (``save_pretrained``'s) loaded on top, trainable, so attribution is over
    the adapter's weights (needs the ``peft`` extra). Keyword arguments go to
    both ``from_pretrained`` calls (e.g. ``local_files_only=True``,
    ``revision=...``, ``torch_dtype=torch.bfloat16``).
    """
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **from_pretrained_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **from_pretrained_kwargs)
    except OSError as exc:
        raise ArtifactError(
            f"could not load a causal LM from {str(name_or_path)!r} ({exc}). Pass a local "
            "directory written by save_pretrained, or a hub name with network access."
        ) from exc
    state = {"source": str(name_or_path)}
    if adapter is not None:
        model, state["adapter_hash"], state["adapter_parameters"] = _load_adapter(model, adapter)
    model.eval()
    if device is not None:
        model.to(resolve_device(device))
    path = Path(name_or_path) if Path(name_or_path).exists() else None
    return Checkpoint(model, tokenizer, path=path, trainer_state=state)


def _load_adapter(model, adapter: str | os.PathLike):
    """(the PEFT model of ``model`` with the adapter in ``adapter``, trainable; a hash of the
    adapter's files; the number of its trainable parameters)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ArtifactError(f"model.adapter={str(adapter)!r} needs peft: pip install 'trackstar[peft]'.") from None
    directory = Path(adapter).expanduser()
    if not (directory / "adapter_config.json").is_file():
        raise ArtifactError(f"model.adapter={str(adapter)!r} has no adapter_config.json; give the directory "
                            "the adapter was saved to (PeftModel.save_pretrained).")
    try:
        model = PeftModel.from_pretrained(model, directory, is_trainable=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ArtifactError(f"model.adapter={str(adapter)!r} could not be loaded on this base model "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); was it trained on it?") from None
    digest = hashlib.sha256()
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name.startswith("adapter_"):
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return model, digest.hexdigest()[:12], sum(p.numel() for p in model.parameters() if p.requires_grad)
