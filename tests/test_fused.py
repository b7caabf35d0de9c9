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


def test_linear_token_loss_gives_the_full_logits_gradient_in_chunks(monkeypatch):
    from trackstar.attribution import fused

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(23, 8, generator=gen).requires_grad_(True)
    weight, bias = torch.randn(40, 8, generator=gen), torch.randn(40, generator=gen)
    labels = torch.randint(0, 40, (23,), generator=gen)
    weights = torch.rand(23, generator=gen) + 0.1
    want = (weights * F.cross_entropy(F.linear(hidden, weight, bias), labels, reduction="none")).sum()
    (g_want,) = torch.autograd.grad(3.0 * want, hidden)
    monkeypatch.setattr(fused, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setitem(fused.CHUNK_BYTES, "cpu", 4 * 40 * 5)  # 5 rows a chunk: 5 chunks, the last of 3
    got = fused.linear_token_loss(hidden, weight, bias, labels, weights)
    (g_got,) = torch.autograd.grad(3.0 * got, hidden)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradient wanted: the value alone
        assert fused.linear_token_loss(hidden, weight, bias, labels, weights).item() == pytest.approx(got.item())
    with pytest.raises(ValueError, match="freeze"):
        fused.linear_token_loss(hidden, weight.requires_grad_(True), bias, labels, weights)


def _tiny(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=16)).eval()


def _mixed_batch(side: str):
    from trackstar.attribution.output import Example, collate

    gen = torch.Generator().manual_seed(2)
    examples = []
    for i, fn in enumerate(("loss", "margin", "loss", "logit", "loss")):
        n = 5 + 2 * i
        ids = tuple(int(t) for t in torch.randint(0, 50, (n,), generator=gen))
        weights = (0.0,) + tuple(float(w) for w in torch.rand(n - 1, generator=gen))
        if fn != "loss":  # a query: only its last two tokens weigh
            weights = (0.0,) * (n - 2) + (1.0, 0.5)
        examples.append(Example(ids, weights, fn, f"e{i}"))
    return collate(examples, side)


@pytest.mark.parametrize("arch,side,autocast", [("gpt2", "right", False), ("gpt2", "left", False),
                                               ("llama", "right", False), ("llama", "left", False),
                                               ("gpt2", "left", True), ("llama", "right", True)])
def test_forward_objective_has_the_full_logits_gradient_without_forming_them(arch, side, autocast, monkeypatch):
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    from trackstar.attribution import fused, output
    from trackstar.attribution.gradients import frozen_parameters

    model, batch = _tiny(arch), _mixed_batch(side)
    n, t = batch.input_ids.shape
    monkeypatch.setattr(fused, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setitem(fused.CHUNK_BYTES, "cpu", 4 * 50 * 8)  # 8 rows of logits a chunk
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    params = {q.untyped_storage().data_ptr() for q in model.parameters()}

    class Largest(TorchDispatchMode):  # the most positions of any (..., vocab) tensor, and the head's rows
        most = rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in params:
                params.add(out.untyped_storage().data_ptr())  # a weight cast to autocast's dtype
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.dim() and o.shape[-1] == 50 and \
                        o.untyped_storage().data_ptr() not in params:  # not the head's weight or a view of it
                    Largest.most = max(Largest.most, o.numel() // 50)
                    if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                        Largest.rows += o.shape[0]
            return out

    def grad_below_head(fast: bool):
        monkeypatch.setattr(output, "PLAIN_HEAD_MODELS", output.PLAIN_HEAD_MODELS if fast else ())
        with frozen_parameters(model):
            assert (output.plain_head(model) is not None) == fast
            embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)
            hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: embeds)
            try:
                Largest.most = Largest.rows = 0
                with Largest(), precision:
                    value = output.forward_objective(model, batch)
                    (grad,) = torch.autograd.grad(value, embeds)
            finally:
                hook.remove()
        return value, grad, Largest.most, Largest.rows

    fast_value, fast_grad, fast_most, fast_rows = grad_below_head(True)
    full_value, full_grad, full_most, full_rows = grad_below_head(False)
    assert full_most == full_rows == n * t  # the reference forms every position's logits at once
    assert fast_most <= 8  # the fused path: a chunk of logits at a time,
    assert fast_rows == int((batch.weights[:, 1:] > 0).sum())  # and only where a weight is > 0
    tol = dict(rtol=1e-3, atol=1e-5) if autocast else dict(rtol=1e-5, atol=1e-7)  # bfloat16 eps: 8e-3
    torch.testing.assert_close(fast_value, full_value, **tol)
    torch.testing.assert_close(fast_grad, full_grad, **tol)
    assert fast_grad.abs().sum() > 0


def test_a_model_that_changes_its_logits_after_the_head_keeps_them_whole():
    from trackstar.attribution import output
    from trackstar.attribution.gradients import frozen_parameters

    class CappedGPT2(GPT2LMHeadModel):  # soft-capped logits, as Gemma 2 does
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2.0 * torch.tanh(out.logits / 2.0)
            return out

    torch.manual_seed(0)
    capped = CappedGPT2(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2)).eval()
    batch = _mixed_batch("right")
    with frozen_parameters(capped), torch.no_grad():
        assert output.plain_head(capped) is None
        got = output.forward_objective(capped, batch)
        want = output.objective(output.forward_logits(capped, batch), batch)
        uncapped = output.objective(GPT2LMHeadModel.forward(capped, input_ids=batch.input_ids,
                                                           attention_mask=batch.attention_mask,
                                                           position_ids=batch.position_ids).logits, batch)
    assert torch.equal(got, want) and not torch.allclose(got, uncapped)
    assert output.plain_head(_tiny("gpt2")) is None  # a head that needs its own gradient: logits as usual
