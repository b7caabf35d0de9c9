"""BM25 (the bm25s library) over the closed or open set, the paper's strongest
attribution baseline.

The query is the whole fact statement, prompt and target together, as in the
paper: BM25 matches the passage that spells the fact out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .records import Corpus, query_text, text_records, top_k_rows
from .registry import RetrievalTask, Retriever, register, sum_query_rows


def _index(corpus_texts: Sequence[str], query_texts: Sequence[str], k1: float, b: float):
    """(the BM25 index of the corpus, each query's words that occur in it)."""
    import bm25s  # only to index: the registry imports this module just to list the methods

    # bm25s sets its own logger to DEBUG when imported, which prints a line per index on stdout.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(bm25s.tokenize(list(corpus_texts), stopwords="en", show_progress=False), show_progress=False)
    vocab = retriever.vocab_dict
    tokenized = bm25s.tokenize(list(query_texts), stopwords="en", return_ids=False, show_progress=False)
    return retriever, [[t for t in toks if t in vocab] for toks in tokenized]


def bm25_topk(
    corpus_texts: Sequence[str], query_texts: Sequence[str], k: int, k1: float = 1.5, b: float = 0.75
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (queries x k) of the top-``k`` corpus texts per query, and their scores;
    equal scores in corpus order (:func:`~trackstar.retrieval.records.top_k_rows`). A query
    with no word in the corpus matches nothing: score 0 for the first k texts."""
    if k > len(corpus_texts):
        raise ValueError(f"k={k} exceeds the corpus size {len(corpus_texts)}; lower k.")
    ids = np.empty((len(query_texts), k), dtype=np.int64)
    scores = np.empty((len(query_texts), k), dtype=np.float32)
    for row, all_scores in enumerate(bm25_all_scores(corpus_texts, query_texts, k1, b)):
        ids[row] = top_k_rows(all_scores, k)[0]
        scores[row] = all_scores[ids[row]]
    return ids, scores


def bm25_all_scores(
    corpus_texts: Sequence[str], query_texts: Sequence[str], k1: float = 1.5, b: float = 0.75
) -> Iterator[np.ndarray]:
    """Every corpus text's score, one (texts,) array per query in order (0 for a
    query with no word in the corpus)."""
    retriever, known = _index(corpus_texts, query_texts, k1, b)
    for q in known:
        yield retriever.get_scores(q) if q else np.zeros(len(corpus_texts), dtype=np.float32)


class BM25(Retriever):
    name = "bm25"
    rank = 0.0

    @dataclass(frozen=True)
    class Options:
        #: Term-frequency saturation and length normalization (Lucene's defaults).
        k1: float = 1.5
        b: float = 0.75

    @property
    def label(self) -> str:
        return "BM25"

    def retrieve(self, task: RetrievalTask) -> tuple[list[dict], dict]:
        corpus = Corpus.from_world(task.world, task.corpus)
        rows, scores = bm25_topk(corpus.texts, [query_text(q) for q in task.queries], task.k,
                                 k1=self.options.k1, b=self.options.b)
        return text_records(task.queries, corpus, rows, scores), {}

    def subset_sums(self, task: RetrievalTask, masks):
        corpus = Corpus.from_world(task.world, task.corpus)
        return sum_query_rows(bm25_all_scores(corpus.texts, [query_text(q) for q in task.queries],
                                              k1=self.options.k1, b=self.options.b), masks)


register("bm25", BM25)
