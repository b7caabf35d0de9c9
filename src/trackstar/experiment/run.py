"""``trackstar-run``: the Hydra shell around :func:`~.cell.run_cell`, one job per cell.

    trackstar-run method=bm25 eval=open
    trackstar-run -m method=trackstar method.lam=0.5,0.9,auto
    trackstar-run -m --config-dir sweeps --config-name table1
    trackstar-run -m method=trackstar shard.count=3 shard.index=0,1,2   # sharded extraction (map)
    trackstar-run method=trackstar shard.count=3                        # ... then scoring (reduce)

Hydra composes the config, picks the run directory and launches the jobs of a
multirun (sequentially, or in parallel with ``hydra/launcher=parallel``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ..errors import debug_requested, describe_error
from .cell import run_cell
from .compose import register, writable_results
from .ids import table_name
from .record import ATTEMPTS_DIR
from .shard import shard_job
from .validation import ConfigError


# The schema and resolvers the config files name. At import, not in main(): the
# joblib and submitit launchers' workers import this module to unpickle the job
# function, then resolve the same config (its run directory names ts_run_id).
register()


def main(argv: list[str] | None = None) -> None:
    """``trackstar-run``: the values that name the run directories are checked first
    (Hydra makes those before any job starts, and reports a failure there as a
    traceback), then Hydra runs the jobs."""
    for problem in _directory_problems(sys.argv[1:] if argv is None else argv):
        raise SystemExit(f"trackstar-run: invalid config: {problem}")
    # The parallel launcher's workers inherit this: a worker that takes its first job after
    # this process is gone can tell (its parent is then another process).
    os.environ[SWEEP_PID_ENV] = str(os.getpid())
    hydra_main()


def _directory_problems(argv: list[str]) -> list[str]:
    """What is wrong with the ``table=`` and ``results_dir=`` values on the command line
    (each value of a sweep's comma list)."""
    problems = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in ("table", "results_dir") or value.startswith(("${", "choice(", "range(", "glob(")):
            continue
        for item in value.split(","):
            try:
                table_name(item) if key == "table" else writable_results(item)
            except ValueError as exc:
                problems.append(str(exc))
    return problems


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    if multirun and multiprocessing.current_process().name != "MainProcess":
        die_with_parent()  # a parallel launcher's worker: never outlive the sweep
    group = f"{cfg.table}:{Path(hc.sweep.dir).name}" if multirun else cfg.table
    if multirun and cfg.device == "auto":
        cfg.device = job_device(hc.job.num)
    run_dir = Path(hc.runtime.output_dir)
    try:
        if cfg.shard.index is not None:  # the map step of a sharded run: features only, no record
            shard_job(cfg)
            return
        run_cell(cfg, run_dir, multirun=multirun, wandb_group=group)
    except ConfigError as exc:
        raise SystemExit(f"trackstar-run: invalid config: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - one clear message; the record keeps the traceback
        if debug_requested():
            raise
        attempts = run_dir / ATTEMPTS_DIR
        where = (f"\n  this attempt's record, with the traceback, is in {attempts}/ (HYDRA_FULL_ERROR=1 shows it here)"
                 if attempts.is_dir() and any(attempts.iterdir()) else "")
        raise SystemExit(f"trackstar-run: error: {describe_error(exc)}{where}") from None


_WATCHED: set[int] = set()
#: The pid of the ``trackstar-run`` process that started the sweep (set by :func:`main`).
SWEEP_PID_ENV = "TRACKSTAR_SWEEP_PID"


def _gone(parent: int) -> None:
    logging.getLogger("trackstar").error("the sweep's main process %d is gone: this worker exits", parent)
    os._exit(1)


def die_with_parent(poll_s: float = 1.0) -> None:
    """Exit this worker process when its parent (the sweep's main process) is gone.

    A worker of ``hydra/launcher=parallel`` whose main process was killed (kill -9, a
    lost session) would otherwise finish its job, and take the next, for minutes,
    holding the compute slot a re-run waits for. Its stages are atomic and resumable,
    so exiting at once loses nothing finished. Once per process (workers are reused).
    A worker that reads its first job only after the main process died (a job already
    in the pipe) finds another parent than the sweep's (``TRACKSTAR_SWEEP_PID``) and
    exits at once.
    """
    parent = os.getppid()
    sweep = os.environ.get(SWEEP_PID_ENV, "")
    if sweep.isdigit() and int(sweep) != parent:
        _gone(int(sweep))
    if parent in _WATCHED or parent <= 1:
        return
    _WATCHED.add(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        _gone(parent)

    threading.Thread(target=watch, name="trackstar-die-with-parent", daemon=True).start()


def job_device(job_num: int) -> str:
    """``auto`` for job ``job_num`` of a multirun: with several GPUs visible, job n takes
    GPU n mod count (parallel jobs on one machine each get their own); else ``auto``.
    Under SLURM each job sees only the GPU it was given, so this is ``cuda:0`` there."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"cuda:{job_num % count}" if count > 1 else "auto"


if __name__ == "__main__":
    main()
