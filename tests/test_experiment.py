"""The Hydra layer: every config composes, bad configs fail before work, a multirun
writes run records and W&B offline runs, re-runs skip, failures are recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from trackstar.experiment import ConfigError, validate
from trackstar.sweeps import OPTIONAL_SWEEPS, SWEEPS_DIR, sweep_names
from trackstar.tables.aggregate import SOURCES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "trackstar" / "conf"
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


def _compose(name="config", overrides=(), config_dir=CONF):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_one_sweep_file_per_table_and_figure():
    """Every output's own tag has a sweep, and every sweep feeds some output."""
    names = sweep_names()
    assert names == [p.stem for p in sorted(SWEEPS, key=lambda p: (p.stem in OPTIONAL_SWEEPS, p.stem.startswith("figure"), p.stem))]
    assert names[0] == "table1"  # it builds the stages the others share
    assert {tags[0] for tags in SOURCES.values()} <= set(names)
    tags = {tag for tags in SOURCES.values() for tag in tags}
    # A sweep feeds the output of its own name, or (an optional one) writes runs of an existing tag.
    assert {_experiment(name) for name in names} <= tags
    assert {name for name in names if _experiment(name) != name} <= set(OPTIONAL_SWEEPS)


def _experiment(sweep: str) -> str:
    """The experiment a sweep file selects (the tag its runs get)."""
    defaults = OmegaConf.to_container(OmegaConf.load(SWEEPS_DIR / f"{sweep}.yaml").defaults)
    return next(d["override /experiment"] for d in defaults if isinstance(d, dict) and "override /experiment" in d)


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_grid_point_composes_and_validates(sweep):
    """Each value of each swept key composes against the schema and passes validation."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    grid = OmegaConf.load(sweep).hydra.sweeper.params
    parser = OverridesParser.create()
    # trackstar-run finds the root config in the package and the sweep file through
    # `--config-dir sweeps`; the compose API needs it the other way round.
    search = "hydra.searchpath=[pkg://trackstar.conf]"

    def values_of(key):
        override = parser.parse_override(f"{key}={grid[key]}")
        return list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(grid[key])]

    # A sweep over experiments (the oracle's: one run per table) tags each run with its own.
    tags = set(values_of("experiment")) if "experiment" in grid else {_experiment(sweep.stem)}
    with initialize_config_dir(config_dir=str(sweep.parent), version_base="1.3"):
        for key in grid:
            for value in values_of(key):
                cfg = compose(config_name=sweep.stem, overrides=[search, f"{key}={value}"])
                assert cfg.table in tags
                validate(cfg)


def test_every_group_option_composes():
    for group in ("world", "model", "method", "eval", "logger", "experiment", "ablation", "regime"):
        for option in sorted((CONF / group).glob("*.yaml")):
            overrides = [f"{group}={option.stem}"]
            if option.stem == "hf":
                overrides.append("model.hf_name_or_path=/some/local/model")
            if group == "world" and option.stem == "release":
                overrides.append(f"world.path={ROOT / 'tests' / 'fixtures' / 'release'}")
            if option.stem == "medium":
                # The strict equal split needs d divisible by medium's 24 matrices; the default does not.
                with pytest.raises(ConfigError, match="method.d=4096: .* divisible by 24"):
                    validate(_compose(overrides=[*overrides, "+method.options.split=equal"]))
            cfg = _compose(overrides=overrides)
            if group != "model" or option.stem != "hf":
                validate(cfg)


def test_open_set_experiment_and_defaults():
    cfg = _compose(overrides=["experiment=table2"])
    assert cfg.eval.corpus == "open" and cfg.table == "table2"
    default = _compose()
    assert (default.world.profile, default.model.size, default.method.name) == ("tiny", "tiny", "trackstar")


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.bogus=1", "Key 'bogus' not in 'MethodConf'"),
        ("method.d=abc", "could not be converted to Integer"),
        ("eval.k=ten", "could not be converted to Integer"),
        ("world.extra=1", "Key 'extra' not in 'WorldConf'"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_composition(override, message):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(overrides=[override])
    assert message in str(info.value.__cause__)


@pytest.mark.parametrize(
    "override, match",
    [
        ("eval.corpus=foo", "eval.corpus"),
        ("method.lam=3", "lam"),
        ("model.checkpoint=0.3", "model.checkpoint"),
        ("model.size=huge", "huge"),
        ("world.seed=-1", "seed"),
        ("logger.mode=sometimes", "logger.mode"),
        ("eval.k=3", "eval.k"),
    ],
)
def test_bad_values_fail_before_any_work(override, match):
    with pytest.raises(ValueError, match=match):
        validate(_compose(overrides=[override]))


def _run(args, tmp_path, env_extra=None):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true", **(env_extra or {})}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "trackstar.experiment.run", *args,
           f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "progress=false",
           "world=micro", "model=micro", "method.d=64", "eval.n_queries=6"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


@pytest.mark.slow
def test_multirun_records_wandb_skip_and_failure(tmp_path):
    out = _run(["-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", "table2", "method=bm25,grad_cosine"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted((tmp_path / "res" / "table2").glob("*/metrics.json"))
    assert len(runs) == 2
    for path in runs:
        record = json.loads(path.read_text())
        assert record["status"] == "finished", record.get("traceback")
        assert record["table"] == "table2" and record["corpus"] == "open"
        assert {"mrr", "recall@10", "tail_patch@10"} <= set(record["metrics"])
        assert record["metrics"]["mrr"]["ci_low"] <= record["metrics"]["mrr"]["mean"] <= record["metrics"]["mrr"]["ci_high"]
        assert (path.parent / "config.yaml").is_file() and (path.parent / "retrievals.jsonl").is_file()
        assert record["wandb"]["mode"] == "offline"
        wandb_runs = list(Path(record["run_dir"]).glob("wandb/offline-run-*"))
        assert len(wandb_runs) == 1 and list(wandb_runs[0].glob("*.wandb"))
    again = _run(["-m", "--config-dir", str(ROOT / "sweeps"), "--config-name", "table2", "method=bm25,grad_cosine"], tmp_path)
    assert again.stdout.count("[skip]") == 2
    failing = _run(["-m", "method=bm25", "model=hf", "model.hf_name_or_path=/nonexistent/model,/also/missing"], tmp_path)
    assert failing.returncode == 0
    failed = [json.loads(p.read_text()) for p in (tmp_path / "res" / "adhoc").glob("*/metrics.json")]
    assert len(failed) == 2 and all(r["status"] == "failed" and r["error"] for r in failed)


def test_scale_study_plans_compose_and_name_what_they_run():
    """`trackstar scale-study` (and `--full-world`, `--sizes`) runs sweeps whose
    overrides compose; the full-world plan is the paper regime on the full world."""
    from trackstar.cli import SCALE_STUDY, scale_study_plan

    assert scale_study_plan(False, None) == list(SCALE_STUDY)
    full = scale_study_plan(True, None)
    assert [name for name, _ in full] == ["table1", "table_a5", "figure2_scale"]
    assert all("regime=paper_full" in extra for _, extra in full)
    assert full[-1][1][-1] == "model=micro,tiny,small"
    assert scale_study_plan(False, "medium")[-1] == ("scale_study", ("model=medium",))
    assert scale_study_plan(True, "tiny, micro,tiny")[-1][1][-1] == "model=tiny,micro"
    with pytest.raises(ValueError, match="--sizes 'huge'"):
        scale_study_plan(False, "huge")
    search = "hydra.searchpath=[pkg://trackstar.conf]"
    with initialize_config_dir(config_dir=str(SWEEPS_DIR), version_base="1.3"):
        for name, extra in full:
            one = [e.split(",")[0] for e in extra]  # the first value of a swept key
            cfg = compose(config_name=name, overrides=[search, *one])
            validate(cfg)
            assert cfg.world.profile == "full" and cfg.model.epochs == 2 and cfg.eval.n_queries == 300
