"""Figure 2: MRR and tail-patch@10 against projection dimension, model size and training.

Three panels, each a small :class:`PaperTable` (so the plotted numbers also go
to ``figure2.csv``): d from the runs tagged ``figure2_dim`` (else
``table_a4``); model size from the ``figure2_scale`` runs of final checkpoints;
training progress from the ``figure2_scale`` runs at every checkpoint fraction,
a line per model size. Runs of several training regimes (``regime=paper``:
another world, 2 epochs) get a line each, labelled with their world and
epochs. Error bars from the 95% intervals.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..io import atomic_write_bytes
from .aggregate import MAIN_COLUMNS, PaperTable, build_table, label_column, method_label, regime_label, select

SIZE_ORDER = ("micro", "tiny", "small", "medium")
FIGURE_COLUMNS = [MAIN_COLUMNS[0], MAIN_COLUMNS[2]]
TITLE = "Figure 2: MRR and tail-patch@10 vs projection dimension, model size and training steps"
X_LABELS = {"d": "Projection dimension d", "size": "Model size", "step": "Fraction of training steps"}


@dataclass
class Figure2:
    """The three panels (absent ones are None) and the runs behind them."""

    panels: dict[str, PaperTable | None]

    @property
    def present(self) -> list[PaperTable]:
        return [p for p in self.panels.values() if p is not None]


def _x(panel: str, run: pd.Series):
    if panel == "d":
        return int(run["d"])
    if panel == "size":
        return SIZE_ORDER.index(run["model_size"])
    return float(run["checkpoint"])


def _line(panel: str, regimes: int, sizes: int) -> Callable[[pd.Series], str]:
    """A line's label: the method, then its regime when the panel has several, then (the
    training panel) its model size when it has several."""
    def label(run: pd.Series) -> str:
        parts = [method_label(run)]
        if regimes > 1 and panel != "d":
            parts.append(regime_label(run))
        if sizes > 1 and panel == "step":
            parts.append(f"{run['model_size']} model")
        return ", ".join(parts)
    return label


def figure2(runs: pd.DataFrame, strict: bool = False) -> Figure2 | None:
    dim, note = select(runs, "figure2_dim", fallback="table_a4")
    dim = dim[dim["d"].notna() & (dim["projection"] != "identity")]
    scale = runs[(runs["table"] == "figure2_scale") & runs["model_size"].isin(SIZE_ORDER)]
    sources = {
        "d": (dim, note),
        "size": (scale[scale["checkpoint"] == 1.0], None),
        "step": (scale[scale["checkpoint"].notna()], None),
    }
    panels = {}
    for panel, (chosen, panel_note) in sources.items():
        x_header = X_LABELS[panel]
        regimes = chosen.apply(regime_label, axis=1).nunique() if not chosen.empty else 0
        sizes = chosen["model_size"].nunique() if not chosen.empty else 0
        line = _line(panel, regimes, sizes)
        panels[panel] = build_table(
            f"figure2 ({panel})", f"Figure 2: {x_header}", chosen,
            {"Method": line, x_header: lambda r, p=panel: str(r["model_size"]) if p == "size" else f"{_x(p, r):g}"},
            FIGURE_COLUMNS,
            key=lambda r, p=panel: (r["method"], regime_label(r) if p != "d" else "",
                                    SIZE_ORDER.index(r["model_size"]) if p == "step" else 0, _x(p, r)),
            note=panel_note, strict=strict, world_lines=None if panel == "d" else regime_label,
        )
    result = Figure2(panels)
    return result if result.present else None


def figure2_frame(fig: Figure2) -> PaperTable:
    """All panels stacked into one table (a ``Panel`` label first), for the CSV."""
    parts, notes, superseded = [], [], []
    for panel, table in fig.panels.items():
        if table is None:
            continue
        x_header = table.labels[1]
        parts.append(table.rows.assign(**{label_column("Panel"): panel, label_column("x"): table.rows[label_column(x_header)]}))
        notes += [table.note] if table.note else []
        superseded += table.superseded
    rows = pd.concat(parts, ignore_index=True)
    return PaperTable("figure2", TITLE, ["Panel", "Method", "x"], FIGURE_COLUMNS, rows, " ".join(notes) or None, superseded)


def plot_figure2(fig: Figure2, path: Path) -> None:
    """Render the 2 x 3 grid (metrics x panels) to a PNG at ``path``."""
    import matplotlib  # only to draw: reading and tabulating runs never needs it

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    # One colour per line label across all panels, and a legend with room for every label.
    names = list(dict.fromkeys(lab for t in fig.present for lab in t.rows[label_column("Method")]))
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20").colors
    colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    ncol = min(len(names), 3) or 1
    legend_rows = -(-len(names) // ncol)
    height = 6.5 + 0.3 * legend_rows
    figure, axes = plt.subplots(len(FIGURE_COLUMNS), len(fig.panels), figsize=(4.2 * len(fig.panels), height), squeeze=False)
    for j, (panel, table) in enumerate(fig.panels.items()):
        for i, column in enumerate(FIGURE_COLUMNS):
            ax = axes[i][j]
            ax.set_xlabel(X_LABELS[panel])
            ax.set_ylabel(column.header)
            if table is None:
                ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="gray")
                continue
            for label, series in table.rows.groupby(label_column("Method"), sort=False):
                x = [_x(panel, r) for _, r in series.iterrows()]
                mean = series[column.key].astype(float)
                low = series.get(f"{column.key}/ci_low", mean).astype(float)
                high = series.get(f"{column.key}/ci_high", mean).astype(float)
                ax.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=label,
                            color=colors[label])
            if panel == "d":
                ax.set_xscale("log", base=2)
            if panel == "size":
                ax.set_xticks(range(len(SIZE_ORDER)), SIZE_ORDER)
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = list(handles)
    if labels:
        figure.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=ncol)
    figure.suptitle(TITLE)
    figure.tight_layout(rect=(0, (0.3 * legend_rows + 0.2) / height if labels else 0, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
