"""The `trackstar` command end to end on the micro profile."""

from trackstar.cli import main


def test_quick_builds_world_pretrains_and_reports(tmp_path, capsys):
    args = ["--artifacts", str(tmp_path), "quick", "--profile", "micro", "--size", "micro", "--epochs", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "world micro seed=0" in out and "model gpt2-micro" in out
    assert "c4_frequency_bucket" in out and "accuracy" in out
    models = list((tmp_path / "models" / "micro-s0").iterdir())
    assert len(models) == 1 and (models[0] / "pretrain.json").is_file()
    # A second run reuses both artifacts instead of rebuilding them.
    assert main(args) == 0
    assert list((tmp_path / "models" / "micro-s0").iterdir()) == models


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["--artifacts", str(tmp_path), "world", "--profile", "micro", "--seed", "-3"]) == 2
    assert "seed must be a non-negative integer" in capsys.readouterr().err
    assert main(["--artifacts", str(tmp_path), "pretrain", "--world", str(tmp_path / "nope")]) == 2
    assert "is not a built world" in capsys.readouterr().err
