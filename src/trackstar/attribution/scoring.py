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


def _best_first(s: torch.Tensor, i: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of candidates (scores ``s``, distinct row indices ``i``), best first and
    among equal scores the lower row first: one order on every machine and device (which of
    several tied rows a top-k keeps is otherwise the kernel's; identical texts tie exactly)."""
    by_row = torch.sort(i, dim=1).indices
    s, i = s.gather(1, by_row), i.gather(1, by_row)
    order = torch.sort(s, dim=1, descending=largest, stable=True).indices[:, :k]
    return s.gather(1, order), i.gather(1, order)


def _chunk_best(scores: torch.Tensor, start: int, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's ``k`` best (scores, row indices), as :func:`_best_first` orders them: a top-k,
    then, for the rare query whose k-th score is shared by rows beyond the k, every row that
    reaches it (the lower rows make the cut)."""
    c = scores.shape[1]
    k = min(k, c)
    top = torch.topk(scores, min(k + 1, c), dim=1, largest=largest, sorted=True)  # one more: is the cut tied?
    s, i = _best_first(top.values[:, :k], top.indices[:, :k], k, largest)
    if c > k:
        for q in torch.nonzero(top.values[:, k] == top.values[:, k - 1]).flatten().tolist():
            kth = top.values[q, k - 1]
            rows = torch.nonzero(scores[q] >= kth if largest else scores[q] <= kth).flatten()
            s[q], i[q] = (t[0] for t in _best_first(scores[q, rows][None], rows[None], k, largest))
    return s, i + start


def _merge(best_s, best_i, scores, start, k, largest):
    """Fold one chunk's (M, c) scores into the running (M, ≤k) best."""
    s, i = _chunk_best(scores, start, k, largest)
    return _best_first(torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1), k, largest)


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
        s, i = _best_first(torch.cat(scores, dim=1), torch.cat(rows, dim=1), k, largest)
        return i, s

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
    Opponents are the proponents of the negated queries. Equal scores come in FAISS's
    order, not necessarily the streaming top-k's (the lower row first).
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
