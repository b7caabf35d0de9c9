"""The paper's tables (SPEC §3) from the runs DataFrame of :mod:`.runs`.

Each table takes the runs tagged with its name (the run's ``table`` field;
A.6 and A.7 fall back to the Table 1 runs), keys each run to a row, and reads
its metric columns. The runs of a table must be of one world and their rows of
one setting each (:mod:`.consistency` refuses anything else, naming the runs and
the settings). Two runs of one row whose settings agree (a config id can differ
without a result-bearing setting) keep the most recently finished one; the
superseded run is named in a warning and in the table's provenance. Runs of
one row key with different seeds are one row over seeds (:func:`over_seeds`).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from .consistency import check_comparable, check_one_setting_per_row
from .runs import TablesError

CURVATURE_LABELS = {"none": "none", "train": "R_train", "mix": "R_mix"}
OUTPUT_FN_ORDER = ("loss", "margin", "logit")
CORRECTNESS_GROUPS = (("True", "Correct"), ("False", "Incorrect"))


@dataclass(frozen=True)
class Column:
    """One metric column: its header, its flat metric key, and whether the paired
    companion compares rows on it (not for a baseline every row shares)."""

    header: str
    key: str
    paired: bool = True


MAIN_COLUMNS = (Column("MRR", "mrr"), Column("Recall@10", "recall@10"), Column("Tail-patch@10 (pp)", "tail_patch@10"))


@dataclass
class PaperTable:
    """A table ready to render: label columns, metric columns, one row per run."""

    name: str
    title: str
    labels: list[str]
    columns: list[Column]
    rows: pd.DataFrame
    note: str | None = None
    superseded: list[str] = field(default_factory=list)
    #: Per-query values of columns that no run record holds (a share of the oracle):
    #: column key -> row's run -> values indexed by example_id, for the paired companion.
    series: dict[str, dict[str, pd.Series]] = field(default_factory=dict)

    @property
    def runs(self) -> list[str]:
        """Every run behind the rows (all seeds of a row over seeds), each once: a figure
        shows a run in several panels (the final checkpoint is a size and a step point)."""
        seeds = self.rows["seed_runs"] if "seed_runs" in self.rows else [None] * len(self.rows)
        return list(dict.fromkeys(r for run, many in zip(self.rows["run"], seeds)
                                  for r in (many if isinstance(many, tuple) else (run,))))

    @property
    def commits(self) -> Counter:
        """Rows per commit, a run shown in several panels counted once."""
        return Counter(dict(zip(self.rows["run"], self.rows["git_commit"])).values())


def label_column(header: str) -> str:
    return f"label:{header}"


def method_label(run: pd.Series, corpora: int = 1) -> str:
    """The label the run gave its method, with the corpus when a table mixes both."""
    label = run["method_label"]
    return f"{label} ({run['corpus']} set)" if corpora > 1 else label


def lam_label(run: pd.Series) -> str:
    if run["curvature"] != "mix":
        return "—"  # λ only weighs R_train against R_eval in R_mix
    if run["lam"] == "auto":
        used = run.get("lam_used")
        return f"auto ({used:.3g})" if _is_number(used) else "auto"
    return f"{float(run['lam']):g}"


def regime_label(run: pd.Series) -> str:
    """The training regime of a run: its world and how many epochs its model saw
    (``preset``: the size preset's own, 4–10 over the tiny world)."""
    epochs = run.get("model_epochs")
    trained = "preset epochs" if epochs is None or (isinstance(epochs, float) and math.isnan(epochs)) else f"{int(epochs)} epochs"
    return f"{run['world_profile']} world, {trained}"


def yes_no(value) -> str:
    return "yes" if bool(value) else "no"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))


#: The run tags (the ``table`` of a run record) each output is built from, in
#: order of preference: a table without runs of its own borrows the next tag's.
SOURCES: dict[str, tuple[str, ...]] = {
    "table1": ("table1",),
    "table2": ("table2",),
    "table_a3": ("table_a3",),
    "table_a4": ("table_a4",),
    "table_a5": ("table_a5",),
    "table_a6": ("table_a6", "table1"),
    "table_a7": ("table_a7", "table1"),
    "table_c1": ("table_c1",),
    "figure2": ("figure2_dim", "table_a4", "figure2_scale"),
}


def select(runs: pd.DataFrame, table: str, fallback: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """Runs tagged ``table``, else those tagged ``fallback``; and a note saying which.

    ``fallback`` defaults to the next tag of ``SOURCES[table]``.
    """
    if fallback is None and len(SOURCES.get(table, ())) > 1:
        fallback = SOURCES[table][1]
    chosen = runs[runs["table"] == table]
    if chosen.empty and fallback is not None:
        chosen = runs[runs["table"] == fallback]
        if not chosen.empty:
            return chosen, f"No runs tagged {table}; built from the {fallback} runs."
    return chosen, None


def build_table(
    name: str,
    title: str,
    runs: pd.DataFrame,
    labels: dict[str, Callable[[pd.Series], str]],
    columns: list[Column],
    key: Callable[[pd.Series], tuple],
    note: str | None,
    strict: bool,
    world_lines: Callable[[pd.Series], str] | None = None,
) -> PaperTable | None:
    """One row per distinct ``key`` (sorted by it), labelled by ``labels``; None without runs.

    A label is stored as column ``label:<header>`` so that it never shadows a
    run field of the same name (Table A.4's ``d``). The runs must be of one world,
    or of one world per value of ``world_lines`` when the labels show it (Figure 2's
    training regimes).
    """
    if runs.empty:
        return None
    runs = runs.assign(_key=[key(r) for _, r in runs.iterrows()],
                       _seeds=[tuple(str(r.get(f)) for f in SEED_FIELDS) for _, r in runs.iterrows()],
                       # Seeds of one setting share their seedless id (records without one stand alone).
                       _setting=[r.get("seedless_id") if isinstance(r.get("seedless_id"), str) else r["run"]
                                 for _, r in runs.iterrows()])
    for _, same_world in (runs.groupby(runs.apply(world_lines, axis=1), sort=False) if world_lines else [(None, runs)]):
        check_comparable(name, same_world)
    ordered = runs.sort_values("finished", na_position="first", kind="stable")
    latest = ordered.groupby(["_key", "_setting", "_seeds"], sort=False).tail(1)
    for _, group in latest.groupby("_key", sort=False):
        if group["_setting"].nunique() > 1 and "setting" in group:
            per_setting = group.groupby("_setting", sort=False).tail(1)
            row = " / ".join(str(make(per_setting.iloc[-1])) for make in labels.values())
            check_one_setting_per_row(name, row, dict(zip(per_setting["run"], per_setting["setting"])))
    # Settings that agree on everything (a config id can differ without a result-bearing
    # setting: Table A.5's lam_auto and v_on_r_mix ablations resolve alike): the one whose run
    # finished last; the others are superseded.
    chosen = latest.groupby("_key", sort=False).tail(1)[["_key", "_setting"]]
    latest = latest.merge(chosen, on=["_key", "_setting"])
    superseded = sorted(set(runs["run"]) - set(latest["run"]))
    if superseded:
        message = (
            f"{name}: {len(superseded)} run(s) share a row with a later run and are left out: "
            f"{', '.join(superseded)}. Move them out of the results root to silence this."
        )
        if strict:
            raise TablesError(message + " (--strict is set)")
        warnings.warn(message, stacklevel=3)
    groups = [group for _, group in latest.groupby("_key", sort=False)]
    # From records, so that each column gets one dtype and the frame one block per dtype.
    merged = pd.DataFrame.from_records([(over_seeds(g, columns) if len(g) > 1 else g.iloc[0]).to_dict() for g in groups])
    order = sorted(range(len(merged)), key=lambda i: merged["_key"].iloc[i])
    rows = merged.iloc[order].reset_index(drop=True)
    made = {label_column(header): [make(r) for _, r in rows.iterrows()] for header, make in labels.items()}
    rows = pd.concat([rows, pd.DataFrame(made, index=rows.index)], axis=1)
    if any(len(g) > 1 for g in groups):
        note = " ".join(filter(None, [note, SEEDS_NOTE]))
    return PaperTable(name, title, list(labels), list(columns), rows.drop(columns=["_key", "_seeds", "_setting"]), note,
                      superseded)


#: What makes two runs of one table row seeds of each other: the world, model
#: (initialization and data order) and projection seeds.
SEED_FIELDS = ("world_seed", "model_seed", "seed")
SEEDS_NOTE = ("Rows over several seeds (world, model or projection): the mean over seeds, the per-query "
              "interval averaged over seeds in brackets, then the t-interval across seeds and their number.")


def over_seeds(group: pd.DataFrame, columns) -> pd.Series:
    """One row for runs that differ only in their seeds: per metric column, the mean over seeds,
    each seed's per-query interval averaged (``ci_low``/``ci_high``), and a t-interval across
    seeds (``seed_low``/``seed_high``, ``seeds``); the latest run's fields otherwise."""
    # scipy.stats is slow to import and only rows over seeds need it: keeps `import trackstar.tables` quick
    from scipy import stats

    row = group.sort_values("finished", na_position="first", kind="stable").iloc[-1].copy()
    row["seed_runs"] = tuple(group["run"])
    row["seed_worlds"] = tuple(sorted({str(w) for w in group["world_seed"]}))
    row["seed_models"] = tuple(sorted({str(m) for m in group["model_seed"]})) if "model_seed" in group else ()
    for c in columns:
        if c.key not in group:
            continue
        values = group[c.key].dropna().astype(float)
        if values.empty:
            continue
        mean, n = float(values.mean()), len(values)
        row[c.key] = mean
        for part in ("ci_low", "ci_high"):
            if f"{c.key}/{part}" in group:
                row[f"{c.key}/{part}"] = float(group.loc[values.index, f"{c.key}/{part}"].astype(float).mean())
        level = float(row.get("confidence") or 0.95)
        half = float(stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        row[f"{c.key}/seed_low"], row[f"{c.key}/seed_high"], row[f"{c.key}/seeds"] = mean - half, mean + half, n
    return row


def _method_table(name: str, title: str, runs: pd.DataFrame, columns, note, strict) -> PaperTable | None:
    corpora = runs["corpus"].nunique()
    return build_table(
        name, title, runs, {"Method": lambda r: method_label(r, corpora)}, columns,
        key=lambda r: (str(r["corpus"]), float(r["method_rank"]), r["method"], str(r["method_label"])), note=note, strict=strict,
    )


def _trackstar_only(name: str, runs: pd.DataFrame) -> pd.DataFrame:
    # The tail-patch oracle joins every table with tail-patch (see .oracle), not as an ablation.
    others = sorted(set(runs["method"]) - {"trackstar", "oracle_tail_patch"})
    if others:
        warnings.warn(f"{name} is a TrackStar ablation; runs of {others} tagged {name} are left out.", stacklevel=3)
    return runs[runs["method"] == "trackstar"]


def table1(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen, note = select(runs, "table1")
    return _method_table("table1", "Table 1: fact tracing on the closed set (T-REx-like sentences)", chosen, MAIN_COLUMNS, note, strict)


def table2(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen, note = select(runs, "table2")
    return _method_table("table2", "Table 2: fact tracing on the open set (the pretraining corpus)", chosen, MAIN_COLUMNS, note, strict)


def table_a3(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen = _trackstar_only("table_a3", select(runs, "table_a3")[0])

    def rank(r):
        return (OUTPUT_FN_ORDER.index(r["output_fn"]) if r["output_fn"] in OUTPUT_FN_ORDER else len(OUTPUT_FN_ORDER), r["output_fn"])

    return build_table(
        "table_a3", "Table A.3: TrackStar by query output function f", chosen,
        {"Output function": lambda r: str(r["output_fn"]).capitalize()}, MAIN_COLUMNS, key=rank, note=None, strict=strict,
    )


def table_a4(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen = _trackstar_only("table_a4", select(runs, "table_a4")[0])
    return build_table(
        "table_a4", "Table A.4: TrackStar by projection dimension d", chosen,
        {"d": lambda r: "full (no projection)" if r["projection"] == "identity" else str(int(r["d"]))},
        MAIN_COLUMNS, key=lambda r: (1, 0) if r["projection"] == "identity" else (0, int(r["d"])), note=None, strict=strict,
    )


def table_a5(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen = _trackstar_only("table_a5", select(runs, "table_a5")[0])

    def rank(r):
        curvature = list(CURVATURE_LABELS).index(r["curvature"]) if r["curvature"] in CURVATURE_LABELS else len(CURVATURE_LABELS)
        lam = (1, 0.0) if r["lam"] == "auto" else (0, float(r["lam"]))
        return (bool(r["use_v"]), curvature, lam if r["curvature"] == "mix" else (0, 0.0), bool(r["unit_norm"]))

    return build_table(
        "table_a5", "Table A.5: TrackStar ablations: optimizer second moment V, Hessian approximation R, λ", chosen,
        {"V": lambda r: yes_no(r["use_v"]), "R": lambda r: CURVATURE_LABELS.get(r["curvature"], str(r["curvature"])),
         "λ": lam_label, "Unit norm": lambda r: yes_no(r["unit_norm"])},
        MAIN_COLUMNS, key=rank, note=None, strict=strict,
    )


def table_a6(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen, note = select(runs, "table_a6")
    columns = [Column(f"Tail-patch@{k} (pp)", f"tail_patch@{k}") for k in (1, 3, 5, 10)]
    return _method_table("table_a6", "Table A.6: tail-patch over the top-k proponents", chosen, columns, note, strict)


def table_a7(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen, note = select(runs, "table_a7")
    columns = [
        Column(f"{name}: {c.header}", f"split/greedy_correct/{group}/{c.key}")
        for group, name in CORRECTNESS_GROUPS for c in MAIN_COLUMNS
    ]
    return _method_table(
        "table_a7", "Table A.7: metrics split by model correctness (greedy decoding reproduces the target)",
        chosen, columns, note, strict,
    )


COUNTERFACTUAL_COLUMNS = (
    Column("LDS", "lds"),
    Column("Leave-top-10-out drop (nats)", "loo_drop@10"),
    # The same random draws for every method: the yardstick, not a comparison.
    Column("Random-10-out drop (nats)", "random_drop@10", paired=False),
    Column("Tail-patch@10 (pp)", "tail_patch@10"),
)


def table_c1(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
    chosen, note = select(runs, "table_c1")
    other_k = sorted({c for c in chosen.columns if c.startswith("loo_drop@") and "/" not in c and c != "loo_drop@10"
                      and chosen[c].notna().any()})
    if other_k:
        warnings.warn(f"table_c1 shows leave-top-10-out; runs with {', '.join(other_k)} (counterfactual.k "
                      "other than 10) have blank cells there.", stacklevel=2)
    return _method_table(
        "table_c1", "Table C.1: counterfactual validation on the open set (retraining without passages)",
        chosen, list(COUNTERFACTUAL_COLUMNS), note, strict,
    )


def _with_oracle(build: Callable[..., PaperTable | None]) -> Callable[..., PaperTable | None]:
    """``build``, then the tail-patch oracle's row and shares (:mod:`.oracle`)."""
    def built(runs: pd.DataFrame, strict: bool = False) -> PaperTable | None:
        from .oracle import attach_oracle  # reads per-query files, and imports this module

        return attach_oracle(build(runs, strict), runs)

    built.__name__, built.__doc__ = build.__name__, build.__doc__
    return built


TABLES: dict[str, Callable[..., PaperTable | None]] = {
    "table1": _with_oracle(table1),
    "table2": _with_oracle(table2),
    "table_a3": _with_oracle(table_a3),
    "table_a4": _with_oracle(table_a4),
    "table_a5": _with_oracle(table_a5),
    "table_a6": _with_oracle(table_a6),
    "table_a7": _with_oracle(table_a7),
    "table_c1": table_c1,
}
