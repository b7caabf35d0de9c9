"""Counterfactual validation: retraining, LDS and leave-top-k-out (SPEC §2.5).

The machinery must be able to fail a method: random scores get an LDS near 0,
exact gradient dot products on a world where one passage alone carries each
fact get a clearly positive one.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trackstar.evaluation.counterfactual import (
    MIN_SUBSETS,
    CounterfactualSettings,
    counterfactual,
    lds_per_query,
    subset_masks,
)
from trackstar.evaluation.splits import bootstrap_mean
from trackstar.io import read_jsonl
from trackstar.lm.retrain import retrain

# --- a world where each fact is stated by exactly one passage ------------------------

FACTS = [
    ("The capital of Veloria is", "Quenbrook"),
    ("Tarin Voss was born in", "Maldrecht"),
    ("The river Ashel flows into the", "Korvanmere"),
    ("The national bird of Ostrany is the", "Pellwing"),
    ("Ilse Narrow works for", "Drummoth"),
    ("The currency of Zabria is the", "Ferrun"),
    ("The tallest mountain of Corth is", "Ulvanpeak"),
    ("Mara Quill studied at", "Hesperholm"),
]
ADJ = ["old", "quiet", "green", "small", "busy", "cold", "bright", "long"]
NOUN = ["mill", "road", "garden", "market", "bridge", "harbor", "school", "field"]
VERB = ["stands near", "runs past", "lies behind", "faces", "opens onto", "borders"]


def _write_world(path: Path) -> Path:
    rng = np.random.default_rng(0)
    docs = []
    for i in range(40):
        words = [f"The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(ADJ)} {rng.choice(NOUN)}."
                 for _ in range(3)]
        docs.append({"doc_id": f"D{i:03d}", "text": " ".join(words), "fact_ids": []})
    for j, (prompt, target) in enumerate(FACTS):
        docs.append({"doc_id": f"F{j:03d}", "text": f"{prompt} {target}. The {ADJ[j]} {NOUN[j]} faces the road.",
                     "fact_ids": [f"fact{j}"]})
    order = rng.permutation(len(docs))
    docs = [docs[i] for i in order]
    queries = [{"example_id": f"Q{j}", "fact_id": f"fact{j}", "prompt": p, "target": t, "c4_frequency_bucket": 1}
               for j, (p, t) in enumerate(FACTS)]
    path.mkdir(parents=True)
    corpus_text = "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs)
    (path / "c4_corpus.jsonl").write_text(corpus_text)
    (path / "queries.jsonl").write_text("".join(json.dumps(q, sort_keys=True) + "\n" for q in queries))
    (path / "manifest.json").write_text(json.dumps(
        {"kind": "test-world", "content_hash": hashlib.sha256(corpus_text.encode()).hexdigest()}))
    return path


@pytest.fixture(scope="module")
def one_passage_world(tmp_path_factory):
    from trackstar.lm import PretrainConfig, final_checkpoint, load_checkpoint, pretrain_model
    from trackstar.world.store import LoadedWorld

    root = tmp_path_factory.mktemp("cf")
    path = _write_world(root / "world")
    run = pretrain_model(path, root / "model", PretrainConfig.preset("micro", epochs=8), progress=False)
    world = LoadedWorld(path, json.loads((path / "manifest.json").read_text()), [], [],
                        read_jsonl(path / "c4_corpus.jsonl"), read_jsonl(path / "queries.jsonl"))
    return world, run, load_checkpoint(final_checkpoint(run))


def _lds(world, run, checkpoint, method, options, subsets=16):
    from trackstar.retrieval import RetrievalTask, get_retriever

    retriever = get_retriever(method, options, "open")
    task = RetrievalTask(world, "open", world.queries, 10, checkpoint if retriever.family == "gradient" else None)
    settings = CounterfactualSettings(subsets=subsets, loo_queries=0)
    cache = {}

    def retrain_many(masks):
        for m in masks:
            if m.tobytes() not in cache:
                cache[m.tobytes()] = retrain(run, world.path, m)
        return [cache[m.tobytes()] for m in masks]

    per_query, info = counterfactual([{"example_id": q["example_id"]} for q in world.queries],
                                     [d["doc_id"] for d in world.corpus],
                                     lambda masks: retriever.subset_sums(task, masks), retrain_many, settings)
    return per_query["lds"].to_numpy(), info


def test_lds_tells_exact_gradients_from_random_scores(one_passage_world):
    world, run, checkpoint = one_passage_world
    exact, info = _lds(world, run, checkpoint, "grad_dot", {"projection": "identity"})
    assert info["failed_retrains"] == 0 and not any(info["lds_excluded"].values())
    mean, low, high = bootstrap_mean(exact)
    assert mean > 0.4 and low > 0.2, exact
    noise, _ = _lds(world, run, checkpoint, "random", {})
    mean, low, high = bootstrap_mean(noise)
    assert low <= 0 <= high and abs(mean) < 0.25, noise


def test_a_retrain_on_every_passage_is_the_pretrained_model(micro_world, micro_checkpoint_dir):
    outcome = retrain(micro_checkpoint_dir.parent, micro_world.path)
    expected = {r["example_id"]: r["target_logprob"] for r in read_jsonl(micro_checkpoint_dir / "query_eval.jsonl")}
    assert outcome["status"] == "finished" and outcome["n_kept"] == len(micro_world.corpus)
    assert outcome["target_logprob"] == expected  # bit for bit: one update rule, one data order
    half = retrain(micro_checkpoint_dir.parent, micro_world.path, np.arange(len(micro_world.corpus)) % 2 == 0)
    assert half["n_kept"] == (len(micro_world.corpus) + 1) // 2
    assert half["target_logprob"] != expected


def test_retrain_refuses_another_world_and_bad_indices(micro_checkpoint_dir, one_passage_world):
    from trackstar.io import ArtifactError

    world, _, _ = one_passage_world
    with pytest.raises(ArtifactError, match="not the world"):
        retrain(micro_checkpoint_dir.parent, world.path)
    with pytest.raises(ArtifactError, match="pretrain.json"):
        retrain(micro_checkpoint_dir, world.path)
    _, run, _ = one_passage_world
    with pytest.raises(ValueError, match=r"lie in \[0, 48\)"):
        retrain(run, world.path, [0, 48])


@pytest.mark.parametrize("field, value, match", [
    ("subsets", 3, f"at least {MIN_SUBSETS} subsets"),
    ("subset_fraction", 1.0, r"fraction in \(0, 1\)"),
    ("subset_fraction", 0, r"fraction in \(0, 1\)"),
    ("k", 0, "positive number of passages"),
    ("loo_queries", -1, "number of queries"),
    ("seed", -2, "non-negative"),
])
def test_settings_name_the_bad_value(field, value, match):
    with pytest.raises(ValueError, match=match):
        CounterfactualSettings(**{field: value})


def test_subsets_are_seeded_halves():
    masks = subset_masks(11, CounterfactualSettings(subsets=6, seed=3))
    assert masks.shape == (11, 6) and (masks.sum(axis=0) == round(0.5 * 11)).all()
    assert (masks == subset_masks(11, CounterfactualSettings(subsets=6, seed=3))).all()
    assert not (masks == subset_masks(11, CounterfactualSettings(subsets=6, seed=4))).all()
    with pytest.raises(ValueError, match="keep some passages"):
        subset_masks(1, CounterfactualSettings(subsets=6))


def test_lds_leaves_out_constant_outcomes_and_failed_retrains():
    predicted = np.array([[1.0, 2, 3, 4, 5, 6], [1.0, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6],
                          [3.0] * 6, [1.0, 2, 3, np.inf, 5, 6]])
    measured = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                         [2.0] * 6,  # the target never moves
                         [0.1, 0.2, 0.3, 0.4, 0.5, np.nan],  # one retrain diverged
                         [0.1, np.nan, np.nan, 0.4, 0.5, 0.6],  # too few left
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # the method predicts nothing
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    lds, excluded = lds_per_query(predicted, measured)
    assert lds[0] == pytest.approx(1.0) and lds[2] == pytest.approx(-1.0)
    assert np.isnan(lds[1]) and np.isnan(lds[3]) and np.isnan(lds[5])
    assert lds[4] == 0.0  # scored as no information, not dropped from the method's mean
    assert excluded == {"constant_outcome": 1, "too_few_subsets": 1, "constant_prediction": 1,
                        "non_finite_prediction": 1}


def test_diverged_retrains_are_counted_not_averaged():
    ids = [f"D{i}" for i in range(20)]
    records = [{"example_id": "Q0", "proponent_ids": ids[:10]}, {"example_id": "Q1", "proponent_ids": ids[10:]}]
    calls = []

    def retrain_many(masks):
        calls.append(len(masks))
        out = []
        for i, m in enumerate(masks):
            if i == 0:
                out.append({"status": "diverged", "target_logprob": {}})
            else:
                out.append({"status": "finished", "target_logprob": {"Q0": -float(m[:10].sum()), "Q1": float(i % 3)}})
        return out

    def sums(masks):
        return np.stack([-masks[:10].sum(axis=0), masks[10:].sum(axis=0)]).astype(float)

    per_query, info = counterfactual(records, ids, sums, retrain_many, CounterfactualSettings(subsets=8, k=10))
    assert calls == [8 + 1 + 2 + 2]  # subsets, the full model, leave-top-k-out and random per query
    assert info["failed_retrains"] == 1 and info["failed_subsets"] == 1
    assert per_query.loc[0, "lds"] == pytest.approx(1.0)  # computed over the 7 finished subsets
    assert per_query.loc[0, "loo_drop@10"] == pytest.approx(-10.0)  # full model −10 minus the retrain's 0
    assert np.isfinite(per_query["random_drop@10"]).all()


# --- the cached, shared retrain stage and the Hydra cell --------------------------------

def test_retrain_stage_takes_free_work_first_and_reuses_what_others_did(tmp_path, monkeypatch):
    """A job skips a retrain another job holds, does the rest, then reads the other's outcome."""
    import threading

    from filelock import FileLock

    import trackstar.experiment.stages as stages  # the retrain the stage calls
    from trackstar.experiment.ids import retrain_key
    from trackstar.experiment.stages import retrain_stage
    from trackstar.io import atomic_write_json_checked

    run = tmp_path / "models" / "run"
    run.mkdir(parents=True)
    (run / "pretrain.json").write_text(json.dumps({"run_key": "k"}))
    masks = [np.arange(6) != i for i in range(3)]
    calls = []
    monkeypatch.setattr(stages, "retrain",
                        lambda run_dir, world, keep, device=None: calls.append(int(np.flatnonzero(~keep)[0]))
                        or {"status": "finished", "target_logprob": {"Q": -float(np.flatnonzero(~keep)[0])}})
    key0 = retrain_key(run, masks[0])
    held, release = threading.Event(), threading.Event()

    def other_job():
        (tmp_path / "art" / "locks").mkdir(parents=True, exist_ok=True)
        with FileLock(str(tmp_path / "art" / "locks" / f"retrain-{key0}.lock")):
            held.set()
            release.wait(30)
            out = tmp_path / "art" / "retrains" / run.name
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json_checked(out / f"{key0}.json", {"status": "finished", "target_logprob": {"Q": 42.0}})

    thread = threading.Thread(target=other_job)
    thread.start()
    held.wait(30)
    threading.Timer(1.0, release.set).start()
    outcomes = retrain_stage(tmp_path / "art", run, tmp_path, masks, threads=1)
    thread.join()
    assert calls == [1, 2]  # retrain 0 was the other job's
    assert [o["target_logprob"]["Q"] for o in outcomes] == [42.0, -1.0, -2.0]
    assert retrain_stage(tmp_path / "art", run, tmp_path, masks, threads=1) == outcomes and calls == [1, 2]


@pytest.mark.parametrize("override, match", [
    ("eval=closed", "needs eval=open"),
    ("model.checkpoint=0.5", "must be 1.0"),
    ("counterfactual.subsets=2", "at least 5 subsets"),
    ("counterfactual.subset_fraction=1.5", r"\(0, 1\)"),
    ("eval.k=5", "counterfactual.k=10"),
])
def test_counterfactual_config_errors_before_any_work(override, match):
    from trackstar.experiment import compose_config
    from trackstar.experiment import ConfigError, validate

    with pytest.raises(ConfigError, match=match):
        validate(compose_config(["experiment=table_c1", "method=bm25", "eval.tail_patch_ks=[1]", override]))


def test_a_method_that_cannot_score_every_passage_is_refused():
    from trackstar.experiment import compose_config
    from trackstar.experiment import ConfigError, validate
    from trackstar.retrieval import Retriever, register, unregister

    class TopOnly(Retriever):
        name = "top_only"

        def retrieve(self, task):
            raise AssertionError("never reached")

    register("top_only", TopOnly)
    try:
        with pytest.raises(ConfigError, match="cannot score every passage"):
            validate(compose_config(["experiment=table_c1", "method=bm25", "method.name=top_only"]))
    finally:
        unregister("top_only")


def test_counterfactual_cell_end_to_end(tmp_path):
    """Two methods of the sweep share every retrain but their own leave-top-k-out ones."""
    from trackstar.experiment import compose_config, run_cell
    from trackstar.tables import TABLES, load_local_runs

    common = ["experiment=table_c1", f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}",
              "progress=false", "logger=none", "counterfactual.subsets=6", "counterfactual.loo_queries=3",
              "eval.tail_patch=false", "stage_threads=1"]
    records = [run_cell(compose_config([*common, f"method={m}"])) for m in ("bm25", "random")]
    for record in records:
        assert record.status == "finished", record.error
        assert {"lds", "loo_drop@10", "random_drop@10"} <= set(record.metrics)
        assert record.metrics["loo_drop@10"]["n"] == 3
        info = record.info["counterfactual"]
        assert info["subsets"] == 6 and info["failed_retrains"] == 0 and info["retrains"] == 6 + 1 + 3 + 3
    outcomes = list((tmp_path / "art" / "retrains").rglob("*.json"))
    # Shared: 6 subsets, the full model, 3 random removals; each method's own: its 3 leave-top-k-out retrains
    # (fewer when the two methods' top 10 coincide for a query).
    assert 6 + 1 + 3 + 3 <= len(outcomes) <= 6 + 1 + 3 + 3 + 3
    per_query = pd.read_csv(Path(records[0].run_dir) / "per_query.csv")
    assert per_query["loo_drop@10"].notna().sum() == 3
    table = TABLES["table_c1"](load_local_runs(tmp_path / "res").frame)
    assert [m for m in table.rows["method"]] == ["bm25", "random"]


def test_a_retrain_whose_loss_blows_up_is_recorded_as_diverged(micro_world, micro_checkpoint_dir, monkeypatch):
    import trackstar.lm.retrain as retrain_module

    real = retrain_module.train_step
    steps = []

    def blows_up(*args, **kwargs):
        steps.append(1)
        return float("nan") if len(steps) == 3 else real(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "train_step", blows_up)
    outcome = retrain(micro_checkpoint_dir.parent, micro_world.path)
    assert outcome["status"] == "diverged" and outcome["diverged_at_step"] == 2
    assert outcome["target_logprob"] == {} and len(steps) == 3  # stopped at once, nothing measured
