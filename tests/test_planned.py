"""A sweep that did not run every job it planned is named by the tables, never passed over:
re-planned from the multirun.yaml Hydra wrote, on a real (tiny) sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trackstar.tables import TablesError, load_local_runs
from trackstar.tables.cli import main
from trackstar.tables.planned import unfinished_jobs
from trackstar.tables.runs import UnfinishedJobsWarning

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two BM25 jobs (two query counts) of one real `-m` sweep, no model, no tail-patch."""
    tmp = tmp_path_factory.mktemp("planned")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "trackstar.experiment.run", "-m", "--config-dir", str(ROOT / "sweeps"),
           "--config-name", "table1", "method=bm25", "eval.n_queries=5,6", "eval.tail_patch=false",
           f"artifacts_dir={tmp / 'art'}", f"results_dir={tmp / 'res'}", "progress=false", "world=micro",
           "model=micro", "logger=none"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = sorted((tmp / "res" / "table1").glob("*/metrics.json"))
    assert len(records) == 2 and all(json.loads(p.read_text())["status"] == "finished" for p in records)
    return tmp / "res"


def _record_of(results: Path, n_queries: int) -> Path:
    """The record of the job with ``eval.n_queries=n_queries``."""
    [path] = [p for p in (results / "table1").glob("*/metrics.json")
              if yaml.safe_load((p.parent / "config.yaml").read_text())["eval"]["n_queries"] == n_queries]
    return path


def test_a_whole_sweep_has_nothing_unfinished(sweep):
    assert unfinished_jobs(sweep) == []
    assert load_local_runs(sweep).unfinished == []


def test_a_job_without_its_record_is_named_everywhere(sweep, tmp_path, capsys):
    record = _record_of(sweep, 6)
    moved = record.with_name("metrics.json.away")
    record.rename(moved)
    try:
        missing = unfinished_jobs(sweep)
        assert [(u.sweep, u.job) for u in missing] == [("table1", "method=bm25 eval.n_queries=6")]
        assert missing[0].reason == f"no run record in {record.parent.name}/"
        with pytest.warns(UnfinishedJobsWarning, match="eval.n_queries=6"):
            runs = load_local_runs(sweep)
        assert len(runs.frame) == 1 and runs.unfinished == [missing[0].line()]
        with pytest.raises(TablesError, match="--strict"):
            load_local_runs(sweep, strict=True)

        out = tmp_path / "tables"
        assert main(["--results", str(sweep), "--out", str(out), "--tables", "table1"]) == 0
        readme = (out / "README.md").read_text()
        assert "WARNING: incomplete sweeps: 1 planned job(s)" in readme and missing[0].line() in readme
        assert "INCOMPLETE SWEEPS" in (out / "table1.md").read_text()
        assert json.loads((out / "table1.provenance.json").read_text())["unfinished_jobs"] == [missing[0].line()]
        assert "eval.n_queries=6" in capsys.readouterr().err
    finally:
        moved.rename(record)
    assert unfinished_jobs(sweep) == []


def test_a_sweep_whose_configs_are_gone_is_named_unchecked(sweep, tmp_path):
    copy = tmp_path / "res"
    (copy / "table1").mkdir(parents=True)
    saved = yaml.safe_load((sweep / "table1" / "multirun.yaml").read_text())
    for source in saved["hydra"]["runtime"]["config_sources"]:
        if source["provider"] == "command-line":
            source["path"] = str(tmp_path / "gone")
    saved["hydra"]["job"]["config_name"] = "not_a_packaged_sweep"
    (copy / "table1" / "multirun.yaml").write_text(yaml.safe_dump(saved))
    [unchecked] = unfinished_jobs(copy)
    assert unchecked.job is None and "is not on this machine" in unchecked.reason
    # A sweep of ours run from a checkout that is gone is re-planned from the package's copy.
    saved["hydra"]["job"]["config_name"] = "table1"
    (copy / "table1" / "multirun.yaml").write_text(yaml.safe_dump(saved))
    assert [u.job for u in unfinished_jobs(copy)] == ["method=bm25 eval.n_queries=5", "method=bm25 eval.n_queries=6"]
