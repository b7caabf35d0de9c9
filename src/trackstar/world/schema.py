"""The paper's release schemas (SPEC §2.1), as checked field lists.

The world writes facts and closed-set sentences in the release's own schemas,
so the same readers serve the paper's files; the open-set corpus and the query
list are this project's (documented here).
"""

from __future__ import annotations

from collections.abc import Iterable

FACT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fact_id": str,
    "kilt_id": str,
    "entity0": str,
    "relation": str,
    "entity1": str,
    "entity0_uri": str,
    "predicate_uri": str,
    "entity1_uri": str,
    "entity0_alias": list,
    "entity1_alias": list,
    "trex_sentences": list,
    "c4_frequency": int,
    "is_repetition": bool,
    "prompt0": str,
    "prompt1": str,
    "prompt2": str,
}

SENTENCE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "sentence_id": str,
    "text": str,
    "abstract_uri": str,
    "sent_idx_in_abst": int,
    "fact_triples": list,
}

#: Open-set ("C4") document: the facts it states stand in for the entailment
#: annotations an AIS model gives real C4 passages.
CORPUS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "doc_id": str,
    "text": str,
    "fact_ids": list,
    "fact_triples": list,
}

QUERY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "example_id": str,
    "fact_id": str,
    "prompt": str,
    "target": str,
    "relation": str,
    "c4_frequency": int,
    "c4_frequency_bucket": int,
    "is_repetition": bool,
    "has_trex_sentence": bool,
}

SCHEMAS = {"fact": FACT_FIELDS, "sentence": SENTENCE_FIELDS, "corpus": CORPUS_FIELDS, "query": QUERY_FIELDS}


#: The field that names each record of a kind: unique within a world, since labels,
#: judgements and metrics are looked up by it.
ID_FIELDS = {"fact": "fact_id", "sentence": "sentence_id", "corpus": "doc_id", "query": "example_id"}


class SchemaError(ValueError):
    """A record does not follow its release schema."""


def check_unique(kind: str, records: Iterable[dict], source: str, places: Iterable[str] | None = None) -> None:
    """Raise :class:`SchemaError` on the first id (:data:`ID_FIELDS`) that two records of
    ``source`` share, naming both (``places``: where each record is, default its line)."""
    key = ID_FIELDS[kind]
    seen: dict[str, str] = {}
    places = iter(places) if places is not None else (f"record {i}" for i in range(1, 1 << 62))
    for rec, place in zip(records, places):
        ident = rec[key]
        if ident in seen:
            raise SchemaError(
                f"{source}: {kind} records at {seen[ident]} and {place} share {key}={ident!r}; each {kind} needs "
                f"its own {key} (labels and metrics are looked up by it). Remove or rename the duplicate.")
        seen[ident] = place


def validate_records(kind: str, records: Iterable[dict], source: str) -> None:
    """Raise :class:`SchemaError` naming the first bad record of ``source``."""
    fields = SCHEMAS[kind]
    for i, rec in enumerate(records):
        missing = [f for f in fields if f not in rec]
        if missing:
            raise SchemaError(
                f"{source}: {kind} record {i} (line {i + 1}, {_record_name(rec)}) lacks field(s) {missing}. "
                f"A {kind} record needs: {', '.join(fields)}."
            )
        for name, typ in fields.items():
            value = rec[name]
            # bool is an int subclass; an int field must not accept True/False.
            if (typ is int and isinstance(value, bool)) or not isinstance(value, typ):
                raise SchemaError(
                    f"{source}: {kind} record {i} (line {i + 1}, {_record_name(rec)}) field {name!r} is "
                    f"{type(value).__name__} {value!r}, expected {getattr(typ, '__name__', typ)}."
                )
        if "fact_triples" in fields:
            for triple in rec["fact_triples"]:
                if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(t, str) for t in triple)):
                    raise SchemaError(
                        f"{source}: {kind} record {i} (line {i + 1}, {_record_name(rec)}) has a malformed "
                        f"fact triple {triple!r}; expected [entity0_uri, relation, entity1_uri]."
                    )


def _record_name(rec: dict) -> str:
    for key in ("fact_id", "sentence_id", "doc_id", "example_id"):
        if key in rec:
            return f"{key}={rec[key]!r}"
    return "no id"
