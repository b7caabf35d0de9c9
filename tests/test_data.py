"""The one text-to-tokens path (trackstar.lm.data) against brute-force expectations.

Expected ids are spelled out from the tokenizer's plain ``encode``; expected
logits and losses come from the model run on each sequence alone, unpadded.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from trackstar.attribution.output import Example, collate, query_example, training_example
from trackstar.lm import build_model, lm_loss, pad, passage_ids, query_ids, score_targets, train_tokenizer
from trackstar.lm.data import lm_batch, tokenize_corpus

TEXTS = [f"The capital of Country{i} is City{i}, by the river." for i in range(16)]
CONTEXT = 16


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    return build_model(request.param, "micro", len(tokenizer), context_length=CONTEXT, seed=0).eval()


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def unpadded_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------- passages
def test_passage_is_bos_text_eos_cut_at_max_length(tokenizer):
    text = TEXTS[3]
    full = [tokenizer.bos_token_id, *encode(tokenizer, text), tokenizer.eos_token_id]
    assert len(full) > 8
    assert passage_ids(tokenizer, text, None) == full
    assert passage_ids(tokenizer, text, len(full)) == full
    assert passage_ids(tokenizer, text, 8) == full[:8]
    passages, n_cut = tokenize_corpus(tokenizer, [text, "a", text], len(full) - 1)
    assert passages == [full[:-1], [tokenizer.bos_token_id, *encode(tokenizer, "a"), tokenizer.eos_token_id],
                        full[:-1]]
    assert n_cut == 2


def test_attributed_passage_is_the_cut_pretraining_passage(tokenizer):
    with pytest.warns(UserWarning, match="t0.*longer than the model's 8 positions"):
        example = training_example(tokenizer, TEXTS[3], "t0", 8)
    assert list(example.ids) == passage_ids(tokenizer, TEXTS[3], 8)
    assert example.weights == (0.0,) + (1 / 7,) * 7


# ---------------------------------------------------------------- queries
def test_overlong_query_loses_prompt_tokens_from_the_left_in_eval_and_attribution(tokenizer, model):
    prompt, target = " ".join(TEXTS[:3]) + " The capital of Country5 is", "City5"
    prompt_ids = [tokenizer.bos_token_id, *encode(tokenizer, prompt)]
    target_ids = encode(tokenizer, " " + target)
    assert len(prompt_ids) + len(target_ids) > CONTEXT
    want = prompt_ids[len(prompt_ids) + len(target_ids) - CONTEXT:] + target_ids

    assert query_ids(tokenizer, prompt, target, CONTEXT) == (want, len(target_ids))
    example = query_example(tokenizer, prompt, target, "q0", CONTEXT)
    assert list(example.ids) == want
    assert example.weights == (0.0,) * (CONTEXT - len(target_ids)) + (1 / len(target_ids),) * len(target_ids)

    (log_prob, _), = score_targets(model, tokenizer, [prompt], [target])
    log_probs = torch.log_softmax(unpadded_logits(model, want).double(), dim=-1)
    first = CONTEXT - len(target_ids)
    expected = sum(log_probs[t - 1, want[t]].item() for t in range(first, CONTEXT))
    assert log_prob == pytest.approx(expected, abs=1e-5)


def test_query_that_fits_is_bos_prompt_then_target(tokenizer):
    ids, n_target = query_ids(tokenizer, "The capital of Country1 is", "City1", CONTEXT)
    target_ids = encode(tokenizer, " City1")
    assert ids == [tokenizer.bos_token_id, *encode(tokenizer, "The capital of Country1 is"), *target_ids]
    assert n_target == len(target_ids)


def test_bad_queries_are_refused_with_their_name(tokenizer):
    with pytest.raises(ValueError, match="q1.*no room for the prompt.*Shorten the target"):
        query_ids(tokenizer, "The capital of", " ".join(["City1"] * CONTEXT), CONTEXT, "q1")
    with pytest.raises(ValueError, match="'The capital of'.*blank or empty after tokenization"):
        query_ids(tokenizer, "The capital of", " ", CONTEXT)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="q2.*empty prompt.*no BOS"):
        query_ids(no_bos, "", "City1", CONTEXT, "q2")


# ---------------------------------------------------------------- padding
def test_pad_right_and_left():
    sequences = [[5, 6, 7], [8]]
    ids, mask, positions = pad(sequences, 0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert positions[mask.bool()].tolist() == [0, 1, 2, 0]
    ids, mask, positions = pad(sequences, 9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions[mask.bool()].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="padding side 'middle'"):
        pad(sequences, 0, side="middle")


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_changes_no_logit_of_a_real_token(tokenizer, model, side):
    sequences = [passage_ids(tokenizer, text, CONTEXT) for text in ("The capital", TEXTS[0], "City3 is")]
    ids, mask, positions = pad(sequences, tokenizer.pad_token_id, side)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for row, seq in enumerate(sequences):
        torch.testing.assert_close(logits[row][mask[row].bool()], unpadded_logits(model, seq),
                                   rtol=1e-5, atol=1e-5)


def test_attribution_batch_puts_each_weight_on_its_token():
    examples = [Example((5, 6, 7), (0.0, 0.5, 0.5), "loss", "a"), Example((8, 9), (0.0, 1.0), "loss", "b")]
    for side, want in [("right", [[0.0, 0.5, 0.5], [0.0, 1.0, 0.0]]),
                       ("left", [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])]:
        batch = collate(examples, side)
        assert batch.weights.tolist() == want
        assert batch.input_ids[batch.attention_mask.bool()].tolist() == [5, 6, 7, 8, 9]


# ---------------------------------------------------------------- LM loss
def test_lm_loss_is_mean_cross_entropy_over_real_tokens(tokenizer, model):
    sequences = [passage_ids(tokenizer, text, CONTEXT) for text in ("The capital", TEXTS[0], TEXTS[1])]
    with torch.no_grad():
        got = lm_loss(model, lm_batch(sequences, tokenizer.pad_token_id))
    nll, count = 0.0, 0
    for seq in sequences:
        log_probs = F.log_softmax(unpadded_logits(model, seq).double(), dim=-1)
        nll -= sum(log_probs[t - 1, seq[t]].item() for t in range(1, len(seq)))
        count += len(seq) - 1
    assert got.item() == pytest.approx(nll / count, abs=1e-5)
