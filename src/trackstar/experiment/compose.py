"""The config tree's registrations and composing a config without a Hydra app.

:func:`register` puts the typed schema in Hydra's ConfigStore and the
resolvers the config files use (``ts_run_id``: a run's id; ``ts_table``: the
table's directory name, refused unless plain; ``ts_results``: results_dir, checked
writable; ``ts_rows``: a
shared list of method rows for a sweep's ``method`` axis). ``trackstar-run``
calls it before Hydra starts; :func:`compose_config` before composing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ..io import ArtifactError, ensure_writable_dir
from ..sweeps import method_rows
from .ids import run_id, table_name
from .schema import register as register_schema

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def register() -> None:
    """Register the schema and the resolvers (idempotent)."""
    register_schema()
    OmegaConf.register_new_resolver("ts_run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("ts_table", table_name, replace=True)
    OmegaConf.register_new_resolver("ts_results", writable_results, replace=True)
    OmegaConf.register_new_resolver("ts_rows", lambda name: ",".join(method_rows(name)), replace=True)


def writable_results(path: str) -> str:
    """``path`` once it is a directory this process can write to (the ``ts_results``
    resolver of the run directories in config.yaml: checked before Hydra makes them,
    so a read-only or misplaced results_dir is one clear message, not a traceback)."""
    try:
        ensure_writable_dir(path, "results_dir")
    except ArtifactError as exc:
        raise ValueError(str(exc)) from None
    return path


def compose_config(overrides: Sequence[str] = (), config_name: str = "config", config_dir: str | Path | None = None) -> DictConfig:
    """The resolved config of ``overrides`` without a Hydra app (for Python and the CLI);
    ``config_dir`` (e.g. the sweeps) is searched before the package's config tree."""
    register()
    search = []
    if config_dir is None:
        config_dir = CONF_DIR
    else:
        search = ["hydra.searchpath=[pkg://trackstar.conf]"]
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*search, *overrides], return_hydra_config=False)
