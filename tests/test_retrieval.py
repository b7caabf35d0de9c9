"""The retrieval stage: the registry, the baselines, retrieve -> evaluate, the curvature cache,
one cell end to end, and the sanity report, on the micro world."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from trackstar.attribution import METHODS, TrackStar
from trackstar.evaluation.fact_tracing import evaluate
from trackstar.retrieval import (
    Corpus,
    Retriever,
    get_retriever,
    register,
    retrieve,
    retriever_names,
    unregister,
)
from trackstar.retrieval.records import text_records


class FirstSentences(Retriever):
    """A throwaway baseline: the first k corpus texts for every query, scored k..1."""

    name = "first_sentences"
    rank = 2.5

    @dataclass(frozen=True)
    class Options:
        offset: int = 0

    def retrieve(self, task):
        corpus = Corpus.from_world(task.world, task.corpus)
        rows = np.tile(np.arange(self.options.offset, self.options.offset + task.k), (len(task.queries), 1))
        scores = np.tile(np.arange(task.k, 0, -1, dtype=np.float32), (len(task.queries), 1))
        return text_records(task.queries, corpus, rows, scores), {"offset": self.options.offset}


@pytest.fixture
def throwaway():
    register(FirstSentences.name, FirstSentences)
    yield FirstSentences.name
    unregister(FirstSentences.name)


def test_registry_lists_every_paper_row_in_table_order():
    # The tail-patch oracle (the ceiling) after every method, the control row of Table C.1 last.
    assert retriever_names() == ["bm25", "dense", *METHODS, "oracle_tail_patch", "random"]
    assert get_retriever("trackstar").label == "TrackStar" and get_retriever("dense").label.startswith("Dense (MiniLM")
    assert get_retriever("trackstar", corpus="open").settings["lam"] == 0.99  # the corpus default
    assert get_retriever("trackstar", {"lam": 0.5}).settings["lam"] == 0.5
    with pytest.raises(ValueError, match="Unknown method 'nope'.*bm25"):
        get_retriever("nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['k3'\].*\['b', 'k1'\]"):
        get_retriever("bm25", {"k3": 1})
    with pytest.raises(ValueError, match="unknown setting"):
        get_retriever("trackstar", {"bogus": 1})
    with pytest.raises(ValueError, match="already registered"):
        register("bm25", FirstSentences)


def test_every_retriever_has_its_own_cache_key(throwaway):
    keys = {name: get_retriever(name).key_hash() for name in retriever_names()}
    assert len(set(keys.values())) == len(keys)  # a new baseline never reuses BM25's records
    assert get_retriever("bm25", {"k1": 1.2}).key_hash() != keys["bm25"]
    assert get_retriever("trackstar", {"d": 1024}).key_hash() != keys["trackstar"]
    assert get_retriever("trackstar", {"lam": 0.9}).key_hash() == keys["trackstar"]  # = the closed-set default


def test_throwaway_baseline_runs_through_a_cell_with_its_own_results(throwaway, micro_world, tmp_path):
    from trackstar.experiment import compose_config, run_cell
    from trackstar.io import read_jsonl

    common = [f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "world=micro", "model=micro",
              "eval.tail_patch=false", "eval.bootstrap_resamples=50", "logger=none", "progress=false"]
    bm25 = run_cell(compose_config([*common, "method=bm25"]))
    mine = run_cell(compose_config([*common, "method=bm25", f"method.name={throwaway}", "+method.options.offset=3"]))
    assert bm25.status == mine.status == "finished"
    assert mine.artifacts["retrievals"]["key"] != bm25.artifacts["retrievals"]["key"]
    assert (mine.method.name, mine.method.rank, mine.method.settings) == (throwaway, 2.5, {"offset": 3})
    records = read_jsonl(f"{mine.run_dir}/retrievals.jsonl")
    first = [s["sentence_id"] for s in micro_world.sentences[3:13]]
    assert all(r["proponent_ids"] == first for r in records)
    assert mine.info["offset"] == 3 and mine.metrics["mrr"]["mean"] != bm25.metrics["mrr"]["mean"]
    saved = json.loads((tmp_path / "res" / "adhoc" / next(iter(
        p.name for p in (tmp_path / "res" / "adhoc").iterdir() if p.name.startswith(throwaway))) / "metrics.json").read_text())
    assert saved["schema_version"] == 2 and saved["method"]["label"] == throwaway
    again = run_cell(compose_config([*common, "method=bm25", f"method.name={throwaway}", "+method.options.offset=3"]))
    assert again.finished == mine.finished  # skipped: the finished record was returned


def test_bm25_ranks_the_only_matching_text_first():
    from trackstar.retrieval.bm25 import bm25_topk

    texts = ["the cat sat on the mat", "Paris is the capital of France", "dogs bark loudly", "a mat of grass"]
    rows, scores = bm25_topk(texts, ["capital of France", "mat", "zebra"], k=2)
    assert rows[0, 0] == 1 and scores[0, 0] > 0 and scores[0, 1] == 0
    assert set(rows[1]) == {0, 3} and scores[1, 0] > 0
    assert (scores[2] == 0).all()  # no word of the corpus: no made-up match
    with pytest.raises(ValueError, match="exceeds the corpus size"):
        bm25_topk(texts, ["cat"], k=5)


def test_dense_top_k_equals_brute_force_cosine_ranking():
    from trackstar.retrieval.dense import dense_topk, load_encoder

    texts = ["Paris is the capital of France.", "Berlin is in Germany.", "The cat sleeps.", "Rome is in Italy."]
    queries = ["capital of France Paris", "a sleeping cat"]
    rows, scores = dense_topk(texts, queries, k=3)
    enc = load_encoder()
    d = enc.encode(texts, normalize_embeddings=True)
    q = enc.encode(queries, normalize_embeddings=True)
    sims = q @ d.T
    np.testing.assert_array_equal(rows, np.argsort(-sims, axis=1)[:, :3])
    np.testing.assert_allclose(scores, np.sort(sims, axis=1)[:, ::-1][:, :3], rtol=1e-5)
    assert rows[0, 0] == 0 and rows[1, 0] == 2


@pytest.mark.parametrize("method", ["bm25", "grad_cosine"])
def test_retrieve_then_evaluate(method, micro_world, checkpoint, tmp_path):
    queries = micro_world.queries[:4]
    records, info = retrieve(method, micro_world, "closed", queries=queries, k=5, checkpoint=checkpoint,
                             options={"d": 64} if method != "bm25" else None, work_dir=tmp_path)
    assert info["method"] == method and [r["example_id"] for r in records] == [q["example_id"] for q in queries]
    corpus = Corpus.from_world(micro_world, "closed")
    facts = {q["example_id"]: q["fact_id"] for q in queries}
    for r in records:
        assert len(r["proponent_ids"]) == 5 and r["proponent_scores"] == sorted(r["proponent_scores"], reverse=True)
        expected = [facts[r["example_id"]] in corpus.fact_ids[corpus.position(p)] for p in r["proponent_ids"]]
        assert r["proponent_correct"] == expected
        assert ("opponent_ids" in r) == (method != "bm25")
    per_query = evaluate(records, checkpoint, tail_patch_ks=(1, 5), progress=False)
    for r, (_, row) in zip(records, per_query.iterrows()):
        first = next((i for i, c in enumerate(r["proponent_correct"]) if c), None)
        assert row["mrr"] == (0.0 if first is None else 1 / (1 + first))
    assert {"tail_patch@1", "tail_patch@5", "tail_patch_logprob@5"} <= set(per_query.columns)
    assert per_query["tail_patch@5"].notna().all()


def test_gradient_rows_need_a_checkpoint_and_k_fits_the_corpus(micro_world):
    with pytest.raises(ValueError, match="needs a model checkpoint"):
        retrieve("trackstar", micro_world, "closed", k=5)
    with pytest.raises(ValueError, match="exceeds the closed corpus size"):
        retrieve("bm25", micro_world, "closed", k=10**6)


def test_curvature_is_cached_and_shared_without_changing_scores(micro_world, checkpoint, tmp_path):
    texts = [s["text"] for s in micro_world.sentences]
    queries = [(q["prompt"], q["target"]) for q in micro_world.queries[:6]]

    def run(name, work_dir, **changes):
        engine = TrackStar(checkpoint.model, checkpoint.tokenizer, METHODS[name].replace(d=64, k=5, **changes),
                           optimizer=checkpoint.optimizer, work_dir=work_dir)
        return engine.attribute(texts, queries)

    fresh = run("trackstar", None, lam=0.5)  # a temporary directory: nothing shared
    cached = run("trackstar", tmp_path, lam=0.5)
    again = run("trackstar", tmp_path, lam=0.5)
    for result in (cached, again):
        assert result.proponent_ids == fresh.proponent_ids
        np.testing.assert_allclose(result.proponent_scores, fresh.proponent_scores, rtol=1e-6)
    def cached_kinds():
        # Each cached matrix file has a checksum file beside it.
        assert sorted(p.name for p in (tmp_path / "curvature").glob("*.sha256")) == sorted(
            p.name + ".sha256" for p in (tmp_path / "curvature").glob("*.pt"))
        return sorted(p.name.split("-")[0] for p in (tmp_path / "curvature").glob("*.pt"))

    assert cached_kinds() == ["r", "r", "whitening"]  # R_train, R_eval, one R^{-1/2}
    run("trackstar", tmp_path, lam="auto")  # a new λ: a new decomposition, the same R matrices
    assert cached_kinds() == ["r", "r", "whitening", "whitening"]
    # exp1 and TRAK whiten with the same R_train (no V): one decomposition serves both.
    run("exp1", tmp_path)
    n = len(cached_kinds())
    run("trak", tmp_path)
    assert len(cached_kinds()) == n


def test_sanity_report(micro_world, checkpoint, tmp_path):
    from trackstar.experiment.sanity import sanity_report

    text = sanity_report(micro_world, checkpoint, methods=("bm25", "grad_cosine"), n_facts=2, d=64, work_dir=tmp_path)
    lines = text.splitlines()
    assert lines[0].startswith("Sanity report: ") and "  bm25:" in lines and "  grad_cosine:" in lines
    assert any(line.startswith("    [x]") for line in lines)  # BM25 finds a gold sentence of a frequent fact
    gold = next(line for line in lines if line.strip().startswith("gold sentence:"))
    rand = next(line for line in lines if line.strip().startswith("random sentences:"))
    assert float(gold.split()[2]) > float(rand.split()[2])
