"""The import contracts of pyproject.toml ([tool.importlinter]): a wrong arrow fails the tests, and so CI."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_the_import_contracts_hold():
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout, out.stdout


def test_importing_the_engine_loads_no_training_or_checkpoint_code():
    """The attribution engine's import stays light: the model, training and checkpoint code of trackstar.lm,
    and transformers' trainer utilities (with peft and bitsandbytes where installed), load only when used.
    Loading them all cost ~200 MB of peak RSS and ~5 s of every process that only extracts features."""
    heavy = ["trackstar.lm.checkpoint", "trackstar.lm.pretrain", "trackstar.lm.models",
             "transformers.optimization", "transformers.trainer_utils", "peft"]
    code = f"import sys, trackstar.attribution; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"import trackstar.attribution loaded {out.stdout.strip()}"


def test_the_command_line_answers_help_without_the_stages():
    """`trackstar --help` (and a mistyped option) must not wait for torch, transformers, pandas or scipy:
    the parser reads only names (trackstar.lm.presets); each command imports its stages. Importing them at
    the top made `trackstar --help` take 5.7 s on an idle 2-core machine (13 s beside a running job)."""
    heavy = ["torch", "transformers", "pandas", "scipy", "trackstar.lm.models", "trackstar.experiment.cell"]
    code = ("import sys, contextlib, io, trackstar.cli as cli\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    cli.main(['--help'])\n"
            "assert 'scale-study' in out.getvalue()\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"trackstar --help loaded {out.stdout.strip()}"


def test_the_presets_are_the_ones_the_model_and_optimizer_code_use():
    from trackstar.lm import models, optim, presets

    assert models.MODEL_SIZES is presets.MODEL_SIZES and models.FAMILIES is presets.FAMILIES
    assert optim.OPTIMIZERS is presets.OPTIMIZERS
    assert set(optim.DEFAULT_HYPERPARAMETERS) == set(presets.OPTIMIZERS)
