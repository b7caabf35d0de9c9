"""The compatibility matrix (benchmarks/compatibility.py): tiny models of transformers' causal-LM
types run with default settings, coverage read, gradients checked against plain autograd."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("compatibility", ROOT / "benchmarks" / "compatibility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_few_families_run_in_full_and_equal_autograd(tmp_path):
    """Dense (GPT-2's Conv1D), MoE with a shared expert (Qwen2-MoE), and a refusal the matrix names."""
    script = _script()
    out, data = tmp_path / "matrix.md", tmp_path / "matrix.json"
    assert script.main(["--only", "gpt2,qwen2_moe", "--out", str(out), "--json", str(data)]) == 0
    rows = {r["type"]: r for r in json.loads(data.read_text())}
    for kind in ("gpt2", "qwen2_moe"):
        assert rows[kind]["status"] == "full", rows[kind]
        assert rows[kind]["matrix_share"] > 0.3 and rows[kind]["gap"] < 1e-3
    assert rows["qwen2_moe"]["experts"]
    table = out.read_text()
    assert "| gpt2 | GPT2LMHeadModel | full |" in table and "Summary: 2 full." in table


def test_a_brute_force_mismatch_would_be_reported(monkeypatch):
    """The gap is measured, not assumed: a wrong feature shows as `differs`."""
    script = _script()
    from trackstar.attribution import features

    original = features.FeatureExtractor.__call__
    monkeypatch.setattr(features.FeatureExtractor, "__call__", lambda self, batch: original(self, batch) * 1.01)
    row = script.check("gpt2", script.tokenizer())
    assert row["status"] == "differs" and 5e-3 < row["gap"] < 2e-2


@pytest.mark.slow
def test_every_causal_lm_type_is_full_refused_or_said_why(tmp_path):
    script = _script()
    data = tmp_path / "matrix.json"
    script.main(["--json", str(data)])
    rows = json.loads(data.read_text())
    assert len(rows) == len(script.causal_lm_types())
    assert not [r["type"] for r in rows if r["status"] == "differs"]
    for r in rows:
        assert r["status"] in {"full", "refused", "no tiny config", "error"}
        assert r["status"] == "full" or r.get("detail")  # never silent
    full = {r["type"] for r in rows if r["status"] == "full"}
    assert {"gpt2", "llama", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss", "gpt_neox"} <= full
