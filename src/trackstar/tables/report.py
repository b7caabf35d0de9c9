"""One self-contained HTML page to read a sweep's results as researchers do.

``trackstar-tables --html`` writes ``<out>/report.html`` beside the tables: no
server, no network, one file. It holds

- every table made (and its paired companion), sortable by any column; a row
  opens the queries of its run;
- Figure 2 (the PNG, inlined) and ``findings.md`` with its verdicts;
- per query (prompt, target, relation, frequency bucket, whether the model
  predicts the target): each method's top-k proponents side by side, the
  passage text with the object's and the subject's names and aliases marked, ✓/✗ from the judge, the
  score, each passage's tail-patch (runs that record it) and the query's tail-patch@k; filters by table, relation, bucket,
  model correctness, seed and method;
- each run's provenance (its config, commit and the world card) a click away.

The data sit in one JSON block (passage texts stored once), gzip-compressed and
base64-encoded (the browser's own ``DecompressionStream`` reads it: a sweep's
report is a third of its plain JSON's size, small enough to commit beside its tables),
and the page draws only what is shown, so a full-world sweep stays quick to open. The view state
lives in the URL's fragment (``#view=queries&table=table1&query=Q00003&relation=P36``), so a
view can be linked, and the browser test opens such links.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import math
import re
from pathlib import Path

import pandas as pd

from ..experiment.record import TAIL_PATCH_FILE
from ..io import atomic_write_text, read_jsonl
from .aggregate import PaperTable
from .render import cells

REPORT_FILE = "report.html"
#: Per-query columns carried into the report (those a run has).
QUERY_COLUMNS = ("mrr", "recall@10", "greedy_correct", "tail_patch@1", "tail_patch@10")


def _run_dir(run: str, results: Path) -> Path | None:
    """A table row's run directory: as written (relative to here), or under ``results``."""
    parts = Path(run).parts
    for candidate in (Path(run), results.parent / run, results.joinpath(*parts[-2:])):
        if (candidate / "retrievals.jsonl").is_file():
            return candidate
    return None


def _number(value):
    """A number for the page: None for NaN, floats to 7 significant digits (float32's precision,
    beyond anything the page shows; a report a quarter smaller)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(f"{value:.7g}") if isinstance(value, float) else value


def _table_data(table: PaperTable, results: Path) -> dict:
    header, body = cells(table)
    rows = []
    for (_, row), text in zip(table.rows.iterrows(), body, strict=True):
        sort = [None] * len(table.labels) + [_number(row.get(c.key)) for c in table.columns]
        many = row.get("seed_runs")
        runs = [str(r) for r in (many if isinstance(many, tuple) else (row["run"],))]
        rows.append({"cells": text, "sort": sort, "run": str(row["run"]), "runs": runs,
                     "has_queries": _run_dir(str(row["run"]), results) is not None})
    return {"name": table.name, "title": table.title, "header": header, "rows": rows, "note": table.note}


def _entities(world_dir: Path | None) -> dict[str, dict]:
    """fact_id -> the subject's and the object's names and aliases, from the world's release files."""
    path = None if world_dir is None else world_dir / "trex_facts.jsonl"
    if path is None or not path.is_file():
        return {}
    return {f["fact_id"]: {"s": list(dict.fromkeys([f["entity0"], *f.get("entity0_alias", [])])),
                           "o": list(dict.fromkeys([f["entity1"], *f.get("entity1_alias", [])]))}
            for f in read_jsonl(path)}


def _world_dir(record: dict, run_dir: Path, results: Path) -> Path | None:
    path = ((record.get("artifacts") or {}).get("world") or {}).get("path")
    if not path:
        return None
    for base in (Path.cwd(), results.parent, run_dir.parents[2] if len(run_dir.parents) > 2 else run_dir):
        if (base / path).is_dir():
            return base / path
    return None


def _correctness(rec: dict, threshold: float | None) -> list:
    """The judge's verdict per proponent as the run scored it: the closed set's labels, or the open
    set's entailment score against the run's own ``eval.judge_threshold``; None where unknown."""
    if "proponent_correct" in rec:
        return [bool(c) for c in rec["proponent_correct"]]
    if "proponent_ais_scores" in rec and threshold is not None:
        return [float(a) >= threshold for a in rec["proponent_ais_scores"]]
    return [None] * len(rec["proponent_ids"])


def _run_data(run: str, results: Path, texts: dict, worlds: dict, k: int) -> dict | None:
    run_dir = _run_dir(run, results)
    if run_dir is None:
        return None
    record = json.loads((run_dir / "metrics.json").read_text())
    per_query = pd.read_csv(run_dir / "per_query.csv") if (run_dir / "per_query.csv").is_file() else None
    metrics = {}
    if per_query is not None:
        keep = [c for c in QUERY_COLUMNS if c in per_query.columns]
        metrics = {r["example_id"]: {c: _number(r[c]) for c in keep} for r in per_query.to_dict("records")}
    world_dir = _world_dir(record, run_dir, results)
    world_key = str(world_dir) if world_dir is not None else None
    if world_key is not None and world_key not in worlds:
        card = world_dir / "world_card.md"
        worlds[world_key] = {"card": card.read_text() if card.is_file() else None, "entities": _entities(world_dir)}
    patched: dict[tuple[str, str], float] = {}
    if (run_dir / TAIL_PATCH_FILE).is_file():  # runs since the file exists: tail-patch per passage
        for r in pd.read_csv(run_dir / TAIL_PATCH_FILE).to_dict("records"):
            patched[(r["example_id"], str(r["proponent_id"]))] = _number(r["delta_pp"])
    threshold = (record.get("eval") or {}).get("judge_threshold")
    queries = {}
    for rec in read_jsonl(run_dir / "retrievals.jsonl"):
        correct = _correctness(rec, threshold)[:k]
        for pid, text in zip(rec["proponent_ids"][:k], rec["proponents"][:k], strict=True):
            texts.setdefault(pid, text)
        queries[rec["example_id"]] = {
            "ids": rec["proponent_ids"][:k], "scores": [round(s, 6) for s in rec["proponent_scores"][:k]],
            "correct": correct, "metrics": metrics.get(rec["example_id"], {}),
            "tp": [patched.get((rec["example_id"], str(pid))) for pid in rec["proponent_ids"][:k]] if patched else None,
            "prompt": rec["inputs_plaintext"], "target": rec["targets_plaintext"],
            "relation": rec.get("relation"), "bucket": rec.get("c4_frequency_bucket"), "fact": rec.get("fact_id"),
        }
    config = run_dir / "config.yaml"
    method = record.get("method") or {}
    seeds = [f"{part} {value}" for part, value in (("world seed", (record.get("world") or {}).get("seed")),
                                                   ("model seed", (record.get("model") or {}).get("seed")),
                                                   ("projection seed", (method.get("settings") or {}).get("seed")))
             if value is not None]
    return {"run": run, "label": method.get("label") or method.get("name") or run, "corpus": record.get("corpus"),
            "seeds": ", ".join(seeds),
            "commit": record.get("git_commit"), "config": config.read_text() if config.is_file() else None,
            "world": world_key, "queries": queries}


def report_data(made: list[tuple[str, PaperTable]], results: str | Path, findings: str | None,
                figure: Path | None, provenance: list[str], k: int = 10) -> dict:
    """Everything the page shows, as one JSON-able dict."""
    results = Path(results)
    texts: dict[str, str] = {}
    worlds: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    tables = []
    for _, table in made:
        data = _table_data(table, results)
        tables.append(data)
        for row in data["rows"]:
            for name in row["runs"]:  # a row over seeds: every seed's run, to choose from
                if name not in runs:
                    run = _run_data(name, results, texts, worlds, k)
                    if run is not None:
                        runs[name] = run
    image = base64.b64encode(figure.read_bytes()).decode() if figure is not None and figure.is_file() else None
    return {"tables": tables, "runs": runs, "texts": texts, "worlds": worlds, "findings": findings,
            "figure": image, "provenance": provenance, "k": k}


#: How the page carries its data: ``gzip+base64`` of the JSON (mtime 0: the same data, the same bytes).
DATA_ENCODING = "gzip+base64"
_DATA_BLOCK = re.compile(r'<script type="application/octet-stream" id="data" data-encoding="([^"]+)">(.*?)</script>', re.S)


def write_report(out: Path, data: dict) -> Path:
    """``report.html`` in ``out``: the page with ``data`` inlined, compressed."""
    raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    payload = base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")
    page = (_PAGE.replace("__TITLE__", html.escape("trackstar report: " + ", ".join(t["name"] for t in data["tables"])))
            .replace("__ENCODING__", DATA_ENCODING).replace("__DATA__", payload))
    path = Path(out) / REPORT_FILE
    atomic_write_text(path, page)
    return path


def read_report_data(path: str | Path) -> dict:
    """The data a ``report.html`` carries, as :func:`report_data` made them (for scripts and tests)."""
    found = _DATA_BLOCK.search(Path(path).read_text())
    if found is None or found.group(1) != DATA_ENCODING:
        raise ValueError(f"{path}: not a report written by trackstar-tables --html (no {DATA_ENCODING} data block); "
                         "regenerate it with trackstar-tables --html")
    return json.loads(gzip.decompress(base64.b64decode(found.group(2))))


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222}
header{background:#24292f;color:#fff;padding:8px 16px}header a{color:#9cf;margin-right:14px}
main{padding:8px 16px}h2{margin:18px 0 6px}
table.t{border-collapse:collapse;margin:6px 0 4px}table.t th,table.t td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
table.t th{background:#f3f3f3;cursor:pointer}table.t td:first-child,table.t th:first-child{text-align:left}
table.t tr.link:hover{background:#eef6ff;cursor:pointer}
.filters label{margin-right:12px}.filters select{max-width:18em}
#qlist{max-height:14em;overflow:auto;border:1px solid #ccc;margin:6px 0}
#qlist div{padding:2px 6px;cursor:pointer}#qlist div.sel{background:#dbeafe}
#panels{display:flex;gap:8px;overflow-x:auto;align-items:flex-start}
.panel{min-width:260px;max-width:340px;border:1px solid #ccc;border-radius:4px;padding:4px 6px;background:#fafafa}
.panel h3{font-size:13px;margin:2px 0 4px}.prop{border-top:1px solid #e2e2e2;padding:3px 0;font-size:12.5px}
.ok{color:#137333;font-weight:bold}.no{color:#b3261e}.na{color:#888}
mark.t{background:#fde68a}mark.s{background:#bfdbfe}
pre{white-space:pre-wrap;background:#f6f8fa;padding:8px;border:1px solid #ddd;max-height:30em;overflow:auto}
.meta{color:#555;font-size:12.5px}
</style></head><body>
<header><b>trackstar report</b> &nbsp; <a href="#">everything</a><a href="#view=tables">tables</a><a href="#view=queries">queries</a><a href="#view=figure">figure 2</a><a href="#view=findings">findings</a><a href="#view=provenance">provenance</a></header>
<main>
<section data-view="tables"><h2 id="tables">Tables</h2><div id="tables-body"></div></section>
<section data-view="queries"><h2 id="queries">Queries</h2>
<div class="filters">
<label>table <select id="f-table"></select></label>
<label>relation <select id="f-relation"></select></label>
<label>bucket <select id="f-bucket"></select></label>
<label>seeds <select id="f-seed"></select></label>
<label>model predicts target <select id="f-model"><option value="">any</option><option value="yes">yes</option><option value="no">no</option></select></label>
<span id="f-methods"></span>
</div>
<div id="qcount" class="meta"></div><div id="qlist"></div><div id="qhead"></div><div id="panels"></div>
</section>
<section data-view="figure"><h2 id="figure">Figure 2</h2><div id="figure-body"></div></section>
<section data-view="findings"><h2 id="findings">Findings</h2><pre id="findings-body"></pre></section>
<section data-view="provenance"><h2 id="provenance">Provenance</h2><pre id="provenance-body"></pre><div id="runs-body"></div></section>
</main>
<script type="application/octet-stream" id="data" data-encoding="__ENCODING__">__DATA__</script>
<script>
"use strict";
let D;  // the data block, decoded below before anything is drawn
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const state = {};
function readHash() {
  for (const k of Object.keys(state)) delete state[k];
  for (const part of location.hash.replace(/^#/, "").split("&")) {
    const i = part.indexOf("=");
    if (i > 0) state[decodeURIComponent(part.slice(0, i))] = decodeURIComponent(part.slice(i + 1));
  }
}
function setHash(changes) {
  Object.assign(state, changes);
  const parts = Object.entries(state).filter(([, v]) => v !== "" && v != null).map(([k, v]) => encodeURIComponent(k) + "=" + encodeURIComponent(v));
  history.replaceState(null, "", "#" + parts.join("&"));
  renderQueries();
}
function fmt(v, d = 3) { return v == null ? "—" : (typeof v === "number" ? v.toFixed(d) : String(v)); }
function queryTables() { return D.tables.filter((t) => t.rows.some((r) => r.runs.some((n) => D.runs[n]))); }
function renderTables() {
  const out = [];
  D.tables.forEach((t, ti) => {
    out.push(`<h3 id="t-${esc(t.name)}">${esc(t.title)}</h3><table class="t" data-table="${esc(t.name)}"><thead><tr>` +
      t.header.map((h, i) => `<th data-col="${i}" title="sort">${esc(h)}</th>`).join("") + "</tr></thead><tbody>" +
      t.rows.map((r, i) => `<tr class="${r.runs.some((n) => D.runs[n]) ? "link" : ""}" data-i="${i}" data-run="${esc(r.run)}" title="${r.runs.some((n) => D.runs[n]) ? "show this row's queries" : esc(r.run)}">` +
        r.cells.map((c) => `<td>${esc(c)}</td>`).join("") + "</tr>").join("") + "</tbody></table>" +
      (t.note ? `<div class="meta"><i>${esc(t.note)}</i></div>` : ""));
  });
  $("tables-body").innerHTML = out.join("");
  document.querySelectorAll("table.t").forEach((el) => {
    const t = D.tables.find((x) => x.name === el.dataset.table);
    el.querySelectorAll("th").forEach((th) => th.addEventListener("click", () => sortTable(el, t, +th.dataset.col)));
    el.querySelectorAll("tr.link").forEach((tr) => tr.addEventListener("click", () => {
      const run = D.runs[t.rows[+tr.dataset.i].runs[0]] || D.runs[tr.dataset.run];
      setHash({table: t.name, methods: "", only: run.label, view: "queries"});
      showView();
    }));
  });
}
function sortTable(el, t, col) {
  const dir = el.dataset.sortCol == col && el.dataset.sortDir === "desc" ? "asc" : "desc";
  el.dataset.sortCol = col; el.dataset.sortDir = dir;
  const body = el.tBodies[0];
  const rows = Array.from(body.rows).map((tr) => [tr, t.rows[+tr.dataset.i]]);
  rows.sort((a, b) => {
    const x = a[1].sort[col] ?? a[1].cells[col], y = b[1].sort[col] ?? b[1].cells[col];
    const c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
    return dir === "desc" ? -c : c;
  });
  rows.forEach(([tr]) => body.appendChild(tr));
}
function options(sel, values, current, any = "any") {
  sel.innerHTML = `<option value="">${any}</option>` + values.map((v) => `<option value="${esc(v)}"${String(v) === current ? " selected" : ""}>${esc(v)}</option>`).join("");
}
function mark(text, q, ent) {
  const rx = (w) => new RegExp("(" + esc(w).replace(/[.*+?^${}()|[\]\\]/g, "\\$&") + ")", "g");
  let s = esc(text);
  const objects = ent ? ent.o : [q.target];
  for (const w of objects.filter(Boolean).sort((a, b) => b.length - a.length)) s = s.replace(rx(w), '<mark class="t">$1</mark>');
  for (const w of (ent ? ent.s : []).filter(Boolean).sort((a, b) => b.length - a.length)) s = s.replace(rx(w), '<mark class="s">$1</mark>');
  return s;
}
function renderQueries() {
  const tables = queryTables();
  if (!tables.length) { $("qcount").textContent = "No run behind these tables kept its retrievals."; return; }
  const table = tables.find((t) => t.name === state.table) || tables[0];
  $("f-table").innerHTML = tables.map((t) => `<option value="${esc(t.name)}"${t === table ? " selected" : ""}>${esc(t.title)}</option>`).join("");
  // A row over seeds holds one run per seed: the seeds selector picks which (default: the lowest).
  const seedSets = Array.from(new Set(table.rows.flatMap((r) => r.runs.map((n) => D.runs[n] && D.runs[n].seeds).filter(Boolean))));
  const seed = seedSets.includes(state.seed) ? state.seed : (seedSets.slice().sort()[0] || "");
  $("f-seed").innerHTML = seedSets.sort().map((v) => `<option${v === seed ? " selected" : ""}>${esc(v)}</option>`).join("");
  const pick = (r) => r.runs.map((n) => D.runs[n]).filter(Boolean).find((x) => !seed || x.seeds === seed) || D.runs[r.runs[0]];
  const runs = table.rows.map(pick).filter(Boolean);
  const ids = Array.from(new Set(runs.flatMap((r) => Object.keys(r.queries)))).sort();
  const info = (id) => { for (const r of runs) if (r.queries[id]) return r.queries[id]; return {}; };
  options($("f-relation"), Array.from(new Set(ids.map((i) => info(i).relation).filter((v) => v != null))).sort(), state.relation || "");
  options($("f-bucket"), Array.from(new Set(ids.map((i) => info(i).bucket).filter((v) => v != null))).sort((a, b) => a - b), state.bucket || "");
  $("f-model").value = state.model || "";
  const labels = runs.map((r) => r.label);
  const hidden = new Set((state.methods || "").split("|").filter(Boolean));
  const only = state.only;
  $("f-methods").innerHTML = "methods: " + labels.map((l) => `<label><input type="checkbox" data-label="${esc(l)}"${(only ? l === only : !hidden.has(l)) ? " checked" : ""}>${esc(l)}</label>`).join("");
  $("f-methods").querySelectorAll("input").forEach((box) => box.addEventListener("change", () => {
    const off = Array.from($("f-methods").querySelectorAll("input")).filter((b) => !b.checked).map((b) => b.dataset.label);
    setHash({methods: off.join("|"), only: ""});
  }));
  const shown = ids.filter((id) => {
    const q = info(id), m = runs.map((r) => r.queries[id] && r.queries[id].metrics.greedy_correct).find((v) => v != null);
    return (!state.relation || String(q.relation) === state.relation) && (!state.bucket || String(q.bucket) === state.bucket) &&
      (!state.model || (state.model === "yes") === Boolean(m));
  });
  $("qcount").textContent = `${shown.length} of ${ids.length} queries (${runs.length} methods, ${table.title})`;
  const current = shown.includes(state.query) ? state.query : shown[0];
  $("qlist").innerHTML = shown.map((id) => `<div data-q="${esc(id)}" class="${id === current ? "sel" : ""}">${esc(id)}: ${esc(info(id).prompt)} <b>${esc(info(id).target)}</b></div>`).join("");
  $("qlist").querySelectorAll("div").forEach((el) => el.addEventListener("click", () => setHash({query: el.dataset.q})));
  if (!current) { $("qhead").innerHTML = ""; $("panels").innerHTML = ""; return; }
  const q = info(current);
  const greedy = runs.map((r) => r.queries[current] && r.queries[current].metrics.greedy_correct).find((v) => v != null);
  $("qhead").innerHTML = `<p id="query-head"><b>${esc(current)}</b> &nbsp; prompt: <i>${esc(q.prompt)}</i> &nbsp; target: <mark class="t">${esc(q.target)}</mark>` +
    ` &nbsp; relation ${esc(q.relation ?? "—")} &nbsp; frequency bucket ${esc(q.bucket ?? "—")} &nbsp; model predicts it: ${greedy == null ? "—" : (greedy ? "yes" : "no")}</p>`;
  const checked = new Set(Array.from($("f-methods").querySelectorAll("input")).filter((b) => b.checked).map((b) => b.dataset.label));
  $("panels").innerHTML = runs.filter((r) => checked.has(r.label)).map((r) => {
    const x = r.queries[current];
    if (!x) return `<div class="panel"><h3>${esc(r.label)}</h3><div class="na">no retrieval for this query</div></div>`;
    const world = r.world && D.worlds[r.world];
    const ent = world && world.entities ? world.entities[x.fact] : null;
    const m = x.metrics;
    return `<div class="panel" data-method="${esc(r.label)}"><h3>${esc(r.label)} <span class="meta">MRR ${fmt(m.mrr)} · tail-patch@1 ${fmt(m["tail_patch@1"])} pp · @10 ${fmt(m["tail_patch@10"])} pp</span></h3>` +
      x.ids.map((id, i) => `<div class="prop"><span class="${x.correct[i] == null ? "na" : (x.correct[i] ? "ok" : "no")}">${x.correct[i] == null ? "?" : (x.correct[i] ? "✓" : "✗")}</span> ` +
        `${i + 1}. <span class="meta">${esc(id)} · ${fmt(x.scores[i], 4)}${x.tp ? ` · tail-patch ${fmt(x.tp[i])} pp` : ""}</span><br>${mark(D.texts[id] || "", x, ent)}</div>`).join("") +
      `<details><summary class="meta">provenance</summary><div class="meta">run ${esc(r.run)} · ${esc(r.seeds || "")} · commit ${esc(r.commit || "—")}</div>` +
      `<pre>${esc(r.config || "(no config.yaml)")}</pre>${world && world.card ? `<pre>${esc(world.card)}</pre>` : ""}</details></div>`;
  }).join("");
}
function renderStatic() {
  $("figure-body").innerHTML = D.figure ? `<img alt="Figure 2" style="max-width:100%" src="data:image/png;base64,${D.figure}">` : "<i>no Figure 2 in these runs</i>";
  $("findings-body").textContent = D.findings || "(no findings: no paired tables)";
  $("provenance-body").textContent = D.provenance.join("\n");
}
function showView() {  // view=queries (or tables, figure, ...) shows that section alone
  document.querySelectorAll("main > section").forEach((sec) => {
    sec.style.display = !state.view || sec.dataset.view === state.view ? "" : "none";
  });
}
async function decodeData(el) {  // gzip+base64 JSON, unpacked by the browser's own DecompressionStream
  const bytes = Uint8Array.from(atob(el.textContent), (c) => c.charCodeAt(0));
  return JSON.parse(await new Response(new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"))).text());
}
decodeData($("data")).then((data) => {
  D = data;
  ["f-table", "f-relation", "f-bucket", "f-model", "f-seed"].forEach((id) => $(id).addEventListener("change", (e) => {
    const key = {"f-table": "table", "f-relation": "relation", "f-bucket": "bucket", "f-model": "model", "f-seed": "seed"}[id];
    setHash(key === "table" ? {table: e.target.value, query: "", methods: "", only: ""} : {[key]: e.target.value});
  }));
  window.addEventListener("hashchange", () => { readHash(); renderQueries(); showView(); });
  readHash(); renderTables(); renderStatic(); renderQueries(); showView();
  document.body.dataset.ready = "1";
}, (err) => {
  $("tables-body").textContent = "This page could not read its data (" + err + "): open it in a browser from 2023 on (DecompressionStream).";
  throw err;
});
</script></body></html>
"""
