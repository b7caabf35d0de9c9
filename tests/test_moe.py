"""Mixture-of-experts models: every expert's matrices attributed, against brute force.

Tiny models of five MoE families are built from transformers' own configs
(2 layers, 4 experts, top-2). The reference is plain autograd of the model as
transformers runs it (its own experts implementation), one example at a time,
over the fused 3-D parameters, sliced per expert afterwards: it shares nothing
with the engine's per-expert forward, so a wrong routing, layout (GPT-OSS
stores its experts transposed, with biases and an interleaved gate) or
scatter would show.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from trackstar.attribution import METHODS, TrackStar
from trackstar.attribution.coverage import coverage
from trackstar.attribution.gradients import AttributionError, all_parameter_sites, block_linear_sites
from trackstar.attribution.output import query_example, training_example
from trackstar.attribution.second_moment import second_moment_from_optimizer

from test_attribution import QUERIES, TRAIN, WORDS, lib_features, ref_objective, step_each, train_adafactor

COMMON = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=1, eos_token_id=len(WORDS) - 1)


def _build(cls, config_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(**COMMON, **kw)
    model = cls(config).float().eval()
    with torch.no_grad():  # transformers leaves some MoE weights at zero; the test needs every path alive
        for name, p in model.named_parameters():
            if p.dim() >= 1 and not name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.2)
    return model


FAMILIES = {
    "mixtral": lambda: _build(MixtralForCausalLM, MixtralConfig, intermediate_size=24,
                              num_local_experts=4, num_experts_per_tok=2),
    "olmoe": lambda: _build(OlmoeForCausalLM, OlmoeConfig, intermediate_size=24,
                            num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: _build(Qwen2MoeForCausalLM, Qwen2MoeConfig, intermediate_size=24, moe_intermediate_size=12,
                                shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
                                decoder_sparse_step=1),
    "qwen3_moe": lambda: _build(Qwen3MoeForCausalLM, Qwen3MoeConfig, intermediate_size=24, moe_intermediate_size=12,
                                num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8),
    "gpt_oss": lambda: _build(GptOssForCausalLM, GptOssConfig, intermediate_size=12, num_local_experts=4,
                              num_experts_per_tok=2, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"]),
}


ROUTER = re.compile(r"\.mlp\.(gate|router)\.weight$")


def ref_names(model, routers=False):
    """Every weight matrix inside the blocks, 2-D or fused 3-D, found by shape and name alone:
    the routers (each block's ``mlp.gate`` or ``mlp.router``) only when asked."""
    return [n for n, p in model.named_parameters()
            if n.startswith("model.layers.") and p.dim() >= 2 and not n.endswith("bias")
            and (routers or not ROUTER.search(n))]


def ref_gradients(model, tokenizer, names, text=None, prompt=None, target=None):
    """One example's gradient by plain autograd, as {name: O×I matrix}; experts sliced per expert
    and oriented out×in (GPT-OSS stores them in×out)."""
    params = dict(model.named_parameters())
    f = ref_objective(model, tokenizer, text, prompt, target)
    grads = torch.autograd.grad(f, [params[n] for n in names], allow_unused=True)
    transposed = type(model).__name__.startswith("GptOss")
    out = {}
    for n, g in zip(names, grads):
        g = torch.zeros_like(params[n]) if g is None else g
        if g.dim() == 3:
            for e in range(g.shape[0]):
                out[f"{n}[{e}]"] = (g[e].T if transposed else g[e]).double()
        else:
            out[n] = g.double()
    return out


def _examples(tokenizer):
    examples = [training_example(tokenizer, t, f"t{i}", 32) for i, t in enumerate(TRAIN[:4])]
    examples += [query_example(tokenizer, p, t, f"q{i}", 32) for i, (p, t) in enumerate(QUERIES)]
    return examples


def _references(model, tokenizer):
    names = ref_names(model)
    return ([ref_gradients(model, tokenizer, names, text=t) for t in TRAIN[:4]]
            + [ref_gradients(model, tokenizer, names, prompt=p, target=t) for p, t in QUERIES])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_expert_matrix_is_a_site_and_its_gradient_equals_brute_force(family, tokenizer):
    model = FAMILIES[family]()
    sites = block_linear_sites(model)
    want = _references(model, tokenizer)
    assert [s.name for s in sites if s.expert is not None] and set(s.name for s in sites) == set(want[0])
    report = coverage(model, [s.name for s in sites])
    assert report["unattributed_main"] == []
    experts = sum(p.numel() for n, p in model.named_parameters() if "expert" in n and not n.endswith("bias") and p.dim() >= 2)
    assert report["by_kind"]["experts"] == {"parameters": experts, "attributed": experts}
    # Identity projection: the features are the flattened O×I gradients, site by site.
    got = lib_features(model, tokenizer, _examples(tokenizer), batch_size=3).double()
    ref = torch.stack([torch.cat([g[s.name].reshape(-1) for s in sites]) for g in want])
    # Routing is per token, so padding and batching must not change it; a few experts get no
    # token in some batch of three (their rows are zero there), which the brute force agrees with.
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    experts = [s.name for s in sites if s.expert is not None]
    reached = [name for name in experts if any(g[name].abs().max() > 0 for g in want)]
    assert len(reached) >= len(experts) // 2  # the comparison is not one of zeros


def test_params_all_attributes_each_expert_by_plain_autograd(tokenizer):
    model = FAMILIES["qwen2_moe"]()
    sites = all_parameter_sites(model)
    assert "model.layers.1.mlp.experts.down_proj[3]" in {s.name for s in sites}
    examples = _examples(tokenizer)[:2]
    got = lib_features(model, tokenizer, examples, sites=sites, dense=True).double()
    names = [n for n, _ in model.named_parameters()]
    want = [ref_gradients(model, tokenizer, names, text=t) for t in TRAIN[:2]]
    ref = torch.stack([torch.cat([g[s.name].reshape(-1) for s in sites]) for g in want])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_a_failure_inside_the_model_names_the_architecture_site_and_shapes(tokenizer):
    model = FAMILIES["mixtral"]()
    norm = model.model.layers[1].post_attention_layernorm

    def broken(hidden):
        raise RuntimeError("The size of tensor a (39) must match the size of tensor b (624)")

    norm.forward = broken
    with pytest.raises(AttributionError) as info:
        lib_features(model, tokenizer, _examples(tokenizer)[:2], batch_size=2)
    message = str(info.value)
    assert "MixtralForCausalLM (model_type 'mixtral')" in message and "forward pass failed" in message
    assert "model.layers.1.self_attn.o_proj.weight (input (2, " in message  # the last site before the failure
    assert "tensor a (39)" in message and "params='all'" in message


def test_a_module_on_a_subset_of_tokens_is_refused_by_name(tokenizer):
    """A per-expert linear module called on the tokens routed to it (remote-code MoE style)."""

    class EveryOtherToken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            keep = torch.arange(0, flat.shape[0], 2)
            out = flat.new_zeros(flat.shape[0], self.inner.out_features).index_add(0, keep, self.inner(flat[keep]))
            return out.reshape(*x.shape[:-1], -1)

    model = FAMILIES["mixtral"]()
    attention = model.model.layers[0].self_attn
    attention.o_proj = EveryOtherToken(attention.o_proj)
    with pytest.raises(AttributionError, match=r"input of model\.layers\.0\.self_attn\.o_proj\.inner\.weight "
                                               r"has shape \(12, 16\), neither .*per-expert module"):
        lib_features(model, tokenizer, _examples(tokenizer)[:2], batch_size=2)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_routers_are_sites_when_asked_and_equal_brute_force(family, tokenizer):
    model = FAMILIES[family]()
    sites = block_linear_sites(model, routers=True)
    routers = [s.name for s in sites if ROUTER.search(s.name)]
    assert len(routers) == 2
    assert not set(routers) & {s.name for s in block_linear_sites(model)}  # off by default
    names = ref_names(model, routers=True)
    want = [ref_gradients(model, tokenizer, names, text=t) for t in TRAIN[:3]]
    got = lib_features(model, tokenizer, _examples(tokenizer)[:3], sites=sites, batch_size=3).double()
    ref = torch.stack([torch.cat([g[s.name].reshape(-1) for s in sites]) for g in want])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())
    assert all(ref[:, _span(sites, name)].abs().max() > 0 for name in routers)
    report = coverage(model, [s.name for s in sites])
    assert report["by_kind"]["router"]["attributed"] == sum(model.get_parameter(n).numel() for n in routers)


def _span(sites, name):
    offset = 0
    for s in sites:
        if s.name == name:
            return slice(offset, offset + s.out_features * s.in_features)
        offset += s.out_features * s.in_features
    raise KeyError(name)


@pytest.mark.parametrize("optim", ["adam", "adafactor"])
def test_expert_v_is_the_optimizers_own_statistic_for_that_expert(optim, tokenizer):
    model = FAMILIES["mixtral"]()
    if optim == "adam":
        opt = step_each(model, tokenizer, torch.optim.Adam(model.parameters(), lr=1e-3), TRAIN[:4])
    else:
        opt = train_adafactor(model, tokenizer, lr=0.01)
    sites = [s for s in block_linear_sites(model) if s.expert is not None]
    v = second_moment_from_optimizer(model, opt, sites)
    for s in sites:
        state = opt.state[model.get_parameter(s.parameter)]
        if optim == "adam":
            step = float(state["step"])
            want = 1.0 / ((state["exp_avg_sq"][s.expert].double() / (1 - 0.999 ** step)).sqrt() + 1e-8)
        else:
            r, c = state["row_var"][s.expert].double(), state["col_var"][s.expert].double()
            want = 1.0 / ((r @ c) / r.mean()).sqrt().clamp(min=torch.finfo(torch.float32).eps)
        torch.testing.assert_close(v[s.name].multiplier().double(), want.float().double(), rtol=1e-5, atol=0)
    # The experts' statistics differ, so a slice of the wrong expert would show.
    assert not torch.equal(v[sites[0].name].multiplier(), v[sites[1].name].multiplier())


def test_default_trackstar_runs_on_every_family_with_full_coverage(tokenizer):
    texts = TRAIN[:6]
    for family, build in FAMILIES.items():
        model = build()
        engine = TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=256, k=3))
        assert engine.coverage["unattributed_main"] == [], family
        assert engine.coverage["by_kind"]["experts"]["attributed"] > 0, family
        scores = torch.cat([chunk for _, chunk in engine.all_scores(texts, QUERIES[:2])], dim=1)
        assert scores.shape == (2, len(texts)) and bool(torch.isfinite(scores).all()), family
