"""The fused extraction kernels against the op-by-op functions they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from trackstar.attribution.fused import fused_activations, weighted_token_loss


def test_weighted_token_loss_equals_cross_entropy_and_ignores_pads():
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(6, 5, 40, generator=gen, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, 40, (6, 5), generator=gen)
    weights = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    weights[:, -1] = 0.0  # pads
    with torch.no_grad():
        logits[:, -1, :3] = float("nan")  # a pad's logits may be anything
        logits[0, -1, 5] = float("inf")
    got = weighted_token_loss(logits, labels, weights)
    (g_got,) = torch.autograd.grad(got, logits)
    keep = weights > 0
    ce = F.cross_entropy(logits[keep], labels[keep], reduction="none")
    want = (weights[keep] * ce).sum()
    (g_want,) = torch.autograd.grad(want, logits)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    assert torch.equal(g_got[:, -1], torch.zeros_like(g_got[:, -1]))  # exactly zero at pads, no NaN


def test_fused_gelu_computes_the_same_function_and_is_restored():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    gelus = [m for m in model.modules() if isinstance(m, NewGELUActivation)]
    assert len(gelus) == 2
    x = torch.randn(4, 16)
    ids = torch.randint(0, 50, (2, 10))
    plain = model(input_ids=ids).logits
    with fused_activations(model) as n, fused_activations(model) as inner:
        assert (n, inner) == (2, 0)  # nested: the outer swap is kept, not swapped twice
        fused = model(input_ids=ids).logits
        torch.testing.assert_close(gelus[0](x), NewGELUActivation.forward(gelus[0], x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in gelus)
    with pytest.raises(RuntimeError), fused_activations(model):
        raise RuntimeError("a failing extraction")
    assert all("forward" not in vars(m) for m in gelus)  # restored after an error too


def test_fused_rms_norm_is_bit_for_bit_the_llama_norm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=16)).eval()
    ids = torch.randint(0, 50, (2, 10))
    plain = model(input_ids=ids).logits
    with fused_activations(model) as n:
        assert n == 5  # two norms per layer and the final one
        fused = model(input_ids=ids).logits
    assert torch.equal(fused, plain)
    assert all("forward" not in vars(m) for m in model.modules())
