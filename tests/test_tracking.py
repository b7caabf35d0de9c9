"""W&B mirror of a run record: offline into a temporary folder, then read back."""

import types

import pandas as pd
import pytest

from trackstar.experiment.record import MethodInfo, RunRecord, flatten_metrics, unflatten_metrics
from trackstar.experiment.tracking import log_to_wandb, per_query_rows, resolve_mode, wandb_summary

RECORD = RunRecord(
    config_id="c", table="table1", corpus="closed", method=MethodInfo("bm25", "BM25", "baseline", 0.0, {"k1": 1.5}),
    world={"profile": "micro", "seed": 0}, model={"size": "micro"}, eval={"k": 10}, git_commit="abc",
    started="2026-01-01T00:00:00+00:00", run_dir="/tmp/x", status="finished",
    metrics={"mrr": {"mean": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 2}},
    splits={"greedy_correct": {"True": {"mrr": {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 1}}}},
    timings={"total": 3.0},
)
RETRIEVALS = [
    {"example_id": "Q1", "inputs_plaintext": "The capital of France is", "targets_plaintext": "Paris", "relation": "P36",
     "c4_frequency_bucket": 5, "proponents": ["The capital of France is Paris."], "proponent_ids": ["S1"],
     "proponent_scores": [0.9], "proponent_correct": [True]},
    {"example_id": "Q2", "inputs_plaintext": "Spain borders", "targets_plaintext": "France", "relation": "P47",
     "c4_frequency_bucket": 1, "proponents": ["x", "y"], "proponent_ids": ["S2", "S3"],
     "proponent_scores": [0.2, 0.1], "proponent_correct": [False, False]},
]
PER_QUERY = pd.DataFrame({"example_id": ["Q1", "Q2"], "mrr": [1.0, 0.0], "recall@10": [1.0, 0.0], "greedy_correct": [True, False]})


def test_flat_summary_and_table_rows():
    flat = wandb_summary(RECORD)
    assert flat["mrr"] == 0.5 and flat["mrr/ci_low"] == 0.4 and flat["split/greedy_correct/True/mrr"] == 1.0
    assert flat["time/total"] == 3.0 and flat["status"] == "finished"
    # The one flattening and its inverse: W&B's extra keys are ignored.
    assert unflatten_metrics({**flat, "_runtime": 5}) == (RECORD.metrics, RECORD.splits)
    assert flatten_metrics(*unflatten_metrics(flat)) == RECORD.flat_metrics()
    # The record round-trips through its dict and through its W&B header + summary.
    assert RunRecord.from_dict(RECORD.to_dict()) == RECORD
    rebuilt = RunRecord.from_header(RECORD.header(), flat, "test")
    assert rebuilt.metrics == RECORD.metrics and rebuilt.method == RECORD.method
    columns, rows = per_query_rows(RETRIEVALS, PER_QUERY)
    assert columns[:5] == ["example_id", "prompt", "target", "relation", "bucket"]
    assert rows[0][columns.index("top1")] == "The capital of France is Paris."
    assert rows[0][columns.index("top1_correct")] is True and rows[1][columns.index("top3")] is None


def test_modes(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent")
    monkeypatch.setenv("HOME", "/nonexistent")
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    with pytest.raises(ValueError, match="logger.mode"):
        resolve_mode("sometimes")


def test_offline_run_is_written_and_holds_config_and_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = types.SimpleNamespace(mode="offline", project="trackstar-test", entity=None, max_table_rows=None, init_timeout=20)
    info = log_to_wandb(tmp_path, {"method": {"name": "bm25"}}, RECORD, RETRIEVALS, PER_QUERY, logger,
                        group="table1", tags=["table1", "bm25"], name="bm25-closed-test")
    assert info["mode"] == "offline" and "error" not in info
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The SDK hands records to its service process, which writes the run's log on its own
    # schedule; shutting the service down is what guarantees everything is on disk (a sweep
    # process does this at exit).
    import wandb

    wandb.teardown()
    # Offline runs keep config, summary and history in the run's .wandb log (protobuf,
    # strings stored as written) and tables as JSON media files.
    (log,) = runs[0].glob("*.wandb")
    raw = log.read_bytes()
    for expected in (b"trackstar-test", b"table1", b"bm25-closed-test", b"mrr/ci_low", b"split/greedy_correct/True/mrr", b"per_query",
                     b"run_record", b"schema_version"):
        assert expected in raw, expected
    (table,) = (runs[0] / "files" / "media" / "table").glob("per_query_*.table.json")
    content = table.read_text()
    assert "The capital of France is Paris." in content and "top1_correct" in content


def test_wandb_failure_is_reported_not_raised(tmp_path, monkeypatch):
    import wandb

    def boom(*a, **k):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", boom)
    logger = types.SimpleNamespace(mode="online", project="p", entity=None, max_table_rows=None, init_timeout=1)
    info = log_to_wandb(tmp_path, {}, RECORD, RETRIEVALS, PER_QUERY, logger, group="g", tags=[], name="n")
    assert info == {"mode": "online", "error": "ConnectionError: api.wandb.ai unreachable"}


def test_regenerated_tables_do_not_make_the_code_dirty(tmp_path):
    """`trackstar quick` rewrites paper_tables/ between sweeps; later runs are still of a clean commit."""
    import subprocess

    from trackstar.experiment.record import git_commit

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "paper_tables").mkdir()
    (tmp_path / "paper_tables" / "table1.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path)
    assert clean and not clean.endswith("-dirty")
    (tmp_path / "paper_tables" / "table1.md").write_text("regenerated\n")
    assert git_commit(tmp_path) == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path) == clean + "-dirty"
