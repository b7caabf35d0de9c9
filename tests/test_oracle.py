"""The tail-patch oracle: exact one-step effects, the ceiling of tail-patch@k, shares of it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trackstar.evaluation.fact_tracing import evaluate_with_pairs
from trackstar.evaluation.tail_patch import tail_patch
from trackstar.retrieval import Corpus, RetrievalTask, get_retriever, run
from trackstar.tables.oracle import per_query_share

N_QUERIES = 4


def _task(world, checkpoint, cache, k=10, corpus="closed"):
    queries = [q for q in world.queries if q["has_trex_sentence"]][:N_QUERIES]
    return RetrievalTask(world=world, corpus=corpus, queries=queries, k=k, checkpoint=checkpoint,
                         tail_patch_cache=cache)


@pytest.fixture(scope="module")
def oracle(micro_world, micro_checkpoint_dir, tmp_path_factory):
    """The oracle's records on the micro closed set, and the cache it filled."""
    from trackstar.lm import load_checkpoint

    cache = tmp_path_factory.mktemp("tailpatch")
    corpus = Corpus.from_world(micro_world, "closed")
    task = _task(micro_world, load_checkpoint(micro_checkpoint_dir), cache, k=len(corpus))
    records, info = run(get_retriever("oracle_tail_patch"), task)
    return records, info, cache, task.queries


def _brute_force(checkpoint, world, queries) -> pd.DataFrame:
    """Every (query, passage) change of log p by the imperative step, one passage at a time (no cache)."""
    corpus = Corpus.from_world(world, "closed")
    every = list(zip(corpus.ids, corpus.texts, strict=True))
    pairs = tail_patch(checkpoint, queries, {q["example_id"]: every for q in queries}, progress=False, batched=False)
    return pairs.pivot(index="example_id", columns="proponent_id", values="delta_logprob")


def test_oracle_ranks_by_the_exact_one_step_change(oracle, micro_world, checkpoint):
    records, info, _, queries = oracle
    truth = _brute_force(checkpoint, micro_world, queries)
    assert info["oracle"]["pairs"] == truth.size and info["oracle"]["passages"] == truth.shape[1]
    for rec in records:
        exact = truth.loc[rec["example_id"]]
        ranked = exact[rec["proponent_ids"]].to_numpy()
        # The oracle's value of each passage is the brute force's within float tolerance ...
        np.testing.assert_allclose(rec["proponent_scores"], ranked, atol=5e-5)
        # ... every passage is ranked (k = corpus size), and in the brute force's order
        # wherever two values are further apart than that tolerance.
        assert sorted(rec["proponent_ids"]) == sorted(exact.index)
        assert np.all(np.diff(ranked) <= 1e-4)
        assert exact[rec["proponent_ids"][0]] >= exact.max() - 1e-4
        assert rec["opponent_ids"][0] == rec["proponent_ids"][-1]  # opponents: the passages that lower it most


def test_rank_agreement_is_spearman_against_the_brute_force_truth(oracle, micro_world, checkpoint):
    from scipy.stats import spearmanr

    records, info, _, queries = oracle
    agreement = info["rank_agreement"]
    assert set(agreement) == {"first_order", "first_order:projection=identity",
                              "first_order:params=all,projection=identity", "exp3", "trackstar"}
    truth = _brute_force(checkpoint, micro_world, queries)
    corpus = Corpus.from_world(micro_world, "closed")
    row = get_retriever("first_order", {"projection": "identity"})
    scores = row.score_matrix(_task(micro_world, checkpoint, None))
    for q, s in zip(queries, scores, strict=True):
        expected = spearmanr(s, truth.loc[q["example_id"], corpus.ids].to_numpy()).statistic
        assert agreement["first_order:projection=identity"]["per_query"][q["example_id"]] == pytest.approx(
            expected, abs=0.01)
    stats = agreement["first_order:projection=identity"]
    assert stats["queries"] == len(queries) and stats["min"] <= stats["median"] <= stats["max"]
    assert stats["label"] == "First-order tail-patch (reference)"
    assert agreement["first_order:params=all,projection=identity"]["label"].endswith("all parameters)")


def test_rank_agreement_takes_gradient_rows_only(micro_world, checkpoint):
    with pytest.raises(ValueError, match="key=value"):
        get_retriever("oracle_tail_patch", {"agreement": ["first_order:identity"]})
    retriever = get_retriever("oracle_tail_patch", {"agreement": ["bm25"]})
    with pytest.raises(ValueError, match="not a gradient row"):
        run(retriever, _task(micro_world, checkpoint, None))


def test_oracle_tail_patch_is_the_ceiling_of_every_row(oracle, micro_world, checkpoint, tmp_path):
    records, _, cache, queries = oracle
    top = [{**r, **{f: r[f][:10] for f in ("proponents", "proponent_ids", "proponent_scores", "proponent_correct")}}
           for r in records]
    corpus = Corpus.from_world(micro_world, "closed")
    others = {
        name: run(get_retriever(name), _task(micro_world, None, None))[0] for name in ("bm25", "random")
    }
    # Evaluated without the oracle's cache: the values are recomputed, bit for bit the oracle's.
    mine, pairs = evaluate_with_pairs(top, checkpoint, cache_dir=tmp_path / "fresh", progress=False)
    for rec in top:
        got = pairs[pairs["example_id"] == rec["example_id"]].sort_values("rank")["delta_logprob"].tolist()
        assert got == rec["proponent_scores"]
    assert len(list(Path(cache).glob("*.json"))) == len(corpus)  # one cache file per passage stepped
    for name, recs in others.items():
        theirs, _ = evaluate_with_pairs(recs, checkpoint, cache_dir=cache, progress=False)
        both = mine.merge(theirs, on="example_id", suffixes=("", f"_{name}"))
        assert len(both) == N_QUERIES
        for k in (1, 3, 5, 10):
            for unit in ("tail_patch", "tail_patch_rel", "tail_patch_logprob"):
                # Exact up to the summation order of a mean (the same k values in another order).
                assert (both[f"{unit}@{k}"] >= both[f"{unit}@{k}_{name}"] - 1e-12).all(), (name, unit, k)


def test_the_ceiling_check_can_fail(oracle, checkpoint):
    # Reversed, the oracle's own ranking puts the worst passages first: far below itself.
    records, _, cache, _ = oracle
    best = [{**r, **{f: r[f][:10] for f in ("proponents", "proponent_ids", "proponent_scores", "proponent_correct")}}
            for r in records]
    worst = [{**r, **{f: r[f][::-1][:10] for f in ("proponents", "proponent_ids", "proponent_scores", "proponent_correct")}}
             for r in records]
    a, _ = evaluate_with_pairs(best, checkpoint, cache_dir=cache, progress=False)
    b, _ = evaluate_with_pairs(worst, checkpoint, cache_dir=cache, progress=False)
    assert (a["tail_patch@1"] > b["tail_patch@1"]).all()


def test_share_is_one_for_the_oracle_and_the_mean_effect_for_random_picks(oracle, checkpoint):
    records, _, cache, queries = oracle
    # Every passage as a top-1 of its own: averaged over them (the expectation of a random
    # top 1), the share is the corpus's mean one-step effect over the oracle's.
    every = {r["example_id"]: list(zip(r["proponent_ids"], r["proponents"], strict=True)) for r in records}
    pairs = tail_patch(checkpoint, queries, every, progress=False, cache_dir=cache)
    delta = pairs.pivot(index="example_id", columns="proponent_id", values="delta_pp")
    ceiling = delta.max(axis=1)
    assert (ceiling > 0).all()
    assert per_query_share(ceiling, ceiling).eq(1.0).all()
    shares = pd.concat([per_query_share(delta[p], ceiling) for p in delta.columns], axis=1).mean(axis=1)
    np.testing.assert_allclose(shares, delta.mean(axis=1) / ceiling, rtol=1e-12)
    assert (shares < 1).all()


def test_share_is_undefined_where_no_passage_raises_the_target():
    share = per_query_share(pd.Series({"a": 1.0, "b": -0.5, "c": 0.2}), pd.Series({"a": 2.0, "b": 0.0, "c": -0.1}))
    assert share["a"] == 0.5 and math.isnan(share["b"]) and math.isnan(share["c"])


def test_oracle_refuses_a_corpus_over_its_budget(micro_world, checkpoint):
    task = _task(micro_world, checkpoint, None)
    pairs = len(Corpus.from_world(micro_world, "closed")) * len(task.queries)
    with pytest.raises(ValueError, match=r"max_pairs=.*Lower\s+eval.n_queries"):
        run(get_retriever("oracle_tail_patch", {"max_pairs": pairs - 1}), task)
    with pytest.raises(ValueError, match="unknown option"):
        get_retriever("oracle_tail_patch", {"d": 64})


def test_oracle_needs_a_checkpoint_with_optimizer_state(micro_world, checkpoint):
    with pytest.raises(ValueError, match="needs a model checkpoint"):
        run(get_retriever("oracle_tail_patch"), _task(micro_world, None, None))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real cells on the micro world: BM25 and the oracle for Table 1, TrackStar for Table A.3."""
    from trackstar.experiment import compose_config, run_cell

    tmp = tmp_path_factory.mktemp("oracle-cells")
    common = [f"artifacts_dir={tmp / 'art'}", f"results_dir={tmp / 'res'}", "progress=false", "logger=none",
              "world=micro", "model=micro", "eval.n_queries=6", "stage_threads=1", "method.d=64"]
    cells = [("table1", "bm25"), ("table1", "oracle_tail_patch"), ("table_a3", "trackstar")]
    for table, method in cells:
        record = run_cell(compose_config([*common, f"experiment={table}", f"method={method}"]))
        assert record.status == "finished", record.error
    yield tmp / "res"
    shutil.rmtree(tmp / "art")  # the oracle's rank agreement caches d = 4096 curvature (330 MiB)


def test_tables_carry_the_oracle_row_and_every_rows_share(runs):
    from trackstar.tables import TABLES, load_local_runs, to_markdown
    from trackstar.tables.paired import paired_table, per_query

    frame = load_local_runs(runs).frame
    table = TABLES["table1"](frame)
    rows = table.rows.set_index("method")
    assert list(rows.index) == ["bm25", "oracle_tail_patch"]
    key = "oracle_share/tail_patch@10"
    assert key in [c.key for c in table.columns]
    assert rows.loc["oracle_tail_patch", key] == 1.0
    bm25, ceiling = per_query(rows.loc["bm25", "run"]), per_query(rows.loc["oracle_tail_patch", "run"])
    expected = (bm25["tail_patch@10"] / ceiling["tail_patch@10"]).mean()
    assert rows.loc["bm25", key] == pytest.approx(expected, rel=1e-12)
    assert rows.loc["bm25", f"{key}/n"] == len(bm25)
    assert (bm25["tail_patch@10"] <= ceiling.loc[bm25.index, "tail_patch@10"]).all()
    assert "Tail-patch@10, share of oracle" in to_markdown(table)
    paired = paired_table(table)
    assert "paired/Oracle/tail_patch@10" in [c.key for c in paired.columns]

    # Table A.3 has no oracle run of its own: it borrows Table 1's (same checkpoint, same corpus).
    a3 = TABLES["table_a3"](frame)
    assert list(a3.rows["method"]) == ["trackstar", "oracle_tail_patch"]
    assert a3.rows["label:Output function"].iloc[-1] == "Tail-patch oracle (exact one-step effect)"
    assert "borrowed" in a3.note
    assert 0 < a3.rows[key].iloc[0] < 1 and a3.rows[key].iloc[1] == 1.0
    assert [c.key for c in paired_table(a3).columns if c.key.startswith("paired/Oracle/")]
    # A.7's split columns have shares within each correctness group.
    a7 = TABLES["table_a7"](frame)
    assert any(c.key.startswith("oracle_share/split/greedy_correct/") for c in a7.columns)


def test_a_row_over_more_seeds_than_the_oracle_is_compared_on_its_seeds_only(runs, tmp_path):
    import shutil

    from trackstar.experiment import compose_config, run_cell
    from trackstar.tables import TABLES, load_local_runs
    from trackstar.tables.paired import paired_table, per_query

    copy = tmp_path / "res"
    shutil.copytree(runs, copy)
    art = runs.parent / "art"
    record = run_cell(compose_config([f"artifacts_dir={art}", f"results_dir={copy}", "progress=false", "logger=none",
                                      "world=micro", "model=micro", "model.seed=1", "eval.n_queries=6",
                                      "stage_threads=1", "method.d=64", "experiment=table1", "method=bm25"]))
    assert record.status == "finished", record.error
    frame = load_local_runs(copy).frame
    table = TABLES["table1"](frame)
    rows = table.rows.set_index("method")
    assert len(rows.loc["bm25", "seed_runs"]) == 2
    # The share is seed 0's alone (the oracle's checkpoint), and the note says which seeds.
    seed0 = frame[(frame["method"] == "bm25") & (frame["model_seed"] == 0)]["run"].iloc[0]
    ceiling = per_query(rows.loc["oracle_tail_patch", "run"])["tail_patch@10"]
    expected = (per_query(seed0)["tail_patch@10"] / ceiling).mean()
    assert rows.loc["bm25", "oracle_share/tail_patch@10"] == pytest.approx(expected, rel=1e-12)
    assert "(world, model) seeds (0, 0) only" in table.note
    paired = paired_table(table)
    cells = paired.rows.set_index("label:Method")
    assert pd.isna(cells.loc["BM25", "paired/Oracle/tail_patch@10"])  # two seeds against one: blank


def test_a_table_without_an_oracle_run_is_unchanged(runs, tmp_path):
    import shutil

    from trackstar.tables import TABLES, load_local_runs

    copy = tmp_path / "res"
    shutil.copytree(runs, copy)
    for run_dir in (copy / "table1").glob("oracle_tail_patch-*"):
        shutil.rmtree(run_dir)
    table = TABLES["table1"](load_local_runs(copy).frame)
    assert list(table.rows["method"]) == ["bm25"]
    assert not any(c.key.startswith("oracle_share/") for c in table.columns)
