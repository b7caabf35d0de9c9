"""Which runs may stand in one table: one world, one model per model config, one setting per row.

A table's rows are compared query by query (the paired companions pair query
ids, which are positions in a world), so a table over runs of two worlds, or of
two models that were configured alike but trained apart, would pair unrelated
queries and still print numbers. And a row shows only the settings its labels
name: two runs that land in one row but differ in another setting (an fp16 run
beside the float32 one) must not be reduced to "the latest" without a word.
These checks refuse such inputs with the runs and the differing settings named.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator, Mapping

import pandas as pd

from .runs import TablesError

#: What to do about runs that cannot share a table.
SPLIT_HINT = ("Give each its own results directory (results_dir=...) and compare them with "
              "`trackstar-tables --results DIR --compare LABEL=OTHER_DIR`, or move the runs you do not want "
              "out of the results root.")


def _flat(value, prefix: str = "") -> Iterator[tuple[str, object]]:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _flat(inner, f"{prefix}{key}.")
    else:
        yield prefix[:-1], value


def differences(settings: Mapping[str, str]) -> list[str]:
    """``key: value (runs…); other value (runs…)`` for each key on which the canonical JSON
    ``settings`` (run -> setting) disagree."""
    flats = {run: dict(_flat(json.loads(s))) for run, s in settings.items()}
    out = []
    for key in sorted(set().union(*flats.values())):
        by_value: dict[str, list[str]] = defaultdict(list)
        for run, flat in flats.items():
            by_value[json.dumps(flat.get(key, "<unset>"), sort_keys=True, default=str)].append(run)
        if len(by_value) > 1:
            out.append(f"{key}: " + "; ".join(f"{value} ({', '.join(runs)})" for value, runs in by_value.items()))
    return out


def _one_per_run(runs: pd.DataFrame, column: str) -> dict[str, str]:
    """The first run of each distinct value of ``column`` -> that value."""
    firsts = runs.dropna(subset=[column]).drop_duplicates(column)
    return dict(zip(firsts["run"], firsts[column]))


def check_comparable(name: str, runs: pd.DataFrame) -> None:
    """Refuse runs of ``name`` that are of several worlds (their settings, or their content
    for one seed) or of several checkpoints for one model config."""
    if runs.empty or "world_setting" not in runs:
        return
    worlds = _one_per_run(runs, "world_setting")
    if len(worlds) > 1:
        raise TablesError(
            f"{name}: its runs are of {len(worlds)} different worlds ({' | '.join(differences(worlds))}); a table "
            f"compares its rows query by query, so all of them must come from one world (seeds aside). {SPLIT_HINT}")
    _one_value_per_group(name, runs, "world_hash", runs["world_seed"].astype(str),
                         "runs of world seed {group} were made on {n} worlds with different content ({listed}): the "
                         "world was rebuilt by other code between them")
    _one_value_per_group(name, runs, "checkpoint_hash", runs["model_config"] + runs["world_hash"].astype(str),
                         "runs configured with the same model on the same world used {n} different checkpoints "
                         "({listed}): the model was trained again, by other code, between them")


def _one_value_per_group(name: str, runs: pd.DataFrame, column: str, groups: pd.Series, problem: str) -> None:
    known = runs[column].notna()
    for group, same in runs[known].groupby(groups[known], sort=True):
        if same[column].nunique() > 1:
            listed = "; ".join(f"{value[:12]} ({', '.join(g['run'])})" for value, g in same.groupby(column))
            raise TablesError(f"{name}: " + problem.format(group=group, n=same[column].nunique(), listed=listed)
                              + ". Re-run the older runs (remove their run directories and run their sweep again) "
                              "so that every row reads one world and one model.")


def check_one_setting_per_row(name: str, row: str, settings: Mapping[str, str]) -> None:
    """Refuse runs that share table row ``row`` but differ in a setting (seeds aside):
    ``settings`` maps the latest run of each setting to its canonical setting."""
    found = differences(settings)
    if found:
        raise TablesError(
            f"{name}: row {row!r} would take one of {len(settings)} runs that differ in settings its labels do not "
            f"show ({' | '.join(found)}); a row holds one setting. {SPLIT_HINT}")
