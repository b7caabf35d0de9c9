"""Tail-patch: exact restore, sign convention, bad input."""

import math
import random

import pytest
import torch

from trackstar.evaluation.batched_step import BatchedTailPatch
from trackstar.evaluation.tail_patch import restored, tail_patch, tail_patch_at_k
from trackstar.io import ArtifactError
from trackstar.lm import load_checkpoint


def _state(ck):
    params = {n: p.detach().clone() for n, p in ck.model.named_parameters()}
    opt = {
        (i, k): (v.clone() if torch.is_tensor(v) else v)
        for i, (p, s) in enumerate(ck.optimizer.state.items())
        for k, v in s.items()
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in ck.optimizer.param_groups]
    return params, opt, groups, ck.model.training


def _equal(a, b):
    pa, oa, ga, ta = a
    pb, ob, gb, tb = b
    return (
        pa.keys() == pb.keys()
        and all(torch.equal(pa[n], pb[n]) for n in pa)
        and oa.keys() == ob.keys()
        and all(torch.equal(oa[k], ob[k]) if torch.is_tensor(oa[k]) else oa[k] == ob[k] for k in oa)
        and ga == gb
        and ta == tb
    )


def _gold_and_random(world, n_queries=6, seed=0):
    sentences = {s["sentence_id"]: s for s in world.sentences}
    facts = world.facts_by_id
    queries = [q for q in world.queries if q["has_trex_sentence"]][:n_queries]
    rng = random.Random(seed)
    gold = {q["example_id"]: [(sid, sentences[sid]["text"]) for sid in facts[q["fact_id"]]["trex_sentences"][:1]] for q in queries}
    rand = {q["example_id"]: [(s["sentence_id"], s["text"]) for s in rng.sample(world.sentences, 3)] for q in queries}
    return queries, gold, rand


def test_model_and_optimizer_are_bit_identical_after_tail_patch(micro_world, checkpoint):
    queries, gold, _ = _gold_and_random(micro_world)
    checkpoint.model.train()
    before = _state(checkpoint)
    tail_patch(checkpoint, queries, gold, progress=False)
    assert _equal(before, _state(checkpoint))


def test_restore_detects_a_change(checkpoint):
    # The comparison above must be able to fail: a step outside `restored` changes state.
    before = _state(checkpoint)
    with restored(checkpoint.model, checkpoint.optimizer):
        checkpoint.model.transformer.h[0].attn.c_attn.weight.data.add_(1.0)
    assert _equal(before, _state(checkpoint))
    checkpoint.model.transformer.h[0].attn.c_attn.weight.data.add_(1.0)
    assert not _equal(before, _state(checkpoint))


def test_gold_sentences_raise_the_target_more_than_random_ones(micro_world, checkpoint):
    queries, gold, rand = _gold_and_random(micro_world)
    g = tail_patch(checkpoint, queries, gold, progress=False)
    r = tail_patch(checkpoint, queries, rand, progress=False)
    assert g["delta_logprob"].mean() > 0
    assert g["delta_logprob"].mean() > r["delta_logprob"].mean() + 0.1


def test_each_pair_equals_a_fresh_single_step(micro_checkpoint_dir, micro_world):
    """Sharing one step across queries gives what a from-scratch step per pair gives."""
    from trackstar.lm.data import lm_batch, lm_loss, tokenize_corpus
    from trackstar.lm.evaluate import score_targets

    queries, gold, rand = _gold_and_random(micro_world, n_queries=2)
    ck = load_checkpoint(micro_checkpoint_dir)
    df = tail_patch(ck, queries, rand, progress=False)
    q = queries[1]
    pid, text = rand[q["example_id"]][2]
    fresh = load_checkpoint(micro_checkpoint_dir)
    for group in fresh.optimizer.param_groups:
        group["lr"] = fresh.learning_rate
    fresh.model.eval()
    ids, _ = tokenize_corpus(fresh.tokenizer, [text], 10**6)
    lm_loss(fresh.model, lm_batch(ids, fresh.tokenizer.pad_token_id)).backward()
    fresh.optimizer.step()
    (lp, _), = score_targets(fresh.model, fresh.tokenizer, [q["prompt"]], [q["target"]])
    row = df[(df.example_id == q["example_id"]) & (df.proponent_id == pid)].iloc[0]
    assert row["p_after"] == pytest.approx(math.exp(lp), rel=1e-5)


def test_tail_patch_at_k_and_too_few_proponents(micro_world, checkpoint):
    queries, _, rand = _gold_and_random(micro_world)
    per_pair = tail_patch(checkpoint, queries, rand, progress=False)
    table = tail_patch_at_k(per_pair, ks=(1, 3))
    first = per_pair[per_pair["rank"] == 0].set_index("example_id")["delta_pp"]
    assert table.set_index("example_id")["tail_patch@1"].to_dict() == pytest.approx(first.to_dict())
    with pytest.raises(ValueError, match="only 3 proponents"):
        tail_patch_at_k(per_pair, ks=(10,))


def test_checkpoint_without_optimizer_is_refused(micro_world, micro_checkpoint_dir):
    from trackstar.lm import load_hf_causal_lm

    plain = load_hf_causal_lm(micro_checkpoint_dir)
    queries, gold, _ = _gold_and_random(micro_world, n_queries=1)
    with pytest.raises(ArtifactError, match="no optimizer state"):
        tail_patch(plain, queries, gold, progress=False)


def test_cache_serves_a_second_method_without_new_steps(micro_world, checkpoint, tmp_path, monkeypatch):
    queries, gold, rand = _gold_and_random(micro_world, n_queries=3)
    first = tail_patch(checkpoint, queries, rand, progress=False, cache_dir=tmp_path)
    steps = []
    monkeypatch.setattr(checkpoint.optimizer, "step", lambda *a, **k: steps.append(1))
    monkeypatch.setattr(BatchedTailPatch, "stepped", lambda *a, **k: steps.append(1))
    again = tail_patch(checkpoint, queries, rand, progress=False, cache_dir=tmp_path)
    assert steps == [] and again.equals(first)
