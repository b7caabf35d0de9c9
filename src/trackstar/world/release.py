"""The paper's release files as a world: ``trackstar world --from-release DIR``.

The release (SPEC §2.1) ships ``trex_facts.jsonl`` and the closed set as
``trex_sentences.jsonl-000XX-of-000NN``. A world directory also needs

- each sentence's facts by id: read from its ``fact_triples`` (a triple names
  a fact when its subject and object URIs are the fact's and its middle is the
  fact's relation or predicate URI) and from each fact's ``trex_sentences``;
- an open set that can also serve as a pretraining corpus: the release has no
  C4 passages, so each abstract (its sentences in ``sent_idx_in_abst`` order)
  is one passage, with the union of its sentences' facts. A real corpus can
  be used as the open set instead (see docs/real_data_and_scale.md);
- queries: up to ``queries_per_bucket`` facts per frequency bucket, drawn
  with ``seed``. A fact's bucket is its ``c4_frequency_bucket`` where the file
  marks one, else the decade of its ``c4_frequency`` (0; 1–9; 10–99; 100–999;
  1,000–9,999; 10,000 and more: buckets 0–5). The query is ``prompt0`` and the
  target ``entity1``.

The result is written atomically and checked like a generated world, so
every sweep accepts it (``world=release world.path=DIR``).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from ..io import (
    ArtifactError,
    atomic_directory,
    config_hash,
    discard_if_damaged,
    is_complete,
    read_json,
    input_digest,
    write_jsonl,
)
from .schema import SchemaError, check_unique, validate_records

FACTS_FILE = "trex_facts.jsonl"
SENTENCES_GLOB = "trex_sentences.jsonl-*-of-*"
#: Upper bounds (exclusive) of c4_frequency for buckets 0..4; bucket 5 is the rest.
BUCKET_BOUNDS = (1, 10, 100, 1_000, 10_000)
RELEASE_PROFILE = "release"


def frequency_bucket(frequency: int) -> int:
    return next((b for b, bound in enumerate(BUCKET_BOUNDS) if frequency < bound), len(BUCKET_BOUNDS))


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SchemaError(f"{path} line {line_no}: byte {raw[exc.start]:#04x} at column {exc.start + 1} is not "
                                  "UTF-8; the release files are UTF-8 JSON lines. Re-encode the file "
                                  "(e.g. `iconv -f latin1 -t utf-8`).") from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SchemaError(f"{path} line {line_no}: not valid JSON ({exc.msg}).") from None
    return records


def read_release(release_dir: str | os.PathLike) -> tuple[list[dict], list[tuple[str, list[dict]]]]:
    """(facts, [(shard file name, sentences)]) of a release directory, every record checked."""
    release_dir = Path(release_dir).expanduser()
    if not (release_dir / FACTS_FILE).is_file():
        raise ArtifactError(f"{str(release_dir)!r} has no {FACTS_FILE}: give the directory that holds the "
                            f"release's {FACTS_FILE} and {SENTENCES_GLOB} files.")
    shards = sorted(release_dir.glob(SENTENCES_GLOB))
    if not shards:
        raise ArtifactError(f"{str(release_dir)!r} has no closed-set shards ({SENTENCES_GLOB}).")
    facts = _read_jsonl(release_dir / FACTS_FILE)
    validate_records("fact", facts, str(release_dir / FACTS_FILE))
    check_unique("fact", facts, str(release_dir / FACTS_FILE))
    sentences = []
    for shard in shards:
        records = _read_jsonl(shard)
        validate_records("sentence", records, str(shard))
        sentences.append((shard.name, records))
    if not facts:
        raise SchemaError(f"{release_dir / FACTS_FILE} holds no facts.")
    if not any(records for _, records in sentences):
        raise SchemaError(f"{str(release_dir)!r}: its closed-set shards ({', '.join(n for n, _ in sentences)}) hold no "
                          "sentences, so no fact can be traced. Give the directory with the release's filled "
                          f"{SENTENCES_GLOB} files.")
    check_unique("sentence", (s for _, records in sentences for s in records), str(release_dir),
                 (f"{name} record {i + 1}" for name, records in sentences for i in range(len(records))))
    return facts, sentences


def _annotate(facts: list[dict], shards: list[tuple[str, list[dict]]]) -> None:
    """Give each sentence its ``fact_ids`` (see the module doc)."""
    by_triple: dict[tuple[str, str, str], list[str]] = {}
    for f in facts:
        for middle in {f["relation"], f["predicate_uri"]}:
            by_triple.setdefault((f["entity0_uri"], middle, f["entity1_uri"]), []).append(f["fact_id"])
    listed: dict[str, set[str]] = {}
    for f in facts:
        for sid in f["trex_sentences"]:
            listed.setdefault(sid, set()).add(f["fact_id"])
    for _, records in shards:
        for s in records:
            ids = set(listed.get(s["sentence_id"], ()))
            for triple in s["fact_triples"]:
                ids.update(by_triple.get(tuple(triple), ()))
            s["fact_ids"] = sorted(ids)


def _abstracts(shards: list[tuple[str, list[dict]]]) -> list[dict]:
    """One open-set passage per abstract, its sentences in order, ids in order of first appearance."""
    grouped: dict[str, list[dict]] = {}
    for _, records in shards:
        for s in records:
            grouped.setdefault(s["abstract_uri"], []).append(s)
    docs = []
    for uri, sentences in grouped.items():
        sentences.sort(key=lambda s: (s["sent_idx_in_abst"], s["sentence_id"]))
        fact_ids = sorted({f for s in sentences for f in s["fact_ids"]})
        triples = sorted({tuple(t) for s in sentences for t in s["fact_triples"]})
        docs.append({"doc_id": uri, "text": " ".join(s["text"] for s in sentences), "fact_ids": fact_ids,
                     "fact_triples": [list(t) for t in triples]})
    return docs


def sample_queries(facts: list[dict], sentences_by_fact: dict[str, int], per_bucket: int, seed: int) -> list[dict]:
    """Up to ``per_bucket`` facts of each frequency bucket as queries, drawn with ``seed``
    (``sentences_by_fact``: annotated closed-set sentences per fact id)."""
    rng = random.Random(seed)
    buckets: dict[int, list[dict]] = {}
    for f in facts:
        b = f.get("c4_frequency_bucket")
        buckets.setdefault(int(b) if isinstance(b, int) else frequency_bucket(f["c4_frequency"]), []).append(f)
    queries = []
    for b in sorted(buckets):
        pool = sorted(buckets[b], key=lambda f: f["fact_id"])
        for f in sorted(rng.sample(pool, min(per_bucket, len(pool))), key=lambda f: f["fact_id"]):
            queries.append({
                "example_id": f"Q{len(queries):05d}", "fact_id": f["fact_id"],
                "prompt": f["prompt0"], "prompt1": f["prompt1"], "prompt2": f["prompt2"],
                "target": f["entity1"], "entity0": f["entity0"], "entity1": f["entity1"],
                "relation": f["relation"], "c4_frequency": f["c4_frequency"], "c4_frequency_bucket": b,
                "is_repetition": f["is_repetition"], "has_trex_sentence": sentences_by_fact.get(f["fact_id"], 0) > 0,
            })
    return queries


def release_key(release_dir: str | os.PathLike, queries_per_bucket: int, seed: int) -> str:
    """What a release world is a function of: the release files' contents and the sampling."""
    release_dir = Path(release_dir).expanduser()
    if not (release_dir / FACTS_FILE).is_file():
        raise ArtifactError(f"{str(release_dir)!r} has no {FACTS_FILE}: give the directory that holds the "
                            f"release's {FACTS_FILE} and {SENTENCES_GLOB} files.")
    files = [release_dir / FACTS_FILE, *sorted(release_dir.glob(SENTENCES_GLOB))]
    return config_hash({"files": {p.name: input_digest(p) for p in files},
                        "queries_per_bucket": queries_per_bucket, "seed": seed})


def world_from_release(release_dir: str | os.PathLike, out_dir: str | os.PathLike, queries_per_bucket: int = 900,
                       seed: int = 0) -> Path:
    """Write (or reuse) the world of a release directory into ``out_dir``."""
    # store imports natural, which imports release (sample_queries)
    from .store import CORPUS_FILE, MANIFEST, QUERIES_FILE, sentence_shard_name, write_manifest

    if isinstance(queries_per_bucket, bool) or not isinstance(queries_per_bucket, int) or queries_per_bucket < 1:
        raise ValueError(f"queries_per_bucket={queries_per_bucket!r}: give a positive number of queries per bucket.")
    out_dir = Path(out_dir)
    key = release_key(release_dir, queries_per_bucket, seed)
    if out_dir.exists():
        # A release world is a function of its key (the release files and the sampling): a
        # damaged one is rebuilt, never reused.
        if (is_complete(out_dir) and read_json(out_dir / MANIFEST).get("release_key") == key
                and discard_if_damaged(out_dir, "Release world")):
            return out_dir
    if out_dir.exists():
        raise ArtifactError(f"{str(out_dir)!r} already exists and is not this release's world (other files or "
                            "settings, or unfinished). Choose another output directory or delete it.")
    facts, shards = read_release(release_dir)
    _annotate(facts, shards)
    per_fact: dict[str, int] = {}
    for _, records in shards:
        for s in records:
            for fid in s["fact_ids"]:
                per_fact[fid] = per_fact.get(fid, 0) + 1
    corpus = _abstracts(shards)
    queries = sample_queries(facts, per_fact, queries_per_bucket, seed)
    with atomic_directory(out_dir) as tmp:
        write_jsonl(tmp / FACTS_FILE, facts)
        for i, (_, records) in enumerate(shards):  # renamed as the world reader expects
            write_jsonl(tmp / sentence_shard_name(i, len(shards)), records)
        write_jsonl(tmp / CORPUS_FILE, corpus)
        write_jsonl(tmp / QUERIES_FILE, queries)
        write_manifest(tmp, {
            "kind": "trackstar-world", "profile": RELEASE_PROFILE, "seed": seed,
            "release_dir": str(Path(release_dir).resolve()), "release_key": key,
            "profile_settings": {"n_sentence_shards": len(shards), "queries_per_bucket": queries_per_bucket,
                                 "bucket_bounds": list(BUCKET_BOUNDS)},
            "release_shard_files": [name for name, _ in shards],
            "counts": {"facts": len(facts), "sentences": sum(len(r) for _, r in shards), "documents": len(corpus),
                       "queries": len(queries),
                       "queries_per_bucket": [sum(q["c4_frequency_bucket"] == b for q in queries)
                                              for b in range(len(BUCKET_BOUNDS) + 1)]},
        })
    return out_dir


__all__ = ["BUCKET_BOUNDS", "frequency_bucket", "read_release", "release_key", "sample_queries", "world_from_release"]
