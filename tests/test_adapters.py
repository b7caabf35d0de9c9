"""PEFT adapters (LoRA): attribution over the adapter's weights, against brute force.

A fine-tuned adapter is what changed the model, so its weights are what the
per-example gradients are taken over, with V from the adapter's own optimizer.
The reference is plain autograd over the adapter's parameters of the PEFT model
as peft runs it, one example at a time.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="the adapter path needs the peft extra (pip install -e '.[test]')")

from trackstar.attribution import METHODS, TrackStar  # noqa: E402
from trackstar.attribution.coverage import PartialCoverageError  # noqa: E402
from trackstar.attribution.gradients import adapter_parameters, attribution_sites  # noqa: E402
from trackstar.attribution.output import query_example, training_example  # noqa: E402
from trackstar.attribution.second_moment import second_moment_from_optimizer  # noqa: E402

from test_attribution import (  # noqa: E402
    QUERIES, TRAIN, lib_features, make_gpt2, make_llama, ref_objective, step_each)


def _lora(model, targets, **kw):
    torch.manual_seed(1)
    config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets,
                             init_lora_weights=False, **kw)  # B = 0 at init would zero A's gradient
    return peft.get_peft_model(model, config).eval()


def llama_lora(**kw):
    return _lora(make_llama(), ["q_proj", "v_proj", "up_proj", "down_proj"], **kw)


def ref_adapter_gradient(model, tokenizer, text=None, prompt=None, target=None):
    """One example's gradient over the parameters named lora_A/lora_B, flattened per matrix."""
    named = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    f = ref_objective(model, tokenizer, text, prompt, target)
    grads = torch.autograd.grad(f, list(named.values()))
    return {n: g.double() for n, g in zip(named, grads)}


def _examples(tokenizer):
    return ([training_example(tokenizer, t, f"t{i}", 32) for i, t in enumerate(TRAIN[:4])]
            + [query_example(tokenizer, p, t, f"q{i}", 32) for i, (p, t) in enumerate(QUERIES)])


def _train(model, tokenizer, steps=3):
    """A few Adam steps on the adapter's trainable weights, named (as a saved state would be)."""
    opt = torch.optim.AdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-2)
    return step_each(model, tokenizer, opt, TRAIN[:steps])


@pytest.mark.parametrize("build", [llama_lora, lambda: _lora(make_gpt2(), ["c_attn", "c_fc"], fan_in_fan_out=True)],
                         ids=["llama", "gpt2-conv1d"])
def test_sites_are_the_adapters_matrices_and_their_gradients_equal_brute_force(build, tokenizer):
    model = build()
    sites = attribution_sites(model)
    want = [ref_adapter_gradient(model, tokenizer, text=t) for t in TRAIN[:4]]
    want += [ref_adapter_gradient(model, tokenizer, prompt=p, target=t) for p, t in QUERIES]
    assert {s.name for s in sites} == set(want[0]) and len(sites) >= 8
    assert not any("base_layer" in s.name for s in sites)  # the frozen base is not attributed
    got = lib_features(model, tokenizer, _examples(tokenizer), sites=sites, batch_size=3).double()
    ref = torch.stack([torch.cat([g[s.name].reshape(-1) for s in sites]) for g in want])
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_v_is_the_adapters_own_optimizer_state(tokenizer):
    model = llama_lora()
    opt = _train(model, tokenizer)
    sites = attribution_sites(model)
    v = second_moment_from_optimizer(model, opt, sites)
    params = dict(model.named_parameters())
    for s in sites:
        state = opt.state[params[s.name]]
        want = 1.0 / ((state["exp_avg_sq"].double() / (1 - 0.999 ** float(state["step"]))).sqrt() + 1e-8)
        torch.testing.assert_close(v[s.name].multiplier().double(), want.float().double(), rtol=1e-5, atol=0)
    named = second_moment_from_optimizer(model, opt.state_dict(), sites)  # a saved state, matched by name
    assert all(torch.equal(named[s.name].multiplier(), v[s.name].multiplier()) for s in sites)


def test_the_api_scores_the_adapter_with_coverage_scoped_to_it(tokenizer):
    model = llama_lora()
    opt = _train(model, tokenizer)
    engine = TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64, k=2), optimizer=opt)
    report = engine.coverage
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert report["scope"] == "adapter" and report["parameters"] == report["attributed"] == lora
    assert report["unattributed_main"] == []
    result = engine.attribute(TRAIN, QUERIES)
    assert len(result.proponent_ids[0]) == 2 and result.v_source == "adam"
    # Without the optimizer, V is estimated over the same adapter weights (with the usual warning).
    with pytest.warns(UserWarning, match="ESTIMATED"):
        TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64, k=2)).attribute(TRAIN, QUERIES[:1])


def test_variants_outside_the_linear_layers_are_refused_and_params_all_takes_them(tokenizer):
    model = _lora(make_llama(), ["q_proj", "v_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"LoRA variant \(e\.g\. DoRA\).*params='all'"):
        attribution_sites(model)
    sites = attribution_sites(model, params="all")
    names = adapter_parameters(model)
    assert [s.name for s in sites] == names and any("lora_magnitude_vector" in n for n in names)
    examples = _examples(tokenizer)[:2]
    got = lib_features(model, tokenizer, examples, sites=sites, dense=True).double()
    params = dict(model.named_parameters())
    want = []
    for text in TRAIN[:2]:
        f = ref_objective(model, tokenizer, text=text)
        grads = torch.autograd.grad(f, [params[n] for n in names])
        want.append(torch.cat([g.reshape(-1) for g in grads]).double())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-7)


def test_partial_adapter_is_refused(tokenizer):
    model = _lora(make_llama(), ["q_proj", "v_proj", "embed_tokens"])  # a LoRA embedding: no linear layer
    with pytest.raises(PartialCoverageError, match=r"leave out 2 of the adapter's weights.*lora_embedding_A"):
        TrackStar(model, tokenizer, METHODS["trackstar"].replace(d=64))


def test_an_adapter_runs_from_the_config_with_its_optimizer_and_tail_patch(micro_checkpoint_dir, tmp_path):
    from trackstar.experiment import ConfigError, compose_config, run_cell, validate
    from trackstar.lm import load_hf_causal_lm

    base = load_hf_causal_lm(micro_checkpoint_dir)
    model = _lora(base.model, ["c_attn", "c_fc"], fan_in_fan_out=True)
    opt = torch.optim.AdamW([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for text in ["alpha beta gamma", "delta epsilon"]:
        ids = base.tokenizer(text, return_tensors="pt")["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "adapter")
    torch.save(opt.state_dict(), tmp_path / "adapter_opt.pt")
    common = ["world=micro", "world.style=templated", "method=trackstar", "method.d=64", "eval.n_queries=3",
              "progress=false", "logger=none", f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}",
              "model=hf", f"model.hf_name_or_path={micro_checkpoint_dir}"]
    record = run_cell(compose_config([*common, f"model.adapter={tmp_path / 'adapter'}",
                                      f"model.optimizer_state={tmp_path / 'adapter_opt.pt'}",
                                      "model.learning_rate=1e-3"]))
    assert record.status == "finished", record.error
    cover = record.info["coverage"]
    assert cover["scope"] == "adapter" and cover["share"] == 1.0 and cover["sites"] == 2 * 2 * 2  # A, B x 2 x 2 layers
    assert record.model["adapter"] == str(tmp_path / "adapter") and record.info["v_source"] == "adam"
    assert "tail_patch@10" in record.metrics
    plain = run_cell(compose_config(common))  # the base model alone: another model, another run
    assert plain.status == "finished" and plain.config_id != record.config_id and plain.run_dir != record.run_dir
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        validate(compose_config([*common, f"model.adapter={tmp_path}"]))
