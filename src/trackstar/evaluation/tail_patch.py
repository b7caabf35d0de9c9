"""Tail-patch, the paper's influence metric (SPEC §2.3).

From the final checkpoint with its optimizer state and final learning rate,
take one optimizer step on a proponent alone (its mean LM loss), measure the
query's target sequence probability, and restore the model and optimizer
exactly before the next proponent. A positive change means training on the
proponent raises the target's probability.

One step per *distinct* proponent serves every query that retrieved it: the
step does not depend on the query, so all of them are measured after it (each
query in a forward pass of its own, so that a cached value never depends on
which queries were measured with it). Across methods and queries the same
passages recur, which makes tail-patch of every method's top 10 affordable.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from ..io import ArtifactError, atomic_write_json_checked, read_json_checked
from ..lm.data import context_length, pad_token_id, passage_ids
from ..lm.evaluate import score_targets
from ..lm.pretrain import train_step

TAIL_PATCH_KS = (1, 3, 5, 10)
log = logging.getLogger("trackstar")


class _Snapshot:
    """Exact copy of parameters, buffers, optimizer state and hyperparameters."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = [t.detach().clone() for t in model.parameters()]
        self.buffers = [t.detach().clone() for t in model.buffers()]
        self.state = {p: {k: _clone(v) for k, v in s.items()} for p, s in optimizer.state.items()}
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.training = model.training

    @torch.no_grad()
    def restore(self) -> None:
        for t, saved in zip(self.model.parameters(), self.params, strict=True):
            t.copy_(saved)
            t.grad = None
        for t, saved in zip(self.model.buffers(), self.buffers, strict=True):
            t.copy_(saved)
        for p in list(self.optimizer.state):
            if p not in self.state:
                del self.optimizer.state[p]
        for p, saved in self.state.items():
            live = self.optimizer.state[p]
            for k in list(live):
                if k not in saved:
                    del live[k]
            for k, v in saved.items():
                if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape:
                    live[k].copy_(v)
                else:
                    live[k] = _clone(v)
        for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
            group.update(copy.deepcopy(saved))
        self.model.train(self.training)


def _clone(v):
    return v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)


@contextmanager
def restored(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Run the body, then put model and optimizer back exactly as they were."""
    snap = _Snapshot(model, optimizer)
    try:
        yield snap
    finally:
        snap.restore()


def _require_optimizer(checkpoint) -> None:
    if checkpoint.optimizer is None or checkpoint.learning_rate is None:
        raise ArtifactError(
            f"checkpoint {str(checkpoint.path)!r} has no optimizer state or learning rate, which "
            "tail-patch needs (one optimizer step from the final state). Use a checkpoint written "
            "by `trackstar pretrain`, or turn tail-patch off for this model."
        )


class _AfterCache:
    """Log-probabilities after one step on a proponent, kept on disk per proponent.

    The value depends only on the checkpoint, the proponent's text and the
    query, so one cache directory per checkpoint serves every method and every
    job of a sweep. Files are merged under a lock and replaced atomically.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.dir = Path(directory) if directory is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def query_key(query: dict) -> str:
        return hashlib.sha256(f"{query['prompt']}\0{query['target']}".encode()).hexdigest()[:16]

    def _file(self, pid: str, text: str) -> Path:
        digest = hashlib.sha256(f"{pid}\0{text}".encode()).hexdigest()[:24]
        return self.dir / f"{digest}.json"

    def load(self, pid: str, text: str) -> dict[str, float]:
        """The cached values of this proponent; a damaged file counts as empty (recomputed)."""
        path = None if self.dir is None else self._file(pid, text)
        if path is None or not path.is_file():
            return {}
        try:
            return read_json_checked(path)
        except ArtifactError as exc:
            log.warning("tail-patch cache: recomputing %s (%s)", pid, exc)
            return {}

    def add(self, pid: str, text: str, values: dict[str, float]) -> None:
        if self.dir is None:
            return
        path = self._file(pid, text)
        with FileLock(str(path) + ".lock"):
            merged = {**self.load(pid, text), **values}
            atomic_write_json_checked(path, merged)


def tail_patch(
    checkpoint,
    queries: Sequence[dict],
    proponents: Mapping[str, Sequence[tuple[str, str]]],
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Probability change of each query's target after one step on each of its proponents.

    ``checkpoint`` is a :class:`trackstar.lm.Checkpoint` with optimizer state;
    ``proponents`` maps a query's ``example_id`` to its ranked ``(id, text)``
    pairs. Returns one row per (query, rank): ``p_before``, ``p_after``,
    ``delta_pp`` (percentage points), ``relative`` (p_after / p_before - 1),
    ``delta_logprob``. ``cache_dir`` (one per checkpoint) keeps each
    proponent's results so that other methods and jobs skip its step.
    """
    _require_optimizer(checkpoint)
    model, tok, optimizer = checkpoint.model, checkpoint.tokenizer, checkpoint.optimizer
    by_id = {q["example_id"]: q for q in queries}
    unknown = [e for e in proponents if e not in by_id]
    if unknown:
        raise KeyError(f"tail_patch: proponents given for unknown query id(s) {unknown[:5]}")

    def measure(qids: Sequence[str]) -> list[float]:
        # One query per forward pass: a value must not depend on which other
        # queries share its batch (their padding changes the kernels' shapes and
        # the last bits), or the cache would make it depend on the order runs came in.
        return [lp for lp, _ in score_targets(model, tok, [by_id[q]["prompt"] for q in qids],
                                              [by_id[q]["target"] for q in qids], batch_size=1)]

    before = dict(zip(by_id, measure(list(by_id)), strict=True))

    # Who needs which proponent: one optimizer step per distinct passage.
    needed: dict[str, list[str]] = defaultdict(list)
    texts: dict[str, str] = {}
    for qid, ranked in proponents.items():
        for pid, text in ranked:
            texts[pid] = text
            if qid not in needed[pid]:
                needed[pid].append(qid)

    cache = _AfterCache(cache_dir)
    after: dict[tuple[str, str], float] = {}
    todo: dict[str, list[str]] = {}
    for pid, qids in needed.items():
        cached = cache.load(pid, texts[pid])
        missing = []
        for q in qids:
            key = cache.query_key(by_id[q])
            if key in cached:
                after[(q, pid)] = cached[key]
            else:
                missing.append(q)
        if missing:
            todo[pid] = missing

    ctx = context_length(model)
    with restored(model, optimizer) as snap:
        for pid in tqdm(sorted(todo), desc="tail-patch", unit="proponent", disable=not progress):
            model.eval()  # no dropout in the step or the measurement
            ids = passage_ids(tok, texts[pid], ctx)
            if len(ids) < 2:
                raise ValueError(f"tail_patch: proponent {pid!r} has fewer than 2 tokens; it has no LM loss to step on")
            # The pretraining step itself, at the final learning rate, on this
            # passage alone (no gradient clipping).
            train_step(model, optimizer, [ids], pad_token_id(tok), checkpoint.learning_rate, grad_clip=None)
            qids = todo[pid]
            for q, lp in zip(qids, measure(qids), strict=True):
                after[(q, pid)] = lp
            cache.add(pid, texts[pid], {cache.query_key(by_id[q]): after[(q, pid)] for q in qids})
            snap.restore()

    rows = []
    for qid, ranked in proponents.items():
        lp0 = before[qid]
        for rank, (pid, _) in enumerate(ranked):
            lp1 = after[(qid, pid)]
            p0, p1 = math.exp(lp0), math.exp(lp1)
            rows.append({
                "example_id": qid, "rank": rank, "proponent_id": pid, "p_before": p0, "p_after": p1,
                "delta_pp": 100.0 * (p1 - p0), "relative": math.expm1(lp1 - lp0),
                "delta_logprob": lp1 - lp0,
            })
    return pd.DataFrame(rows)


def tail_patch_at_k(per_pair: pd.DataFrame, ks: Sequence[int] = TAIL_PATCH_KS) -> pd.DataFrame:
    """Per query: mean over its top-k proponents of each change, for every k.

    Columns ``tail_patch@k`` (percentage points), ``tail_patch_rel@k`` and
    ``tail_patch_logprob@k``. A query with fewer than k proponents is an error:
    its mean would silently cover fewer passages than the others'.
    """
    out = []
    for qid, frame in per_pair.groupby("example_id", sort=False):
        frame = frame.sort_values("rank")
        row = {"example_id": qid}
        for k in ks:
            if len(frame) < k:
                raise ValueError(
                    f"tail-patch@{k}: query {qid!r} has only {len(frame)} proponents. Retrieve at "
                    f"least {k} per query or drop k={k} from the tail-patch ks."
                )
            top = frame.iloc[:k]
            row[f"tail_patch@{k}"] = float(np.mean(top["delta_pp"]))
            row[f"tail_patch_rel@{k}"] = float(np.mean(top["relative"]))
            row[f"tail_patch_logprob@{k}"] = float(np.mean(top["delta_logprob"]))
        out.append(row)
    return pd.DataFrame(out)
