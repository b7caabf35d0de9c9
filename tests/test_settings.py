"""One home per setting: the run config's groups and the CLI's flags agree with the library's dataclasses."""

import dataclasses

import pytest

from trackstar.attribution.settings import AttributionSettings
from trackstar.cli import build_parser, corpus_flags, _corpus
from trackstar.evaluation.counterfactual import CounterfactualSettings
from trackstar.experiment import compose_config
from trackstar.experiment.schema import CorpusConf, CounterfactualConf, MethodConf, ModelConf
from trackstar.experiment.settings import corpus_spec, counterfactual_settings, pretrain_config
from trackstar.lm.config import PretrainConfig
from trackstar.world.corpus import CorpusSpec


def _fields(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def test_the_corpus_group_is_the_corpus_spec():
    assert _fields(CorpusConf) == _fields(CorpusSpec)


def test_the_counterfactual_group_is_its_settings_and_a_switch():
    assert _fields(CounterfactualConf) == {"enabled": False, **_fields(CounterfactualSettings)}


def test_every_method_setting_is_an_attribution_setting():
    shared = set(_fields(MethodConf)) - {"name", "options"}
    assert shared <= set(_fields(AttributionSettings)), shared - set(_fields(AttributionSettings))


def test_the_model_group_feeds_every_pretraining_field_it_names():
    own = {"size", "checkpoint", "hf_name_or_path", "optimizer_state", "learning_rate", "adapter"}
    assert set(_fields(ModelConf)) - own <= set(_fields(PretrainConfig))
    cfg = compose_config(["model.epochs=3", "model.seed=4", "model.optimizer=adamw"])
    recipe = pretrain_config(cfg.model)
    assert (recipe.epochs, recipe.seed, recipe.optimizer, recipe.family) == (3, 4, "adamw", cfg.model.family)


def test_every_corpus_setting_has_its_cli_flag_with_the_same_default():
    parser = build_parser()
    args = parser.parse_args(["world", "--corpus-source", "jsonl", "--corpus-path", "x.jsonl"])
    assert [f.name for f, _, _ in corpus_flags()] == list(_fields(CorpusSpec))
    spec = _corpus(args)
    assert spec == CorpusSpec(source="jsonl", path="x.jsonl")
    assert parser.parse_args(["world"]).corpus_source is None and _corpus(parser.parse_args(["world"])) is None


def test_every_corpus_flag_reaches_its_setting(tmp_path):
    values = {"source": "jsonl", "path": str(tmp_path / "c.jsonl"), "name": "n", "config": "c", "split": "dev",
              "text_field": "body", "max_docs": 7, "streaming": True, "passage_words": 50, "judge": "exact"}
    argv = ["world"]
    for f, flag, _ in corpus_flags():
        argv += [flag] if f.name == "streaming" else [flag, str(values[f.name])]
    assert dataclasses.asdict(_corpus(build_parser().parse_args(argv))) == {**values, "path": values["path"]}


def test_model_flags_default_to_the_model_group():
    args = build_parser().parse_args(["pretrain", "--world", "w"])
    model = ModelConf()
    assert (args.family, args.optimizer, args.model_seed) == (model.family, model.optimizer, model.seed)


def test_the_run_config_builds_the_library_settings_by_keyword():
    cfg = compose_config(["corpus.source=jsonl", "corpus.path=x.jsonl", "corpus.max_docs=3",
                          "counterfactual.enabled=true", "counterfactual.subsets=8"])
    assert corpus_spec(cfg).max_docs == 3 and corpus_spec(compose_config([])) is None
    assert counterfactual_settings(cfg) == CounterfactualSettings(subsets=8)
    assert counterfactual_settings(compose_config([])) is None


@pytest.mark.parametrize("flag", ["--corpus-source", "--corpus-judge"])
def test_choice_flags_refuse_unknown_values(flag):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["world", flag, "nope"])
