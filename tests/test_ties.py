"""Equal scores come in corpus order, in every retriever: the lists (and MRR) are the same on
every machine. Checked against a brute-force sort by (score, position) on scores full of ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trackstar.attribution.scoring import TopK, merge_top_k, top_k
from trackstar.retrieval.records import top_k_rows


def brute(scores, k: int, largest: bool = True) -> list[list[int]]:
    """Each row's k best positions: by score (highest or lowest first), then the lower position."""
    sign = -1 if largest else 1
    return [sorted(range(len(row)), key=lambda j: (sign * float(row[j]), j))[:k] for row in scores]


def tied(rows: int, cols: int, seed: int) -> np.ndarray:
    """Scores with few distinct values: most of each row's top k are ties, at the cut too."""
    return np.random.default_rng(seed).integers(0, 4, size=(rows, cols)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 10, 40])
def test_top_k_rows_orders_ties_by_position(k):
    scores = tied(6, 40, k)
    assert top_k_rows(scores, k).tolist() == brute(scores, k)
    # Shuffling the columns moves each tie to its new position's order, nothing else.
    perm = np.random.default_rng(0).permutation(40)
    got = top_k_rows(scores[:, perm], k)
    assert got.tolist() == brute(scores[:, perm], k)


def test_streaming_top_k_orders_ties_by_row_across_chunks():
    """Proponents and opponents, chunk sizes that split tied groups, against the full sort."""
    x = torch.from_numpy(tied(97, 3, 1))  # 97 training rows of 3 integer features
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, -1.0, 0.0]])
    full = (q @ x.T).numpy()
    for chunk in (1, 7, 32, 97):
        for k in (1, 5, 20):
            res = top_k(q, ((i, x[i:i + chunk]) for i in range(0, 97, chunk)), k=k)
            assert res.proponent_rows.tolist() == brute(full, k), (chunk, k)
            assert res.opponent_rows.tolist() == brute(full, k, largest=False), (chunk, k)
            np.testing.assert_array_equal(res.proponent_scores.numpy(), np.take_along_axis(full, res.proponent_rows.numpy(), 1))


def test_shards_merge_to_the_same_tie_order():
    x = torch.from_numpy(tied(60, 2, 2))
    q = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    whole = top_k(q, [(0, x)], k=12)
    # Shards given in any order: the merge orders ties by the global row.
    parts = [top_k(q, [(start, x[start:start + 20])], k=12) for start in (40, 0, 20)]
    merged = merge_top_k(parts, k=12)
    assert isinstance(merged, TopK)
    assert torch.equal(merged.proponent_rows, whole.proponent_rows)
    assert torch.equal(merged.opponent_rows, whole.opponent_rows)


def test_bm25_lists_identical_texts_in_corpus_order():
    from trackstar.retrieval.bm25 import bm25_all_scores, bm25_topk

    # A world repeats sentences word for word (a pronoun sentence in two abstracts).
    texts = ["She was born in Paris.", "Rome is in Italy.", "She was born in Paris.", "He was born in Lyon.",
             "She was born in Paris.", "Paris is in France."]
    queries = ["She was born in Paris", "born"]
    rows, scores = bm25_topk(texts, queries, k=4)
    full = np.stack(list(bm25_all_scores(texts, queries)))
    assert rows.tolist() == brute(full, 4)
    assert rows[0, :3].tolist() == [0, 2, 4]  # the three copies, first to last
    np.testing.assert_array_equal(scores, np.take_along_axis(full, rows, 1).astype(np.float32))
