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
from ..lm.data import context_length, pad_token_id, passage_ids, query_ids
from ..lm.evaluate import score_targets
from ..lm.pretrain import train_step
from .batched_step import DEFAULT_MEMORY_BYTES, KERNELS, BatchedTailPatch, Unsupported, passage_width, query_width

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


def _measure_one_by_one(model, tok, by_id: Mapping[str, dict], qids: Sequence[str]) -> list[float]:
    # One query per forward pass: a value must not depend on which other
    # queries share its batch (their padding changes the kernels' shapes and
    # the last bits), or the cache would make it depend on the order runs came in.
    return [lp for lp, _ in score_targets(model, tok, [by_id[q]["prompt"] for q in qids],
                                          [by_id[q]["target"] for q in qids], batch_size=1)]


def _measure_batched(engine: BatchedTailPatch, params, index: Sequence[int],
                     queries: Sequence[tuple[list[int], int]]) -> list[float]:
    """Log-probabilities of ``queries[j]`` under ``params[index[j]]``, in order (grouped by padded width)."""
    out: list[float] = [0.0] * len(queries)
    groups: dict[int, list[int]] = defaultdict(list)
    for j, (ids, _) in enumerate(queries):
        groups[query_width(len(ids), engine.max_width)].append(j)
    for members in groups.values():
        for start in range(0, len(members), engine.chunk):
            part = members[start:start + engine.chunk]
            for j, lp in zip(part, engine.log_probs(params, [index[j] for j in part], [queries[j] for j in part]),
                             strict=True):
                out[j] = lp
    return out


def _chunks_by_length(todo: Mapping[str, Sequence[str]], passages: Mapping[str, list[int]], size: int,
                      max_width: int | None, first_key):
    """Proponents grouped by padded token length, in chunks of at most ``size``.

    Within a length, ordered by ``first_key`` of their first query, then by id: the
    first queries of a chunk then fall in runs of one padded width, whose stepped
    parameters are read in place rather than copied.
    """
    by_length: dict[int, list[str]] = defaultdict(list)
    for pid in sorted(todo, key=lambda p: (first_key(todo[p][0]), p)):
        by_length[passage_width(len(passages[pid]), max_width)].append(pid)
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), size):
            yield group[start:start + size]


def _batched_engine(checkpoint, passages: Mapping[str, list[int]], batched: bool,
                    memory_bytes: int) -> BatchedTailPatch | None:
    """The batched path for this checkpoint, or None (said in the log) where it cannot be taken."""
    if not batched or not passages:
        return None
    model, optimizer = checkpoint.model, checkpoint.optimizer
    sample = next(iter(passages.values()))
    was_training = model.training
    model.eval()  # no dropout in the step or the measurement
    try:
        engine = BatchedTailPatch(model, optimizer, checkpoint.learning_rate, sample,
                                  pad_token_id(checkpoint.tokenizer), memory_bytes)
        if engine.chunk < 2:
            raise Unsupported(f"a stacked parameter set does not fit {memory_bytes} bytes twice")
        engine.probe(sample)  # the model's forward must vmap; find out before any value is kept
    except (Unsupported, RuntimeError) as exc:
        model.train(was_training)
        log.info("tail-patch: one proponent at a time (%s)", exc)
        return None
    return engine


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

    def __init__(self, directory: str | os.PathLike | None, flavour: str):
        self.dir = Path(directory) if directory is not None else None
        self.flavour = flavour
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def query_key(query: dict) -> str:
        return hashlib.sha256(f"{query['prompt']}\0{query['target']}".encode()).hexdigest()[:16]

    def _file(self, pid: str, text: str) -> Path:
        # The two paths agree within float tolerance, not to the bit: each keeps its own values.
        tag = "" if self.flavour == "sequential" else f"\0{self.flavour}"
        digest = hashlib.sha256(f"{pid}\0{text}{tag}".encode()).hexdigest()[:24]
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
    batched: bool = True,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> pd.DataFrame:
    """Probability change of each query's target after one step on each of its proponents.

    ``checkpoint`` is a :class:`trackstar.lm.Checkpoint` with optimizer state;
    ``proponents`` maps a query's ``example_id`` to its ranked ``(id, text)``
    pairs. Returns one row per (query, rank): ``p_before``, ``p_after``,
    ``delta_pp`` (percentage points), ``relative`` (p_after / p_before - 1),
    ``delta_logprob``. ``cache_dir`` (one per checkpoint) keeps each
    proponent's results so that other methods and jobs skip its step.
    ``batched`` steps many proponents at once (:mod:`.batched_step`) where
    the optimizer and the model allow it, within ``memory_bytes`` of stacked
    parameters; values equal the one-at-a-time step's within float tolerance.
    """
    _require_optimizer(checkpoint)
    by_id = {q["example_id"]: q for q in queries}
    unknown = [e for e in proponents if e not in by_id]
    if unknown:
        raise KeyError(f"tail_patch: proponents given for unknown query id(s) {unknown[:5]}")

    # Who needs which proponent: one optimizer step per distinct passage.
    needed: dict[str, list[str]] = defaultdict(list)
    texts: dict[str, str] = {}
    for qid, ranked in proponents.items():
        for pid, text in ranked:
            texts[pid] = text
            if qid not in needed[pid]:
                needed[pid].append(qid)
    after, before = _measure(checkpoint, by_id, needed, texts, progress, cache_dir, batched, memory_bytes)

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


def one_step_effects(
    checkpoint,
    queries: Sequence[dict],
    passages: Mapping[str, str],
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    batched: bool = True,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    desc: str = "one-step effects",
) -> tuple[np.ndarray, np.ndarray]:
    """Every query's target log-probability before, and after one step on each passage.

    The exact one-step effect of every (query, passage) pair, measured as
    :func:`tail_patch` measures it (same step, same kernels, same cache: a value
    here is bit for bit the value tail-patch reads for that pair). Returns
    ``(before, after)``: (queries,) and (queries, passages) float64 log-probabilities
    in the order given; ``after - before`` is the change in log p.
    """
    _require_optimizer(checkpoint)
    by_id = {q["example_id"]: q for q in queries}
    if len(by_id) != len(queries):
        raise ValueError("one_step_effects: query example_ids must be unique")
    qids = list(by_id)
    needed = {pid: list(qids) for pid in passages}
    after, before = _measure(checkpoint, by_id, needed, dict(passages), progress, cache_dir, batched, memory_bytes,
                             desc=desc)
    return (np.array([before[q] for q in qids]),
            np.array([[after[(q, pid)] for pid in passages] for q in qids]))


def _measure(checkpoint, by_id, needed, texts, progress, cache_dir, batched, memory_bytes, desc="tail-patch"):
    """Tokenize, then :func:`_after_and_before` with the model put back in its mode."""
    model, tok = checkpoint.model, checkpoint.tokenizer
    ctx = context_length(model)
    encoded = {q: query_ids(tok, by_id[q]["prompt"], by_id[q]["target"], ctx) for q in by_id}
    passages = {pid: passage_ids(tok, texts[pid], ctx) for pid in needed}
    for pid, ids in passages.items():
        if len(ids) < 2:
            raise ValueError(f"tail_patch: proponent {pid!r} has fewer than 2 tokens; it has no LM loss to step on")
    was_training = model.training
    try:
        return _after_and_before(checkpoint, by_id, encoded, needed, texts, passages, progress,
                                 cache_dir, batched, memory_bytes, desc)
    finally:
        model.train(was_training)


def _after_and_before(checkpoint, by_id, encoded, needed, texts, passages, progress, cache_dir, batched,
                      memory_bytes, desc="tail-patch") -> tuple[dict[tuple[str, str], float], dict[str, float]]:
    """(log p after each needed step per (query, proponent), log p before per query)."""
    model, tok, optimizer = checkpoint.model, checkpoint.tokenizer, checkpoint.optimizer
    pad_id = pad_token_id(tok)
    engine = _batched_engine(checkpoint, passages, batched, memory_bytes)
    if engine is not None:
        before = dict(zip(by_id, _measure_batched(engine, engine.base_params(), [0] * len(by_id),
                                                  [encoded[q] for q in by_id]), strict=True))
    else:
        before = dict(zip(by_id, _measure_one_by_one(model, tok, by_id, list(by_id)), strict=True))

    cache = _AfterCache(cache_dir, KERNELS if engine is not None else "sequential")
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

    bar = tqdm(total=len(todo), desc=desc, unit="passage" if desc != "tail-patch" else "proponent", disable=not progress)
    if engine is not None:
        for chunk in _chunks_by_length(todo, passages, engine.chunk, engine.max_width,
                                       lambda q: query_width(len(encoded[q][0]), engine.max_width)):
            stepped = engine.stepped([passages[pid] for pid in chunk])
            # Slot by slot: the first query of every proponent, then the second...: a
            # slot that every proponent fills reads the stacked parameters as they are.
            for slot in range(max(len(todo[pid]) for pid in chunk)):
                members = [i for i, pid in enumerate(chunk) if slot < len(todo[pid])]
                qids = [todo[chunk[i]][slot] for i in members]
                for i, q, lp in zip(members, qids, _measure_batched(engine, stepped, members,
                                                                    [encoded[q] for q in qids]), strict=True):
                    after[(q, chunk[i])] = lp
            for pid in chunk:
                cache.add(pid, texts[pid], {cache.query_key(by_id[q]): after[(q, pid)] for q in todo[pid]})
            bar.update(len(chunk))
    else:
        with restored(model, optimizer) as snap:
            for pid in sorted(todo):
                model.eval()  # no dropout in the step or the measurement
                # The pretraining step itself, at the final learning rate, on this
                # passage alone (no gradient clipping).
                train_step(model, optimizer, [passages[pid]], pad_id, checkpoint.learning_rate, grad_clip=None)
                qids = todo[pid]
                for q, lp in zip(qids, _measure_one_by_one(model, tok, by_id, qids), strict=True):
                    after[(q, pid)] = lp
                cache.add(pid, texts[pid], {cache.query_key(by_id[q]): after[(q, pid)] for q in qids})
                snap.restore()
                bar.update(1)
    bar.close()
    return after, before


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
