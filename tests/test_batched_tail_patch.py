"""Batched tail-patch against the one-at-a-time optimizer step it replaces."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trackstar.evaluation.batched_step import BatchedTailPatch, FunctionalStep, Unsupported
from trackstar.evaluation.tail_patch import tail_patch
from trackstar.lm.checkpoint import Checkpoint
from trackstar.lm.data import lm_batch, lm_loss, passage_ids


def _proponents(world, n_queries=8, per_query=5, offset=3):
    sentences = world.sentences
    queries = world.queries[:n_queries]
    props = {q["example_id"]: [(s["sentence_id"], s["text"])
                               for s in sentences[i * offset:i * offset + per_query]]
             for i, q in enumerate(queries)}
    return queries, props


def _close(a, b, atol=1e-4):
    assert list(a["proponent_id"]) == list(b["proponent_id"])
    diff = (a["delta_logprob"] - b["delta_logprob"]).abs().max()
    assert diff < atol, diff


def test_batched_equals_one_at_a_time_with_adafactor(micro_world, checkpoint):
    queries, props = _proponents(micro_world)
    one = tail_patch(checkpoint, queries, props, progress=False, batched=False)
    many = tail_patch(checkpoint, queries, props, progress=False)
    _close(one, many)
    # The comparison can fail: a different learning rate moves the values.
    checkpoint.learning_rate *= 3
    with pytest.raises(AssertionError):
        _close(one, tail_patch(checkpoint, queries, props, progress=False))


def test_values_do_not_depend_on_which_proponents_share_a_batch(micro_world, checkpoint):
    queries, props = _proponents(micro_world)
    whole = tail_patch(checkpoint, queries, props, progress=False).set_index(["example_id", "proponent_id"])
    part = {k: v[1:3] for k, v in list(props.items())[2:5]}
    few = tail_patch(checkpoint, queries, part, progress=False, memory_bytes=1 << 25)
    few = few.set_index(["example_id", "proponent_id"])
    # Bit for bit: the cache may serve a value computed beside any other proponents.
    assert (whole.loc[few.index, "delta_logprob"] == few["delta_logprob"]).all()
    assert (whole.loc[few.index, "p_before"] == few["p_before"]).all()


def _tiny_adamw_checkpoint(micro_world, tokenizer_source, weight_decay):
    torch.manual_seed(0)
    tok = tokenizer_source.tokenizer
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    for s in micro_world.sentences[:6]:
        opt.zero_grad()
        lm_loss(model, lm_batch([passage_ids(tok, s["text"], 64)], tok.pad_token_id)).backward()
        opt.step()
    return Checkpoint(model=model, tokenizer=tok, optimizer=opt, learning_rate=3e-3)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_batched_equals_one_at_a_time_with_adamw(micro_world, checkpoint, weight_decay):
    ck = _tiny_adamw_checkpoint(micro_world, checkpoint, weight_decay)
    queries, props = _proponents(micro_world, n_queries=4, per_query=4)
    one = tail_patch(ck, queries, props, progress=False, batched=False)
    many = tail_patch(ck, queries, props, progress=False)
    _close(one, many)
    assert one["delta_logprob"].abs().max() > 1e-3  # the steps move something


@pytest.mark.parametrize("kind", ["adafactor", "adamw"])
def test_functional_step_equals_the_optimizers_own_step(micro_world, checkpoint, kind):
    ck = checkpoint if kind == "adafactor" else _tiny_adamw_checkpoint(micro_world, checkpoint, 0.1)
    model, opt, tok = ck.model, ck.optimizer, ck.tokenizer
    model.eval()
    texts = [s["text"] for s in micro_world.sentences[10:13]]
    ids = [passage_ids(tok, t, 64) for t in texts]
    grads = []
    for one in ids:
        model.zero_grad()
        lm_loss(model, lm_batch([one], tok.pad_token_id)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    step = FunctionalStep(model, opt, ck.learning_rate, frozen=set())
    stacked = step.apply({n: torch.stack([g[n] for g in grads]) for n in grads[0]})
    for i, g in enumerate(grads):
        m2, o2 = copy.deepcopy((model, opt))
        for group in o2.param_groups:
            group["lr"] = ck.learning_rate
        for n, p in m2.named_parameters():
            p.grad = g[n]
        o2.step()
        for n, p in m2.named_parameters():
            torch.testing.assert_close(stacked[n][i], p.detach(), rtol=1e-5, atol=1e-7)


def test_unsupported_optimizer_takes_the_one_at_a_time_path(micro_world, checkpoint):
    ck = _tiny_adamw_checkpoint(micro_world, checkpoint, 0.0)
    sgd = torch.optim.SGD(ck.model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(Unsupported, match="SGD"):
        FunctionalStep(ck.model, sgd, 0.1, frozen=set())
    ck.optimizer = sgd
    queries, props = _proponents(micro_world, n_queries=2, per_query=3)
    a = tail_patch(ck, queries, props, progress=False)
    b = tail_patch(ck, queries, props, progress=False, batched=False)
    assert a.equals(b)  # the same path, so the same bits


def test_frozen_parameters_stay_fixed(micro_world, checkpoint):
    checkpoint.model.transformer.wpe.weight.requires_grad_(False)
    queries, props = _proponents(micro_world, n_queries=3, per_query=3)
    _close(tail_patch(checkpoint, queries, props, progress=False, batched=False),
           tail_patch(checkpoint, queries, props, progress=False))
    engine = BatchedTailPatch(checkpoint.model, checkpoint.optimizer, checkpoint.learning_rate,
                              passage_ids(checkpoint.tokenizer, micro_world.sentences[0]["text"], 64),
                              checkpoint.tokenizer.pad_token_id)
    assert "transformer.wpe.weight" not in engine.step.names


def test_probability_before_does_not_depend_on_the_other_queries(micro_world, checkpoint):
    queries, props = _proponents(micro_world)
    whole = tail_patch(checkpoint, queries, props, progress=False).set_index(["example_id", "proponent_id"])
    some = queries[3:5]
    few = tail_patch(checkpoint, some, {q["example_id"]: props[q["example_id"]] for q in some}, progress=False)
    few = few.set_index(["example_id", "proponent_id"])
    assert (whole.loc[few.index, "p_before"] == few["p_before"]).all()
    assert (whole.loc[few.index, "delta_logprob"] == few["delta_logprob"]).all()


def _brute_force_gradients(model, passages):
    """Each passage's mean-loss gradient by plain autograd on the model itself, one at a time."""
    out = []
    for ids in passages:
        model.zero_grad()
        t = torch.tensor([ids])
        logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, :-1].float()
        torch.nn.functional.cross_entropy(logits, t[0, 1:]).backward()
        out.append({n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
                    for n, p in model.named_parameters()})
    return out


def _llama_adafactor(vocab, pad_id, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=64, pad_token_id=pad_id,
                                         tie_word_embeddings=tie)).eval()
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    ids = torch.randint(3, vocab, (4, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("family", ["gpt2-tied", "llama-untied", "llama-tied"])
def test_gradients_equal_plain_autograd_per_example(micro_world, checkpoint, family):
    """The batched per-example gradients (input embedding rows looked up outside the
    vmapped call) equal each passage's own backward, repeated tokens and a token equal
    to the embedding's padding index included."""
    if family == "gpt2-tied":
        model, opt, pad = checkpoint.model.eval(), checkpoint.optimizer, checkpoint.tokenizer.pad_token_id
        vocab = model.config.vocab_size
    else:
        vocab, pad = 50, 0
        model, opt = _llama_adafactor(vocab, pad, tie=family == "llama-tied")
    # One padded width (8): the same token three times, the padding id inside a passage,
    # and a passage shorter than the width.
    passages = [[5, 9, 5, 11, 5, 7, 8, 9], [6, 7, pad, 9, 10, 12, 13, 14], [20, 21, 22, 23, 20]]
    engine = BatchedTailPatch(model, opt, 1e-3, passages[0], pad)
    assert engine.embedding is not None  # the looked-up path is the one under test
    got = engine._gradients(passages)
    want = _brute_force_gradients(model, passages)
    embedding = engine.embedding[0]
    for name, stacked in got.items():
        for i, w in enumerate(want):
            torch.testing.assert_close(stacked[i], w[name], rtol=1e-4, atol=1e-6, msg=f"{family} {name} #{i}")
    # Untied, the padding index's row stays at zero where it is a real token (nn.Embedding's rule).
    if family == "llama-untied":
        assert not got[embedding][1, pad].any()
    # The check can fail: the gradients before the looked-up rows' scatter are not the answer.
    ids = torch.tensor([passages[0]])
    base = engine.step.base
    train = {n: base[n] for n in engine._trainable}
    fixed = {n: t for n, t in base.items() if n not in engine._trainable}
    unscattered, _ = engine._embed_grads(train, fixed, base[embedding][ids], ids, ids.clone())
    with pytest.raises(AssertionError):
        torch.testing.assert_close(unscattered[embedding][0], want[0][embedding], rtol=1e-4, atol=1e-6)


def test_head_at_target_positions_equals_the_full_logits(micro_world, checkpoint):
    """log_probs with the vocabulary head only at the target positions (``logits_to_keep``)
    equals the same call over every position's logits, targets of different lengths in one call."""
    tok = checkpoint.tokenizer
    model = checkpoint.model.eval()
    engine = BatchedTailPatch(model, checkpoint.optimizer, checkpoint.learning_rate,
                              passage_ids(tok, micro_world.sentences[0]["text"], 64), tok.pad_token_id)
    assert engine.keeps_logits
    queries = [(list(range(5, 5 + n)), t) for n, t in ((9, 1), (11, 3), (12, 2), (10, 4))]
    params = engine.base_params()
    kept = engine.log_probs(params, [0] * 4, queries)
    engine.keeps_logits = False
    full = engine.log_probs(params, [0] * 4, queries)
    assert kept == pytest.approx(full, rel=1e-5, abs=1e-5)
    # and equals the plain model, one query at a time
    for (ids, n), lp in zip(queries, kept, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        plain = sum(float(logits[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))
        assert lp == pytest.approx(plain, rel=1e-5, abs=1e-5)


class _ScalesLookedUpRows(GPT2LMHeadModel):
    """A forward that treats ``inputs_embeds`` unlike the rows its ids would give."""

    def forward(self, input_ids=None, inputs_embeds=None, logits_to_keep=0, **kwargs):
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds * 2.0
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep,
                               **kwargs)


class _KeepsOnlyAnInt(GPT2LMHeadModel):
    """A forward whose ``logits_to_keep`` takes a count only."""

    def forward(self, input_ids=None, inputs_embeds=None, logits_to_keep=0, **kwargs):
        if torch.is_tensor(logits_to_keep):
            raise TypeError("logits_to_keep must be an int")
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, logits_to_keep=logits_to_keep,
                               **kwargs)


@pytest.mark.parametrize("cls", [_ScalesLookedUpRows, _KeepsOnlyAnInt])
def test_shortcuts_a_model_does_not_honour_are_dropped(micro_world, checkpoint, cls):
    """probe() checks both shortcuts against the model's own forward; the values still equal
    the one-at-a-time step where a model does not honour one of them."""
    ck = _tiny_adamw_checkpoint(micro_world, checkpoint, 0.0)
    model = cls(ck.model.config).eval()
    model.load_state_dict(ck.model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(ck.optimizer.state_dict())
    ck = Checkpoint(model=model, tokenizer=ck.tokenizer, optimizer=opt, learning_rate=ck.learning_rate)
    sample = passage_ids(ck.tokenizer, micro_world.sentences[0]["text"], 64)
    engine = BatchedTailPatch(model, opt, ck.learning_rate, sample, ck.tokenizer.pad_token_id)
    assert engine.embedding is not None and engine.keeps_logits  # both on before the probe
    engine.probe(sample)
    if cls is _ScalesLookedUpRows:
        assert engine.embedding is None and engine.keeps_logits
    else:
        assert engine.embedding is not None and not engine.keeps_logits
    queries, props = _proponents(micro_world, n_queries=3, per_query=3)
    _close(tail_patch(ck, queries, props, progress=False, batched=False), tail_patch(ck, queries, props, progress=False))
