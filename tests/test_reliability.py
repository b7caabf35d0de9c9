"""Probes of a demanding user: damaged caches, lost records, bad values, scheduling, errors.

Each test names the probe it runs. A damaged cached artifact must give a clear
error or a correct rebuild, never a number computed from the damage.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from trackstar.attribution import METHODS, TrackStar
from trackstar.attribution.store import FeatureStore
from trackstar.errors import describe_error
from trackstar.evaluation.tail_patch import tail_patch
from trackstar.experiment import ConfigError, compose_config, run_cell
from trackstar.experiment.record import ATTEMPTS_DIR, METRICS_FILE, attempts, read_record
from trackstar.experiment.tracking import resolve_mode
from trackstar.io import ArtifactError, read_jsonl
from trackstar.runtime import compute_stage

ROOT = Path(__file__).resolve().parents[1]


def _meta(n=10, d=8):
    return {"kind": "train", "row_ids": list(range(n)), "d": d, "dtype": "float32", "model_id": "m", "model_hash": "h"}


def _finished_store(path, rows, chunk=4):
    store = FeatureStore.create(path, _meta(*rows.shape))
    for start in range(0, rows.shape[0], chunk):
        store.write(start, rows[start:start + chunk])
    store.finish()
    return path / "features.npy"


# --- feature stores ---------------------------------------------------------------------------

def test_truncated_feature_store_is_refused_on_open_and_rebuilt_never_regrown(tmp_path, caplog):
    rows = torch.randn(10, 8)
    data = _finished_store(tmp_path / "s", rows)
    size = data.stat().st_size
    with open(data, "r+b") as fh:  # a full disk or a killed copy
        fh.truncate(size - 3 * 8 * 4)
    with pytest.raises(ArtifactError, match=r"damaged: features.npy has \d+ bytes"):
        FeatureStore.open(tmp_path / "s")
    with caplog.at_level(logging.WARNING, logger="trackstar"):
        store = FeatureStore.create(tmp_path / "s", _meta())
    assert "rebuilding damaged feature store" in caplog.text
    # Started over: no row of the damaged file is trusted, none is re-grown as zeros.
    assert store.rows_done == 0 and not store.complete
    assert data.stat().st_size == size and not np.asarray(store.array).any()


def test_overwritten_feature_rows_fail_as_they_stream(tmp_path):
    rows = torch.randn(10, 8)
    data = _finished_store(tmp_path / "s", rows)
    with open(data, "r+b") as fh:  # same size, other bytes (a bad copy, a flipped disk block)
        fh.seek(data.stat().st_size - 8)
        fh.write(b"\0" * 8)
    store = FeatureStore.open(tmp_path / "s")
    first = next(store.chunks(4))[1]  # rows 0-3 are intact
    torch.testing.assert_close(first, rows[:4], rtol=0, atol=0)
    with pytest.raises(ArtifactError, match="rows 8-10 of features.npy do not match the checksum"):
        list(store.chunks(4))


def test_partial_store_resumes_only_from_chunks_that_check_out(tmp_path, caplog):
    rows = torch.randn(10, 8)
    store = FeatureStore.create(tmp_path / "s", _meta())
    store.write(0, rows[:4])
    store.write(4, rows[4:8])  # then killed; then the second chunk is damaged
    store.array[5] = 0
    store.array.flush()
    with caplog.at_level(logging.WARNING, logger="trackstar"):
        resumed = FeatureStore.create(tmp_path / "s", _meta())
    assert resumed.rows_done == 4 and "rows 4-8 do not match their checksum" in caplog.text
    with open(tmp_path / "s" / "features.npy", "r+b") as fh:
        fh.truncate(200)
    assert FeatureStore.create(tmp_path / "s", _meta()).rows_done == 0  # wrong size: start over


def test_attribution_after_a_truncated_store_equals_a_fresh_run(checkpoint, micro_world, tmp_path):
    """The issue's probe: a shared training store cut short scored every method against zeros."""
    texts = [s["text"] for s in micro_world.sentences]
    queries = [(q["prompt"], q["target"]) for q in micro_world.queries[:6]]

    def attribute():
        engine = TrackStar(checkpoint.model, checkpoint.tokenizer, METHODS["trackstar"].replace(d=64, k=5),
                           optimizer=checkpoint.optimizer, work_dir=tmp_path)
        return engine.attribute(texts, queries)

    first = attribute()
    data = first.train_store / "features.npy"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    again = attribute()
    assert again.proponent_ids == first.proponent_ids and again.proponent_scores == first.proponent_scores


# --- other caches -----------------------------------------------------------------------------

def _cell(tmp_path, *extra):
    return compose_config([f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "world=micro",
                           "model=micro", "method=bm25", "eval.tail_patch=false", "eval.bootstrap_resamples=50",
                           "logger=none", "progress=false", *extra])


def test_retrieval_cache_cut_short_is_recomputed_not_trusted(tmp_path, caplog):
    first = run_cell(_cell(tmp_path))
    cache = Path(first.artifacts["retrievals"]["path"]) / "retrievals.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:9]))  # the marker is still there
    with caplog.at_level(logging.WARNING, logger="trackstar"):
        again = run_cell(_cell(tmp_path, "force=true"))
    assert "recomputing" in caplog.text and "retrievals.jsonl" in caplog.text
    assert again.n_queries == first.n_queries == len(lines)
    assert again.metrics == first.metrics
    assert len(read_jsonl(cache)) == len(lines)


def test_world_with_a_deleted_shard_is_rebuilt(tmp_path, caplog):
    from trackstar.world import build_world, load_world

    path = build_world(tmp_path / "w", "micro", 0)
    before = load_world(path).manifest["content_hash"]
    next(path.glob("trex_sentences.jsonl-*")).unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        load_world(path)
    with caplog.at_level(logging.WARNING, logger="trackstar"):
        build_world(path, "micro", 0)
    assert "rebuilding" in caplog.text
    assert load_world(path).manifest["content_hash"] == before


def test_damaged_curvature_and_tail_patch_caches_are_recomputed(checkpoint, micro_world, tmp_path, caplog):
    from trackstar.attribution.curvature import CurvatureCache

    cache = CurvatureCache(tmp_path / "curv")
    path = cache._path("r", "k")
    cache._save(path, [torch.eye(3)])
    path.write_bytes(path.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="trackstar"):
        assert cache._load(path) is None
    assert "recomputing" in caplog.text

    queries = micro_world.queries[:2]
    props = {q["example_id"]: [(s["sentence_id"], s["text"]) for s in micro_world.sentences[:2]] for q in queries}
    first = tail_patch(checkpoint, queries, props, progress=False, cache_dir=tmp_path / "tp")
    for f in (tmp_path / "tp").glob("*.json"):
        entry = json.loads(f.read_text())
        entry["data"] = {k: 0.0 for k in entry["data"]}  # edited values, stale checksum
        f.write_text(json.dumps(entry))
    again = tail_patch(checkpoint, queries, props, progress=False, cache_dir=tmp_path / "tp")
    assert again.equals(first)


def test_tail_patch_does_not_depend_on_what_the_cache_held(checkpoint, micro_world, tmp_path):
    """Values differed at 1e-7 with the order in which methods ran on one cache."""
    queries = micro_world.queries[:6]
    sents = micro_world.sentences
    a = {q["example_id"]: [(s["sentence_id"], s["text"]) for s in sents[i:i + 3]] for i, q in enumerate(queries)}
    b = {q["example_id"]: [(s["sentence_id"], s["text"]) for s in sents[i + 1:i + 4]] for i, q in enumerate(queries)}
    tail_patch(checkpoint, queries, a, progress=False, cache_dir=tmp_path / "ab")
    after_a = tail_patch(checkpoint, queries, b, progress=False, cache_dir=tmp_path / "ab")
    alone = tail_patch(checkpoint, queries, b, progress=False, cache_dir=tmp_path / "b")
    assert after_a.equals(alone)


# --- run records ----------------------------------------------------------------------------

def test_failed_force_rerun_keeps_the_finished_record(tmp_path, monkeypatch):
    first = run_cell(_cell(tmp_path))
    run_dir = Path(first.run_dir)
    import trackstar.experiment.cell as cell  # the evaluation stage's evaluate, where the cell calls it

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cell, "evaluate_with_pairs", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_cell(_cell(tmp_path, "force=true"))
    kept = read_record(run_dir / METRICS_FILE)
    assert kept.status == "finished" and kept.metrics == first.metrics
    history = attempts(run_dir)
    assert [a.status for a in history] == ["finished", "failed"] or [a.status for a in history] == ["failed", "finished"]
    assert any(a.error == "RuntimeError: disk on fire" and "Traceback" in a.traceback for a in history)
    assert len(list((run_dir / ATTEMPTS_DIR).iterdir())) == 2


def test_non_numeric_metric_is_named_with_its_file(tmp_path):
    from trackstar.tables.runs import StaleRecordsWarning, TablesError, load_local_runs

    first = run_cell(_cell(tmp_path))
    path = Path(first.run_dir) / METRICS_FILE
    record = json.loads(path.read_text())
    record["metrics"]["mrr"]["mean"] = "high"
    path.write_text(json.dumps(record))
    with pytest.warns(StaleRecordsWarning) as warned, pytest.raises(TablesError, match="1 of another schema or damaged"):
        load_local_runs(tmp_path / "res")
    message = str(warned[0].message)
    assert "metrics.mrr.mean is 'high', not a number" in message and str(path) in message


# --- validation before work -----------------------------------------------------------------

@pytest.mark.parametrize("override, match", [
    ("eval.n_queries=-5", "eval.n_queries=-5: give a positive number"),
    ("eval.n_queries=0", "eval.n_queries=0: give a positive number"),
    ("method.lam=abc", "method.lam='abc'"),
    ("method.d=5", "method.d=5: d=5 leaves some of the 8 parameters being attributed without a dimension"),
    ("stage_threads=0", "stage_threads=0"),
])
def test_bad_values_are_refused_before_any_work(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        run_cell(_cell(tmp_path, "method=trackstar", override))
    assert not (tmp_path / "art").exists() and not (tmp_path / "res").exists()


def test_more_queries_than_the_world_has_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.n_queries=500, but the world micro-natural-[0-9a-f]{8}-s0 has 12 queries"):
        run_cell(_cell(tmp_path, "eval.n_queries=500"))


def test_unwritable_directories_are_named_with_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="artifacts_dir .* is not writable .* Choose a directory you can write to"):
        run_cell(_cell(tmp_path, f"artifacts_dir={blocker / 'art'}"))
    message = describe_error(PermissionError(13, "Permission denied", "/data/results"))
    assert "'/data/results'" in message and "results_dir=" in message


# --- scheduling ---------------------------------------------------------------------------------

def test_numeric_stages_run_with_the_stage_thread_count(tmp_path):
    torch.set_num_threads(1)  # what the joblib launcher gives each of two jobs on two cores
    try:
        with compute_stage(tmp_path, 2) as n:
            assert n == torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(int(os.environ.get("TRACKSTAR_TEST_THREADS", "1")))


def _sweep(tmp_path, name, *launcher):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "trackstar.experiment.run", "-m", "method=bm25,trackstar", *launcher,
           f"artifacts_dir={tmp_path / name / 'art'}", f"results_dir={tmp_path / name / 'res'}", "progress=false",
           "world=micro", "model=micro", "method.d=64", "eval.n_queries=6", "eval.bootstrap_resamples=100"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {p.parent.name: p.parent for p in (tmp_path / name / "res").rglob(METRICS_FILE)}


def test_parallel_and_sequential_sweeps_give_identical_results(tmp_path):
    sequential = _sweep(tmp_path, "seq")
    parallel = _sweep(tmp_path, "par", "hydra/launcher=parallel")
    assert sorted(sequential) == sorted(parallel) and len(sequential) == 2
    for name, run in sequential.items():
        other = parallel[name]
        for f in ("retrievals.jsonl", "per_query.csv"):
            assert (run / f).read_bytes() == (other / f).read_bytes(), (name, f)
        a, b = read_record(run / METRICS_FILE), read_record(other / METRICS_FILE)
        assert (a.metrics, a.splits, a.n_queries) == (b.metrics, b.splits, b.n_queries)
        assert a.artifacts["checkpoint"]["hash"] == b.artifacts["checkpoint"]["hash"]


# --- W&B and errors --------------------------------------------------------------------------

def test_wandb_mode_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    for env, expected in (("offline", "offline"), ("disabled", "disabled"), ("dryrun", "offline")):
        monkeypatch.setenv("WANDB_MODE", env)
        assert resolve_mode("auto") == expected and resolve_mode("online") == expected
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY")
    assert resolve_mode("auto") == "online"


def test_unreachable_wandb_server_logs_the_run_offline(tmp_path, monkeypatch):
    import types

    import wandb
    from test_tracking import PER_QUERY, RECORD, RETRIEVALS

    from trackstar.experiment.tracking import log_to_wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = types.SimpleNamespace(mode="auto", project="p", entity=None, max_table_rows=None, init_timeout=2)
    info = log_to_wandb(tmp_path, {}, RECORD, RETRIEVALS, PER_QUERY, logger, group="g", tags=[], name="n")
    wandb.teardown()
    assert info["mode"] == "offline" and "online_error" in info and "error" not in info
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1


def _trackstar(*args, env_extra=None, cwd=None):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "trackstar.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_errors_are_one_clear_message(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = _trackstar("score", str(empty))
    assert out.returncode == 2 and "holds no retrieval records" in out.stderr and "Traceback" not in out.stderr
    out = _trackstar("score", str(empty), env_extra={"TRACKSTAR_DEBUG": "1"})
    assert "Traceback" in out.stderr
    # Global options after the subcommand, too.
    out = _trackstar("world", "--profile", "micro", "--artifacts", str(tmp_path / "art"))
    assert out.returncode == 0, out.stderr
    world, = (tmp_path / "art" / "worlds").glob("micro-natural-*-s0")
    assert (world / "COMPLETE").is_file() and (world / "world_card.md").is_file()


def test_failed_run_prints_one_message_and_keeps_the_traceback_in_the_record(tmp_path):
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "models").write_text("")  # pretraining cannot make its directory
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "trackstar.experiment.run", "method=bm25", "world=micro", "model=micro",
           f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "progress=false"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1, out.stderr
    assert str(tmp_path / "art" / "models") in out.stderr
    (record,) = [r for p in (tmp_path / "res").rglob(METRICS_FILE) for r in [read_record(p)]]
    assert record.status == "failed" and "Traceback" in record.traceback


def test_a_table_name_that_leaves_results_dir_is_refused(tmp_path):
    """table=../../escaped wrote the run record outside results_dir."""
    overrides = ["table=../../escaped", "method=bm25", f"results_dir={tmp_path / 'res'}",
                 f"artifacts_dir={tmp_path / 'art'}", "logger=none"]
    with pytest.raises(ConfigError, match=r"table='../../escaped' is not a plain name"):
        run_cell(compose_config(overrides), multirun=True)
    from hydra import compose, initialize_config_dir

    from trackstar.experiment.compose import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        hydra_cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    for where in ("hydra.run.dir", "hydra.sweep.dir"):  # the directory Hydra makes before any job runs
        with pytest.raises(Exception, match="is not a plain name"):
            str(OmegaConf.select(hydra_cfg, where, throw_on_resolution_failure=True))
    assert not (tmp_path.parent / "escaped").exists() and not any((tmp_path / "res").rglob("*"))
    # trackstar-run checks them before Hydra makes its directories (Hydra's report is a traceback).
    from trackstar.experiment.run import main

    with pytest.raises(SystemExit, match=r"^trackstar-run: invalid config: table='../../escaped' is not a plain"):
        main(["-m", "method=bm25", "table=table1,../../escaped"])
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit, match=r"^trackstar-run: invalid config: results_dir '.*afile/res' is not writable"):
        main(["method=bm25", f"results_dir={tmp_path / 'afile' / 'res'}"])


def test_a_moved_artifacts_dir_keeps_its_features_and_finished_runs(tmp_path):
    """Clusters mount shared storage at different paths: a copied or moved artifacts dir
    re-extracted every feature (the checkpoint's path was in the store key) and re-ran
    finished cells (artifacts_dir was in the config id)."""
    common = ["world=micro", "world.style=templated", "model=micro", "method=grad_dot", "method.d=64",
              "eval.n_queries=4", "eval.tail_patch=false", "eval.bootstrap_resamples=50", "progress=false",
              "logger=none"]
    here = [f"artifacts_dir={tmp_path / 'a'}", f"results_dir={tmp_path / 'r'}"]
    first = run_cell(compose_config([*common, *here]))
    assert first.status == "finished"
    (tmp_path / "mnt").mkdir()
    for name in ("a", "r"):
        (tmp_path / name).rename(tmp_path / "mnt" / name)
    stores = {p: p.stat().st_mtime_ns for p in (tmp_path / "mnt" / "a" / "features").rglob("COMPLETE")}
    there = [f"artifacts_dir={tmp_path / 'mnt' / 'a'}", f"results_dir={tmp_path / 'mnt' / 'r'}"]
    run_dir = tmp_path / "mnt" / "r" / Path(first.run_dir).relative_to(tmp_path / "r")
    run_cell(compose_config([*common, *there]))
    assert len(attempts(run_dir)) == 1  # skipped: the finished run, not a new attempt
    again = run_cell(compose_config([*common, *there, "force=true"]))
    assert len(attempts(run_dir)) == 2 and again.metrics == first.metrics
    # Every feature store was reused: none added, none rewritten.
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "mnt" / "a" / "features").rglob("COMPLETE")} == stores


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of the live processes whose parent is ``pid`` (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _threads(pid: int) -> list[str]:
    """A process's thread names (a worker that watches its sweep has trackstar-die-w...)."""
    try:
        return sorted((t / "comm").read_text().strip() for t in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_parallel_sweep_workers_die_with_their_main_process(tmp_path):
    """kill -9 of a hydra/launcher=parallel sweep's main process left its workers running for
    minutes, holding the compute slot the re-run waited for."""
    import signal
    import time

    cmd = [sys.executable, "-m", "trackstar.experiment.run", "-m", "hydra/launcher=parallel", "world=micro",
           "model=micro", "model.seed=5,6", "method=bm25", f"artifacts_dir={tmp_path / 'a'}",
           f"results_dir={tmp_path / 'r'}", "progress=false", "logger=none"]
    main = subprocess.Popen(cmd, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.monotonic() + 180, {}
        while time.monotonic() < deadline and not (tmp_path / "a" / "models").exists():
            workers = {p: c for p, c in _children(main.pid).items() if "loky" in c and "resource_tracker" not in c}
            time.sleep(0.2)
        assert workers and main.poll() is None, "the sweep's workers never started pretraining"
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        survivors = {p: (c, _threads(p)) for p, c in workers.items() if _alive(p)}
        assert not survivors, f"a worker outlived the sweep's main process: {survivors}"
    finally:
        main.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_worker_whose_sweep_is_already_gone_exits_before_its_job():
    """A parallel sweep's worker can read a job already in the pipe after the main process was
    killed: its parent is then another process, so it used to watch that one and run the whole
    job (seen as a flaky failure of the test above). It must exit at once instead, and a worker
    of a live sweep must go on."""
    from trackstar.experiment.run import SWEEP_PID_ENV

    code = "from trackstar.experiment.run import die_with_parent; die_with_parent(); print('ran the job')"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    alive = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**env, SWEEP_PID_ENV: str(os.getpid())})  # its parent: the sweep
    assert alive.returncode == 0 and "ran the job" in alive.stdout, alive.stderr[-2000:]
    gone = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, SWEEP_PID_ENV: str(os.getpid() + 1)})  # not its parent
    assert gone.returncode == 1 and "ran the job" not in gone.stdout
    assert f"main process {os.getpid() + 1} is gone" in gone.stderr


def test_a_full_disk_while_writing_a_record_names_the_file(tmp_path, monkeypatch):
    """A full results_dir gave `[Errno 28]` with no path; the old file stays as it was."""
    import errno

    from trackstar.io import atomic_write_json

    atomic_write_json(tmp_path / "metrics.json", {"status": "finished"})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ArtifactError, match=rf"No space left .* of '{tmp_path}' while writing metrics.json"):
        atomic_write_json(tmp_path / "metrics.json", {"status": "running"})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"status": "finished"}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind
