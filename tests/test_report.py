"""The HTML report: built from real run records, opened in a real (headless) browser."""

import base64
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from trackstar.tables.report import read_report_data

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs it with apt-get; "
                             "`apt-get install chromium` here)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two real runs of Table 1 (BM25 and gradient cosine) on the micro world, then the tables with --html."""
    tmp = tmp_path_factory.mktemp("report")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = subprocess.run(
        [sys.executable, "-m", "trackstar.experiment.run", "-m", "--config-dir", str(ROOT / "src/trackstar/sweeps"),
         "--config-name", "table1", "method=bm25,grad_cosine", f"artifacts_dir={tmp / 'art'}",
         f"results_dir={tmp / 'res'}", "progress=false", "world=micro", "model=micro", "method.d=64",
         "eval.n_queries=6", "logger=none"],
        capture_output=True, text=True, env=env, cwd=tmp, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    tables = subprocess.run([sys.executable, "-m", "trackstar.tables.cli", "--results", str(tmp / "res"),
                             "--out", str(tmp / "tables"), "--html"],
                            capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert tables.returncode == 0, tables.stderr[-3000:]
    return tmp / "tables" / "report.html", tmp / "res"


def _data(path: Path) -> dict:
    return read_report_data(path)


def test_the_index_links_the_report_with_its_size(report):
    page, _ = report
    index = (page.parent / "README.md").read_text()
    assert f"[report.html](report.html) ({page.stat().st_size / 1e6:.1f} MB," in index


def test_the_data_block_is_compressed_json_and_a_foreign_page_is_refused(report, tmp_path):
    page, _ = report
    block = re.search(r'id="data" data-encoding="gzip\+base64">(.*?)</script>', page.read_text(), re.S).group(1)
    data = json.loads(gzip.decompress(base64.b64decode(block)))  # decoded here without the product's reader
    assert data == read_report_data(page) and set(data) >= {"tables", "runs", "texts", "worlds"}
    assert len(block) < len(json.dumps(data)) / 2
    other = tmp_path / "other.html"
    other.write_text("<html><body>no data</body></html>")
    with pytest.raises(ValueError, match=r"other\.html: not a report written by trackstar-tables --html"):
        read_report_data(other)


def test_report_is_one_self_contained_page(report):
    path, results = report
    text = path.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', text)  # nothing fetched from a network
    data = _data(path)
    assert [t["name"] for t in data["tables"]][:2] == ["table1", "table1_paired"]
    labels = sorted(r["label"] for r in data["runs"].values())
    assert labels == ["BM25", "Gradient cosine"]
    # Every query of every run, with its proponents' texts and the judge's verdicts, as recorded.
    for run in data["runs"].values():
        records = [json.loads(line) for line in (Path(run["run"]) if Path(run["run"]).is_dir()
                                                  else results.parent / run["run"]).joinpath("retrievals.jsonl").open()]
        assert set(run["queries"]) == {r["example_id"] for r in records}
        for rec in records:
            q = run["queries"][rec["example_id"]]
            assert q["ids"] == rec["proponent_ids"][:10]
            assert q["correct"] == [bool(c) for c in rec["proponent_correct"][:10]]
            assert all(data["texts"][pid] == text for pid, text in zip(rec["proponent_ids"][:10], rec["proponents"][:10]))
        assert run["config"] and run["world"] and data["worlds"][run["world"]]["card"]
        # Each passage's tail-patch, as the run recorded it; a query's first one is its tail-patch@1.
        pairs = pd.read_csv(Path(run["run"]) / "tail_patch.csv")
        for qid, q in run["queries"].items():
            mine = pairs[pairs.example_id == qid].sort_values("rank")
            assert q["tp"] == pytest.approx(mine["delta_pp"].tolist()[:10])
            assert q["tp"][0] == pytest.approx(q["metrics"]["tail_patch@1"])


def _browse(page: Path, fragment: str, tmp_path: Path, screenshot: Path | None = None) -> tuple[str, list[str]]:
    """(the DOM after the page's scripts ran, the console messages) from headless Chromium."""
    url = page.resolve().as_uri() + fragment
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=5000"]
    out = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    if screenshot is not None:
        subprocess.run([*args, "--hide-scrollbars", "--window-size=1500,1050", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120)
    # The page's own script holds the templates it draws from: look at what it drew.
    return re.sub(r"<script\b.*?</script>", "", out.stdout, flags=re.S), console


@needs_chromium
def test_the_console_check_can_fail(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    _, console = _browse(page, "", tmp_path)
    assert any("Uncaught" in line for line in console)


@needs_chromium
def test_report_renders_tables_proponents_and_filters_in_a_browser(report, tmp_path):
    path, _ = report
    data = _data(path)
    queries = {q: v for run in data["runs"].values() for q, v in run["queries"].items()}
    qid = sorted(queries)[1]
    dom, console = _browse(path, f"#view=queries&table=table1&query={qid}", tmp_path, tmp_path / "report.png")
    assert console == []  # no JavaScript error, no message at all
    assert 'data-ready="1"' in dom
    assert f'id="query-head"><b>{qid}</b>' in dom
    panels = re.findall(r'<div class="panel" data-method="([^"]+)"', dom)
    assert sorted(panels) == ["BM25", "Gradient cosine"]
    assert dom.count('<div class="prop">') == sum(len(run["queries"][qid]["ids"]) for run in data["runs"].values())
    assert (tmp_path / "report.png").stat().st_size > 10_000
    # The tables are drawn, with a row per method.
    dom, _ = _browse(path, "#view=tables", tmp_path)
    assert dom.count('<table class="t" data-table="table1"') == 1 and "Gradient cosine</td>" in dom
    # Filters: one relation keeps exactly its queries; a method switched off loses its column.
    relation = queries[qid]["relation"]
    want = sum(1 for v in queries.values() if v["relation"] == relation)
    dom, console = _browse(path, f"#view=queries&table=table1&relation={relation}&methods=BM25", tmp_path)
    assert console == []
    assert f"{want} of {len(queries)} queries" in dom
    assert re.findall(r'<div class="panel" data-method="([^"]+)"', dom) == ["Gradient cosine"]


COMMITTED_REPORT = ROOT / "paper_tables" / "report.html"


@needs_chromium
def test_the_committed_tables_report_shows_every_method_of_a_query_in_a_browser(tmp_path):
    """The report committed beside paper_tables/ (the runs of the committed tables) opens from disk."""
    data = read_report_data(COMMITTED_REPORT)
    table1 = next(t for t in data["tables"] if t["name"] == "table1")
    rows = [row for row in table1["rows"] if any(r in data["runs"] for r in row["runs"])]
    assert len(rows) == len(table1["rows"]) >= 10  # every Table 1 row kept its retrievals
    labels = sorted({data["runs"][next(r for r in row["runs"] if r in data["runs"])]["label"] for row in rows})
    qid = sorted(data["runs"][rows[0]["runs"][0]]["queries"])[7]
    dom, console = _browse(COMMITTED_REPORT, f"#view=queries&table=table1&query={qid}", tmp_path)
    assert console == []
    assert 'data-ready="1"' in dom and f'id="query-head"><b>{qid}</b>' in dom
    assert sorted(re.findall(r'<div class="panel" data-method="([^"]+)"', dom)) == labels
    assert dom.count('<div class="prop">') == 10 * len(labels)
