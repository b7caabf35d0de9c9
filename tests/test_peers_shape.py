"""The peers-harness wrapper for a bigger workload (benchmarks/peers_shape)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers

from trackstar.lm.models import MODEL_SIZES

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "benchmarks" / "peers_shape"


def _shim():
    spec = importlib.util.spec_from_file_location("peers_shape_sitecustomize", SHIM / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_medium_shape_is_our_medium_model():
    shape = _shim().SHAPES["medium"]
    size = MODEL_SIZES["medium"]
    assert (shape["n_layer"], shape["d_model"], shape["n_head"], shape["d_ff_gpt2"], shape["d_ff_llama"]) == (
        size.n_layer, size.d_model, size.n_head, size.d_ff_gpt2, size.d_ff_llama)
    # The peers' feature dimension never exceeds trackstar's fixed d in the harness (4096 / 4032).
    per_side = shape["per_side"]
    assert 4 * shape["n_layer"] * per_side["gpt2"] ** 2 <= 4096
    assert 7 * shape["n_layer"] * per_side["llama"] ** 2 <= 4032


# A stand-in for the harness's common.py: the same names, and a build_model that
# calls transformers.<Family>Config(...) with its own small sizes.
FAKE_COMMON = textwrap.dedent("""
    import transformers
    SEQ_LEN = 64
    PER_SIDE = {"gpt2": 16, "llama": 12}
    def write_result(path, result):
        print("RESULT", result)
    def build_model(arch):
        if arch == "gpt2":
            return transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=128)
        return transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=4096,
                                        max_position_embeddings=128, tie_word_embeddings=True)
""")


def test_patch_rewrites_the_harness_workload_and_restores_transformers(tmp_path, capsys):
    (tmp_path / "common.py").write_text(FAKE_COMMON)
    spec = importlib.util.spec_from_file_location("fake_peers_common", tmp_path / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)

    before = transformers.GPT2Config
    _shim().patch(common, "medium")
    gpt2, llama = common.build_model("gpt2"), common.build_model("llama")
    common.write_result(None, {"tool": "x"})
    assert "'workload': 'medium: 6 layers, width 384, 256 tokens'" in capsys.readouterr().out
    assert transformers.GPT2Config is before  # restored after the call
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.n_inner, gpt2.n_positions, gpt2.vocab_size) == (
        6, 384, 6, 1536, 256, 4096)
    assert (llama.num_hidden_layers, llama.hidden_size, llama.intermediate_size, llama.num_key_value_heads,
            llama.max_position_embeddings, llama.tie_word_embeddings) == (6, 384, 1024, 6, 256, True)
    assert common.SEQ_LEN == 256 and common.PER_SIDE == {"gpt2": 13, "llama": 9}


def test_sitecustomize_patches_common_on_import_only_when_asked(tmp_path):
    (tmp_path / "common.py").write_text(FAKE_COMMON)
    probe = "import common; print(common.SEQ_LEN, common.build_model('gpt2').n_layer)"
    env = {"PYTHONPATH": f"{tmp_path}:{SHIM}", "PATH": "/usr/bin:/bin"}
    run = lambda extra: subprocess.run([sys.executable, "-c", probe], env={**env, **extra},  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout.split()
    assert run({"PEERS_SHAPE": "medium"}) == ["256", "6"]
    assert run({}) == ["64", "4"]
    # A harness whose common.py lost what the patch needs is refused, not measured at its own size.
    (tmp_path / "common.py").write_text("SEQ_LEN = 64\n")
    (tmp_path / "run_peers.sh").write_text("")
    failed = subprocess.run([sys.executable, "-c", "import common"], env={**env, "PEERS_SHAPE": "medium"},
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "no longer has build_model, PER_SIDE, write_result" in failed.stderr


def test_a_harness_that_ignores_the_sizes_is_refused(tmp_path):
    (tmp_path / "common.py").write_text(FAKE_COMMON.replace("transformers.GPT2Config(", "dict(").replace(
        "def write_result", "def build_model_unused(): pass\ndef write_result"))
    spec = importlib.util.spec_from_file_location("fake_peers_common2", tmp_path / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    shim = _shim()
    shim.patch(common, "medium")
    with pytest.raises(SystemExit, match="the harness built None layers"):
        common.build_model("gpt2")
