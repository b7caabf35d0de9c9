"""The prepared GPU run (benchmarks/gpu_check.py) runs end to end: its dry run, on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_its_json_and_table(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    # CPU against itself: the agreement is exact, which shows the comparison ran.
    assert report["agreement_micro"]["feature_rel_err_max"] == 0.0
    assert report["agreement_micro"]["top10_overlap"] == 1.0
    rows = {(r["dtype"], r["tool"]): r for r in report["throughput"]}
    assert set(rows) == {(d, t) for d in ("float32", "bfloat16") for t in ("trackstar", "bergson")}
    for dtype in ("float32", "bfloat16"):
        ours = rows[(dtype, "trackstar")]
        assert ours["examples_per_s"] > 0 and ours["feature_dim"] == 4096
        assert ours["tokens_per_s"] == ours["examples_per_s"] * ours["seq_len"]
        theirs = rows[(dtype, "bergson")]
        # bergson is not a dependency: measured where installed, otherwise the row says why not.
        assert theirs.get("examples_per_s", 0) > 0 or "not installed" in theirs["skipped"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in table and "| tiny | float32 | trackstar |" in table
