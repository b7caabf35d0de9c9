"""Retrieval metrics and bootstrap intervals on hand-written release-schema fixtures."""

import numpy as np
import pytest
import pandas as pd

from trackstar.evaluation.metrics import (
    RetrievalRecordError,
    mrr_first,
    precision_at,
    recall_at,
    score_retrievals,
)
from trackstar.evaluation.splits import bootstrap_mean, bootstrap_means, summarize


def record(example_id, correct, has_trex_sentence=True, **extra):
    n = len(correct)
    return {
        "example_id": example_id,
        "query_set": "trex",
        "inputs_plaintext": "The capital of France is",
        "targets_plaintext": "Paris",
        "proponents": [f"text {i}" for i in range(n)],
        "proponent_ids": [f"S{i}" for i in range(n)],
        "proponent_scores": [float(n - i) for i in range(n)],
        "proponent_correct": list(correct),
        "fact_id": f"F{example_id}",
        "relation": "P36",
        "c4_frequency": 3,
        "c4_frequency_bucket": 2,
        "has_trex_sentence": has_trex_sentence,
        **extra,
    }


FIXTURE = [
    record("a", [False, False, True] + [False] * 9),  # first correct at rank 3
    record("b", [False] * 12),  # no correct proponent among 12
    record("c", [False, True, True]),  # fewer than 10 proponents
    record("d", [False] * 10 + [True, False]),  # correct only beyond the top 10
    record("e", [False] * 5, has_trex_sentence=False),  # no gold sentence exists
]


def test_metric_definitions():
    assert recall_at([False, False, True]) == 1.0
    assert recall_at([False] * 10 + [True]) == 0.0
    assert precision_at([True, False, True]) == pytest.approx(0.2)  # over 10, not over 3
    assert mrr_first([False, False, True]) == pytest.approx(1 / 3)
    assert mrr_first([False] * 10 + [True]) == pytest.approx(1 / 11)  # whole list, not top 10
    assert mrr_first([]) == 0.0


def test_score_retrievals_per_query():
    df = score_retrievals(FIXTURE).set_index("example_id")
    assert df.loc["a", "mrr"] == pytest.approx(1 / 3) and df.loc["a", "recall@10"] == 1
    assert df.loc["b", "mrr"] == 0 and df.loc["b", "recall@10"] == 0
    assert df.loc["c", "precision@10"] == pytest.approx(0.2) and df.loc["c", "mrr"] == pytest.approx(0.5)
    assert df.loc["d", "recall@10"] == 0 and df.loc["d", "mrr"] == pytest.approx(1 / 11)
    assert not df.loc["e", "has_trex_sentence"]
    scored = df[df["has_trex_sentence"]]
    assert scored["mrr"].mean() == pytest.approx((1 / 3 + 0 + 1 / 2 + 1 / 11) / 4)


def test_open_set_uses_ais_threshold():
    rec = record("o", [True, True])
    del rec["proponent_correct"]
    rec["proponent_ais_scores"] = [0.49, 0.5]
    assert score_retrievals([rec]).loc[0, "mrr"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("proponent_ids"), "lacks \\['proponent_ids'\\]"),
        (lambda r: r.pop("proponent_correct"), "neither 'proponent_correct'"),
        (lambda r: r["proponent_scores"].pop(), "different lengths"),
        (lambda r: r["proponent_correct"].pop(), "must align"),
    ],
)
def test_bad_records_name_the_record(mutate, match):
    rec = record("bad", [True, False])
    mutate(rec)
    with pytest.raises(RetrievalRecordError, match=match) as err:
        score_retrievals([rec], source="run/retrievals.jsonl")
    assert "bad" in str(err.value) or "record 0" in str(err.value)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(20)
    mean, lo, hi = bootstrap_mean(small)
    assert lo < mean < hi and mean == pytest.approx(small.mean())
    big = rng.random(2000)
    _, lo2, hi2 = bootstrap_mean(big)
    assert hi2 - lo2 < (hi - lo) / 3
    assert bootstrap_mean([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0)


def test_summarize_by_split():
    df = score_retrievals(FIXTURE)
    out = summarize(df[df.has_trex_sentence], ["mrr", "recall@10"], by="relation")
    row = out[(out.metric == "mrr")].iloc[0]
    assert row["group"] == "P36" and row["n"] == 4 and row["ci_low"] <= row["mean"] <= row["ci_high"]
    with pytest.raises(KeyError, match="no column"):
        summarize(df, ["nope"])


def test_label_retrievals_against_the_world(micro_world):
    from trackstar.retrieval import label_retrievals

    q = next(q for q in micro_world.queries if q["has_trex_sentence"])
    gold = micro_world.facts_by_id[q["fact_id"]]["trex_sentences"][0]
    other = next(s["sentence_id"] for s in micro_world.sentences if q["fact_id"] not in s["fact_ids"])
    rec = record(q["example_id"], [])
    rec.update(proponent_ids=[other, gold], proponents=["", ""], proponent_scores=[2.0, 1.0])
    del rec["proponent_correct"]
    (labelled,) = label_retrievals([rec], micro_world, "closed")
    assert labelled["proponent_correct"] == [False, True]
    assert score_retrievals([labelled]).loc[0, "mrr"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="not a query of the world"):
        label_retrievals([dict(rec, example_id="Q99999")], micro_world, "closed")
    with pytest.raises(KeyError, match="proponent id 'S999999' is not in the closed corpus"):
        label_retrievals([dict(rec, proponent_ids=["S999999"])], micro_world, "closed")


@pytest.mark.parametrize("confidence,resamples", [(0.95, 1000), (0.9, 200)])
def test_batched_intervals_equal_one_bootstrap_per_column_bit_for_bit(confidence, resamples):
    """A run's ~400 intervals are computed together; every one must be the number the
    one-column bootstrap (scipy.stats.bootstrap) gives, or committed tables would move."""
    rng = np.random.default_rng(7)
    n = 120
    holes = rng.random(n) < 0.1
    columns = {
        "mrr": rng.random(n),
        "recall": (rng.random(n) < 0.4).astype(float),
        "tail_patch": rng.normal(5, 20, n),
        "skewed": rng.lognormal(0, 3, n),  # a heavy tail, like tail_patch_rel
        "with_nans": np.where(holes, np.nan, rng.random(n)),
        "same_nans": np.where(holes, np.nan, rng.normal(size=n)),
        "constant": np.full(n, 0.25),
        "one_value": np.where(np.arange(n) == 3, 1.5, np.nan),
        "empty": np.full(n, np.nan),
    }
    got = bootstrap_means(columns, confidence, resamples)
    assert list(got) == list(columns)
    for name, values in columns.items():
        want = bootstrap_mean(values, confidence, resamples)
        assert got[name] == want or (np.isnan(want).all() and np.isnan(got[name]).all()), name
    # Grouped as summarize does: the same numbers as one bootstrap per (group, metric).
    frame = pd.DataFrame({k: v for k, v in columns.items() if k != "empty"})
    frame["relation"] = rng.choice(["P17", "P19", "P36"], n)
    table = summarize(frame, ["mrr", "tail_patch", "with_nans"], by="relation", confidence=confidence,
                      n_resamples=resamples)
    for row in table.itertuples():
        part = frame[frame["relation"] == row.group][row.metric].to_numpy()
        assert (row.mean, row.ci_low, row.ci_high) == bootstrap_mean(part, confidence, resamples)
