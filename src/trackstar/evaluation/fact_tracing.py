"""Judging fact tracing: retrieval records in, per-query metrics out.

``evaluate`` scores release-schema retrieval records (from
:mod:`trackstar.retrieval`, or the paper's release) for attribution (MRR,
recall@10, precision@10) and influence (tail-patch), per query, with the
columns the splits need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .counterfactual import is_counterfactual_metric
from .metrics import AIS_THRESHOLD, RETRIEVAL_METRICS, score_retrievals
from .tail_patch import TAIL_PATCH_KS, tail_patch, tail_patch_at_k


def evaluate(records: Sequence[dict], *args, **kwargs) -> pd.DataFrame:
    """Per-query attribution metrics (and tail-patch): :func:`evaluate_with_pairs` without the pairs."""
    return evaluate_with_pairs(records, *args, **kwargs)[0]


def evaluate_with_pairs(
    records: Sequence[dict],
    checkpoint=None,
    query_eval: Sequence[dict] | None = None,
    tail_patch_ks: Sequence[int] = TAIL_PATCH_KS,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    ais_threshold: float = AIS_THRESHOLD,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(per-query metrics, per-(query, proponent) tail-patch or None): attribution metrics, and
    tail-patch when a checkpoint is given (the pairs are :func:`~.tail_patch.tail_patch`'s rows).

    ``query_eval`` (the checkpoint's ``query_eval.jsonl``) adds each query's
    model correctness for the Table A.7 split; ``cache_dir`` shares tail-patch
    steps across methods and jobs (see :func:`~.tail_patch.tail_patch`);
    ``ais_threshold``: an open-set proponent is correct when its entailment
    score reaches it.
    """
    per_query, pairs = score_retrievals(records, ais_threshold=ais_threshold), None
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
    return per_query, pairs


def metric_columns(per_query: pd.DataFrame) -> list[str]:
    return [c for c in per_query.columns
            if c in RETRIEVAL_METRICS or c.startswith("tail_patch") or is_counterfactual_metric(c)]

