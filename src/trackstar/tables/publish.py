"""``trackstar-tables --wandb``: the regenerated tables, Figure 2 and findings.md on W&B.

One summary run (job type ``paper-tables``) in the sweep's project and group,
so the dashboard shows the paper's tables next to the runs they come from:
each table as a W&B table of its rendered cells (mean [ci_low, ci_high], as in
the Markdown) and of its full-precision CSV columns, Figure 2 as an image and
as a line plot per panel, findings.md as a file and as text, and ``report.html``
(``--html``) as a file of the run and an artifact of type ``report``. Offline without
credentials, like the runs; ``WANDB_MODE`` wins over ``--wandb-mode``.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pandas as pd

from ..wandb_mode import resolve_mode
from .aggregate import PaperTable
from .render import cells, to_csv
from .report import REPORT_FILE

log = logging.getLogger("trackstar")


def publish(made: list[tuple[str, PaperTable]], out: Path, source: str, commits: dict, command: str,
            project: str, entity: str | None, group: str | None, mode: str = "auto",
            init_timeout: float = 20.0, wandb_dir: Path | None = None) -> dict:
    """Log what this invocation made to one W&B run; returns what happened (never raises for W&B).

    The run's local files (its offline copy, to ``wandb sync`` later) go under
    ``wandb_dir`` (the results root), never into the committed tables directory.
    """
    mode = resolve_mode(mode)
    if mode == "disabled":
        return {"mode": "disabled"}
    try:
        import wandb  # heavy, and only publishing needs it

        with wandb.init(project=project, entity=entity, group=group, job_type="paper-tables",
                        name="paper-tables", dir=str(wandb_dir or Path.cwd()), mode=mode, reinit="create_new",
                        config={"command": command, "source": source, "git_commits": dict(commits)},
                        settings=wandb.Settings(console="off", silent=True, init_timeout=float(init_timeout))) as run:
            logged = {}
            for name, table in made:
                header, body = cells(table)
                logged[name] = wandb.Table(columns=header, data=body)
                numbers = pd.read_csv(io.StringIO(to_csv(table)))
                logged[f"{name}/numbers"] = wandb.Table(dataframe=numbers)
                if name == "figure2":
                    for panel, frame in numbers.groupby(numbers.columns[0], sort=False):
                        logged[f"figure2/{panel}"] = wandb.plot.line_series(
                            xs=list(range(len(frame))),
                            ys=[frame[c].tolist() for c in frame.columns if c.endswith(" mean")],
                            keys=[c[: -len(" mean")] for c in frame.columns if c.endswith(" mean")],
                            title=f"Figure 2: {panel}")
            if (out / "figure2.png").is_file():
                logged["figure2/image"] = wandb.Image(str(out / "figure2.png"))
            findings = out / "findings.md"
            if findings.is_file():
                logged["findings"] = wandb.Html(f"<pre>{_escape(findings.read_text())}</pre>")
                run.save(str(findings), base_path=str(out), policy="now")
            report = out / REPORT_FILE
            if report.is_file():  # trackstar-tables --html: the page itself, to open from the run's files
                run.save(str(report), base_path=str(out), policy="now")
                artifact = wandb.Artifact("report", type="report", description="trackstar-tables --html")
                artifact.add_file(str(report))
                run.log_artifact(artifact)
            run.log(logged)
            return {"mode": mode, "run_id": run.id, "dir": str(Path(run.dir).parent), "tables": [n for n, _ in made]}
    except Exception as exc:  # noqa: BLE001 - the local tables are complete either way
        log.warning("W&B upload of the tables failed (%s); the files in %s are complete", exc, out)
        return {"mode": mode, "error": f"{type(exc).__name__}: {exc}"}


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
