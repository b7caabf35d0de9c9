"""The `trackstar` command end to end on the micro profile."""

from trackstar.cli import main


def test_quick_builds_world_pretrains_and_reports(tmp_path, capsys):
    args = ["--artifacts", str(tmp_path), "quick", "--profile", "micro", "--size", "micro", "--epochs", "2", "--tables", "",
            "--results", str(tmp_path / "res"), "--paper-tables", str(tmp_path / "tables")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "world micro (natural) seed=0" in out and "model gpt2-micro" in out
    assert "c4_frequency_bucket" in out and "accuracy" in out
    assert "closed-set BM25 MRR" in out  # the world card
    world, = (tmp_path / "models").iterdir()
    assert world.name.startswith("micro-natural-") and world.name.endswith("-s0")
    models = list(world.iterdir())
    assert len(models) == 1 and (models[0] / "pretrain.json").is_file()
    # A second run reuses both artifacts instead of rebuilding them.
    assert main(args) == 0
    assert list(world.iterdir()) == models


def test_quick_gives_its_world_style_to_every_sweep(tmp_path, monkeypatch):
    """A sweep with a world of its own (table_c1) keeps its profile but takes quick's style and knobs."""
    import trackstar.cli as cli

    calls = []
    monkeypatch.setattr(cli, "cmd_world", lambda args: tmp_path)
    monkeypatch.setattr(cli, "cmd_pretrain", lambda args, world: None)
    monkeypatch.setattr(cli, "_run_sweep", lambda name, overrides: calls.append((name, overrides)) or 0.0)
    monkeypatch.setattr(cli, "_tables", lambda *a: None)
    assert main(["--artifacts", str(tmp_path), "quick", "--style", "natural", "--knob", "pronoun_share=0.5",
                 "--tables", "table1,table_c1"]) == 0
    (_, table1), (_, table_c1) = calls
    for overrides in (table1, table_c1):
        assert "world.style=natural" in overrides and "world.natural.pronoun_share=0.5" in overrides
    assert "world.profile=tiny" in table1 and not any(o.startswith(("world.profile", "model=")) for o in table_c1)


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["--artifacts", str(tmp_path), "world", "--profile", "micro", "--seed", "-3"]) == 2
    assert "seed must be a non-negative integer" in capsys.readouterr().err
    assert main(["--artifacts", str(tmp_path), "pretrain", "--world", str(tmp_path / "nope")]) == 2
    assert "is not a built world" in capsys.readouterr().err


def test_score_reads_release_schema_files(tmp_path, capsys):
    from test_evaluation_metrics import FIXTURE

    from trackstar.io import write_jsonl

    write_jsonl(tmp_path / "retrievals.jsonl", FIXTURE)
    assert main(["score", str(tmp_path / "retrievals.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "4 queries scored (1 without a gold sentence left out)" in out
    assert f"mrr           {(1 / 3 + 0 + 1 / 2 + 1 / 11) / 4:.3f}" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"example_id": "x"}\n')
    assert main(["score", str(bad)]) == 2
    assert "lacks" in capsys.readouterr().err


def test_sweeps_run_one_after_another_in_this_process(tmp_path, capsys):
    """`trackstar quick` runs its sweeps in its own process: Hydra's state is cleared between
    them, each sweep writes its runs, and a sweep that fails is reported without stopping it."""
    from trackstar import cli

    common = [f"artifacts_dir={tmp_path / 'art'}", f"results_dir={tmp_path / 'res'}", "world=micro", "model=micro",
              "model.epochs=2", "eval.n_queries=2", "eval.tail_patch=false", "logger=none", "progress=false",
              "stage_threads=1"]
    cli._run_sweep("table_a3", [*common, "method.output_fn=loss,margin", "method.d=64"])  # over the sweep's own list
    cli._run_sweep("figure2_dim", [*common, "method.d=64"])
    runs = sorted(p.parent.parent.name for p in (tmp_path / "res").glob("*/*/metrics.json"))
    assert runs == ["figure2_dim", "table_a3", "table_a3"]
    cli._run_sweep("table_a3", [*common, "model=no_such_size"])
    assert "table_a3: the sweep exited with an error" in capsys.readouterr().err
