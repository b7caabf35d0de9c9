"""The paper's release files as a world (a hand-written fixture in the release's schema)."""

import json
import shutil
from pathlib import Path

import pytest

from trackstar.io import ArtifactError, write_marker
from trackstar.world import load_world
from trackstar.world.release import frequency_bucket, world_from_release
from trackstar.world.schema import SchemaError
from trackstar.world.store import MANIFEST, write_manifest

RELEASE = Path(__file__).parent / "fixtures" / "release"


def test_release_becomes_a_world_with_annotations_abstracts_and_bucketed_queries(tmp_path):
    world = load_world(world_from_release(RELEASE, tmp_path / "w", queries_per_bucket=1))
    facts = {s["sentence_id"]: s["fact_ids"] for s in world.sentences}
    # by predicate URI (s1), by relation id (s3), by the fact's own trex_sentences list and a triple (s4)
    assert facts == {"s1": ["T1"], "s2": [], "s3": ["T3"], "s4": ["T2", "T4"], "s5": [], "s6": []}
    docs = {d["doc_id"]: d for d in world.corpus}
    assert list(docs) == ["http://dbpedia.org/resource/Paris", "http://dbpedia.org/resource/Ada_Lovelace",
                          "http://dbpedia.org/resource/Rome"]
    rome = docs["http://dbpedia.org/resource/Rome"]
    assert rome["text"] == "Rome is the capital city of Italy. It has been the capital since 1871."
    assert rome["fact_ids"] == ["T2", "T4"]
    by_fact = {q["fact_id"]: q for q in world.queries}
    assert {f: q["c4_frequency_bucket"] for f, q in by_fact.items()} == {"T5": 0, "T4": 1, "T3": 2, "T2": 4, "T1": 5}
    assert by_fact["T1"]["prompt"] == "The capital of France is" and by_fact["T1"]["target"] == "Paris"
    assert [f for f, q in by_fact.items() if not q["has_trex_sentence"]] == ["T5"]
    again = world_from_release(RELEASE, tmp_path / "w", queries_per_bucket=1)  # reused, not rebuilt
    assert again == world.path
    with pytest.raises(ArtifactError, match="not this release's world"):
        world_from_release(RELEASE, tmp_path / "w", queries_per_bucket=2)


def test_frequency_buckets_are_decades():
    assert [frequency_bucket(n) for n in (0, 1, 9, 10, 99, 100, 999, 1000, 9999, 10000, 10**7)] == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_a_missing_field_names_the_file_and_line(tmp_path):
    bad = tmp_path / "release"
    shutil.copytree(RELEASE, bad)
    lines = (bad / "trex_sentences.jsonl-00001-of-00002").read_text().splitlines()
    record = json.loads(lines[1])
    del record["abstract_uri"]
    lines[1] = json.dumps(record)
    (bad / "trex_sentences.jsonl-00001-of-00002").write_text("\n".join(lines) + "\n")
    with pytest.raises(SchemaError, match=r"trex_sentences.jsonl-00001-of-00002: sentence record 1 \(line 2, "
                                          r"sentence_id='s4'\) lacks field\(s\) \['abstract_uri'\]"):
        world_from_release(bad, tmp_path / "w")
    assert not (tmp_path / "w").exists()  # nothing half-written
    (bad / "trex_facts.jsonl").write_text("{not json\n")
    with pytest.raises(SchemaError, match="trex_facts.jsonl line 1: not valid JSON"):
        world_from_release(bad, tmp_path / "w")
    with pytest.raises(ArtifactError, match="has no trex_facts.jsonl"):
        world_from_release(tmp_path, tmp_path / "w2")


def test_every_sweep_takes_a_release_world(tmp_path):
    """world=release world.path=DIR: our model pretrains on its abstracts; both corpora are scored."""
    from trackstar.experiment import ConfigError, compose_config, run_cell, validate

    common = ["world=release", f"world.path={RELEASE}", "world.queries_per_bucket=1", "model=micro",
              f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "progress=false",
              "logger=none", "eval.k=3", "eval.tail_patch_ks=[1,3]"]
    for corpus in ("closed", "open"):
        record = run_cell(compose_config([*common, "method=bm25", f"eval={corpus}"]))
        assert record.status == "finished" and record.n_queries == 5
        assert record.metrics["mrr"]["n"] == (4 if corpus == "closed" else 5)  # closed: those with a sentence
        assert record.metrics["mrr"]["mean"] > 0.5  # BM25 finds the sentence that states the fact
    with pytest.raises(ConfigError, match="world=release needs world.path"):
        validate(compose_config(["world=release"]))
    with pytest.raises(ConfigError, match="has no trex_facts.jsonl"):
        validate(compose_config(["world=release", f"world.path={tmp_path}"]))


def test_cli_builds_a_release_world(tmp_path, capsys):
    from trackstar.cli import main

    main(["world", "--from-release", str(RELEASE), "--queries-per-bucket", "2", "--out", str(tmp_path / "w")])
    assert "5 facts, 6 closed-set sentences, 3 documents, 5 queries" in capsys.readouterr().out
    assert load_world(tmp_path / "w").manifest["profile"] == "release"


def _edit(path: Path, line: int, **fields) -> None:
    lines = path.read_text().splitlines()
    lines[line] = json.dumps({**json.loads(lines[line]), **fields})
    path.write_text("\n".join(lines) + "\n")


def test_duplicate_ids_in_a_release_are_refused_and_named(tmp_path):
    """A second "T1" made the Italy -> Rome query count the Paris sentence as correct (MRR 1.000);
    a second sentence id failed only after pretraining, naming none."""
    bad = tmp_path / "facts"
    shutil.copytree(RELEASE, bad)
    _edit(bad / "trex_facts.jsonl", 1, fact_id="T1")
    with pytest.raises(SchemaError, match=r"trex_facts.jsonl: fact records at record 1 and record 2 share fact_id='T1'"):
        world_from_release(bad, tmp_path / "w")
    bad = tmp_path / "sentences"
    shutil.copytree(RELEASE, bad)
    first = json.loads((bad / "trex_sentences.jsonl-00000-of-00002").read_text().splitlines()[0])["sentence_id"]
    _edit(bad / "trex_sentences.jsonl-00001-of-00002", 2, sentence_id=first)
    with pytest.raises(SchemaError, match=rf"sentence records at trex_sentences.jsonl-00000-of-00002 record 1 and "
                                          rf"trex_sentences.jsonl-00001-of-00002 record 3 share sentence_id='{first}'"):
        world_from_release(bad, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_world_directory_with_duplicate_ids_does_not_load(tmp_path):
    world = world_from_release(RELEASE, tmp_path / "w", queries_per_bucket=1)
    lines = (world / "queries.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "example_id": json.loads(lines[0])["example_id"]})
    (world / "queries.jsonl").write_text("\n".join(lines) + "\n")
    manifest = json.loads((world / MANIFEST).read_text())  # re-sealed: a world made by other means
    (world / MANIFEST).unlink()
    write_manifest(world, {k: v for k, v in manifest.items() if k not in ("files", "content_hash")})
    write_marker(world)
    with pytest.raises(SchemaError, match="queries.jsonl: query records at record 1 and record 2 share example_id="):
        load_world(world)


def test_unreadable_or_empty_release_files_are_named(tmp_path):
    bad = tmp_path / "bytes"
    shutil.copytree(RELEASE, bad)
    shard = bad / "trex_sentences.jsonl-00001-of-00002"
    lines = shard.read_bytes().splitlines()
    lines[1] = lines[1].replace(b"capital", b"capit\xe0l")
    shard.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(SchemaError, match=r"trex_sentences.jsonl-00001-of-00002 line 2: byte 0xe0 at column \d+ is not UTF-8"):
        world_from_release(bad, tmp_path / "w")
    empty = tmp_path / "empty"
    shutil.copytree(RELEASE, empty)
    for shard in empty.glob("trex_sentences.jsonl-*"):
        shard.write_text("")
    with pytest.raises(SchemaError, match="hold no sentences"):
        world_from_release(empty, tmp_path / "w")


def test_a_damaged_release_world_is_rebuilt_not_reused(tmp_path):
    world = world_from_release(RELEASE, tmp_path / "w", queries_per_bucket=1)
    good = (world / "c4_corpus.jsonl").read_bytes()
    (world / "c4_corpus.jsonl").write_bytes(good[: len(good) // 2])
    assert world_from_release(RELEASE, tmp_path / "w", queries_per_bucket=1) == world
    assert (world / "c4_corpus.jsonl").read_bytes() == good
    assert len(load_world(world).corpus) == 3


def test_k_above_the_corpus_is_refused_before_pretraining(tmp_path):
    from trackstar.experiment import ConfigError, compose_config, run_cell

    cfg = compose_config(["world=release", f"world.path={RELEASE}", "world.queries_per_bucket=1", "model=micro",
                          f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "progress=false",
                          "logger=none", "method=bm25"])
    with pytest.raises(ConfigError, match=r"eval.k=10, but the closed set of the world release-\w+ has 6 passages"):
        run_cell(cfg)
    assert not (tmp_path / "art" / "models").exists()  # no model was trained
