"""Tests of the lm stage: tokenizer, models, pretraining, checkpoints, query evaluation."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from trackstar.io import COMPLETE_MARKER, ArtifactError, read_json, read_jsonl
from trackstar.lm import (
    PretrainConfig,
    accuracy_by_bucket,
    build_model,
    build_optimizer,
    evaluate_queries,
    final_checkpoint,
    lm_loss,
    load_checkpoint,
    load_hf_causal_lm,
    pretrain_model,
    save_checkpoint,
    score_targets,
    train_tokenizer,
)
from trackstar.lm.data import lm_batch, tokenize_corpus
from trackstar.lm.optim import learning_rate_at

TEMPLATES = [
    "The capital of {c} is {o}.",
    "{o} is the capital city of {c}.",
    "People in {c} often travel to {o}, the capital.",
]


def write_world(path: Path, n_docs: int = 120, n_facts: int = 12, seed: int = 0, docs=None) -> Path:
    """A tiny world in the format the world stage writes."""
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    facts = []
    for i in range(n_facts):
        obj = "".join(rng.choice("bdgklmnprstvz") + rng.choice("aeiou") for _ in range(3)).title()
        facts.append((f"fact{i}", f"Country{i}", obj))
    if docs is None:
        docs = []
        for j in range(n_docs):
            chosen = rng.sample(facts, 2)
            text = " ".join(rng.choice(TEMPLATES).format(c=c, o=o) for _, c, o in chosen)
            docs.append({"doc_id": f"doc{j}", "text": text, "fact_ids": [f for f, _, _ in chosen]})
    with open(path / "c4_corpus.jsonl", "w") as fh:
        for doc in docs:
            fh.write(json.dumps(doc) + "\n")
    with open(path / "queries.jsonl", "w") as fh:
        for i, (fact_id, c, o) in enumerate(facts):
            fh.write(json.dumps({
                "example_id": f"q{i}", "fact_id": fact_id, "prompt": f"The capital of {c} is",
                "target": o, "relation": "capital", "c4_frequency": i, "c4_frequency_bucket": i % 6,
            }) + "\n")
    (path / "manifest.json").write_text(json.dumps(
        {"seed": seed, "profile": "test", "content_hash": f"test-{seed}-{len(docs)}"}))
    return path


MICRO = PretrainConfig.preset("micro", epochs=3, batch_size=16, checkpoint_fractions=(0.5, 1.0))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def micro_run(world, tmp_path_factory) -> Path:
    return pretrain_model(world, tmp_path_factory.mktemp("run") / "micro", MICRO, progress=False)


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    params_a, params_b = dict(a.named_parameters()), dict(b.named_parameters())
    assert params_a.keys() == params_b.keys()
    for name, value in params_a.items():
        assert torch.equal(value, params_b[name]), name


def assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, state in sa["state"].items():
        assert state.keys() == sb["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, sb["state"][index][key]), (index, key)


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_determinism(tmp_path):
    texts = ["The capital of France is Paris. Émile was born in 1901."] * 20 + [
        "tabs\tand  double  spaces\n newlines, ünïcödé 日本語 and 🙂 emoji"]
    tok = train_tokenizer(texts, vocab_size=300)
    again = train_tokenizer(texts, vocab_size=300)
    assert tok.get_vocab() == again.get_vocab()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id}) == 3
    for text in [*texts, " leading space", "never seen: Zyxw 42 ~!@", ""]:
        ids = loaded.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
        assert ids == tok.encode(text, add_special_tokens=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


# --------------------------------------------------------------------------- models and config

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_models_are_seeded_tied_and_sized(family):
    a = build_model(family, "micro", vocab_size=512, seed=1)
    b = build_model(family, "micro", vocab_size=512, seed=1)
    c = build_model(family, "micro", vocab_size=512, seed=2)
    assert_same_parameters(a, b)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))
    assert a.get_input_embeddings().weight is a.get_output_embeddings().weight
    assert 30_000 < sum(p.numel() for p in a.parameters()) < 70_000


def test_unknown_family_size_and_bad_config_values():
    with pytest.raises(ValueError, match=r"'gpt5'.*gpt2, llama"):
        build_model("gpt5", "micro", vocab_size=512)
    with pytest.raises(ValueError, match=r"'huge'.*micro, tiny, small, medium"):
        PretrainConfig(size="huge")
    with pytest.raises(ValueError, match="seed"):
        PretrainConfig(seed=-1)
    with pytest.raises(ValueError, match="seed"):
        PretrainConfig(seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        PretrainConfig(seed=True)
    with pytest.raises(ValueError, match="optimizer"):
        PretrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="final_lr_fraction"):
        PretrainConfig(final_lr_fraction=0.0)
    with pytest.raises(ValueError, match="preset"):
        PretrainConfig.preset("giant")
    assert PretrainConfig(checkpoint_fractions=[0.5, 0.25]).checkpoint_fractions == (0.25, 0.5, 1.0)


def test_learning_rate_schedule_ends_at_nonzero_final_lr():
    lrs = [learning_rate_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1) and learning_rate_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)


# --------------------------------------------------------------------------- pretraining

def test_pretraining_loss_falls_and_summary(micro_run):
    summary = read_json(micro_run / "pretrain.json")
    assert [c["fraction"] for c in summary["checkpoints"]] == [0.5, 1.0]
    final = load_checkpoint(final_checkpoint(micro_run))
    losses = final.trainer_state["loss_history"]
    assert len(losses) == summary["total_steps"] == final.step
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    # The final learning rate is the schedule's non-zero end, ready for tail-patch.
    assert final.learning_rate == pytest.approx(MICRO.lr * MICRO.final_lr_fraction)
    assert final.trainer_state["world"]["content_hash"] == "test-0-120"
    # Second moments are reachable by parameter name (Adafactor stores them factored).
    by_name = final.optimizer_state_by_name()
    assert set(by_name) == set(final.trainer_state["param_name_to_index"])
    assert {"row_var", "col_var"} <= set(by_name["transformer.h.0.attn.c_attn.weight"])


def test_llama_pretraining_loss_falls(world, tmp_path):
    config = PretrainConfig.preset("micro", family="llama", optimizer="adamw", lr=3e-3,
                                   epochs=2, checkpoint_fractions=(1.0,))
    run = pretrain_model(world, tmp_path / "llama", config, progress=False)
    losses = load_checkpoint(final_checkpoint(run)).trainer_state["loss_history"]
    assert sum(losses[-3:]) < sum(losses[:3]) - 1.0


@pytest.mark.parametrize(("family", "optimizer"), [("gpt2", "adafactor"), ("llama", "adamw")])
def test_checkpoint_round_trip_is_exact(tmp_path, family, optimizer):
    texts = [f"The capital of Country{i} is City{i}." for i in range(16)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = build_model(family, "micro", len(tokenizer), context_length=32, seed=0)
    opt = build_optimizer(model, optimizer, lr=1e-2, weight_decay=0.01)
    examples, _ = tokenize_corpus(tokenizer, texts, 32)
    batch = lm_batch(examples, tokenizer.pad_token_id)
    for _ in range(3):
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for group in opt.param_groups:
        group["lr"] = 1.2345e-3
    state = {"step": 3, "optimizer": {"name": optimizer, "lr": 1e-2, "weight_decay": 0.01,
                                      "hyperparameters": {}}}
    path = save_checkpoint(tmp_path / "ckpt", model, tokenizer, opt, state)
    loaded = load_checkpoint(path)
    assert_same_parameters(model, loaded.model)
    assert_same_optimizer_state(opt, loaded.optimizer)
    assert loaded.learning_rate == 1.2345e-3 == loaded.trainer_state["learning_rate"]
    assert loaded.tokenizer.get_vocab() == tokenizer.get_vocab()
    # One more identical step from both copies stays identical.
    loaded.model.train()
    for m, o in ((model, opt), (loaded.model, loaded.optimizer)):
        lm_loss(m, batch).backward()
        o.step()
    assert_same_parameters(model, loaded.model)


def test_resume_after_kill_matches_uninterrupted_run(world, micro_run, tmp_path, monkeypatch):
    import trackstar.lm.pretrain as pretrain_module

    out = tmp_path / "killed"
    real_save = pretrain_module.save_checkpoint

    def save_then_die(path, *args, **kwargs):
        if Path(path).name == read_json(micro_run / "pretrain.json")["final_checkpoint"]:
            # A kill while writing the final checkpoint leaves only a temp dir.
            (Path(path).parent / f".{Path(path).name}.partial-999999999-deadbeef").mkdir()
            raise KeyboardInterrupt
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(pretrain_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_model(world, out, MICRO, progress=False)
    assert not (out / "pretrain.json").exists()
    assert len(list(out.glob("checkpoint-*"))) == 1
    monkeypatch.setattr(pretrain_module, "save_checkpoint", real_save)

    pretrain_model(world, out, MICRO, progress=False)
    assert not list(out.glob(".*partial*"))
    resumed = load_checkpoint(final_checkpoint(out))
    reference = load_checkpoint(final_checkpoint(micro_run))
    assert_same_parameters(resumed.model, reference.model)
    assert_same_optimizer_state(resumed.optimizer, reference.optimizer)
    assert resumed.trainer_state["loss_history"] == reference.trainer_state["loss_history"]


def test_a_damaged_final_checkpoint_is_fixed_by_its_hint(world, micro_run, tmp_path):
    """The load error says: delete the checkpoint and re-run pretraining. That used to fail
    next on the finished run's summary; now the run resumes and writes it again, equal."""
    out = Path(shutil.copytree(micro_run, tmp_path / "run"))
    final = final_checkpoint(out)
    with open(final / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ArtifactError, match=r"corrupted.*Delete this checkpoint directory and re-run pretraining"):
        load_checkpoint(final)
    shutil.rmtree(final)  # what the hint says
    pretrain_model(world, out, MICRO, progress=False)
    assert_same_parameters(load_checkpoint(final_checkpoint(out)).model,
                           load_checkpoint(final_checkpoint(micro_run)).model)
    (out / read_json(out / "pretrain.json")["checkpoints"][0]["name"] / "optimizer.pt").unlink()  # an earlier one
    pretrain_model(world, out, MICRO, progress=False)  # every checkpoint from it on is written again
    assert all((out / e["name"] / "optimizer.pt").is_file() for e in read_json(out / "pretrain.json")["checkpoints"])


def test_fresh_run_is_deterministic(world, micro_run, tmp_path):
    again = pretrain_model(world, tmp_path / "again", MICRO, progress=False)
    assert_same_parameters(load_checkpoint(final_checkpoint(again)).model,
                           load_checkpoint(final_checkpoint(micro_run)).model)


def test_rerun_reuses_finished_run_and_refuses_other_settings(world, micro_run):
    before = (final_checkpoint(micro_run) / COMPLETE_MARKER).read_text()
    assert pretrain_model(world, micro_run, MICRO, progress=False) == micro_run
    assert (final_checkpoint(micro_run) / COMPLETE_MARKER).read_text() == before
    with pytest.raises(ArtifactError, match="other settings"):
        pretrain_model(world, micro_run, PretrainConfig.preset("micro", seed=7), progress=False)


def test_partial_or_corrupted_checkpoint_raises_artifact_error(micro_run, tmp_path):
    source = final_checkpoint(micro_run)

    def copy(name):
        return Path(shutil.copytree(source, tmp_path / name))

    unmarked = copy("unmarked")
    (unmarked / COMPLETE_MARKER).unlink()
    with pytest.raises(ArtifactError, match=r"unmarked.*incomplete.*re-run pretraining"):
        load_checkpoint(unmarked)

    tampered = copy("tampered")
    with open(tampered / "model.safetensors", "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ArtifactError, match=r"tampered.*corrupted.*re-run pretraining"):
        load_checkpoint(tampered)

    no_optimizer = copy("no_optimizer")
    (no_optimizer / "optimizer.pt").unlink()
    with pytest.raises(ArtifactError, match=r"no_optimizer.*missing optimizer\.pt"):
        load_checkpoint(no_optimizer)

    with pytest.raises(ArtifactError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_load_hf_causal_lm_from_local_dir(micro_run, tmp_path):
    ckpt = load_checkpoint(final_checkpoint(micro_run), with_optimizer=False)
    ckpt.model.save_pretrained(tmp_path / "hf")
    ckpt.tokenizer.save_pretrained(tmp_path / "hf")
    hf = load_hf_causal_lm(tmp_path / "hf", local_files_only=True)
    assert hf.optimizer is None and hf.learning_rate is None
    assert_same_parameters(ckpt.model, hf.model)
    ids = torch.tensor([hf.tokenizer.encode("The capital of", add_special_tokens=False)])
    assert torch.equal(ckpt.model(ids).logits, hf.model(ids).logits)
    with pytest.raises(ArtifactError, match="could not load"):
        load_hf_causal_lm(tmp_path / "missing", local_files_only=True)


# --------------------------------------------------------------------------- evaluation

def test_evaluate_queries_probabilities_and_buckets(world, micro_run):
    ckpt = load_checkpoint(final_checkpoint(micro_run), with_optimizer=False)
    queries = read_jsonl(world / "queries.jsonl")
    records = evaluate_queries(ckpt.model, ckpt.tokenizer, queries, batch_size=5)
    assert [r["example_id"] for r in records] == [q["example_id"] for q in queries]
    for record in records:
        assert 0.0 < record["target_prob"] <= 1.0
        assert isinstance(record["greedy_correct"], bool)
    # Batching and padding do not change the scores.
    single = score_targets(ckpt.model, ckpt.tokenizer, [q["prompt"] for q in queries],
                           [q["target"] for q in queries], batch_size=1)
    for record, (log_prob, correct) in zip(records, single):
        assert record["target_logprob"] == pytest.approx(log_prob, abs=1e-4)
        assert record["greedy_correct"] == correct
    # Saved with the checkpoint, and summarized per frequency bucket.
    saved = read_jsonl(final_checkpoint(micro_run) / "query_eval.jsonl")
    assert [r["example_id"] for r in saved] == [r["example_id"] for r in records]
    table = accuracy_by_bucket(saved)
    assert list(table.index) == [0, 1, 2, 3, 4, 5, "all"]
    assert table.loc["all", "n"] == len(queries)


def test_memorized_fact_is_greedy_correct(tmp_path):
    docs = [{"doc_id": f"d{i}", "text": "The capital of Country0 is Vokamu.", "fact_ids": ["fact0"]}
            for i in range(8)]
    world = write_world(tmp_path / "one_fact", n_facts=1, docs=docs)
    queries = read_jsonl(world / "queries.jsonl")
    queries[0]["target"] = "Vokamu"
    with open(world / "queries.jsonl", "w") as fh:
        fh.write(json.dumps(queries[0]) + "\n")
    config = PretrainConfig.preset("micro", optimizer="adamw", lr=1e-2, batch_size=8, max_steps=60,
                                   vocab_size=300, checkpoint_fractions=(1.0,))
    run = pretrain_model(world, tmp_path / "run", config, progress=False)
    (record,) = read_jsonl(final_checkpoint(run) / "query_eval.jsonl")
    assert record["greedy_correct"] is True
    assert record["target_prob"] > 0.5
