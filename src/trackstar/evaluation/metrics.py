"""Retrieval metrics over release-schema retrieval records (SPEC §2.2).

The same code scores this suite's retrievals and the paper's released
retrieval files: both are JSON Lines with one record per query.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd

#: Fields every retrieval record must carry.
RETRIEVAL_FIELDS = (
    "example_id",
    "query_set",
    "inputs_plaintext",
    "targets_plaintext",
    "proponents",
    "proponent_ids",
    "proponent_scores",
)

#: Per-query retrieval metrics (SPEC §2.2), in the order reports show them.
RETRIEVAL_METRICS = ("mrr", "recall@10", "precision@10")

#: Open-set passages count as correct when the entailment score reaches this
#: threshold (the paper's AIS threshold).
AIS_THRESHOLD = 0.5


class RetrievalRecordError(ValueError):
    """A retrieval record is missing fields or is inconsistent."""


def proponent_correctness(record: dict, source: str = "retrievals", ais_threshold: float = AIS_THRESHOLD) -> list[bool]:
    """Whether each retrieved proponent states the query fact, in rank order.

    Closed set: ``proponent_correct``; open set: ``proponent_ais_scores`` >= ``ais_threshold``
    (0.5, the release viewer's).
    """
    name = f"{source}: record example_id={record.get('example_id')!r}"
    if "proponent_correct" in record:
        correct = [bool(c) for c in record["proponent_correct"]]
    elif "proponent_ais_scores" in record:
        correct = [float(s) >= ais_threshold for s in record["proponent_ais_scores"]]
    else:
        raise RetrievalRecordError(
            f"{name} has neither 'proponent_correct' (closed set) nor 'proponent_ais_scores' "
            "(open set), so its proponents cannot be judged. Label it against the world with "
            "trackstar.retrieval.label_retrievals first."
        )
    if len(correct) != len(record["proponent_ids"]):
        raise RetrievalRecordError(
            f"{name} has {len(record['proponent_ids'])} proponent_ids but {len(correct)} "
            "correctness labels; the two lists must align."
        )
    return correct


def recall_at(correct: Sequence[bool], k: int = 10) -> float:
    """1 if any of the top ``k`` proponents is correct, else 0."""
    return float(any(correct[:k]))


def precision_at(correct: Sequence[bool], k: int = 10) -> float:
    """Correct among the top ``k``, over ``k`` even when fewer were retrieved."""
    return sum(correct[:k]) / k


def mrr_first(correct: Sequence[bool]) -> float:
    """1 / (1 + rank of the first correct proponent) over the whole list; 0 if none."""
    return next((1.0 / (1 + i) for i, c in enumerate(correct) if c), 0.0)


def validate_retrievals(records: Iterable[dict], source: str = "retrievals") -> list[dict]:
    records = list(records)
    for i, rec in enumerate(records):
        missing = [f for f in RETRIEVAL_FIELDS if f not in rec]
        if missing:
            raise RetrievalRecordError(
                f"{source}: record {i} (example_id={rec.get('example_id')!r}) lacks {missing}. "
                f"A retrieval record needs {', '.join(RETRIEVAL_FIELDS)}."
            )
        n = len(rec["proponent_ids"])
        if len(rec["proponents"]) != n or len(rec["proponent_scores"]) != n:
            raise RetrievalRecordError(
                f"{source}: record example_id={rec['example_id']!r} has proponents, proponent_ids "
                f"and proponent_scores of different lengths ({len(rec['proponents'])}, {n}, "
                f"{len(rec['proponent_scores'])})."
            )
    return records


def score_retrievals(records: Iterable[dict], k: int = 10, source: str = "retrievals",
                     ais_threshold: float = AIS_THRESHOLD) -> pd.DataFrame:
    """One row per query: recall@k, precision@k, mrr_first, and the split columns.

    ``has_trex_sentence`` defaults to True for records that lack it (open set,
    where every query is scored); open-set proponents are correct when their
    entailment score reaches ``ais_threshold``.
    """
    rows = []
    for rec in validate_retrievals(records, source):
        correct = proponent_correctness(rec, source, ais_threshold)
        rows.append(
            {
                "example_id": rec["example_id"],
                "fact_id": rec.get("fact_id"),
                "relation": rec.get("relation"),
                "c4_frequency_bucket": rec.get("c4_frequency_bucket"),
                "has_trex_sentence": bool(rec.get("has_trex_sentence", True)),
                "n_proponents": len(correct),
                f"recall@{k}": recall_at(correct, k),
                f"precision@{k}": precision_at(correct, k),
                "mrr": mrr_first(correct),
            }
        )
    return pd.DataFrame(rows)
