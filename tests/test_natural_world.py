"""The natural world style: its phrasings, surface forms, distractors, tail, card and round trip."""

import json
import re
from dataclasses import replace

import bm25s
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from trackstar.evaluation.world_card import (KNOB_EFFECT_SEEDS, bm25_closed_set, card_markdown, content_words,
                                             knob_effects, write_card)
from trackstar.experiment import ConfigError, validate
from trackstar.sweeps import SWEEPS_DIR
from trackstar.world import build_world, load_world
from trackstar.world.corpus import ExactJudge
from trackstar.world.generate import generate_world
from trackstar.world.natural import DISTRACTOR_KINDS
from trackstar.world.profiles import NaturalKnobs, get_profile, natural_knobs
from trackstar.world.relations import NATURAL_STATEMENTS, RELATIONS, natural_render
from trackstar.world.release import world_from_release

DISTRACTORS_OFF = {"relative_distractors": 0.0, "namesake_distractors": 0.0, "same_object_distractors": 0.0}


@pytest.fixture(scope="module")
def natural_micro(tmp_path_factory):
    path = build_world(tmp_path_factory.mktemp("worlds") / "micro-natural", "micro", 0, "natural")
    return load_world(path)


@pytest.fixture(scope="module")
def natural_tiny():
    return generate_world(get_profile("tiny"), 0, "natural")


def test_every_relation_has_eight_phrasings_none_containing_a_prompt():
    for pid, relation in RELATIONS.items():
        phrasings = NATURAL_STATEMENTS[pid]
        assert len(phrasings) >= 8, pid
        prompt_words = set().union(*(content_words(p.format(s="")) for p in relation.prompts))
        sharing = 0
        for template in phrasings:
            text = natural_render(template, "Xavier Quill", "Yonder").lower()
            for prompt in relation.prompts:
                assert prompt.format(s="Xavier Quill").lower() not in text, (pid, template, prompt)
            sharing += bool(content_words(template.format(s="", o="", a_o="")) & prompt_words)
        assert sharing < len(phrasings) / 2, f"{pid}: {sharing} of {len(phrasings)} phrasings share a prompt word"


def test_natural_world_states_the_same_facts_and_is_deterministic(tmp_path, micro_world, natural_micro):
    assert [(f["entity0_uri"], f["relation"], f["entity1_uri"]) for f in natural_micro.facts] == [
        (f["entity0_uri"], f["relation"], f["entity1_uri"]) for f in micro_world.facts]
    again = load_world(build_world(tmp_path / "again", "micro", 0, "natural"))
    assert again.manifest["content_hash"] == natural_micro.manifest["content_hash"]
    assert natural_micro.manifest["style"] == "natural"
    assert natural_micro.manifest["content_hash"] != micro_world.manifest["content_hash"]


def test_no_closed_set_sentence_contains_its_fact_s_prompt(natural_tiny):
    facts = {f.fact_id: f for f in natural_tiny.facts}
    for s in natural_tiny.sentences:
        if s["kind"] == "gold":
            f = facts[s["states"]]
            for i in range(3):
                assert f.prompt(i).lower() not in s["text"].lower()


def test_aliases_are_written_to_the_release_fields_and_used(natural_micro):
    with_alias = [f for f in natural_micro.facts if len(f["entity0_alias"]) > 1]
    assert with_alias and all(f["entity0_alias"][0] == f["entity0"] for f in natural_micro.facts)
    alias_golds = [s for s in natural_micro.sentences if s.get("subject_form") == "alias"]
    by_id = natural_micro.facts_by_id
    for s in alias_golds:
        f = by_id[s["states"]]
        assert any(a in s["text"] for a in f["entity0_alias"][1:]) and f["entity0"] not in s["text"]


def test_pronoun_sentence_is_correct_for_the_exact_judge_and_missed_by_bm25(natural_tiny):
    """A pronoun-only gold sentence is labelled with its fact, and BM25 ranks it below
    sentences that share the query's words."""
    from trackstar.retrieval.bm25 import bm25_topk
    from trackstar.retrieval.records import Corpus, query_text, retrieval_record

    world = natural_tiny
    corpus = Corpus("closed", [s["sentence_id"] for s in world.sentences], [s["text"] for s in world.sentences],
                    [s["fact_ids"] for s in world.sentences])
    kinds_by_fact: dict[str, set] = {}
    for s in world.sentences:
        if s["kind"] == "gold":
            kinds_by_fact.setdefault(s["states"], set()).add(s["subject_form"])
    queries = [q for q in world.queries if kinds_by_fact.get(q["fact_id"]) == {"pronoun"}]
    assert queries, "the tiny world has queries whose only gold sentences use a pronoun"
    rows, _ = bm25_topk(corpus.texts, [query_text(q) for q in queries], 10)
    missed = 0
    for q, row in zip(queries, rows):
        gold = [s for s in world.sentences if s.get("states") == q["fact_id"]]
        assert all(s["text"].split(" ", 1)[0] in ("He", "She", "It") for s in gold)
        record = retrieval_record(q, corpus, [g["sentence_id"] for g in gold], [0.0] * len(gold))
        assert all(record["proponent_correct"])
        first = [corpus.ids[j] for j in row][0]
        missed += first not in {g["sentence_id"] for g in gold}
    assert missed >= len(queries) / 2


def test_no_distractor_is_judged_correct(natural_tiny):
    facts = [json.loads(json.dumps(r)) for r in _fact_records(natural_tiny)]
    judge = ExactJudge(facts)
    distractors = [s for s in natural_tiny.sentences if s["kind"] in DISTRACTOR_KINDS]
    assert {s["kind"] for s in distractors} == set(DISTRACTOR_KINDS)
    for s in distractors:
        assert s["fact_ids"] == [] and s["fact_triples"] == []
        assert judge(s["text"]) == [], s["text"]
    # The judge can say yes: golds that name their subject are credited to their fact.
    golds = [s for s in natural_tiny.sentences if s.get("subject_form") in ("name", "alias")]
    assert all(judge(s["text"]) == [s["states"]] for s in golds)


def test_open_set_labels_are_what_the_exact_judge_finds(natural_tiny):
    judge = ExactJudge(_fact_records(natural_tiny))
    for doc in natural_tiny.corpus:
        assert judge(doc["text"]) == sorted(doc["fact_ids"]), doc["text"]


def test_distractors_lower_bm25_mrr():
    prof = get_profile("tiny")
    on = [bm25_closed_set(*_closed(generate_world(prof, s, "natural")))["bm25_mrr"] for s in (0, 1)]
    off = [bm25_closed_set(*_closed(generate_world(prof, s, "natural", NaturalKnobs(**DISTRACTORS_OFF))))["bm25_mrr"]
           for s in (0, 1)]
    assert np.mean(on) < np.mean(off) - 0.02


def test_gold_sentences_have_a_heavy_tail(natural_tiny):
    counts = [len(f.trex_sentences) for f in natural_tiny.facts]
    assert np.mean([c <= 1 for c in counts]) > 0.5
    assert max(counts) >= 8


def test_annotation_noise_leaves_stating_sentences_unannotated():
    noisy = generate_world(get_profile("micro"), 0, "natural", NaturalKnobs(annotation_noise=0.5))
    golds = [s for s in noisy.sentences if s["kind"] == "gold"]
    unannotated = [s for s in golds if not s["fact_ids"]]
    assert 0.3 < len(unannotated) / len(golds) < 0.7
    listed = {sid for f in noisy.facts for sid in f.trex_sentences}
    assert not listed & {s["sentence_id"] for s in unannotated}


@pytest.mark.parametrize("values, match", [
    ({"pronoun_share": 1.5}, r"world.natural.pronoun_share=1.5 .* \[0.0, 1.0\]"),
    ({"phrasings": 12}, r"world.natural.phrasings=12 .* at least 9 natural phrasings"),
    ({"alias_share": 0.5, "pronoun_share": 0.4, "short_form_share": 0.3}, "sum to at most 1"),
    ({"gold_sentences": 3}, r"unknown knob\(s\) \['gold_sentences'\]"),
])
def test_bad_knobs_are_named(values, match):
    with pytest.raises(ValueError, match=match):
        natural_knobs(values)


@pytest.mark.parametrize("overrides, match", [
    (["world.style=fancy"], "world.style='fancy' .* templated, natural"),
    (["world.natural.pronoun_share=-0.1"], "world.natural.pronoun_share=-0.1"),
    (["world.style=templated", "world.natural.pronoun_share=0.5"], "apply to world.style=natural only"),
])
def test_bad_world_config_fails_before_any_work(tmp_path, overrides, match):
    with initialize_config_dir(config_dir=str(SWEEPS_DIR.parent / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"artifacts_dir={tmp_path}", *overrides])
    with pytest.raises(ConfigError, match=match):
        validate(cfg)
    assert not any(tmp_path.iterdir())


def test_world_card_figures_are_recomputed_from_the_files(natural_micro):
    card = write_card(natural_micro.path)
    assert json.loads((natural_micro.path / "world_card.json").read_text()) == card
    assert "BM25 MRR" in (natural_micro.path / "world_card.md").read_text() == card_markdown(card)
    w = natural_micro
    assert (card["facts"], card["sentences"], card["documents"], card["queries"]) == (
        len(w.facts), len(w.sentences), len(w.corpus), len(w.queries))
    gold = [(s, f) for s in w.sentences for f in w.facts if f["fact_id"] in s["fact_ids"]]
    assert card["gold_sentences"] == len(gold)
    named = np.mean([bool(re.search(r"\b" + re.escape(f["entity0"]) + r"\b", s["text"], re.I)) for s, f in gold])
    assert card["share_gold_with_subject_name"] == pytest.approx(named, abs=1e-4)
    assert sum(card["gold_per_fact_histogram"].values()) == len(w.facts)
    assert card["gold_per_fact_histogram"]["0"] == sum(not f["trex_sentences"] for f in w.facts)
    n_distractors = sum(s["kind"] in DISTRACTOR_KINDS for s in w.sentences)
    assert card["distractors_per_fact"] == pytest.approx(n_distractors / len(w.facts), abs=1e-4)
    # BM25 MRR by brute force: every sentence scored, ranked, first correct within 10.
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([s["text"] for s in w.sentences], stopwords="en", show_progress=False),
                    show_progress=False)
    rr = []
    for q in w.queries:
        if not q["has_trex_sentence"]:
            continue
        tokens = [t for t in bm25s.tokenize([f"{q['prompt']} {q['target']}"], stopwords="en", return_ids=False,
                                            show_progress=False)[0] if t in retriever.vocab_dict]
        scores = retriever.get_scores(tokens)
        top = np.argsort(-scores, kind="stable")[:10]
        hits = [i for i, j in enumerate(top) if q["fact_id"] in w.sentences[j]["fact_ids"]]
        rr.append(1 / (1 + hits[0]) if hits else 0.0)
    assert card["bm25_mrr"] == pytest.approx(np.mean(rr), abs=1e-3)
    assert "fewer than 50 queries" in card["knob_effects_bm25_mrr"]  # micro: 12 queries


def test_knob_effects_regenerate_the_world_with_each_knob_off():
    effects = knob_effects("micro", 0, {"pronoun_share": 0.6})
    alone = replace(NaturalKnobs(), pronoun_share=0.0)
    means = [bm25_closed_set(*_closed(generate_world(get_profile("micro"), s, "natural", alone)))["bm25_mrr"]
             for s in range(KNOB_EFFECT_SEEDS)]
    assert effects["pronoun_share off"] == pytest.approx(np.mean(means), abs=1e-4)
    assert "annotation_noise off" not in effects  # already off
    assert {"as built", "all knobs off (natural phrasings only)", "templated style"} <= set(effects)


def test_release_round_trip_rebuilds_the_same_world(tmp_path, natural_micro):
    rebuilt = load_world(world_from_release(natural_micro.path, tmp_path / "rebuilt",
                                            get_profile("micro").queries_per_bucket, 0))
    assert rebuilt.facts == natural_micro.facts
    strip = lambda rows: [{k: v for k, v in r.items() if k != "fact_ids"} for r in rows]  # noqa: E731
    assert strip(rebuilt.sentences) == strip(natural_micro.sentences)
    assert [s["fact_ids"] for s in rebuilt.sentences] == [s["fact_ids"] for s in natural_micro.sentences]
    assert rebuilt.queries == natural_micro.queries


def test_knobs_off_gives_a_lexically_easy_world():
    """With every difficulty off, the natural phrasings alone leave BM25 at the templated level:
    the difficulty comes from the knobs, each measured in the card."""
    off = replace(NaturalKnobs(), alias_share=0.0, short_form_share=0.0, pronoun_share=0.0, gold_tail=0.0,
                  max_gold=3, **DISTRACTORS_OFF)
    w = generate_world(get_profile("tiny"), 0, "natural", off)
    assert bm25_closed_set(*_closed(w))["bm25_mrr"] > 0.95


def _closed(world):
    return world.sentences, world.queries


def _fact_records(world):
    from trackstar.world.generate import fact_record

    return [fact_record(f, world.aliases) for f in world.facts]
