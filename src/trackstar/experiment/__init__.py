"""The experiment wing: one cell of a table as a plain function, and what it needs.

    from trackstar.experiment import compose_config, run_cell
    record = run_cell(compose_config(["method=bm25", "eval=open"]))

By concern: ``compose`` (the config tree's registrations, composing without a
Hydra app), ``schema`` (the typed config groups), ``settings`` (the groups as
the library's settings), ``validation`` (every check, before any work),
``ids`` (run ids, config ids, stage keys), ``stages`` (the cached stages),
``cell`` (``run_cell``: the stages of one cell in order), ``shard`` (a sharded
run's map step), ``run`` (``trackstar-run``, the Hydra shell), ``record`` (the
run record, the only thing the tables read), ``tracking`` (W&B), ``sanity``.

The names below are imported on first use, so that reading run records
(``trackstar.experiment.record``) does not load the stages.
"""

from importlib import import_module

_EXPORTS = {
    "compose_config": "compose", "register": "compose",
    "run_cell": "cell", "execute": "cell",
    "shard_job": "shard",
    "validate": "validation", "ConfigError": "validation",
    "config_id": "ids", "run_id": "ids", "default_run_dir": "ids",
    "RunRecord": "record", "read_record": "record",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
