"""Fact tracing end to end: a named method retrieves proponents, then they are scored.

``retrieve`` runs any method row by name over the closed set (T-REx-like
sentences) or the open set (the pretraining corpus) and returns release-schema
retrieval records; ``evaluate`` scores them for attribution (MRR, recall@10,
precision@10) and influence (tail-patch), per query, with the columns the
splits need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .metrics import score_retrievals
from .retrievals import Corpus, retrieval_record
from .tail_patch import TAIL_PATCH_KS, tail_patch, tail_patch_at_k

BASELINES = ("bm25", "dense")

#: λ defaults per corpus (paper: ≈0.90 for T-REx, ≈0.99 for C4).
DEFAULT_LAMBDA = {"closed": 0.9, "open": 0.99}


def method_names() -> list[str]:
    from ..attribution.methods import METHODS

    return [*BASELINES, *METHODS]


def check_method(name: str) -> str:
    if name not in method_names():
        raise ValueError(f"Unknown method {name!r}. Choose one of: {', '.join(method_names())}.")
    return name


def query_text(query: dict) -> str:
    """What a lexical or embedding baseline searches with: the whole fact statement."""
    return f"{query['prompt']} {query['target']}"


def retrieve(
    method: str,
    world,
    corpus_name: str,
    checkpoint=None,
    queries: Sequence[dict] | None = None,
    k: int = 10,
    settings_overrides: dict | None = None,
    dense_model: str | None = None,
    work_dir: str | Path | None = None,
) -> tuple[list[dict], dict]:
    """Top-``k`` proponents of each query under ``method``, as release-schema records.

    Returns ``(records, info)``; ``info`` carries what the method decided on
    its own (λ when ``auto``, where V came from, the feature stores).
    """
    check_method(method)
    corpus = Corpus.from_world(world, corpus_name)
    queries = list(queries if queries is not None else world.queries)
    if k > len(corpus):
        raise ValueError(f"k={k} exceeds the {corpus_name} corpus size {len(corpus)}; lower k.")
    info: dict = {"method": method, "corpus": corpus_name, "k": k}
    if method in BASELINES:
        texts = [query_text(q) for q in queries]
        if method == "bm25":
            from ..baselines.bm25 import bm25_topk

            rows, scores = bm25_topk(corpus.texts, texts, k)
        else:
            from ..baselines.dense import DEFAULT_MODEL, dense_topk

            info["dense_model"] = dense_model or DEFAULT_MODEL
            rows, scores = dense_topk(corpus.texts, texts, k, model=info["dense_model"])
        records = [
            retrieval_record(q, corpus, [corpus.ids[j] for j in r], s)
            for q, r, s in zip(queries, rows.tolist(), scores.tolist(), strict=True)
        ]
        return records, info

    from ..attribution.api import TrackStar
    from ..attribution.methods import method_settings

    if checkpoint is None:
        raise ValueError(f"method {method!r} needs a model checkpoint; pass checkpoint=load_checkpoint(...)")
    overrides = {"k": k, **(settings_overrides or {})}
    overrides.setdefault("lam", DEFAULT_LAMBDA[corpus_name])
    settings = method_settings(method, **overrides)
    engine = TrackStar(checkpoint.model, checkpoint.tokenizer, settings, optimizer=checkpoint.optimizer, work_dir=work_dir)
    result = engine.attribute(
        corpus.texts,
        [{"prompt": q["prompt"], "target": q["target"], "id": q["example_id"]} for q in queries],
        train_ids=corpus.ids,
    )
    info.update({"lambda": result.lam, "v_source": result.v_source, "settings": dataclasses.asdict(settings),
                 "train_store": str(result.train_store), "query_store": str(result.query_store)})
    records = [
        retrieval_record(q, corpus, pids, pscores, oids, oscores)
        for q, pids, pscores, oids, oscores in zip(
            queries, result.proponent_ids, result.proponent_scores, result.opponent_ids, result.opponent_scores, strict=True
        )
    ]
    return records, info


def evaluate(
    records: Sequence[dict],
    checkpoint=None,
    query_eval: Sequence[dict] | None = None,
    tail_patch_ks: Sequence[int] = TAIL_PATCH_KS,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> pd.DataFrame:
    """Per-query attribution metrics, and tail-patch when a checkpoint is given.

    ``query_eval`` (the checkpoint's ``query_eval.jsonl``) adds each query's
    model correctness for the Table A.7 split; ``cache_dir`` shares tail-patch
    steps across methods and jobs (see :func:`~.tail_patch.tail_patch`).
    """
    per_query = score_retrievals(records)
    if query_eval is not None:
        correct = {r["example_id"]: r["greedy_correct"] for r in query_eval}
        per_query["greedy_correct"] = per_query["example_id"].map(correct)
    if checkpoint is not None and tail_patch_ks:
        depth = max(tail_patch_ks)
        queries = [
            {"example_id": r["example_id"], "prompt": r["inputs_plaintext"], "target": r["targets_plaintext"]} for r in records
        ]
        proponents = {r["example_id"]: list(zip(r["proponent_ids"][:depth], r["proponents"][:depth], strict=True)) for r in records}
        pairs = tail_patch(checkpoint, queries, proponents, progress=progress, cache_dir=cache_dir)
        per_query = per_query.merge(tail_patch_at_k(pairs, tail_patch_ks), on="example_id", how="left")
    return per_query


def metric_columns(per_query: pd.DataFrame) -> list[str]:
    return [c for c in per_query.columns if c in ("mrr", "recall@10", "precision@10") or c.startswith("tail_patch")]

