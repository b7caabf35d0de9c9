"""The ``trackstar-tables`` command: run records in, paper tables and Figure 2 out.

    trackstar-tables                                   results/ -> paper_tables/
    trackstar-tables --tables table1,table_a6 --strict
    trackstar-tables --source wandb --entity ME --project trackstar-repro

Each table is printed as Markdown and written to ``--out`` as ``.md``,
``.tex``, ``.csv`` and ``.provenance.json`` (see :mod:`.render`), Figure 2 as
``figure2.png`` (+ ``.csv``, ``.provenance.json``), and ``README.md`` lists
what this invocation generated. A table without runs is skipped with a
message, or is an error under ``--strict``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections import Counter
from pathlib import Path

from ..errors import debug_requested, describe_error
from ..experiment.record import now
from ..io import ArtifactError, atomic_write_text, ensure_writable_dir
from .aggregate import SOURCES, TABLES
from .figures import figure2, figure2_frame, plot_figure2
from .findings import findings
from .findings import to_markdown as findings_markdown
from .paired import paired_table
from .publish import publish
from .render import table_provenance, to_markdown, write_table
from .report import REPORT_FILE, report_data, write_report
from .runs import (RunSet, TablesError, check_commits, check_one_style, describe_commits, load_local_runs,
                   load_wandb_runs, unfinished_lines)

FIGURES = ("figure2",)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trackstar-tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="results root holding <table>/<run>/metrics.json (default: results)")
    parser.add_argument("--out", default="paper_tables", help="output directory (default: paper_tables)")
    parser.add_argument("--source", choices=("local", "wandb"), default="local", help="read local run records or their W&B mirror")
    parser.add_argument("--entity", help="W&B entity (with --source wandb)")
    parser.add_argument("--project", help="W&B project (with --source wandb or --wandb; default trackstar-repro for --wandb)")
    parser.add_argument("--strict", action="store_true", help="a table without runs, or two runs for one row, is an error")
    parser.add_argument("--require-single-commit", action="store_true", help="runs from more than one git commit are an error")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the tables, Figure 2 and findings.md to one W&B run (--project, --entity, --group)")
    parser.add_argument("--group", help="W&B group of that run (e.g. the sweep's table name)")
    parser.add_argument("--wandb-mode", default="auto", choices=("auto", "online", "offline", "disabled"),
                        help="auto: online when logged in, else offline (WANDB_MODE wins)")
    parser.add_argument("--html", action="store_true",
                        help=f"also write {REPORT_FILE}: one page with the tables, Figure 2, the findings and every "
                             "query's proponents side by side, method by method (opens from disk)")
    parser.add_argument("--tables", help=f"comma-separated subset of: {','.join([*TABLES, *FIGURES])} (default: all)")
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=RESULTS",
                        help="findings.md also judges each claim on the local run records in RESULTS (e.g. "
                             "templated=results/templated: another world), side by side; repeatable")
    args = parser.parse_args(argv)
    args.compare = [_compare_arg(item) for item in args.compare]
    return args


def _compare_arg(item: str) -> tuple[str, str]:
    label, sep, path = item.partition("=")
    if not sep or not label.strip() or not path.strip():
        raise TablesError(f"--compare {item!r}: write LABEL=RESULTS_DIR, e.g. --compare templated=results/templated.")
    return label.strip(), path.strip()


def requested(value: str | None) -> list[str]:
    known = [*TABLES, *FIGURES]
    if not value:
        return known
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TablesError(f"--tables: unknown {unknown}; choose from {','.join(known)}.")
    return names


def load(args: argparse.Namespace) -> RunSet:
    if args.source == "wandb":
        return load_wandb_runs(args.entity, args.project, strict=args.strict)
    return load_local_runs(args.results, strict=args.strict)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"WARNING: {message}", file=sys.stderr)


def generate(args: argparse.Namespace, command: str) -> int:
    names = requested(args.tables)
    runs = load(args)
    check_commits(runs, args.require_single_commit)
    style = check_one_style(runs.frame, runs.source)
    out = ensure_writable_dir(args.out, "--out directory")
    generated = now()
    made, skipped, paired_tables = [], [], {}
    for name in names:
        table = figure2(runs.frame, args.strict) if name == "figure2" else TABLES[name](runs.frame, args.strict)
        if table is None:
            message = f"{name}: no runs tagged {' or '.join(SOURCES[name])} in {runs.source}; skipped."
            if args.strict:
                raise TablesError(
                    f"{message.replace('; skipped.', '.')} Run its sweep, e.g. "
                    f"`trackstar-run -m --config-dir sweeps --config-name {SOURCES[name][0]}` (--strict is set)."
                )
            print(message, file=sys.stderr)
            skipped.append(name)
            continue
        if name == "figure2":
            frame = figure2_frame(table)
            provenance = table_provenance(frame, command, runs)
            write_table(frame, out, provenance, generated)
            plot_figure2(table, out / "figure2.png")
            print(to_markdown(frame))
            made.append((name, frame))
        else:
            write_table(table, out, table_provenance(table, command, runs), generated)
            print(to_markdown(table))
            made.append((name, table))
            paired = paired_table(table)
            if paired is not None:
                write_table(paired, out, table_provenance(paired, command, runs), generated)
                print(to_markdown(paired))
                made.append((paired.name, paired))
                paired_tables[paired.name] = paired
    if paired_tables:
        provenance = runs.provenance_lines(command)
        judged = [(style, findings(paired_tables, runs.frame))]
        for label, path in args.compare:
            other = load_local_runs(path, strict=args.strict)
            check_commits(other, args.require_single_commit)
            check_one_style(other.frame, other.source)
            judged.append((label, findings(paired_of(other.frame, names, args.strict), other.frame)))
            provenance.append(f"Compared with {label}: {other.source}, git commit(s): {describe_commits(other.commits)}")
            provenance += [f"{label}: {line}" for line in unfinished_lines(other.unfinished)]
        text = findings_markdown(judged, provenance)
        atomic_write_text(out / "findings.md", text)
        print(text)
    report = None
    if args.html:
        findings_path, figure_path = out / "findings.md", out / "figure2.png"
        data = report_data(made, args.results, findings_path.read_text() if paired_tables else None,
                           figure_path if any(name == "figure2" for name, _ in made) else None,
                           runs.provenance_lines(command))
        report = Path(write_report(out, data))
        print(f"report: {report}", file=sys.stderr)
    write_index(out, made, skipped, runs, command, generated, report=report)
    if args.wandb:
        group = args.group or sweep_group(made, runs.frame)
        if args.source == "local":
            (Path(args.results) / TABLES_RUN_DIR).mkdir(parents=True, exist_ok=True)
        info = publish(made, out, runs.source, runs.commits, command, args.project or "trackstar-repro",
                       args.entity, group, args.wandb_mode,
                       wandb_dir=Path(args.results) / TABLES_RUN_DIR if args.source == "local" else None)
        print(f"W&B: {info}", file=sys.stderr)
    print(f"wrote {len(made)} table(s)/figure(s) to {out}", file=sys.stderr)
    return 0


#: Where under the results root the tables run keeps its W&B files: two levels down, like a
#: cell's (results/<table>/<run>/wandb), so one `wandb sync results/*/*/wandb/offline-run-*` finds all.
TABLES_RUN_DIR = Path("paper-tables") / "tables"


def sweep_group(made: list, frame) -> str | None:
    """The W&B group the tables run joins when --group is not given: the group of the runs
    behind the tables made (the most common one when they span several sweeps), said on stderr."""
    runs = {r for _, table in made for r in table.runs}
    groups = Counter(g for r, g in zip(frame["run"], frame.get("wandb_group", [None] * len(frame)))
                     if r in runs and isinstance(g, str))
    if not groups:
        return None
    group, n = groups.most_common(1)[0]
    others = f"; its runs also span {', '.join(sorted(set(groups) - {group}))}" if len(groups) > 1 else ""
    print(f"W&B: the tables run joins group {group!r} ({n} of its runs){others}; --group G chooses another",
          file=sys.stderr)
    return group


def paired_of(frame, names: list[str], strict: bool) -> dict:
    """The paired tables of ``frame``'s runs, by name (for findings only: nothing written)."""
    out = {}
    for name in names:
        if name in FIGURES:
            continue
        table = TABLES[name](frame, strict)
        paired = paired_table(table) if table is not None else None
        if paired is not None:
            out[paired.name] = paired
    return out


def write_index(out: Path, made: list, skipped: list[str], runs: RunSet, command: str, generated: str,
                report: Path | None = None) -> None:
    """``README.md`` of the output directory: what this invocation made, when, from what."""
    lines = [
        "# Paper tables and figures",
        "",
        f"Generated {generated} by `{command}` from {runs.source}.",
        "",
        f"Git commit(s) of the runs: {describe_commits(runs.commits)}.",
        "",
        f"Environment(s) of the runs (machine, instruction sets, libraries): {describe_commits(runs.environments)}.",
    ]
    if len(runs.commits) > 1:
        lines += ["", "**WARNING: the runs come from more than one commit; see each file's provenance.**"]
    if runs.unfinished:
        lines += ["", f"**WARNING: incomplete sweeps: {len(runs.unfinished)} planned job(s) have no run record, so "
                      "the outputs of their sweeps lack their rows or points:**", ""]
        lines += [f"- {line}" for line in runs.unfinished]
    lines += ["", "| output | content | runs |", "|---|---|---:|"]
    for name, table in made:
        files = f"[{name}.md]({name}.md), [.tex]({name}.tex), [.csv]({name}.csv)"
        if name == "figure2":
            files = "[figure2.png](figure2.png), [.csv](figure2.csv)"
        lines.append(f"| {files} | {table.title} | {len(table.runs)} |")
    if (out / "findings.md").is_file() and any(name.endswith("_paired") for name, _ in made):
        lines += ["", "[findings.md](findings.md): the paper's claims judged on the paired differences."]
    if report is not None:
        lines += ["", f"[{REPORT_FILE}]({REPORT_FILE}) ({report.stat().st_size / 1e6:.1f} MB, written beside these "
                      "files by the command above): one page to open from disk, no server and no network: these "
                      "tables, Figure 2, the findings, and every query's proponents side by side, method by method."]
    if skipped:
        lines += ["", f"Skipped (no runs): {', '.join(skipped)}."]
    if runs.failed:
        lines += ["", f"Left out: {len(runs.failed)} run(s) that did not finish:"]
        lines += [f"- `{f['run']}`: {f['error']}" for f in runs.failed]
    if runs.stale:
        lines += ["", f"Left out: {len(runs.stale)} run record(s) of another schema version, or damaged:"]
        lines += [f"- {s}" for s in runs.stale]
    lines += [
        "",
        "Every `.md`, `.tex` and `.csv` opens with a comment naming the command, the source,",
        "the git commit(s) and every run it was built from; `<name>.provenance.json` holds the",
        "same for scripts. Read a CSV with `pandas.read_csv(path, comment=\"#\")`.",
    ]
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    command = shlex.join(["trackstar-tables", *argv])
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _print_warning
        try:
            return generate(args, command)
        except Exception as exc:  # noqa: BLE001 - one clear line; the traceback on request
            if debug_requested():
                raise
            print(f"trackstar-tables: error: {describe_error(exc)}", file=sys.stderr)
            if not isinstance(exc, (TablesError, ArtifactError)):
                print("  (TRACKSTAR_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
