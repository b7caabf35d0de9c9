"""Streaming top-k scoring (SPEC §1, last steps).

Training features stream from the store chunk by chunk; each chunk gets
R^{-1/2} and unit normalization (the same transform as the queries), is
multiplied against all queries at once, and only a running top-k of
proponents (highest scores) and opponents (lowest) per query is kept. The
full N×M score matrix is never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch


def unit_normalize(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1, keepdim=True)
    # A zero feature (e.g. a training example with zero gradient) scores 0
    # against everything rather than NaN.
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


@dataclass
class TopK:
    """Per query: indices (rows of the training store) and scores, best first."""

    proponent_rows: torch.Tensor  # (M, k) long
    proponent_scores: torch.Tensor  # (M, k) float32
    opponent_rows: torch.Tensor  # (M, k) long, most negative first
    opponent_scores: torch.Tensor  # (M, k) float32


def _merge(best_s, best_i, scores, start, k, largest):
    """Fold one chunk's (M, c) scores into the running (M, ≤k) best."""
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1, largest=largest, sorted=False)
    s = torch.cat([best_s, top.values], dim=1)
    i = torch.cat([best_i, top.indices + start], dim=1)
    top = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest, sorted=True)
    return top.values, i.gather(1, top.indices)


def score_chunks(
    queries: torch.Tensor,
    train_chunks: Iterable[tuple[int, torch.Tensor]],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize_train: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, queries @ g(chunk)ᵀ)`` for every training chunk: every row's score.

    ``queries`` (M, d) must already be transformed; each chunk gets
    ``transform`` and then, if ``normalize_train``, unit normalization (applied
    to the score columns: the same numbers, one pass less over memory). The
    scores are on the queries' device.
    """
    q = queries.float().contiguous()
    for start, chunk in train_chunks:
        chunk = chunk.to(q.device, non_blocking=True)
        x = transform(chunk) if transform is not None else chunk
        scores = q @ x.T
        if normalize_train:
            norms = x.norm(dim=1)
            scores /= torch.where(norms > 0, norms, torch.ones_like(norms))
        yield start, scores


def top_k(
    queries: torch.Tensor,
    train_chunks: Iterable[tuple[int, torch.Tensor]],
    k: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize_train: bool = False,
) -> TopK:
    """Running top-k of the scores of :func:`score_chunks` over all chunks.

    The scores and the running top-k live on the queries' device; the result
    is on the CPU.
    """
    m = queries.shape[0]
    q = queries.float().contiguous()
    device = q.device
    p_s, p_i = torch.empty((m, 0), device=device), torch.empty((m, 0), dtype=torch.long, device=device)
    o_s, o_i = torch.empty((m, 0), device=device), torch.empty((m, 0), dtype=torch.long, device=device)
    for start, scores in score_chunks(q, train_chunks, transform, normalize_train):
        p_s, p_i = _merge(p_s, p_i, scores, start, k, largest=True)
        o_s, o_i = _merge(o_s, o_i, scores, start, k, largest=False)
    return TopK(p_i.cpu(), p_s.cpu(), o_i.cpu(), o_s.cpu())


def merge_top_k(parts: list[TopK], k: int) -> TopK:
    """The top-k over the union of several row sets' own top-k (row indices global): exact,
    since each overall best row is among the best of its own set."""
    def best(rows, scores, largest):
        s, i = torch.cat(scores, dim=1), torch.cat(rows, dim=1)
        top = torch.topk(s, min(k, s.shape[1]), dim=1, largest=largest, sorted=True)
        return i.gather(1, top.indices), top.values

    p_i, p_s = best([p.proponent_rows for p in parts], [p.proponent_scores for p in parts], True)
    o_i, o_s = best([p.opponent_rows for p in parts], [p.opponent_scores for p in parts], False)
    return TopK(p_i, p_s, o_i, o_s)


def faiss_top_k(
    queries: torch.Tensor,
    train_chunks: Iterable[tuple[int, torch.Tensor]],
    k: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize_train: bool = False,
) -> TopK:
    """The same top-k as :func:`top_k`, through a FAISS inner-product index.

    For corpora searched many times: the index holds the transformed training
    features, so later query sets skip R^{-1/2} and the pass over the store.
    Opponents are the proponents of the negated queries.
    """
    try:
        import faiss  # optional: the trackstar[faiss] extra, for scorer='faiss' only
    except ImportError as exc:
        raise ImportError(
            "scorer='faiss' needs the faiss package: pip install 'trackstar[faiss]' (faiss-cpu), "
            "or use scorer='stream'."
        ) from exc
    device = queries.device
    q = queries.float().contiguous().cpu().numpy()
    index = faiss.IndexFlatIP(q.shape[1])
    for _, chunk in train_chunks:
        chunk = chunk.to(device)
        x = transform(chunk) if transform is not None else chunk
        if normalize_train:
            x = unit_normalize(x)
        index.add(x.float().contiguous().cpu().numpy())
    k = min(k, index.ntotal)
    p_s, p_i = index.search(q, k)
    o_s, o_i = index.search(-q, k)
    return TopK(torch.from_numpy(p_i).long(), torch.from_numpy(p_s), torch.from_numpy(o_i).long(), -torch.from_numpy(o_s))
