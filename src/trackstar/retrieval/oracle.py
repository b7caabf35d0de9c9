"""The tail-patch oracle: passages ranked by their exact one-step effect on each query.

Tail-patch@k (SPEC §2.3) takes one optimizer step on a proponent and measures
the change of the query's target log-probability. On our worlds that change is
computable for every passage: one step per passage, then every query's target
under the stepped model. Ranking each query's passages by it gives the best
top k any method can retrieve for tail-patch, so this row's tail-patch@k is the
ceiling of every other row's (the tables report each row as a share of it),
and its MRR and recall say how often the most influential passages state the
fact.

The values are :func:`trackstar.evaluation.tail_patch.one_step_effects`: the
same step, kernels and per-checkpoint cache as the evaluation's tail-patch,
so the evaluation reads this row's values back bit for bit (and every other
row's top k is scored on the same numbers). One step per passage serves every
query; a run that stops keeps every finished passage (the cache is written
per chunk) and the next run goes on from there.

The cost is passages × queries forward passes of a query plus one step per
passage: :attr:`OracleTailPatch.Options.max_pairs` refuses a corpus where it
would not finish in reasonable time (docs/results.md states the measured rate).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..evaluation.tail_patch import one_step_effects
from .records import Corpus, retrieval_record
from .registry import RetrievalTask, Retriever, register, sum_query_rows

#: About 5 minutes at the rate measured on the tiny model on a 2-core CPU
#: (docs/results.md); the tiny world's closed and open sets fit, the small world does not.
DEFAULT_MAX_PAIRS = 400_000


class OracleTailPatch(Retriever):
    """Each query's passages ranked by the exact change of its target log-probability
    after one optimizer step on the passage (the tail-patch step)."""

    name = "oracle_tail_patch"
    family = "influence"
    rank = 90.0

    @dataclass(frozen=True)
    class Options:
        #: Refuse a (corpus, queries) with more (passage, query) measurements than this;
        #: null keeps the default.
        max_pairs: int = DEFAULT_MAX_PAIRS

        def __post_init__(self):
            if int(self.max_pairs) < 1:
                raise ValueError(f"max_pairs must be a positive integer, got {self.max_pairs!r}")

    @property
    def label(self) -> str:
        return "Tail-patch oracle (exact one-step effect)"

    @property
    def settings(self) -> dict:
        return {}  # max_pairs decides whether it runs, never what it returns

    def _effects(self, task: RetrievalTask, corpus: Corpus, progress: bool = True) -> tuple[np.ndarray, dict]:
        pairs = len(corpus) * len(task.queries)
        if pairs > self.options.max_pairs:
            raise ValueError(
                f"method {self.name!r}: {len(corpus):,} {task.corpus}-set passages × {len(task.queries):,} "
                f"queries = {pairs:,} one-step measurements, over method.options.max_pairs="
                f"{self.options.max_pairs:,} (about 5 minutes on a 2-core CPU with the tiny model). Lower "
                "eval.n_queries, or raise +method.options.max_pairs=N if the machine can afford it."
            )
        t0 = time.perf_counter()
        before, after = one_step_effects(task.checkpoint, task.queries, dict(zip(corpus.ids, corpus.texts)),
                                         progress=progress, cache_dir=task.tail_patch_cache,
                                         desc="oracle one-step effects")
        info = {"passages": len(corpus), "queries": len(task.queries), "pairs": pairs,
                "seconds": round(time.perf_counter() - t0, 3)}
        return after - before[:, None], info

    def retrieve(self, task: RetrievalTask) -> tuple[list[dict], dict]:
        corpus = Corpus.from_world(task.world, task.corpus)
        effects, info = self._effects(task, corpus)
        # Ties keep corpus order; the opponents are the passages that lower the target most.
        order = np.argsort(-effects, axis=1, kind="stable")
        records = []
        for q, row, ranked in zip(task.queries, effects, order, strict=True):
            top, bottom = ranked[:task.k], ranked[::-1][:task.k]
            records.append(retrieval_record(q, corpus, [corpus.ids[j] for j in top], row[top].tolist(),
                                            [corpus.ids[j] for j in bottom], row[bottom].tolist()))
        return records, {"oracle": info}

    def subset_sums(self, task: RetrievalTask, masks):
        effects, _ = self._effects(task, Corpus.from_world(task.world, task.corpus))
        return sum_query_rows(effects, masks)


register("oracle_tail_patch", OracleTailPatch)
