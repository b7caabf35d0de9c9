"""Attribution engine against an independent brute-force reference.

The reference below is deliberately plain: one example at a time, autograd
over named parameters, dense matrices, torch.linalg.eigh. It shares no code
with trackstar.attribution except where a test says so.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

from trackstar.attribution import METHODS, AttributionSettings, TrackStar
from trackstar.attribution.curvature import CurvatureError, Whitening, auto_lambda, inverse_factor, inverse_sqrt
from trackstar.attribution.features import FeatureExtractor
from trackstar.attribution.gradients import (
    NonFiniteGradientError,
    all_parameter_sites,
    block_linear_sites,
    layer_factors,
)
from trackstar.attribution.output import collate, query_example, training_example
from trackstar.attribution.projection import ProjectionError, Projector
from trackstar.attribution.scoring import top_k, unit_normalize
from trackstar.attribution.second_moment import (
    SecondMomentError,
    second_moment_from_optimizer,
)

WORDS = (
    "<unk> <bos> the a of is capital city paris france rome italy berlin germany river "
    "runs through lives in was born at and famous for its old town big small north south <eos>"
).split()

TRAIN = [
    "the capital of france is paris",
    "paris is a big city in the north of france",
    "the river runs through rome",
    "rome is the capital of italy and famous for its old town",
    "berlin is in germany",
    "a small town in the south of italy",
    "the city of berlin was born",
    "the capital of germany is berlin and the river runs through it",
]
QUERIES = [("the capital of france is", "paris"), ("the capital of italy is", "rome"),
           ("berlin is in", "germany")]


# ---------------------------------------------------------------- fixtures
def make_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def make_gpt2(width=16, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(WORDS), n_positions=24, n_embd=width, n_layer=layers,
                     n_head=2, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def make_llama(width=16, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=width, intermediate_size=2 * width,
                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=24, bos_token_id=1, eos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


MAKERS = {"gpt2": make_gpt2, "llama": make_llama}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: threaded float64 eigh stalls when other processes keep the cores busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- brute-force reference
def ref_param_names(model):
    """Block linear weights by name pattern, independently of the library."""
    pat = re.compile(r"^(transformer\.h|model\.layers)\.\d+\..*\.weight$")
    return [n for n, p in model.named_parameters() if pat.match(n) and p.dim() == 2]


def ref_conv_names(model):
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def ref_token_values(logits, labels, output_fn):
    logp = F.log_softmax(logits.double(), dim=-1).gather(-1, labels[:, None])[:, 0]
    if output_fn == "loss":
        return -logp
    if output_fn == "margin":
        return -(logp - torch.log1p(-logp.exp()))
    return -logits.double().gather(-1, labels[:, None])[:, 0]


def ref_objective(model, tokenizer, text=None, prompt=None, target=None, output_fn="loss", reduction="mean"):
    """One example's f by a plain forward, no padding: a passage's mean loss, or a query's
    output function over its target tokens."""
    bos = [tokenizer.bos_token_id]
    if text is not None:
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        first_target = 1
        output_fn = "loss"
    else:
        p = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
        ids, first_target = p + t, len(p)
    ids = torch.tensor([ids])
    logits = model(input_ids=ids).logits[0]
    values = ref_token_values(logits[first_target - 1:-1], ids[0, first_target:], output_fn)
    return values.mean() if reduction == "mean" else values.sum()


def ref_gradient(model, tokenizer, names, text=None, prompt=None, target=None,
                 output_fn="loss", reduction="mean"):
    """Flat O×I row-major gradient of one example, plain autograd, no padding."""
    params = dict(model.named_parameters())
    f = ref_objective(model, tokenizer, text, prompt, target, output_fn, reduction)
    grads = torch.autograd.grad(f, [params[n] for n in names], allow_unused=True)
    conv = ref_conv_names(model)
    flat = []
    for n, g in zip(names, grads):
        g = torch.zeros_like(params[n]) if g is None else g
        flat.append((g.T if n in conv else g).reshape(-1))
    return torch.cat(flat).double()


def ref_v_multiplier_torch_adafactor(model, opt, names):
    """1 / max(sqrt(V), eps1) per parameter, flattened O×I, from torch Adafactor state."""
    conv = ref_conv_names(model)
    params = dict(model.named_parameters())
    out = []
    for n in names:
        p = params[n]
        st, group = opt.state[p], opt.param_groups[0]
        eps1 = group["eps"][0] or torch.finfo(p.dtype).eps
        r, c = st["row_var"].double(), st["col_var"].double()
        v = (r @ c) / max(r.mean().item(), eps1)
        m = 1.0 / v.sqrt().clamp(min=eps1)
        out.append((m.T if n in conv else m).reshape(-1))
    return torch.cat(out)


def ref_inv_sqrt(r, damping):
    e, u = torch.linalg.eigh(r)
    e = e.clamp(min=0) + damping * e.clamp(min=0).mean()
    return u @ torch.diag(e ** -0.5) @ u.T


def train_adafactor(model, tokenizer, steps=3, cls=torch.optim.Adafactor, **kw):
    """A few real optimizer steps so the second moment is non-trivial."""
    opt = cls(model.parameters(), **kw)
    model.train()
    for s in range(steps):
        batch = TRAIN[2 * s % len(TRAIN): 2 * s % len(TRAIN) + 4]
        for text in batch:
            ids = torch.tensor([[1] + tokenizer(text, add_special_tokens=False)["input_ids"]])
            (model(input_ids=ids, labels=ids).loss / len(batch)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def step_each(model, tokenizer, opt, texts):
    """One optimizer step per text (its LM loss), in train mode; the model is left in eval mode."""
    model.train()
    for text in texts:
        ids = torch.tensor([[1] + tokenizer(text, add_special_tokens=False)["input_ids"]])
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def lib_features(model, tokenizer, examples, sites=None, projector=None, v=None,
                 batch_size=4, padding_side="right", dense=False):
    sites = sites or block_linear_sites(model)
    projector = projector or Projector(sites, "identity")
    ex = FeatureExtractor(model, sites, projector, v, dense=dense)
    parts = [ex(collate(examples[i:i + batch_size], padding_side))
             for i in range(0, len(examples), batch_size)]
    return torch.cat(parts)


# ---------------------------------------------------------------- parameters and gradients
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_default_sites_are_block_linear_weights_oriented_out_by_in(arch):
    model = MAKERS[arch]()
    sites = block_linear_sites(model)
    assert [s.name for s in sites] == ref_param_names(model)
    params = dict(model.named_parameters())
    for s in sites:
        stored = tuple(params[s.name].shape)
        assert (s.out_features, s.in_features) == (stored[::-1] if s.stored_transposed else stored)
    assert not any("wte" in s.name or "lm_head" in s.name or "norm" in s.name for s in sites)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("output_fn", ["loss", "margin", "logit"])
def test_hook_gradients_equal_bruteforce(arch, output_fn, tokenizer):
    model = MAKERS[arch]()
    names = ref_param_names(model)
    limit = 24
    examples = [training_example(tokenizer, t, f"t{i}", limit) for i, t in enumerate(TRAIN[:3])]
    examples += [query_example(tokenizer, p, t, f"q{i}", limit, output_fn)
                 for i, (p, t) in enumerate(QUERIES)]
    got = lib_features(model, tokenizer, examples, batch_size=6).double()
    want = [ref_gradient(model, tokenizer, names, text=t) for t in TRAIN[:3]]
    want += [ref_gradient(model, tokenizer, names, prompt=p, target=t, output_fn=output_fn)
             for p, t in QUERIES]
    want = torch.stack(want)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_backward_consumes_each_site_once_and_keeps_no_gradient(arch, tokenizer, monkeypatch):
    """Each site's (A, B) goes to the consumer once, inside the backward, equal to the
    returned factors; a consumed B is released before the backward ends; any subset of
    sites (upper layers only, MLPs only) gets the same factors as the full set."""
    import weakref

    from trackstar.attribution import gradients

    model = MAKERS[arch](layers=3)
    sites = block_linear_sites(model)
    batch = collate([training_example(tokenizer, t, i, 24) for i, t in enumerate(TRAIN[:3])], "left")
    lowest = []
    real = gradients._lowest_sites
    monkeypatch.setattr(gradients, "_lowest_sites", lambda outputs: lowest.append(real(outputs)) or lowest[-1])
    full = layer_factors(model, batch, sites)
    first = {"gpt2": ["attn.c_attn"], "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}[arch]
    prefix = "transformer.h.0." if arch == "gpt2" else "model.layers.0."
    assert lowest == [[f"{prefix}{m}.weight" for m in first]]  # autograd is asked for layer 0's inputs only
    subsets = {"all": sites, "upper": [s for s in sites if ".0." not in s.name],
               "mlp": [s for s in sites if "mlp" in s.name]}
    for label, chosen in subsets.items():
        seen, alive = [], []

        def consume(name, a, b):
            # The residual stream's gradient flows through every layer as one buffer
            # (autograd adds into it in place), so a few consumed B's alias it; past
            # those, no consumed gradient may still hold memory.
            live = {ref().untyped_storage().data_ptr() for ref in alive if ref() is not None}
            assert len(live) <= 3, f"{label}: {len(live)} consumed gradients still hold memory"
            seen.append(name)
            alive.append(weakref.ref(b))
            torch.testing.assert_close(a, full[name][0], rtol=0, atol=0)
            torch.testing.assert_close(b, full[name][1], rtol=0, atol=0)

        assert layer_factors(model, batch, chosen, consume=consume) == {}
        assert sorted(seen) == sorted(s.name for s in chosen), label
    # prepare() replaces A with what it returns, computed in the forward pass; the
    # sites whose layers read one input tensor come in one call (Llama's q/k/v and
    # gate/up; GPT-2 has none: c_attn is q/k/v in one matrix).
    got, calls = {}, []

    def prepare(names, a):
        calls.append(names)
        return [a[..., :2] * (i + 2) for i in range(len(names))]

    layer_factors(model, batch, sites, consume=lambda n, a, b: got.setdefault(n, a), prepare=prepare)
    expected = {"gpt2": [("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)],
                "llama": [("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)]}[arch]
    prefix = "transformer.h.{}." if arch == "gpt2" else "model.layers.{}."
    assert calls == [tuple(f"{prefix.format(layer)}{m}.weight" for m in group)
                     for layer in range(3) for group in expected]
    for names in calls:
        for i, name in enumerate(names):
            torch.testing.assert_close(got[name], full[name][0][..., :2] * (i + 2), rtol=0, atol=0)


def test_layers_run_twice_or_outputs_changed_in_place_are_clear_errors(tokenizer):
    """Both would make a site's hooked output gradient not its weight's: refuse, naming the site."""
    batch = collate([training_example(tokenizer, TRAIN[0], 0, 24)], "right")
    model = make_gpt2()
    mlp = model.transformer.h[0].mlp
    once = mlp.forward
    mlp.forward = lambda h: once(h) + 0 * once(h)
    with pytest.raises(RuntimeError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight's layer ran twice"):
        layer_factors(model, batch, block_linear_sites(model))
    model = make_gpt2()
    attn = model.transformer.h[1].attn
    plain = attn.forward

    def scaled_in_place(*args, **kwargs):  # the attention block scales c_proj's output in place
        out = plain(*args, **kwargs)
        out[0].mul_(2)
        return out

    attn.forward = scaled_in_place
    with pytest.raises(RuntimeError, match=r"modifies transformer\.h\.1\.attn\.c_proj\.weight's output in place"):
        layer_factors(model, batch, block_linear_sites(model))


def test_query_sum_reduction_scales_by_target_length(tokenizer):
    model = make_gpt2()
    names = ref_param_names(model)
    q = query_example(tokenizer, "the capital of", "france is paris", "q", 24, "loss", "sum")
    got = lib_features(model, tokenizer, [q])[0].double()
    want = ref_gradient(model, tokenizer, names, prompt="the capital of",
                        target="france is paris", reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_dense_all_parameters_path_equals_bruteforce(tokenizer):
    model = make_gpt2(width=8, layers=1)
    sites = all_parameter_sites(model)
    names = [s.name for s in sites]
    assert "transformer.wte.weight" in names and "transformer.ln_f.bias" in names
    examples = [training_example(tokenizer, t, i, 24) for i, t in enumerate(TRAIN[:2])]
    got = lib_features(model, tokenizer, examples, sites=sites, dense=True).double()
    want = torch.stack([ref_gradient(model, tokenizer, names, text=t) for t in TRAIN[:2]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_padding_batching_and_reruns_do_not_change_features(arch, tokenizer):
    model = MAKERS[arch]()
    examples = [training_example(tokenizer, t, i, 24) for i, t in enumerate(TRAIN)]
    base = lib_features(model, tokenizer, examples, batch_size=len(TRAIN))
    again = lib_features(model, tokenizer, examples, batch_size=len(TRAIN))
    assert torch.equal(base, again)
    scale = base.abs().max().item()
    for bs, side in [(1, "right"), (3, "left"), (len(TRAIN), "left")]:
        other = lib_features(model, tokenizer, examples, batch_size=bs, padding_side=side)
        torch.testing.assert_close(other, base, rtol=1e-4, atol=1e-5 * scale)
    # Different company in the batch: example 0 next to the longest example only.
    pair = lib_features(model, tokenizer, [examples[0], examples[7]], batch_size=2)
    torch.testing.assert_close(pair[0], base[0], rtol=1e-4, atol=1e-5 * scale)


# ---------------------------------------------------------------- V
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_torch_adafactor_v_is_the_optimizers_own_denominator(arch, tokenizer):
    model = MAKERS[arch]()
    opt = train_adafactor(model, tokenizer, lr=0.01)
    sites = block_linear_sites(model)
    params = dict(model.named_parameters())
    # One more step with a known gradient; the parameter change must be
    # proportional (one scalar per parameter) to our corrected gradient.
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(1)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            # From zero the parameter after the step IS the update, free of
            # float32 rounding against the old value (and of weight decay).
            p.zero_()
            before[n] = p.detach().clone()
            p.grad = grads[n].clone()
    opt.step()
    v = second_moment_from_optimizer(model, opt, sites)
    assert v.source == "torch_adafactor"
    for s in sites:
        delta = (params[s.name].detach() - before[s.name]).double()
        mult = v[s.name].multiplier().double()
        corrected = grads[s.name].double() * (mult.T if s.stored_transposed else mult)
        ratio = delta / corrected
        torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4, atol=0)
        assert ratio.flatten()[0] < 0
        # the factored form used by the fast path is the same matrix here
        factored = v[s.name].row[:, None] * v[s.name].col[None, :]
        torch.testing.assert_close(factored.double(), mult, rtol=1e-5, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_adafactor_v_is_the_optimizers_own_denominator(arch, tokenizer):
    from transformers.optimization import Adafactor

    model = MAKERS[arch]()
    kw = dict(lr=0.01, scale_parameter=False, relative_step=False, warmup_init=False)
    opt = train_adafactor(model, tokenizer, cls=Adafactor, **kw)
    sites = block_linear_sites(model)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(2)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            # From zero the parameter after the step IS the update, free of
            # float32 rounding against the old value (and of weight decay).
            p.zero_()
            before[n] = p.detach().clone()
            p.grad = grads[n].clone()
    opt.step()
    v = second_moment_from_optimizer(model, opt, sites)
    assert v.source == "hf_adafactor"
    for s in sites:
        delta = (params[s.name].detach() - before[s.name]).double()
        mult = v[s.name].multiplier().double()
        ratio = delta / (grads[s.name].double() * (mult.T if s.stored_transposed else mult))
        torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4, atol=0)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_adam_v_is_the_optimizers_own_denominator(cls, tokenizer):
    model = make_gpt2()
    params = dict(model.named_parameters())
    opt = cls(model.parameters(), lr=0.01, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(3)
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            # From zero the parameter after the step IS the update, free of
            # float32 rounding against the old value (and of weight decay).
            p.zero_()
            before[n] = p.detach().clone()
            p.grad = grads[n].clone()
    opt.step()  # at step 1 the bias-corrected first moment is g itself
    sites = block_linear_sites(model)
    v = second_moment_from_optimizer(model, opt, sites)
    for s in sites:
        delta = (params[s.name].detach() - before[s.name]).double()
        mult = v[s.name].multiplier().double()
        want = -0.01 * grads[s.name].double() * (mult.T if s.stored_transposed else mult)
        torch.testing.assert_close(delta, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("optim", ["adafactor", "adam"])
def test_corrected_hook_features_equal_corrected_gradients(optim, tokenizer):
    """Factored V scales A and B (Adafactor); full V materializes G (Adam)."""
    model = make_llama()
    if optim == "adafactor":
        opt = train_adafactor(model, tokenizer, lr=0.01)
    else:
        opt = train_adafactor(model, tokenizer, cls=torch.optim.AdamW, lr=0.01)
    sites = block_linear_sites(model)
    v = second_moment_from_optimizer(model, opt, sites)
    examples = [training_example(tokenizer, t, i, 24) for i, t in enumerate(TRAIN[:4])]
    fast = lib_features(model, tokenizer, examples, sites=sites, v=v).double()
    plain = lib_features(model, tokenizer, examples, sites=sites).double()
    mult = torch.cat([v[s.name].multiplier().reshape(-1) for s in sites]).double()
    torch.testing.assert_close(fast, plain * mult, rtol=1e-4, atol=1e-6 * fast.abs().max().item())


def test_clamped_adafactor_v_warns_that_the_fast_path_is_inexact(tokenizer):
    from trackstar.attribution.second_moment import InexactFactoredCorrectionWarning

    model = make_gpt2()
    opt = train_adafactor(model, tokenizer, steps=1, lr=0.01)
    p = model.transformer.h[1].mlp.c_fc.weight
    opt.state[p]["row_var"][3] = 1e-40  # sqrt(V) < eps1 in that row
    with pytest.warns(InexactFactoredCorrectionWarning, match=r"h\.1\.mlp\.c_fc"):
        v = second_moment_from_optimizer(model, opt, block_linear_sites(model))
    assert v["transformer.h.1.mlp.c_fc.weight"].factored_inexact
    assert not v["transformer.h.0.mlp.c_fc.weight"].factored_inexact


def test_adam_rank1_is_exact_for_a_rank1_second_moment_and_marked_inexact():
    from trackstar.attribution.second_moment import dense_correction

    u, w = torch.rand(6) + 0.5, torch.rand(4) + 0.5
    corr = dense_correction("x", u[:, None] * w[None, :], "rank1")
    assert corr.factored and corr.factored_inexact
    torch.testing.assert_close(corr.row[:, None] * corr.col[None, :], u[:, None] * w[None, :])


@pytest.mark.parametrize("cls", [torch.optim.Adafactor, torch.optim.AdamW])
def test_named_state_dict_gives_the_same_v_as_the_optimizer(cls, tokenizer):
    """A checkpoint's saved state_dict is matched to weights by param_names."""
    model = make_gpt2()
    opt = step_each(model, tokenizer, cls(model.named_parameters(), lr=0.01), TRAIN[:3])
    sites = block_linear_sites(model)
    live = second_moment_from_optimizer(model, opt, sites)
    saved = second_moment_from_optimizer(model, opt.state_dict(), sites)
    assert live.source == saved.source
    for s in sites:
        torch.testing.assert_close(live[s.name].multiplier(), saved[s.name].multiplier())


def test_optimizer_from_another_model_is_refused(tokenizer):
    model, other = make_gpt2(seed=0), make_gpt2(width=32)
    opt = train_adafactor(other, tokenizer, steps=1, lr=0.01)
    with pytest.raises(SecondMomentError, match="another model"):
        second_moment_from_optimizer(model, opt, block_linear_sites(model))
    named = torch.optim.Adafactor(other.named_parameters(), lr=0.01)
    for p in other.parameters():
        p.grad = torch.ones_like(p)
    named.step()
    with pytest.raises(SecondMomentError, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        second_moment_from_optimizer(model, named.state_dict(), block_linear_sites(model))


# ---------------------------------------------------------------- projection
@pytest.mark.parametrize("extra", [0, 5], ids=["equal-shares", "balanced-truncated"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_two_sided_projection_equals_dense_kronecker(arch, extra, tokenizer):
    model = MAKERS[arch]()
    sites = block_linear_sites(model)
    d = 16 * len(sites) + extra  # + 5: unequal shares, kept from a larger rectangle
    proj = Projector(sites, "gaussian", d, seed=7)
    assert proj.dim == d and any(b.truncated for b in proj.blocks) == bool(extra)
    examples = [training_example(tokenizer, t, i, 24) for i, t in enumerate(TRAIN[:3])]
    got = lib_features(model, tokenizer, examples, sites=sites, projector=proj).double()
    names = ref_param_names(model)
    for i, text in enumerate(TRAIN[:3]):
        g = ref_gradient(model, tokenizer, names, text=text)
        parts, off = [], 0
        for s in sites:
            size = s.out_features * s.in_features
            left, right = proj.matrices(s.name)
            parts.append((torch.kron(left.double(), right.double()) @ g[off:off + size])[:proj.by_name[s.name].size])
            off += size
        want = torch.cat(parts)
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6 * want.abs().max().item())


def test_projection_matrices_are_regenerated_from_seed_name_and_side():
    from trackstar.attribution.projection import gaussian_matrix

    a = gaussian_matrix(3, "w", "left", 64, 512)
    assert torch.equal(a, gaussian_matrix(3, "w", "left", 64, 512))
    assert not torch.equal(a, gaussian_matrix(3, "w", "right", 64, 512))
    assert not torch.equal(a, gaussian_matrix(3, "v", "left", 64, 512))
    assert not torch.equal(a, gaussian_matrix(4, "w", "left", 64, 512))
    assert abs(a.var().item() * 64 - 1) < 0.05  # entries N(0, 1/p_side)


def test_inner_products_are_preserved_as_d_grows(tokenizer):
    model = make_llama(width=32, layers=1)
    sites = block_linear_sites(model)
    examples = [training_example(tokenizer, t, i, 24) for i, t in enumerate(TRAIN)]
    exact = lib_features(model, tokenizer, examples, sites=sites).double()
    exact_gram = exact @ exact.T
    errors = []
    # A per-example gradient has rank <= T per layer, so a Kronecker projection
    # of it has heavy-tailed error; average over seeds.
    for d in (7 * 4, 7 * 64, 7 * 512):
        trials = []
        for seed in range(8):
            x = lib_features(model, tokenizer, examples, sites=sites,
                             projector=Projector(sites, "gaussian", d, seed)).double()
            trials.append(((x @ x.T - exact_gram).norm() / exact_gram.norm()).item())
        errors.append(float(np.mean(trials)))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.3 and errors[2] < errors[0] / 3


@pytest.mark.parametrize("extra", [0, 3], ids=["equal-shares", "balanced-truncated"])
def test_projection_is_unbiased_in_every_layer(extra):
    """E||P_L G P_R^T||^2 = ||G||^2 for each layer: no layer is mis-scaled, truncated or not."""
    sites = block_linear_sites(make_gpt2(width=16))
    torch.manual_seed(0)
    gs = {s.name: torch.randn(1, *s.shape) for s in sites}
    ratios = {s.name: [] for s in sites}
    for seed in range(300):
        proj = Projector(sites, "gaussian", 16 * len(sites) + extra, seed)
        for s in sites:
            y = proj.project_dense(s.name, gs[s.name])
            ratios[s.name].append((y.norm() ** 2 / gs[s.name].norm() ** 2).item())
    for name, r in ratios.items():
        assert abs(np.mean(r) - 1) < 0.1, name


def test_impossible_d_is_refused_with_valid_suggestions():
    sites = block_linear_sites(make_llama())  # 14 parameters
    with pytest.raises(ProjectionError, match="divisible by 14"):
        Projector(sites, "gaussian", 100, split="equal")
    with pytest.raises(ProjectionError, match="cannot be factored"):
        Projector(sites, "gaussian", 14 * 16 * 33 * 2, split="equal")  # share > O*I of a 16x16 layer
    total = sum(s.out_features * s.in_features for s in sites)
    with pytest.raises(ProjectionError, match=f"exceeds the {total} entries"):
        Projector(sites, "gaussian", total + 1)
    with pytest.raises(ProjectionError, match="choose d >= 14"):
        Projector(sites, "gaussian", 13)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_balanced_split_takes_any_d_and_is_the_equal_split_where_that_works(arch):
    sites = block_linear_sites(MAKERS[arch]())
    total = sum(s.out_features * s.in_features for s in sites)
    for d in (len(sites), len(sites) + 1, 100, len(sites) * 16, 4096, total - 1, total):
        blocks = Projector(sites, "gaussian", d).blocks
        assert sum(b.size for b in blocks) == d and blocks[-1].stop == d
        assert all(b.size <= b.out_features * b.in_features and b.p_left <= b.out_features
                   and b.p_right <= b.in_features for b in blocks)
        sizes = sorted(b.size for b in blocks if b.size < b.out_features * b.in_features)
        assert not sizes or sizes[-1] - sizes[0] <= 1  # as equal as the layer sizes allow
        try:
            equal = Projector(sites, "gaussian", d, split="equal").blocks
        except ProjectionError:
            continue
        assert equal == blocks


@pytest.mark.filterwarnings("ignore:No optimizer state was given")
def test_default_settings_run_on_gpt2_llama_and_gpt_neox(tokenizer, tmp_path):
    """d = 4096 on any family, whatever its number of weight matrices (Llama: 7 per layer)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, bos_token_id=1, eos_token_id=1)).eval()
    for name, model in (("gpt2", make_gpt2()), ("llama", make_llama()), ("neox", neox)):
        ts = TrackStar(model, tokenizer, AttributionSettings(), work_dir=tmp_path / name)
        result = ts.attribute(TRAIN, QUERIES[:2])
        assert ts.projector.dim == 4096 and len(ts.sites) == (14 if name == "llama" else 8), name
        assert all(np.isfinite(s).all() for s in result.proponent_scores) and len(result.proponent_ids[0]) == len(TRAIN)
        shutil.rmtree(tmp_path / name)  # its d = 4096 curvature cache is 320 MiB


def test_split_rule_follows_layer_aspect():
    sites = block_linear_sites(make_gpt2(width=16))
    proj = Projector(sites, "gaussian", 8 * 16)
    by = {b.name.split(".", 3)[-1]: (b.p_left, b.p_right) for b in proj.blocks}
    assert by["attn.c_attn.weight"] == (8, 2)  # 48x16: aspect 3 -> nearest 4
    assert by["attn.c_proj.weight"] == (4, 4)
    assert proj.dim == 8 * 16


# ---------------------------------------------------------------- curvature and scoring
def test_inverse_sqrt_is_the_matrix_inverse_square_root():
    torch.manual_seed(0)
    x = torch.randn(50, 12, dtype=torch.float64)
    r = x.T @ x / 50
    damping = 0.05
    w = inverse_sqrt(r, damping)
    damped = r + damping * torch.linalg.eigvalsh(r).mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(w @ damped @ w, torch.eye(12, dtype=torch.float64))
    torch.testing.assert_close(w, w.T)
    assert not torch.allclose(w, 1 / damped.sqrt())  # not the element-wise pitfall


def test_inverse_factor_inverts_the_damped_r_and_scores_as_r_inverse_sqrt_does():
    torch.manual_seed(0)
    x = torch.randn(50, 12, dtype=torch.float64) * torch.linspace(3, 0.1, 12, dtype=torch.float64)
    r = x.T @ x / 50
    damping = 0.05
    w = inverse_factor(r, damping)
    damped = r + damping * torch.linalg.eigvalsh(r).mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(w @ w.T, torch.linalg.inv(damped))
    assert not torch.allclose(w, w.T)  # a different W from R^{-1/2}: the dot products agree, not W
    # Unit-normalized scores are the same for both factors.
    q, t = torch.randn(4, 12), torch.randn(30, 12)
    scores = {}
    for factor in ("cholesky", "symmetric"):
        wh = Whitening.build([r], [slice(0, 12)], damping, factor=factor)
        scores[factor] = unit_normalize(wh.apply(q)) @ unit_normalize(wh.apply(t)).T
    torch.testing.assert_close(scores["cholesky"], scores["symmetric"], atol=1e-5, rtol=0)
    assert not torch.allclose(scores["cholesky"], unit_normalize(q) @ unit_normalize(t).T, atol=1e-3)


def test_r_sums_and_the_triangular_inverse_equal_plain_products():
    """The CPU's syrk sums (one triangle, mirrored) and LAPACK's trtri against float64 products and
    inverses, per block and over chunks; W = U⁻¹ is upper triangular and C-contiguous."""
    from trackstar.attribution.curvature import outer_product_sums, triangular_inverse

    torch.manual_seed(0)
    x = torch.randn(70, 11) * torch.linspace(2, 0.1, 11)
    blocks = [slice(0, 4), slice(4, 11)]
    sums, count = outer_product_sums(x.split(16), 11, blocks)
    assert count == 70
    for acc, s in zip(sums, blocks):
        xs = x[:, s].double()
        torch.testing.assert_close(acc, xs.T @ xs, rtol=1e-13, atol=1e-13)
        assert torch.equal(acc, acc.T) and acc.is_contiguous() and acc.dtype == torch.float64
    r = sums[1] / count + 0.1 * torch.eye(7, dtype=torch.float64)
    u = torch.linalg.cholesky(r, upper=True)
    w = triangular_inverse(u.clone())
    torch.testing.assert_close(w, torch.linalg.inv(u), rtol=1e-12, atol=1e-12)
    assert w.is_contiguous() and torch.equal(w, w.triu())


def test_undamped_singular_r_is_refused_by_either_factor():
    x = torch.randn(3, 8, dtype=torch.float64)
    for factor in ("cholesky", "symmetric"):
        with pytest.raises(CurvatureError, match="singular"):
            Whitening.build([x.T @ x], [slice(0, 8)], 0.0, factor=factor)


def test_auto_lambda_equates_the_kth_eigenvalues():
    d = 128  # k = 2
    e = torch.diag(torch.tensor([9.0, 4.0] + [0.1] * (d - 2), dtype=torch.float64))
    t = torch.diag(torch.tensor([5.0, 1.0] + [0.1] * (d - 2), dtype=torch.float64))
    lam = auto_lambda([e], [t], d)
    assert lam == pytest.approx(1.0 / 5.0)
    assert lam * 4.0 == pytest.approx((1 - lam) * 1.0)


def test_streaming_top_k_equals_full_matrix():
    torch.manual_seed(0)
    q, x = torch.randn(5, 16), torch.randn(103, 16)
    res = top_k(q, ((i, x[i:i + 10]) for i in range(0, 103, 10)), k=7)
    full = q @ x.T
    want = full.topk(7, dim=1)
    assert torch.equal(res.proponent_rows, want.indices)
    torch.testing.assert_close(res.proponent_scores, want.values)
    low = full.topk(7, dim=1, largest=False)
    assert torch.equal(res.opponent_rows, low.indices)
    normed = top_k(q, ((i, x[i:i + 10]) for i in range(0, 103, 10)), k=7, normalize_train=True)
    cos = (q @ (x / x.norm(dim=1, keepdim=True)).T).topk(7, dim=1)
    assert torch.equal(normed.proponent_rows, cos.indices)
    torch.testing.assert_close(normed.proponent_scores, cos.values)


def test_faiss_index_gives_the_streaming_top_k():
    from trackstar.attribution.scoring import faiss_top_k

    torch.manual_seed(1)
    q, x = torch.randn(6, 32), torch.randn(211, 32)
    chunks = lambda: ((i, x[i:i + 50]) for i in range(0, 211, 50))  # noqa: E731
    for normalize in (False, True):
        want = top_k(q, chunks(), k=9, normalize_train=normalize)
        got = faiss_top_k(q, chunks(), k=9, normalize_train=normalize)
        assert torch.equal(got.proponent_rows, want.proponent_rows)
        assert torch.equal(got.opponent_rows, want.opponent_rows)
        torch.testing.assert_close(got.proponent_scores, want.proponent_scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.opponent_scores, want.opponent_scores, rtol=1e-5, atol=1e-5)


def ref_adafactor_steps(model, names, u, opt):
    """-Δθ of torch Adafactor's next step on each row's corrected gradient ``u`` (flat over
    ``names``), written from its documented update: per matrix, ρ·max(eps2, RMS(W)) · u /
    max(1, RMS(u) / d), ρ = min(lr, 1/sqrt(t)); V is not updated by the step (first order)."""
    params = dict(model.named_parameters())
    group = opt.param_groups[0]
    out, start = torch.zeros_like(u), 0
    for n in names:
        p = params[n]
        t = float(opt.state[p]["step"]) + 1
        alpha = max(group["eps"][1], (p.double().pow(2).mean().sqrt()).item()) * min(group["lr"], t ** -0.5)
        part = u[:, start:start + p.numel()]
        rms = part.pow(2).mean(dim=1).sqrt()
        out[:, start:start + p.numel()] = alpha * part / torch.clamp(rms / group["d"], min=1.0)[:, None]
        start += p.numel()
    return out


def reference_scores(model, tokenizer, settings, v_mult, opt=None):
    """Full N×M score matrix of a method row, written from SPEC §1 directly."""
    names = ref_param_names(model)
    g_train = torch.stack([ref_gradient(model, tokenizer, names, text=t) for t in TRAIN])
    g_query = torch.stack([ref_gradient(model, tokenizer, names, prompt=p, target=t,
                                        output_fn=settings.output_fn) for p, t in QUERIES])
    if settings.train_side == "optimizer_step":
        return g_query @ ref_adafactor_steps(model, names, g_train * v_mult, opt).T
    if settings.use_v:
        g_train, g_query = g_train * v_mult, g_query * v_mult
    if settings.curvature != "none":
        r_train = g_train.T @ g_train / len(TRAIN)
        r = r_train
        if settings.curvature == "mix":
            r = settings.lam * (g_query.T @ g_query / len(QUERIES)) + (1 - settings.lam) * r_train
        w = ref_inv_sqrt(r, settings.damping)
        g_train, g_query = g_train @ w, g_query @ w
    if settings.unit_norm:
        g_train = g_train / g_train.norm(dim=1, keepdim=True)
        g_query = g_query / g_query.norm(dim=1, keepdim=True)
    return g_query @ g_train.T


@pytest.fixture(scope="module")
def micro(tokenizer):
    model = make_gpt2(width=8, layers=1)
    opt = train_adafactor(model, tokenizer, lr=0.01)
    names = ref_param_names(model)
    return model, opt, ref_v_multiplier_torch_adafactor(model, opt, names)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_rows_equal_the_formula(method, micro, tokenizer, tmp_path):
    model, opt, v_mult = micro
    settings = METHODS[method].replace(projection="identity", k=len(TRAIN), lam=0.9,
                                       batch_size=3, chunk_rows=5)
    result = TrackStar(model, tokenizer, settings, optimizer=opt, work_dir=tmp_path).attribute(
        TRAIN, QUERIES)
    want = reference_scores(model, tokenizer, settings, v_mult, opt)
    got = torch.zeros_like(want)
    for qi in range(len(QUERIES)):
        for j, s in zip(result.proponent_ids[qi], result.proponent_scores[qi]):
            got[qi, j] = s
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * want.abs().max().item())
    assert result.v_source == ("torch_adafactor" if settings.use_v else None)


def _mean_target_logp(model, tokenizer, prompt, target):
    p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return logp[len(p) - 1:-1].gather(-1, ids[0, len(p):, None]).mean().item()


@pytest.mark.parametrize("params", ["default", "all"])
def test_first_order_row_predicts_the_real_one_step_change(params, tokenizer, tmp_path):
    """The first-order row ranks (query, training text) pairs as the optimizer's real step
    on the text (V's own update included) changes the query's target log-probability.
    With the default parameters (the block matrices every method row attributes) it
    predicts a step of those matrices; with params='all', the full step tail-patch takes."""
    import copy

    from scipy.stats import spearmanr

    model = make_gpt2(width=8, layers=1)
    opt = train_adafactor(model, tokenizer, steps=40, lr=0.01)
    attributed = set(ref_param_names(model))
    settings = METHODS["first_order"].replace(projection="identity", k=len(TRAIN), batch_size=3, params=params)
    result = TrackStar(model, tokenizer, settings, optimizer=opt, work_dir=tmp_path).attribute(TRAIN, QUERIES)
    predicted = torch.zeros(len(QUERIES), len(TRAIN), dtype=torch.float64)
    for qi in range(len(QUERIES)):
        for j, s in zip(result.proponent_ids[qi], result.proponent_scores[qi]):
            predicted[qi, j] = s
    actual = torch.zeros_like(predicted)
    before = [_mean_target_logp(model, tokenizer, p, t) for p, t in QUERIES]
    for j, text in enumerate(TRAIN):
        m2, o2 = copy.deepcopy((model, opt))
        ids = torch.tensor([training_example(tokenizer, text, "t", None).ids])
        F.cross_entropy(m2(input_ids=ids).logits[0, :-1], ids[0, 1:]).backward()
        if params == "default":
            for name, p in m2.named_parameters():
                if name not in attributed:
                    p.grad = None  # Adafactor skips it
        o2.step()
        for qi, (p, t) in enumerate(QUERIES):
            actual[qi, j] = _mean_target_logp(m2, tokenizer, p, t) - before[qi]
    rho = spearmanr(predicted.flatten(), actual.flatten()).statistic
    assert rho > (0.95 if params == "default" else 0.85), rho


def test_first_order_row_needs_its_settings_and_an_optimizer(micro, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="optimizer_step.*needs use_v=True, curvature='none' and unit_norm=False"):
        METHODS["first_order"].replace(unit_norm=True)
    model, _, _ = micro
    settings = METHODS["first_order"].replace(projection="identity", k=2, use_v=True)
    with pytest.raises(SecondMomentError, match="needs the optimizer state"):
        TrackStar(model, tokenizer, settings, optimizer=None, work_dir=tmp_path).attribute(TRAIN, QUERIES)


def test_trackstar_through_the_faiss_scorer_equals_the_formula(micro, tokenizer, tmp_path):
    model, opt, v_mult = micro
    settings = METHODS["trackstar"].replace(projection="identity", k=len(TRAIN), lam=0.9, scorer="faiss")
    result = TrackStar(model, tokenizer, settings, optimizer=opt, work_dir=tmp_path).attribute(TRAIN, QUERIES)
    want = reference_scores(model, tokenizer, settings, v_mult)
    for qi in range(len(QUERIES)):
        assert result.proponent_ids[qi] == want[qi].argsort(descending=True).tolist()
        torch.testing.assert_close(torch.tensor(result.proponent_scores[qi]), want[qi].sort(descending=True).values.float(),
                                   rtol=2e-3, atol=2e-3)


def test_wrong_order_of_operations_would_be_detected(micro, tokenizer, tmp_path):
    """Normalizing before R, or R on one side only, gives different scores."""
    model, opt, v_mult = micro
    settings = METHODS["trackstar"].replace(projection="identity", k=len(TRAIN), lam=0.9)
    right = reference_scores(model, tokenizer, settings, v_mult)
    names = ref_param_names(model)
    g_t = torch.stack([ref_gradient(model, tokenizer, names, text=t) for t in TRAIN]) * v_mult
    g_q = torch.stack([ref_gradient(model, tokenizer, names, prompt=p, target=t)
                       for p, t in QUERIES]) * v_mult
    r = 0.9 * g_q.T @ g_q / 3 + 0.1 * g_t.T @ g_t / len(TRAIN)
    w = ref_inv_sqrt(r, settings.damping)
    n_t, n_q = g_t / g_t.norm(dim=1, keepdim=True), g_q / g_q.norm(dim=1, keepdim=True)
    q_inv = g_q @ w @ w
    one_sided = (q_inv / q_inv.norm(dim=1, keepdim=True)) @ n_t.T
    norm_first = (n_q @ w) @ (n_t @ w).T
    assert (right - norm_first).norm() > 0.1 * right.norm()
    assert (right - one_sided).norm() > 0.1 * right.norm()


# ---------------------------------------------------------------- bad inputs
def test_empty_target_is_refused_and_overlong_examples_are_cut(tokenizer):
    with pytest.raises(ValueError, match="q7.*empty after tokenization"):
        query_example(tokenizer, "the capital of", "   ", "q7", 24)
    # Overlong examples are cut as pretraining and query evaluation cut them.
    with pytest.warns(UserWarning, match="t3.*longer than the model's 24 positions"):
        passage = training_example(tokenizer, " ".join(["the"] * 30), "t3", 24)
    assert passage.ids == (WORDS.index("<bos>"),) + (WORDS.index("the"),) * 23
    model = make_gpt2()
    ts = TrackStar(model, tokenizer, AttributionSettings(projection="identity", use_v=False))
    (query,) = ts.query_examples([(" ".join(["a"] * 30), "paris")])
    assert query.ids == (WORDS.index("a"),) * 23 + (WORDS.index("paris"),)
    assert query.weights == (0.0,) * 23 + (1.0,)
    with pytest.raises(ValueError, match="Shorten the target"):
        ts.query_examples([("the", " ".join(["paris"] * 24))])


def test_non_finite_gradient_names_the_example_and_parameter(tokenizer):
    model = make_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[WORDS.index("rome")] = float("nan")
    examples = [training_example(tokenizer, t, f"train[{i}]", 24) for i, t in enumerate(TRAIN[:4])]
    with pytest.raises(NonFiniteGradientError, match=r"train\[2\].*model\.layers\.0\.self_attn\.q_proj"):
        lib_features(model, tokenizer, examples)
