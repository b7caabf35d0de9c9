"""The jobs a sweep planned that left no finished run record.

Hydra writes ``multirun.yaml`` into a sweep's directory (``results/<table>/``)
when the sweep starts: the grid (``hydra.sweeper.params`` and the command
line's overrides) and where its configs came from. A sweep that was killed,
timed out on a cluster or is still running leaves some of its jobs without a
record, and tables made from that directory would silently lack their rows or
points. :func:`unfinished_jobs` expands the grid as Hydra's basic sweeper
does, composes each job's config to find its run directory, and names the
jobs whose directory holds no record. A job with a record that did not finish
is already reported as failed, so it is not named again, and a sharded run's
map jobs (``shard.index``) write no record: their reduce names missing shards.

Only the last sweep launched into a directory is checked (each launch
rewrites ``multirun.yaml``). A sweep whose configs cannot be composed here
(its config directory is gone, a custom config) is named as unchecked, never
passed over in silence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..experiment.record import METRICS_FILE

MULTIRUN_FILE = "multirun.yaml"
#: The package's sweep configs: where a sweep's ``--config-dir`` is looked for when the
#: path it ran from is not on this machine (records copied from a cluster).
PACKAGED_SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


@dataclass(frozen=True)
class Unfinished:
    """A sweep's planned job with no run record (``job``), or a sweep that could not be
    checked (``job`` None, ``reason`` why)."""

    sweep: str
    job: str | None
    reason: str

    def line(self) -> str:
        if self.job is None:
            return f"{self.sweep}: not checked ({self.reason})"
        return f"{self.sweep}: {self.job} ({self.reason})"


def unfinished_jobs(results: str | Path) -> list[Unfinished]:
    """Every sweep directory under ``results`` (one with ``multirun.yaml``): its planned
    jobs that have no run record, in the sweep's order."""
    root = Path(results)
    out: list[Unfinished] = []
    for path in sorted(root.rglob(MULTIRUN_FILE)):
        sweep = path.parent.relative_to(root).as_posix() if path.parent != root else "."
        try:
            jobs = planned_jobs(path)
        except Exception as exc:  # noqa: BLE001 - any failure to re-plan is said, not raised
            out.append(Unfinished(sweep, None, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
            continue
        for overrides, table, run_dir in jobs:
            # A job records under its own table's directory, which is the sweep's unless
            # the sweep swept `table` itself.
            places = [path.parent / run_dir, path.parent.parent / table / run_dir]
            if not any((place / METRICS_FILE).is_file() for place in places):
                out.append(Unfinished(sweep, " ".join(overrides), f"no run record in {run_dir}/"))
    return out


def planned_jobs(multirun: Path) -> list[tuple[list[str], str, str]]:
    """(the job's sweep overrides, its table, its run directory's name) for every job of
    the sweep whose ``multirun.yaml`` this is."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ..experiment.compose import CONF_DIR, register

    register()  # the resolvers a sweep's params use (ts_rows)
    saved = OmegaConf.load(multirun)
    hydra = saved.hydra
    target = hydra.sweeper.get("_target_", "")
    if target != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        raise ValueError(f"its sweeper {target!r} is not Hydra's basic sweeper, whose grid this re-plans")
    params = hydra.sweeper.get("params") or {}
    # As the basic sweeper does: the config's params, then the command line's, a later
    # key replacing an earlier one; the product of their values is the job list.
    lines = [f"{key}={value}" for key, value in params.items()] + list(hydra.overrides.task)
    parsed = OverridesParser.create().parse_overrides(lines)
    batches = BasicSweeper.split_arguments(parsed, None)
    jobs = [job for batch in batches for job in batch]
    swept = {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()} | set(params)

    config_name = hydra.job.config_name
    given = [s.path for s in hydra.runtime.config_sources if s.provider == "command-line" and s.schema == "file"]
    config_dir = Path(given[0]) if given else CONF_DIR
    if not config_dir.is_dir():
        if given and (PACKAGED_SWEEPS / f"{config_name}.yaml").is_file():
            config_dir = PACKAGED_SWEEPS
        else:
            raise FileNotFoundError(f"its config directory {str(config_dir)!r} is not on this machine")
    search = [] if config_dir == CONF_DIR else ["hydra.searchpath=[pkg://trackstar.conf]"]
    # The job's directory as the sweep named it (hydra.sweep.subdir, unresolved), resolved
    # against the job's own config.
    subdir = OmegaConf.to_container(hydra.sweep, resolve=False)["subdir"]
    out = []
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name=config_name, overrides=[*search, *job])
            if OmegaConf.select(cfg, "shard.index") is not None:
                continue  # a shard's map step writes features, no record (its reduce names missing shards)
            OmegaConf.set_struct(cfg, False)
            cfg["_planned_subdir"] = subdir
            name = str(cfg["_planned_subdir"])
            shown = [o for o in job if o.split("=", 1)[0].lstrip("+~") in swept]
            out.append((shown, Path(str(cfg.table)).name, name))
    return out
