"""The embedded fact world: determinism, schemas, ground truth, bad input."""

import filecmp
import shutil
from collections import Counter
from pathlib import Path

import pytest

from trackstar.io import ArtifactError
from trackstar.world import build_world, load_world, states_fact
from trackstar.world.schema import SchemaError, validate_records
from trackstar.world.store import MANIFEST


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_same_seed_gives_byte_identical_world(tmp_path):
    a = build_world(tmp_path / "a", "micro", 7)
    b = build_world(tmp_path / "b", "micro", 7)
    assert _files(a) == _files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, _files(a), shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(_files(a))


def test_other_seed_gives_other_world(tmp_path, micro_world):
    other = load_world(build_world(tmp_path / "s1", "micro", 1))
    assert other.manifest["content_hash"] != micro_world.manifest["content_hash"]


def test_schemas_are_valid_and_checked(micro_world):
    # load_world validated every record; a broken record must be caught too.
    bad = dict(micro_world.facts[0])
    del bad["prompt0"]
    with pytest.raises(SchemaError, match="prompt0"):
        validate_records("fact", [bad], "facts.jsonl")
    bad = dict(micro_world.sentences[0], sent_idx_in_abst="3")
    with pytest.raises(SchemaError, match="sent_idx_in_abst"):
        validate_records("sentence", [bad], "sentences")


def test_at_least_eight_relations_with_wikidata_ids(micro_world):
    relations = {f["relation"] for f in micro_world.facts}
    assert len(relations) >= 8
    assert {"P36", "P17", "P30", "P38", "P47", "P19", "P27", "P106"} <= relations
    for f in micro_world.facts:
        assert f["predicate_uri"].endswith("/" + f["relation"])


def test_real_geography_is_present(micro_world):
    capitals = {f["entity0"]: f["entity1"] for f in micro_world.facts if f["relation"] == "P36"}
    assert capitals.get("China") == "Beijing"
    assert capitals.get("India") == "New Delhi"


def test_every_annotated_fact_is_stated_by_its_text(micro_world):
    facts = micro_world.facts_by_id
    for rec in micro_world.sentences + micro_world.corpus:
        assert len(rec["fact_ids"]) == len(rec["fact_triples"])
        for fid, triple in zip(rec["fact_ids"], rec["fact_triples"]):
            fact = facts[fid]
            assert triple == [fact["entity0_uri"], fact["relation"], fact["entity1_uri"]]
            assert states_fact(rec["text"], fact), (rec["text"], fact["entity0"], fact["relation"])


@pytest.mark.parametrize("profile", ["micro", "tiny"])
def test_no_unannotated_text_states_a_query_fact(tmp_path, profile):
    world = load_world(build_world(tmp_path / profile, profile, 0))
    facts = world.facts_by_id
    targets = [facts[q["fact_id"]] for q in world.queries]
    for rec in world.sentences + world.corpus:
        annotated = set(rec["fact_ids"])
        for fact in targets:
            if fact["fact_id"] not in annotated:
                assert not states_fact(rec["text"], fact), (rec["text"], fact["fact_id"])


def test_the_state_checker_can_fail(micro_world):
    fact = micro_world.facts[0]
    assert states_fact(f"Hello. {fact['prompt0']} {fact['entity1']}. Bye.", fact)
    assert not states_fact(f"{fact['entity0']} and {fact['entity1']} are both words.", fact)


def test_closed_set_has_gold_two_fact_and_hard_negative_sentences(tmp_path):
    world = load_world(build_world(tmp_path / "tiny", "tiny", 0))
    n_facts = Counter(len(s["fact_ids"]) for s in world.sentences)
    assert n_facts[1] > 0 and n_facts[2] > 0 and n_facts[0] > 0
    # Hard negatives share a fact's subject or object without stating it.
    names = {f["entity0"] for f in world.facts} | {f["entity1"] for f in world.facts}
    negatives = [s for s in world.sentences if not s["fact_ids"]]
    assert all(any(n in s["text"] for n in names) for s in negatives)
    # The trex_sentences of a fact are exactly the sentences annotated with it.
    by_fact = {}
    for s in world.sentences:
        for fid in s["fact_ids"]:
            by_fact.setdefault(fid, []).append(s["sentence_id"])
    for f in world.facts:
        assert sorted(f["trex_sentences"]) == sorted(by_fact.get(f["fact_id"], []))
    assert any(not f["trex_sentences"] for f in world.facts)


def test_frequency_spreads_over_six_buckets_and_matches_the_corpus(micro_world):
    mentions = Counter(fid for d in micro_world.corpus for fid in d["fact_ids"])
    buckets = set()
    for f in micro_world.facts:
        assert f["c4_frequency"] == mentions.get(f["fact_id"], 0)
        b = f["c4_frequency_bucket"]
        lo, hi = (0, 0) if b == 0 else (2 ** (b - 1), 2**b - 1)
        assert lo <= f["c4_frequency"] <= hi
        buckets.add(b)
    assert buckets == set(range(6))
    assert any(f["c4_frequency"] == 0 for f in micro_world.facts)


def test_queries_are_even_across_buckets_and_end_before_the_object(micro_world):
    per_bucket = Counter(q["c4_frequency_bucket"] for q in micro_world.queries)
    assert set(per_bucket) == set(range(6)) and len(set(per_bucket.values())) == 1
    facts = micro_world.facts_by_id
    for q in micro_world.queries:
        fact = facts[q["fact_id"]]
        assert q["prompt"] == fact["prompt0"] and q["target"] == fact["entity1"]
        assert fact["entity1"] not in q["prompt"] or q["is_repetition"]
        assert states_fact(f"{q['prompt']} {q['target']}.", fact)
        assert q["has_trex_sentence"] == bool(fact["trex_sentences"])


def test_rebuild_reuses_a_finished_world(tmp_path):
    path = build_world(tmp_path / "w", "micro", 0)
    stamp = (path / MANIFEST).stat().st_mtime_ns
    assert build_world(path, "micro", 0) == path
    assert (path / MANIFEST).stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"profile": "huge"}, "Unknown world profile 'huge'.*micro, tiny, small, full"),
        ({"seed": -1}, "non-negative integer"),
        ({"seed": 1.5}, "non-negative integer"),
        ({"seed": True}, "non-negative integer"),
    ],
)
def test_bad_settings_are_named(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_world(tmp_path / "w", **{"profile": "micro", "seed": 0, **kwargs})


def test_unwritable_output_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ArtifactError, match="not writable"):
        build_world(blocker / "world", "micro", 0)


def test_other_settings_in_existing_dir_are_refused(tmp_path):
    path = build_world(tmp_path / "w", "micro", 0)
    with pytest.raises(ArtifactError, match="seed=0.*not profile='micro' seed=3"):
        build_world(path, "micro", 3)


def test_killed_build_leaves_nothing_that_looks_finished(tmp_path, monkeypatch):
    import trackstar.world.store as store

    def die(world, out_dir):
        (out_dir / "trex_facts.jsonl").write_text("{}\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "write_world", die)
    with pytest.raises(KeyboardInterrupt):
        build_world(tmp_path / "w", "micro", 0)
    assert not (tmp_path / "w").exists()
    monkeypatch.undo()
    # A temp dir of a process that no longer exists (a SIGKILL) is swept on the next build.
    stale = tmp_path / ".w.partial-999999999-deadbeef"
    stale.mkdir()
    load_world(build_world(tmp_path / "w", "micro", 0))
    assert not stale.exists()


def test_partial_and_corrupted_worlds_are_refused(tmp_path):
    path = build_world(tmp_path / "w", "micro", 0)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "COMPLETE").unlink()
    with pytest.raises(ArtifactError, match="incomplete.*Delete it and rebuild"):
        load_world(broken)
    with pytest.raises(ArtifactError, match="not a finished world"):
        build_world(broken, "micro", 0)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    with open(corrupt / "c4_corpus.jsonl", "a") as fh:
        fh.write('{"doc_id": "x"}\n')
    with pytest.raises(ArtifactError, match="corrupted"):
        load_world(corrupt)
