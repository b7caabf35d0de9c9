"""Dense embeddings (sentence-transformers), standing in for the paper's Gecko."""

from __future__ import annotations

from dataclasses import dataclass

from ..baselines.dense import DEFAULT_MODEL
from .records import Corpus, query_text, text_records
from .registry import RetrievalTask, Retriever, register, sum_query_rows


class Dense(Retriever):
    name = "dense"
    rank = 1.0

    @dataclass(frozen=True)
    class Options:
        #: A sentence-transformers model name or local path; the default is
        #: the all-MiniLM-L6-v2 that ships inside a package (offline).
        model: str = DEFAULT_MODEL

    @property
    def label(self) -> str:
        model = self.options.model
        short = "MiniLM" if model == DEFAULT_MODEL else model.rstrip("/").rsplit("/", 1)[-1]
        return f"Dense ({short}; stands in for Gecko)"

    def retrieve(self, task: RetrievalTask) -> tuple[list[dict], dict]:
        from ..baselines.dense import dense_topk

        corpus = Corpus.from_world(task.world, task.corpus)
        device = str(task.device) if task.device is not None else None
        rows, scores = dense_topk(corpus.texts, [query_text(q) for q in task.queries], task.k,
                                  model=self.options.model, device=device)
        return text_records(task.queries, corpus, rows, scores), {"dense_model": self.options.model}

    def subset_sums(self, task: RetrievalTask, masks):
        from ..baselines.dense import dense_similarities

        corpus = Corpus.from_world(task.world, task.corpus)
        device = str(task.device) if task.device is not None else None
        sims = dense_similarities(corpus.texts, [query_text(q) for q in task.queries], self.options.model,
                                  device=device)
        return sum_query_rows(sims, masks)


register("dense", Dense)
