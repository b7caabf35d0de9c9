"""Sharded extraction: N jobs write one feature store; R from per-shard sums; one scoring.

A run whose training features were written by 3 shard jobs must give the
unsharded run's proponents and scores (to float tolerance: shard boundaries
change batch composition, hence the last bits of a feature).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trackstar.attribution import METHODS, TrackStar
from trackstar.attribution.store import shard_bounds
from trackstar.experiment import ConfigError, compose_config, run_cell, validate
from trackstar.io import ArtifactError


def _engine(checkpoint, work_dir, **changes):
    settings = METHODS["trackstar"].replace(d=64, k=10, chunk_rows=16, **changes)
    return TrackStar(checkpoint.model, checkpoint.tokenizer, settings, optimizer=checkpoint.optimizer, work_dir=work_dir)


def _inputs(world):
    return [s["text"] for s in world.sentences], [(q["prompt"], q["target"]) for q in world.queries]


def test_shard_bounds_cover_every_row_once():
    for n, count in ((10, 3), (3, 3), (2, 3), (242, 7)):
        bounds = shard_bounds(n, count)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@pytest.mark.parametrize("block_diagonal", [False, True])
def test_three_shards_give_the_unsharded_results(checkpoint, micro_world, tmp_path, block_diagonal):
    texts, queries = _inputs(micro_world)
    whole = _engine(checkpoint, tmp_path / "whole", block_diagonal=block_diagonal).attribute(texts, queries)
    sharded = _engine(checkpoint, tmp_path / "sharded", block_diagonal=block_diagonal)
    for index in (2, 0, 1):  # jobs finish in any order
        shard = sharded.extract_shard(texts, index, 3)
        start, stop = shard_bounds(len(texts), 3)[index]
        assert shard.n_rows == stop - start and shard.row_ids == list(range(start, stop))
    # The map steps left each shard's part of R_train (sum of outer products and count).
    assert len(list((tmp_path / "sharded" / "curvature").glob("rsum-*.pt"))) == 3
    result = sharded.attribute(texts, queries, shards=3)
    assert result.proponent_ids == whole.proponent_ids
    np.testing.assert_allclose(result.proponent_scores, whole.proponent_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.opponent_scores, whole.opponent_scores, rtol=1e-4, atol=1e-6)
    assert result.lam == whole.lam


def test_shard_jobs_after_an_unsharded_run_reuse_its_features(checkpoint, micro_world, tmp_path):
    """A sharded map after an unsharded run of the same cell died with `missing field 'shard'`."""
    texts, queries = _inputs(micro_world)
    whole = _engine(checkpoint, tmp_path / "w").attribute(texts, queries)
    engine = _engine(checkpoint, tmp_path / "w")
    for index in (0, 1, 2):
        store = engine.extract_shard(texts, index, 3)
        assert "shard" not in store.meta and store.n_rows == len(texts)  # the whole store, untouched
    assert not list((tmp_path / "w" / "curvature").glob("rsum-*.pt"))
    again = engine.attribute(texts, queries, shards=3)
    assert again.proponent_ids == whole.proponent_ids
    np.testing.assert_array_equal(again.proponent_scores, whole.proponent_scores)


@pytest.mark.parametrize("extracted_in_shards", [True, False])
def test_sharded_scoring_merges_to_the_unsharded_top_k(checkpoint, micro_world, tmp_path, extracted_in_shards):
    """Each scoring job ranks its shard's rows; attribute() merges them, exactly."""
    texts, queries = _inputs(micro_world)
    whole = _engine(checkpoint, tmp_path / "whole").attribute(texts, queries)
    engine = _engine(checkpoint, tmp_path / "sharded")
    if extracted_in_shards:
        for index in range(3):
            engine.extract_shard(texts, index, 3)
    else:
        engine.attribute(texts, queries[:1])  # the whole store, written by one job
    engine.prepare_scoring(texts, queries, shards=3)
    files = [engine.score_shard(texts, queries, index, 3) for index in (1, 2, 0)]
    assert len({f.parent for f in files}) == 1 and len(files) == 3
    merged = _engine(checkpoint, tmp_path / "sharded")  # a fresh reduce job
    import trackstar.attribution.api as api

    streamed = []
    original = api.top_k
    api.top_k = lambda *a, **kw: streamed.append(1) or original(*a, **kw)
    try:
        result = merged.attribute(texts, queries, shards=3)
    finally:
        api.top_k = original
    assert not streamed  # the reduce merged the shards' rankings instead of scoring every row
    assert result.proponent_ids == whole.proponent_ids and result.opponent_ids == whole.opponent_ids
    np.testing.assert_allclose(result.proponent_scores, whole.proponent_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.opponent_scores, whole.opponent_scores, rtol=1e-4, atol=1e-6)
    assert result.lam == whole.lam


def test_missing_or_mismatched_shards_are_named(checkpoint, micro_world, tmp_path):
    texts, queries = _inputs(micro_world)
    engine = _engine(checkpoint, tmp_path)
    with pytest.raises(ArtifactError, match="No shard .* exists yet: run the 3 extraction jobs first"):
        engine.attribute(texts, queries, shards=3)
    engine.extract_shard(texts, 0, 3)
    engine.extract_shard(texts, 2, 3)
    with pytest.raises(ArtifactError, match=r"shard\(s\) 1 are not finished.*shard.count=3 shard.index=1"):
        engine.attribute(texts, queries, shards=3)
    with pytest.raises(ArtifactError, match="is being written as 3 shards, not 2"):
        engine.extract_shard(texts, 0, 2)
    with pytest.raises(ValueError, match="index=3 is out of range for 3 shard"):
        engine.extract_shard(texts, 3, 3)


def test_shard_config_is_checked_before_any_work():
    with pytest.raises(ConfigError, match="index=5 is out of range for 2"):
        validate(compose_config(["shard.count=2", "shard.index=5"]))
    with pytest.raises(ConfigError, match="sharding splits gradient feature extraction"):
        validate(compose_config(["method=bm25", "shard.count=2"]))
    with pytest.raises(ConfigError, match="shard.step='reduce': use one of"):
        validate(compose_config(["shard.count=2", "shard.index=0", "shard.step=reduce"]))


def test_sharded_sweep_through_hydra_equals_the_unsharded_cell(tmp_path):
    """The map as a Hydra multirun (3 jobs), then the reduce as one run."""
    common = [f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "progress=false",
              "world=micro", "model=micro", "method=trackstar", "method.d=64", "eval.tail_patch=false",
              "eval.bootstrap_resamples=50", "logger=none"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "trackstar.experiment.run", "-m", *common, "shard.count=3",
                          "shard.index=0,1,2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("[shard ") == 3
    # The second map: each job ranks its shard's rows; the reduce then only merges.
    out = subprocess.run([sys.executable, "-m", "trackstar.experiment.run", "-m", *common, "shard.count=3",
                          "shard.index=0,1,2", "shard.step=score"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("] ranked in ") == 3
    assert len(list((tmp_path / "art").rglob("topk/*/shard-*-of-00003.pt"))) == 3
    sharded = run_cell(compose_config([*common, "shard.count=3"]))
    whole = run_cell(compose_config([*common, f"artifacts_dir={tmp_path / 'art-whole'}",
                                     f"results_dir={tmp_path / 'res-whole'}"]))
    assert sharded.status == whole.status == "finished"
    assert sharded.metrics == whole.metrics
    a = [json.loads(line)["proponent_ids"] for line in open(f"{sharded.run_dir}/retrievals.jsonl")]
    b = [json.loads(line)["proponent_ids"] for line in open(f"{whole.run_dir}/retrievals.jsonl")]
    assert a == b
    # A map job after the unsharded run of the cell (it died with `missing field 'shard'`): nothing to do.
    from trackstar.experiment.shard import shard_job

    path = shard_job(compose_config([*common, f"artifacts_dir={tmp_path / 'art-whole'}", "shard.count=3",
                                     "shard.index=0"]))
    assert path.is_dir() and not path.name.startswith("shard-")


@pytest.mark.slow
def test_sharded_extraction_through_submitit_local(tmp_path):
    """The map as submitit jobs (submitit_local: the SLURM launcher's local twin), then the reduce."""
    common = [f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "progress=false",
              "world=micro", "model=micro", "method=trackstar", "method.d=64", "eval.tail_patch=false",
              "eval.bootstrap_resamples=50", "logger=none", "shard.count=2"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    # The model first (one job trains it; the shard jobs then only read it).
    run_cell(compose_config([*common[:-1], "method=bm25"]))
    out = subprocess.run([sys.executable, "-m", "trackstar.experiment.run", "-m", "hydra/launcher=submitit_local",
                          "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1", *common,
                          "shard.index=0,1"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    record = run_cell(compose_config(common))
    assert record.status == "finished" and record.metrics["mrr"]["mean"] > 0
