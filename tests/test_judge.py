"""The NLI judge: mechanics on a tiny entailment model saved locally (no hub)."""

import json

import pytest

from trackstar.evaluation.judge import JudgeError, NLIJudge


def _tiny_nli(path, labels=("contradiction", "entailment", "neutral")):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "capital", "of", "is", "a", "city"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def nli_model(tmp_path_factory):
    return _tiny_nli(tmp_path_factory.mktemp("nli") / "model")


def test_scores_are_entailment_probabilities_batched_and_cached(nli_model, tmp_path):
    pairs = [("The capital of France is Paris.", "The capital of France is Paris"),
             ("A city of lights.", "The capital of Italy is Rome"), ("x", "y")]
    judge = NLIJudge(nli_model, batch_size=2, cache_dir=tmp_path, progress=False)
    assert judge.entailment == 1  # found by its name
    first = judge.scores(pairs)
    assert all(0 < s < 1 for s in first) and len(set(first)) > 1
    calls = []
    judge.model.forward = lambda *a, **kw: calls.append(1)  # a cached pair never reaches the model
    assert judge.scores(list(reversed(pairs))) == list(reversed(first)) and not calls
    again = NLIJudge(nli_model, cache_dir=tmp_path, progress=False)  # another job reads the cache
    again.model.forward = lambda *a, **kw: calls.append(1)
    assert again.scores(pairs) == first and not calls


def test_a_sentence_transformers_cross_encoder_directory_is_a_judge(nli_model, tmp_path):
    from sentence_transformers import CrossEncoder

    CrossEncoder(nli_model).save(str(tmp_path / "ce"))
    pairs = [("The capital of France is Paris.", "The capital of France is Paris")]
    assert NLIJudge(str(tmp_path / "ce"), progress=False).scores(pairs) == \
        pytest.approx(NLIJudge(nli_model, progress=False).scores(pairs))


def test_a_model_without_an_entailment_label_is_refused(tmp_path):
    path = _tiny_nli(tmp_path / "sentiment", labels=("negative", "positive"))
    with pytest.raises(JudgeError, match=r"has labels \['negative', 'positive'\]; a judge needs exactly one"):
        NLIJudge(path)
    with pytest.raises(JudgeError, match="cannot be loaded"):
        NLIJudge(str(tmp_path / "nothing-here"))


def test_an_open_set_cell_judged_by_nli(nli_model, tmp_path):
    from trackstar.experiment import ConfigError, compose_config, run_cell, validate

    common = ["world=micro", "model=micro", "eval=open", "method=bm25", "progress=false", "logger=none",
              "eval.tail_patch=false", f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}"]
    record = run_cell(compose_config([*common, "eval.judge=nli", f"eval.judge_model={nli_model}"]))
    assert record.status == "finished" and "judge" in record.timings
    scores = [s for line in open(f"{record.run_dir}/retrievals.jsonl") for s in json.loads(line)["proponent_ais_scores"]]
    assert all(0 < s < 1 for s in scores) and len(set(scores)) > 1  # model probabilities, not the exact 0/1
    exact = run_cell(compose_config(common))
    assert exact.run_dir != record.run_dir  # the judge is part of the run's identity
    with pytest.raises(ConfigError, match="judges open-set passages"):
        validate(compose_config([*common, "eval=closed", "eval.judge=nli", f"eval.judge_model={nli_model}"]))
    with pytest.raises(ConfigError, match="needs eval.judge_model"):
        validate(compose_config([*common, "eval.judge=nli"]))
