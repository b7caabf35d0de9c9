"""Build release-schema retrieval records and label them against the world.

A retrieval record (SPEC §2.1) is one query with its ranked proponents (and,
for gradient methods, opponents). Closed-set records carry
``proponent_correct``; open-set records carry ``proponent_ais_scores``, which
the embedded world knows exactly (1.0 when the passage states the fact, else
0.0) where the paper used an entailment model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The two retrieval sets: the closed set (T-REx-like sentences) and the open
#: set (the pretraining corpus).
CORPORA = ("closed", "open")


class Corpus:
    """Candidate texts of one retrieval set, with the facts each states.

    ``closed`` (T-REx sentences, ids ``sentence_id``) or ``open`` (pretraining
    documents, ids ``doc_id``).
    """

    def __init__(self, name: str, ids: Sequence[str], texts: Sequence[str], fact_ids: Sequence[Sequence[str]]):
        if name not in CORPORA:
            raise ValueError(f"corpus name must be one of {CORPORA}, got {name!r}")
        self.name = name
        self.ids = list(ids)
        self.texts = list(texts)
        self.fact_ids = [set(f) for f in fact_ids]
        self.index = {i: n for n, i in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ValueError(f"{name} corpus has duplicate ids")

    @classmethod
    def from_world(cls, world, name: str) -> Corpus:
        if name == "closed":
            recs, key = world.sentences, "sentence_id"
        elif name == "open":
            recs, key = world.corpus, "doc_id"
        else:
            raise ValueError(f"corpus must be 'closed' (T-REx sentences) or 'open' (pretraining corpus), got {name!r}")
        return cls(name, [r[key] for r in recs], [r["text"] for r in recs], [r["fact_ids"] for r in recs])

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, doc_id: str, source: str = "retrieval") -> int:
        try:
            return self.index[doc_id]
        except KeyError:
            raise KeyError(
                f"{source}: proponent id {doc_id!r} is not in the {self.name} corpus "
                f"({len(self)} ids such as {self.ids[0]!r}). Was it retrieved from another world?"
            ) from None


def retrieval_record(
    query: dict,
    corpus: Corpus,
    proponent_ids: Sequence[str],
    proponent_scores: Sequence[float],
    opponent_ids: Sequence[str] | None = None,
    opponent_scores: Sequence[float] | None = None,
) -> dict:
    """One release-schema record for ``query`` (a world ``queries.jsonl`` record)."""
    fact = query["fact_id"]
    positions = [corpus.position(p) for p in proponent_ids]
    rec = {
        "example_id": query["example_id"],
        "query_set": "trex" if corpus.name == "closed" else "c4",
        "inputs_plaintext": query["prompt"],
        "targets_plaintext": query["target"],
        "proponents": [corpus.texts[i] for i in positions],
        "proponent_ids": list(proponent_ids),
        "proponent_scores": [float(s) for s in proponent_scores],
        "fact_id": fact,
        "relation": query["relation"],
        "c4_frequency": query["c4_frequency"],
        "c4_frequency_bucket": query["c4_frequency_bucket"],
    }
    if corpus.name == "closed":
        rec["has_trex_sentence"] = query["has_trex_sentence"]
        rec["proponent_correct"] = [fact in corpus.fact_ids[i] for i in positions]
    else:
        rec["proponent_ais_scores"] = [1.0 if fact in corpus.fact_ids[i] else 0.0 for i in positions]
    if opponent_ids is not None:
        rec["opponents"] = [corpus.texts[corpus.position(o)] for o in opponent_ids]
        rec["opponent_ids"] = list(opponent_ids)
        rec["opponent_scores"] = [float(s) for s in opponent_scores or []]
    return rec


def label_retrievals(records: Sequence[dict], world, corpus_name: str, source: str = "retrievals") -> list[dict]:
    """Add ``proponent_correct`` (closed) or ``proponent_ais_scores`` (open) from the world.

    For retrieval files made elsewhere (another tool, or an edited release
    file) over this world's corpus. A query id not in the world or a
    proponent id not in the corpus is an error naming the record.
    """
    corpus = Corpus.from_world(world, corpus_name)
    queries = {q["example_id"]: q for q in world.queries}
    labelled = []
    for i, rec in enumerate(records):
        qid = rec.get("example_id")
        if qid not in queries:
            raise KeyError(
                f"{source}: record {i} has example_id={qid!r}, which is not a query of the world at "
                f"{world.path}. Score it against the world it was retrieved from."
            )
        fact = queries[qid]["fact_id"]
        positions = [corpus.position(p, f"{source}: record {i} (example_id={qid!r})") for p in rec.get("proponent_ids", [])]
        out = dict(rec)
        if corpus.name == "closed":
            out["proponent_correct"] = [fact in corpus.fact_ids[j] for j in positions]
            out.setdefault("has_trex_sentence", queries[qid]["has_trex_sentence"])
        else:
            out["proponent_ais_scores"] = [1.0 if fact in corpus.fact_ids[j] else 0.0 for j in positions]
        labelled.append(out)
    return labelled


def query_text(query: dict) -> str:
    """What a text baseline searches with: the whole fact statement, prompt and target."""
    return f"{query['prompt']} {query['target']}"


def text_records(queries: Sequence[dict], corpus: Corpus, rows, scores) -> list[dict]:
    """Release-schema records from per-query corpus positions (queries x k) and scores."""
    return [
        retrieval_record(q, corpus, [corpus.ids[j] for j in r], s)
        for q, r, s in zip(queries, rows.tolist(), scores.tolist(), strict=True)
    ]


#: How every retriever orders equal scores (the lower corpus position first). In each
#: retrieval's cache key: lists cached before it had the machine's order of ties.
TIE_ORDER = "corpus_order"


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's ``k`` highest scores, best first, and among equal
    scores the lower column (corpus position) first: the same list on every machine.

    Exact ties are common (a world repeats sentences word for word), and which of
    them a partition keeps, and in what order, is the machine's: numpy's SIMD sorts
    and bm25s's top-k differ between instruction sets and versions."""
    scores = np.atleast_2d(np.asarray(scores))
    n = scores.shape[1]
    k = min(k, n)
    out = np.empty((scores.shape[0], k), dtype=np.int64)
    for r, row in enumerate(scores):
        kth = np.partition(row, n - k)[n - k]  # the k-th highest score
        candidates = np.flatnonzero(row >= kth)  # ascending: every score that reaches it, ties included
        out[r] = candidates[np.argsort(-row[candidates], kind="stable")[:k]]
    return out

