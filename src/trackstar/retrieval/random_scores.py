"""Random scores: the control row of the counterfactual table.

Every passage gets a seeded uniform score per query, so its top-k are random
passages and its LDS should be 0 within its interval: a check that the
counterfactual machinery can fail a method.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .records import Corpus, text_records
from .registry import RetrievalTask, Retriever, register, sum_query_rows


class RandomScores(Retriever):
    name = "random"
    rank = 100.0

    @dataclass(frozen=True)
    class Options:
        seed: int = 0

    @property
    def label(self) -> str:
        return "Random scores (control)"

    def _scores(self, task: RetrievalTask, corpus: Corpus):
        """One (passages,) array of scores per query, a pure function of (seed, query id)."""
        for q in task.queries:
            digest = int(hashlib.sha256(str(q["example_id"]).encode()).hexdigest()[:16], 16)
            yield np.random.default_rng([self.options.seed, digest]).random(len(corpus))

    def retrieve(self, task: RetrievalTask) -> tuple[list[dict], dict]:
        corpus = Corpus.from_world(task.world, task.corpus)
        scores = np.stack(list(self._scores(task, corpus)))
        rows = np.argsort(-scores, axis=1, kind="stable")[:, :task.k]
        return text_records(task.queries, corpus, rows, np.take_along_axis(scores, rows, axis=1)), {}

    def subset_sums(self, task: RetrievalTask, masks):
        return sum_query_rows(self._scores(task, Corpus.from_world(task.world, task.corpus)), masks)


register("random", RandomScores)
