"""Aggregation of run records into the paper's tables and Figure 2 (SPEC §3).

``runs`` loads run records (local or W&B) into one DataFrame, ``aggregate``
builds each table from it, ``render`` writes Markdown / LaTeX / CSV with
provenance, ``figures`` draws Figure 2, ``cli`` is ``trackstar-tables``.
"""

from .aggregate import TABLES, PaperTable
from .figures import figure2, plot_figure2
from .render import to_csv, to_latex, to_markdown
from .runs import RunSet, TablesError, check_commits, load_local_runs, load_wandb_runs

__all__ = [
    "TABLES", "PaperTable", "RunSet", "TablesError", "check_commits", "figure2", "load_local_runs",
    "load_wandb_runs", "plot_figure2", "to_csv", "to_latex", "to_markdown",
]
