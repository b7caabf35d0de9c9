"""Which weights a run attributes: counted by kind, recorded, and a partial set of main weights refused."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from trackstar.attribution import METHODS, TrackStar
from trackstar.attribution.coverage import PartialCoverageError, coverage
from trackstar.attribution.gradients import block_linear_sites

from test_attribution import WORDS, make_gpt2


def _mixtral():
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=len(WORDS), max_position_embeddings=32)).eval()


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(WORDS), max_position_embeddings=32)).eval()


def _brute(model, names):
    """Parameters counted by hand: every distinct parameter, and those named."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}
    total = sum(p.numel() for _, p in params.values())
    return total, sum(p.numel() for n, p in params.values() if n in set(names))


@pytest.mark.parametrize("build", [make_gpt2, _llama], ids=["gpt2", "llama"])
def test_dense_models_attribute_every_block_matrix(build):
    model = build()
    names = [s.name for s in block_linear_sites(model)]
    report = coverage(model, names)
    total, done = _brute(model, names)
    assert (report["parameters"], report["attributed"]) == (total, done)
    assert report["share"] == pytest.approx(done / total)
    assert report["unattributed_main"] == []
    kinds = report["by_kind"]
    for kind in ("attention", "mlp"):
        assert kinds[kind]["attributed"] == kinds[kind]["parameters"] > 0
    assert kinds["embeddings"]["attributed"] == 0 and kinds["norm/bias"]["attributed"] == 0
    assert sum(v["parameters"] for v in kinds.values()) == total


def test_mixture_of_experts_is_attributed_expert_by_expert(tokenizer):
    model = _mixtral()
    report = TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64)).coverage
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert report["by_kind"]["experts"] == {"parameters": experts, "attributed": experts}
    assert report["by_kind"]["router"]["attributed"] == 0  # off by default
    assert report["unattributed_main"] == [] and report["sites"] == 8 + 2 * 2 * 4  # attention + 2 per expert


def test_experts_of_an_unknown_layout_are_refused_with_their_names(tokenizer):
    model = _mixtral()
    for layer in model.model.layers:  # a remote-code experts module: fused weights, no declared layout
        del layer.mlp.experts.has_gate
    with pytest.raises(PartialCoverageError, match=r"experts: .* left out.*mlp\.experts\.gate_up_proj.*"
                                                   r"declared experts layout.*allow_partial"):
        TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64))
    engine = TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64, allow_partial=True))
    report = engine.coverage
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert report["by_kind"]["experts"] == {"parameters": experts, "attributed": 0}
    assert report["by_kind"]["attention"]["attributed"] == report["by_kind"]["attention"]["parameters"]
    assert report["attributed"] < report["parameters"] / 2  # most of the model is its experts
    assert len(report["unattributed_main"]) == 4  # gate_up_proj and down_proj of two layers


def test_a_run_records_and_prints_its_coverage(tmp_path, capsys):
    from trackstar.experiment import compose_config, run_cell
    from trackstar.experiment.tracking import wandb_summary

    record = run_cell(compose_config([f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}",
                                      "progress=false", "logger=none", "world=micro", "model=micro",
                                      "eval.n_queries=2", "eval.tail_patch=false", "method=grad_cosine",
                                      "method.d=64", "stage_threads=1"]))
    assert record.status == "finished", record.error
    cover = record.info["coverage"]
    assert cover["sites"] == 8 and cover["unattributed_main"] == [] and 0 < cover["share"] < 1
    summary = wandb_summary(record)
    assert summary["coverage/share"] == cover["share"] and summary["coverage/sites"] == 8
    assert f"{cover['share']:.1%} of the parameters" in capsys.readouterr().out
    # Where it computed: the same code gives the same numbers only in the same environment.
    env = record.environment
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["device"] == "cpu"
    assert env["packages"]["torch"] == torch.__version__ and env["packages"]["bm25s"] and env["numpy_simd"]
    from trackstar.experiment.record import read_record

    assert read_record(next((tmp_path / "res").rglob("metrics.json"))).environment == env


def test_weights_the_forward_never_uses_are_dropped_and_listed(tokenizer):
    """A decoder's cross-attention with no encoder, say: a module that never runs has zero gradient."""
    model = _llama()
    for layer in model.model.layers:
        layer.self_attn.cross = torch.nn.Linear(16, 16, bias=False)  # never called
    engine = TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64))
    idle = [f"model.layers.{i}.self_attn.cross.weight" for i in range(2)]
    assert engine.coverage["unused"] == idle and not {s.name for s in engine.sites} & set(idle)
    assert engine.coverage["unattributed_main"] == []
    assert len(engine.attribute(["the capital of france is paris"] * 3, [("the capital of", "paris")]).proponent_ids[0]) == 3


def test_a_weight_read_outside_its_module_is_refused_by_name(tokenizer):
    """Mamba's dt_proj, say: the module never runs, its weight is read directly."""
    from trackstar.attribution.gradients import AttributionError

    model = _llama()
    mlp = model.model.layers[0].mlp
    mlp.direct = torch.nn.Linear(16, 16, bias=False)
    original = mlp.forward
    mlp.forward = lambda x: original(x) + torch.nn.functional.linear(x, mlp.direct.weight)
    engine = TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64))
    assert "model.layers.0.mlp.direct.weight" in {s.name for s in engine.sites} and engine.coverage["unused"] == []
    with pytest.raises(AttributionError, match=r"mlp\.direct\.weight: its module did not run.*read outside the "
                                               r"module's forward.*params='all'"):
        engine.attribute(["the capital of france is paris"] * 2, [("the capital of", "paris")])
