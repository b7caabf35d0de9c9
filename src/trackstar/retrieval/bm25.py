"""BM25 (the bm25s library), the paper's strongest attribution baseline."""

from __future__ import annotations

from dataclasses import dataclass

from .records import Corpus, query_text, text_records
from .registry import RetrievalTask, Retriever, register, sum_query_rows


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
        from ..baselines.bm25 import bm25_topk

        corpus = Corpus.from_world(task.world, task.corpus)
        rows, scores = bm25_topk(corpus.texts, [query_text(q) for q in task.queries], task.k,
                                 k1=self.options.k1, b=self.options.b)
        return text_records(task.queries, corpus, rows, scores), {}

    def subset_sums(self, task: RetrievalTask, masks):
        from ..baselines.bm25 import bm25_all_scores

        corpus = Corpus.from_world(task.world, task.corpus)
        return sum_query_rows(bm25_all_scores(corpus.texts, [query_text(q) for q in task.queries],
                                              k1=self.options.k1, b=self.options.b), masks)


register("bm25", BM25)
