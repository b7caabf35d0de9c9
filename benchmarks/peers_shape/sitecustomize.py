"""Run the peers harness (``../shared/peers``) on a bigger workload, unchanged otherwise.

The harness fixes its workload in its ``common`` module (4 layers, width 256,
64 tokens) and has no knob for another shape. With this directory on
PYTHONPATH and ``PEERS_SHAPE`` set, Python imports this file at start-up; it
patches ``common`` as soon as a bench imports it, so every tool (the training
reference, bergson, dattri and this project) sees the same bigger models,
sequences and per-matrix sketch sizes, and the harness's own code builds,
converts and measures them. Without ``PEERS_SHAPE`` it does nothing.

``benchmarks/peers_shape.sh`` sets both; see its header.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

#: Our ``medium`` size (trackstar.lm.models.MODEL_SIZES, checked by a test), at
#: 256 tokens. ``per_side``: each tool's p×p sketch per matrix, chosen so that
#: the peers' feature dimension stays at or below trackstar's fixed d (4096 for
#: GPT-2, 4032 for Llama): GPT-2 24 matrices × 13² = 4056, Llama 42 × 9² = 3402.
SHAPES = {
    "medium": {"n_layer": 6, "d_model": 384, "n_head": 6, "d_ff_gpt2": 1536, "d_ff_llama": 1024,
               "seq_len": 256, "per_side": {"gpt2": 13, "llama": 9}},
}


def _config_overrides(shape: dict) -> dict:
    """Keyword overrides for the harness's GPT2Config / LlamaConfig calls."""
    positions = max(128, shape["seq_len"])
    return {
        "GPT2Config": {"n_layer": shape["n_layer"], "n_embd": shape["d_model"], "n_head": shape["n_head"],
                       "n_inner": shape["d_ff_gpt2"], "n_positions": positions},
        "LlamaConfig": {"hidden_size": shape["d_model"], "intermediate_size": shape["d_ff_llama"],
                        "num_hidden_layers": shape["n_layer"], "num_attention_heads": shape["n_head"],
                        "num_key_value_heads": shape["n_head"], "max_position_embeddings": positions},
    }


def patch(common, name: str) -> None:
    """Point the harness module ``common`` at the workload ``SHAPES[name]``."""
    if name not in SHAPES:
        raise SystemExit(f"PEERS_SHAPE={name!r}: unknown shape; choose from {', '.join(SHAPES)}.")
    shape = SHAPES[name]
    common.SEQ_LEN = shape["seq_len"]
    common.PER_SIDE = dict(shape["per_side"])
    original = common.build_model
    overrides = _config_overrides(shape)

    def build_model(arch: str):
        # The harness builds its model from transformers.<Family>Config(...): the same
        # call with our sizes on top, and the rest of the harness's build_model as is.
        import transformers

        saved = {cls: getattr(transformers, cls) for cls in overrides}
        try:
            for cls, extra in overrides.items():
                setattr(transformers, cls, lambda _cls=saved[cls], _extra=extra, **kw: _cls(**{**kw, **_extra}))
            model = original(arch)
        finally:
            for cls, value in saved.items():
                setattr(transformers, cls, value)
        config = getattr(model, "config", model)
        got = (getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers", None),
               getattr(config, "n_embd", None) or getattr(config, "hidden_size", None))
        if got != (shape["n_layer"], shape["d_model"]):
            raise SystemExit(f"PEERS_SHAPE={name}: the harness built {got[0]} layers of width {got[1]}, not "
                             f"{shape['n_layer']} x {shape['d_model']}: its build_model no longer calls "
                             "transformers.<Family>Config(...); update benchmarks/peers_shape.")
        return model

    write_result = common.write_result

    def write_result_with_workload(path, result):
        result.setdefault("workload", f"{name}: {shape['n_layer']} layers, width {shape['d_model']}, "
                                      f"{shape['seq_len']} tokens")
        return write_result(path, result)

    common.build_model = build_model
    common.write_result = write_result_with_workload


class _PatchCommon(importlib.abc.MetaPathFinder):
    """Finds the harness's ``common`` module as usual and patches it once it has run."""

    def __init__(self, shape: str):
        self.shape = shape

    def find_spec(self, fullname, path, target=None):
        if fullname != "common":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            names = ("build_model", "PER_SIDE", "SEQ_LEN", "write_result")
            if all(hasattr(module, n) for n in names):  # the harness's common
                patch(module, self.shape)
            elif os.path.isfile(os.path.join(os.path.dirname(module.__file__ or ""), "run_peers.sh")):
                raise SystemExit(f"PEERS_SHAPE={self.shape}: the peers harness's common.py no longer has "
                                 f"{', '.join(n for n in names if not hasattr(module, n))}; "
                                 "update benchmarks/peers_shape.")

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("PEERS_SHAPE"):
    sys.meta_path.insert(0, _PatchCommon(os.environ["PEERS_SHAPE"]))
