"""The identity scheme (trackstar.identity): old runs keep their ids, new settings cannot slip in unlisted."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from trackstar.attribution.settings import AttributionSettings
from trackstar.experiment import compose_config, config_id, default_run_dir
from trackstar.experiment.ids import RUNTIME_KEYS
from trackstar.experiment.schema import (
    CorpusConf,
    CounterfactualConf,
    EvalConf,
    MethodConf,
    ModelConf,
    TrackStarConfig,
    WorldConf,
)
from trackstar.identity import IDENTITY_VERSION, LATER, later_keys, stable
from trackstar.retrieval import get_retriever, retriever_names
from trackstar.sweeps import METHOD_ROWS, SWEEPS_DIR, sweep_names

ROOT = Path(__file__).parents[1]

#: The settings each scope's identities held before any entry of LATER: frozen. A new
#: setting must either be listed in trackstar.identity.LATER or be added here on purpose
#: (which changes every id of that scope: say so in the commit).
VERSION_0 = {
    "run.world": {"profile", "seed"},
    "run.model": {"checkpoint", "checkpoint_fractions", "epochs", "family", "hf_name_or_path", "optimizer", "seed",
                  "size"},
    "run.method": {"batch_size", "block_diagonal", "curvature", "d", "damping", "lam", "model_dtype", "name",
                   "options", "output_fn", "projection", "seed", "unit_norm", "use_v"},
    "run.eval": {"bootstrap_resamples", "confidence", "corpus", "k", "n_queries", "tail_patch", "tail_patch_ks"},
    "run.counterfactual": {"enabled", "k", "loo_queries", "seed", "subset_fraction", "subsets"},
    "run.corpus": {"config", "judge", "max_docs", "name", "passage_words", "path", "source", "split", "streaming",
                   "text_field"},
    "run": {"world", "model", "method", "eval", "artifacts_dir"},
    "retriever.gradient": {"adam_mode", "batch_size", "block_diagonal", "chunk_rows", "curvature", "d", "damping",
                           "lam", "model_dtype", "output_fn", "padding_side", "params", "projection", "reduction",
                           "scorer", "seed", "storage_dtype", "unit_norm", "use_v", "v_estimate_batches"},
    "store": {"kind", "examples_hash", "model_id", "model_hash", "param_names", "layout", "d", "projection", "seed",
              "use_v", "adam_mode", "v_source", "output_fn", "reduction", "dtype", "row_ids"},
}

GROUPS = {"world": WorldConf, "model": ModelConf, "method": MethodConf, "eval": EvalConf,
          "counterfactual": CounterfactualConf, "corpus": CorpusConf}


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_config_setting_is_original_or_listed_as_later(group):
    assert _names(GROUPS[group]) - later_keys(f"run.{group}") == VERSION_0[f"run.{group}"]


def test_every_identity_bearing_group_is_original_or_listed_as_later():
    groups = _names(TrackStarConfig) - set(RUNTIME_KEYS)
    assert groups - later_keys("run") == VERSION_0["run"]


def test_every_attribution_setting_is_original_or_listed_as_later():
    assert _names(AttributionSettings) - {"k"} - later_keys("retriever.gradient") == VERSION_0["retriever.gradient"]


def test_every_feature_store_key_is_original_or_listed_as_later(checkpoint, tmp_path):
    from trackstar.attribution.api import TrackStar

    engine = TrackStar(checkpoint.model, checkpoint.tokenizer, AttributionSettings(d=64), work_dir=tmp_path)
    meta = engine._meta("train", [0, 1], None, "loss")
    assert set(meta) == VERSION_0["store"]  # float32: the later model_dtype stays out
    bf16 = TrackStar(checkpoint.model, checkpoint.tokenizer, AttributionSettings(d=64, model_dtype="bfloat16"),
                     work_dir=tmp_path)._meta("train", [0, 1], None, "loss")
    assert set(bf16) - VERSION_0["store"] == later_keys("store") == {"model_dtype"}


def test_the_scheme_is_versioned_oldest_first():
    versions = [entry.since for entry in LATER]
    assert versions == sorted(versions) and max(versions) == IDENTITY_VERSION and min(versions) >= 1
    assert len({(e.scope, e.key) for e in LATER}) == len(LATER)


def test_a_later_setting_enters_only_away_from_its_earlier_value():
    world = {"profile": "tiny", "seed": 0, "style": "templated", "natural": {"x": 1}, "path": None}
    assert stable("run.world", world) == {"profile": "tiny", "seed": 0}
    natural = {**world, "style": "natural"}
    assert stable("run.world", natural) == {"profile": "tiny", "seed": 0, "style": "natural", "natural": {"x": 1}}
    assert stable("run.world", {**natural, "profile": "release", "path": "/r"}) == {"profile": "release", "seed": 0,
                                                                                     "path": "/r"}
    assert stable("retriever.gradient", {"d": 8, "split": "balanced", "train_side": "optimizer_step"}) == {
        "d": 8, "train_side": "optimizer_step"}


def _committed_runs(provenance: Path) -> set[str]:
    return {r.rsplit("/", 1)[-1] for r in json.loads(provenance.read_text())["runs"]}


@pytest.mark.parametrize("tables, style", [("paper_tables", "natural"), ("paper_tables/templated", "templated")])
def test_the_committed_table1_runs_keep_their_ids(tables, style):
    """Every run behind a committed Table 1 (three model seeds, and the tail-patch oracle's
    run of seed 0 from the oracle sweep) gets the same directory today."""
    committed = _committed_runs(ROOT / tables / "table1.provenance.json")
    ids = set()
    for method in METHOD_ROWS["table1"]:
        for seed in (0, 1, 2):
            cfg = compose_config([f"method={method}", f"model.seed={seed}", f"world.style={style}"],
                                 config_name="table1", config_dir=SWEEPS_DIR)
            ids.add(default_run_dir(cfg).name)
    oracle = compose_config(["experiment=table1", "method=oracle_tail_patch", f"world.style={style}"],
                            config_name="oracle", config_dir=SWEEPS_DIR)
    ids.add(default_run_dir(oracle).name)
    assert ids == committed


def test_known_configs_keep_their_run_and_config_ids():
    """Anchors taken before the identity scheme moved to one place (trackstar.identity)."""
    known = {
        ("table1", "method=trackstar"): ("trackstar-closed-6a005260", "a06dfe1446eee6f6", "2a3275fc3f5f2fee"),
        ("table1", "method=trackstar world.style=templated"): ("trackstar-closed-785fc3a3", "49aa113ba47c1acc",
                                                               "eb6ed9ff200f2c40"),
        ("table1", "method=bm25 eval=open counterfactual.enabled=true model=micro world=micro"): (
            "bm25-open-d645c8b6", "fbaf0e8f989707f7", "5af1da0ec8e2c3d5"),
        ("table1", "method=trackstar method.model_dtype=bfloat16"): ("trackstar-closed-72e33fbd", "e7bf66afce470c08",
                                                                     "c14a2336ecadb571"),
        ("table_a4", "method=trackstar method.d=256"): ("trackstar-closed-64b7a218", "f8ae37f4bfe707d9",
                                                        "1a6b2e2c189cb758"),
    }
    for (sweep, overrides), expected in known.items():
        cfg = compose_config(overrides.split(), config_name=sweep, config_dir=SWEEPS_DIR)
        assert (default_run_dir(cfg).name, config_id(cfg), config_id(cfg, seeds=False)) == expected


def test_known_retriever_keys_are_unchanged():
    """A retrieval's cache key holds its retriever's key: these are from before the scheme moved."""
    from trackstar.io import config_hash

    known = {"trackstar": "0a3bf8a3acb5e5fa", "first_order": "04c2a3f3440b5bfe", "grad_cosine": "fee4def716ec28f8",
             "bm25": "8ad1a6bff5644c59"}
    assert {name: config_hash(get_retriever(name, {}, "closed").cache_key())[:16] for name in known} == known


def test_every_retriever_has_its_method_file_and_every_method_file_a_retriever():
    files = {p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")}
    assert files == set(retriever_names())
    for name in files:
        assert yaml.safe_load((ROOT / "conf" / "method" / f"{name}.yaml").read_text())["name"] == name


def test_sweeps_share_table1s_rows_instead_of_copying_them():
    literal = ",".join(METHOD_ROWS["table1"][:5])
    for name in sweep_names():
        text = (SWEEPS_DIR / f"{name}.yaml").read_text()
        assert literal not in text, f"sweeps/{name}.yaml spells out Table 1's rows: use ${{ts_rows:table1}}"
    cfg = compose_config(["method=exp3"], config_name="table_a6", config_dir=SWEEPS_DIR)
    assert cfg.method.name == "exp3"
