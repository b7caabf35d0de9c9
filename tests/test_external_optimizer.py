"""A published optimizer state for a Hugging Face model: exact V and tail-patch, or a clear error."""

import pickle
from pathlib import Path

import pytest
import torch

from trackstar.experiment.record import METRICS_FILE, read_record
from trackstar.io import ArtifactError
from trackstar.lm import load_checkpoint, load_hf_causal_lm
from trackstar.lm.external_optimizer import OptimizerStateError, attach_optimizer_state


def _v(checkpoint):
    from trackstar.attribution.gradients import block_linear_sites
    from trackstar.attribution.second_moment import second_moment_from_optimizer

    sm = second_moment_from_optimizer(checkpoint.model, checkpoint.optimizer, block_linear_sites(checkpoint.model))
    return {name: c.multiplier() for name, c in sm.layers.items()}


def _trained(model, make):
    """An optimizer of ``make`` stepped twice on a toy loss over ``model``."""
    opt = make(model)
    for _ in range(2):
        loss = sum((p.float() ** 2).sum() for p in model.parameters())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("named", [True, False], ids=["by-name", "by-position"])
@pytest.mark.parametrize("kind", ["adamw", "torch_adafactor", "hf_adafactor"])
def test_a_saved_state_gives_the_optimizers_own_v(micro_checkpoint_dir, tmp_path, kind, named):
    from transformers.optimization import Adafactor

    ours = load_hf_causal_lm(micro_checkpoint_dir)
    params = list(ours.model.named_parameters()) if named else list(ours.model.parameters())
    make = {"adamw": lambda m: torch.optim.AdamW(params, lr=1e-3),
            "torch_adafactor": lambda m: torch.optim.Adafactor(params, lr=1e-3),
            "hf_adafactor": lambda m: Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False)}[kind]
    original = _trained(ours.model, make)
    torch.save(original.state_dict(), tmp_path / "opt.pt")
    fresh = load_hf_causal_lm(micro_checkpoint_dir)
    fresh.model.load_state_dict(ours.model.state_dict())
    attach_optimizer_state(fresh, tmp_path / "opt.pt", learning_rate=2e-4)
    assert fresh.learning_rate == 2e-4 and all(g["lr"] == 2e-4 for g in fresh.optimizer.param_groups)
    ours.optimizer = original
    want, got = _v(ours), _v(fresh)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name])


def test_state_of_another_model_names_the_parameter_and_both_shapes(micro_checkpoint_dir, tmp_path):
    from trackstar.lm import build_model

    other = build_model("gpt2", "tiny", 512, 64)
    opt = _trained(other, lambda m: torch.optim.AdamW(m.named_parameters(), lr=1e-3))
    torch.save(opt.state_dict(), tmp_path / "other.pt")
    with pytest.raises(OptimizerStateError, match=r"parameter 'transformer.wte.weight' has shape \(\d+, 32\), so its "
                                                  r"'exp_avg' needs shape \(\d+, 32\), but the state has \(512, 128\)"):
        attach_optimizer_state(load_hf_causal_lm(micro_checkpoint_dir), tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(pickle.dumps(ArtifactError))  # torch's text says weights_only=False
    with pytest.raises(ArtifactError, match="is not a file torch can load safely") as caught:
        attach_optimizer_state(load_hf_causal_lm(micro_checkpoint_dir), tmp_path / "garbage.pt")
    assert "weights_only` set to `False" not in str(caught.value) and "torch.save(optimizer.state_dict()" in str(caught.value)
    torch.save({"not": "a state dict"}, tmp_path / "bad.pt")
    with pytest.raises(OptimizerStateError, match="not an optimizer state_dict"):
        attach_optimizer_state(load_hf_causal_lm(micro_checkpoint_dir), tmp_path / "bad.pt")


def test_hf_model_with_its_optimizer_state_traces_like_our_own_checkpoint(micro_checkpoint_dir, tmp_path):
    """Our micro checkpoint loaded as a plain HF model plus its optimizer file gives our checkpoint's
    proponents, scores and tail-patch: V is exact and tail-patch steps from the same state."""
    from trackstar.experiment import ConfigError, compose_config, run_cell, validate
    from trackstar.lm.checkpoint import OPTIMIZER_FILE

    own = load_checkpoint(micro_checkpoint_dir)
    # The checkpoint was pretrained on the templated micro world (conftest).
    common = ["world=micro", "world.style=templated", "method=exp3", "eval.n_queries=4", "progress=false", "logger=none",
              f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}"]
    hf = run_cell(compose_config([*common, "model=hf", f"model.hf_name_or_path={micro_checkpoint_dir}",
                                  f"model.optimizer_state={micro_checkpoint_dir / OPTIMIZER_FILE}",
                                  f"model.learning_rate={own.learning_rate}"]))
    assert hf.status == "finished" and "tail_patch@10" in hf.metrics and hf.info["v_source"] != "estimated"
    # The record describes the model that ran, not the defaults of our own models' config group.
    n_params = sum(p.numel() for p in own.model.parameters())
    assert {k: hf.model[k] for k in ("family", "size", "seed", "optimizer", "parameters", "learning_rate")} == {
        "family": own.model.config.model_type, "size": None, "seed": None, "optimizer": "torch_adafactor",
        "parameters": n_params, "learning_rate": own.learning_rate}
    assert read_record(Path(hf.run_dir) / METRICS_FILE).model == hf.model
    mine = run_cell(compose_config([*common, "model=micro"]))  # the same weights, pretrained by the pipeline
    assert mine.status == "finished"
    for metric in ("mrr", "tail_patch@10"):
        assert hf.metrics[metric]["mean"] == pytest.approx(mine.metrics[metric]["mean"], rel=1e-4, abs=1e-6), metric
    with pytest.raises(ConfigError, match="for a Hugging Face model"):
        validate(compose_config([*common, "model=micro", f"model.optimizer_state={tmp_path}"]))
    with pytest.raises(ConfigError, match="no such file"):
        validate(compose_config([*common, "model=hf", f"model.hf_name_or_path={micro_checkpoint_dir}",
                                 f"model.optimizer_state={tmp_path / 'missing.pt'}"]))


def test_relative_step_adafactor_needs_a_rate_and_then_steps_with_exactly_it(micro_checkpoint_dir, tmp_path):
    from transformers.optimization import Adafactor

    ours = load_hf_causal_lm(micro_checkpoint_dir)
    opt = _trained(ours.model, lambda m: Adafactor(m.named_parameters()))  # transformers' defaults: relative step
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    with pytest.raises(OptimizerStateError, match="records no learning rate.*set model.learning_rate"):
        attach_optimizer_state(load_hf_causal_lm(micro_checkpoint_dir), tmp_path / "opt.pt")
    fresh = attach_optimizer_state(load_hf_causal_lm(micro_checkpoint_dir), tmp_path / "opt.pt", learning_rate=1e-3)
    assert all(not g["relative_step"] and not g["scale_parameter"] and g["lr"] == 1e-3
               for g in fresh.optimizer.param_groups)
