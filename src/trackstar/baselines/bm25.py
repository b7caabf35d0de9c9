"""BM25 over the closed or open set, the paper's strongest attribution baseline.

The query is the whole fact statement, prompt and target together, as in the
paper: BM25 matches the passage that spells the fact out.
"""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np


def bm25_topk(
    corpus_texts: Sequence[str], query_texts: Sequence[str], k: int, k1: float = 1.5, b: float = 0.75
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (queries x k) of the top-``k`` corpus texts per query, and their scores."""
    if k > len(corpus_texts):
        raise ValueError(f"k={k} exceeds the corpus size {len(corpus_texts)}; lower k.")
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(bm25s.tokenize(list(corpus_texts), stopwords="en", show_progress=False), show_progress=False)
    vocab = retriever.vocab_dict
    tokenized = bm25s.tokenize(list(query_texts), stopwords="en", return_ids=False, show_progress=False)
    # A query with no word in the corpus matches nothing: it gets score 0 for
    # the first k texts rather than a made-up match.
    known = [[t for t in toks if t in vocab] for toks in tokenized]
    placeholder = next(iter(vocab))
    ids, scores = retriever.retrieve([q or [placeholder] for q in known], k=k, show_progress=False, n_threads=1)
    ids, scores = np.asarray(ids), np.asarray(scores, dtype=np.float32)
    for row, q in enumerate(known):
        if not q:
            ids[row], scores[row] = np.arange(k), 0.0
    return ids, scores
