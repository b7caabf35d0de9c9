"""Paper tables and Figure 2 from synthetic run records with known numbers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

from trackstar.experiment.record import WANDB_CONFIG_KEY, RunRecord
from trackstar.experiment.tracking import wandb_summary
from trackstar.tables import TABLES, TablesError, check_commits, figure2, load_local_runs, load_wandb_runs, to_latex, to_markdown
from trackstar.tables.aggregate import label_column
from trackstar.tables.figures import figure2_frame
from trackstar.tables.cli import main
from trackstar.tables.runs import FailedRunsWarning, MixedCommitWarning, StaleRecordsWarning

PRESETS = {  # SPEC §1.6: (output_fn, use_v, curvature, unit_norm), as a run resolves them
    "grad_dot": ("loss", False, "none", False), "grad_cosine": ("loss", False, "none", True),
    "trak": ("margin", False, "train", False), "exp1": ("loss", False, "train", False),
    "exp2": ("loss", True, "train", False), "exp3": ("loss", True, "none", True),
    "exp4": ("loss", True, "train", True), "exp5": ("loss", False, "mix", True), "trackstar": ("loss", True, "mix", True),
}
METHODS = ["bm25", "dense", *PRESETS]
# Labels and ranks as the runs write them; the tables must take them from the record.
LABELS = {"bm25": "BM25", "dense": "Dense (MiniLM; stands in for Gecko)", "grad_dot": "Gradient dot product",
          "grad_cosine": "Gradient cosine", "trak": "TRAK", **{f"exp{i}": f"Exp {i}" for i in range(1, 6)},
          "trackstar": "TrackStar", "random": "Random scores (control)"}


def stats(mean: float, n: int = 20) -> dict:
    return {"mean": mean, "ci_low": round(mean - 0.05, 6), "ci_high": round(mean + 0.05, 6), "n": n}


def record(table: str, method: str, mrr: float, *, corpus="closed", commit="c0ffee", finished="2025-01-01T00:00:00+00:00",
           size="tiny", checkpoint=1.0, lam_used=None, extra_metrics=None, **method_fields) -> dict:
    tp = {f"tail_patch@{k}": stats(mrr / k) for k in (1, 3, 5, 10)}
    metrics = {"mrr": stats(mrr), "recall@10": stats(mrr + 0.1), "precision@10": stats(mrr / 10), **tp,
               **{k: stats(v) for k, v in (extra_metrics or {}).items()}}
    split = {"True": {"mrr": stats(mrr + 0.2, 8), "recall@10": stats(mrr + 0.3, 8), "tail_patch@10": stats(mrr / 5, 8)},
             "False": {"mrr": stats(mrr - 0.2, 12), "recall@10": stats(mrr - 0.1, 12), "tail_patch@10": stats(mrr / 20, 12)}}
    info: dict = {"method": method, "corpus": corpus, "k": 10}
    settings: dict = {"model": "builtin:all-MiniLM-L6-v2"} if method == "dense" else {}
    if method in PRESETS:
        settings = dict(zip(("output_fn", "use_v", "curvature", "unit_norm"), PRESETS[method], strict=True))
        settings.update({"lam": 0.9, "projection": "gaussian", "d": 1024})
        settings.update({k: v for k, v in method_fields.items() if v is not None})
        info.update({"lambda": lam_used if lam_used is not None else settings["lam"]})
    return {
        "schema_version": 2, "status": "finished", "error": None, "config_id": f"{table}-{method}-{mrr}",
        "table": table, "corpus": corpus, "started": finished, "run_dir": "",
        "method": {"name": method, "label": LABELS[method], "family": "gradient" if method in PRESETS else "baseline",
                   "rank": float(METHODS.index(method)) if method in METHODS else 100.0, "settings": settings},
        "world": {"profile": "tiny", "seed": 0},
        "model": {"family": "gpt2", "size": size, "optimizer": "adafactor", "seed": 0, "checkpoint": checkpoint,
                  "checkpoint_fractions": [0.25, 0.5, 1.0], "epochs": None, "hf_name_or_path": None},
        "eval": {"corpus": corpus, "k": 10, "tail_patch_ks": [1, 3, 5, 10]},
        "metrics": metrics, "splits": {"greedy_correct": split}, "info": info, "timings": {"total": 1.0},
        "git_commit": commit, "finished": finished,
    }


def write(root: Path, rec: dict, name: str | None = None) -> Path:
    run_dir = root / rec["table"] / (name or f"{rec['method']['name']}-{rec['corpus']}-{abs(hash(rec['config_id'])) % 10**8:08d}")
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({**rec, "run_dir": str(run_dir)}))
    return run_dir


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for i, method in enumerate(METHODS):
        write(root, record("table1", method, 0.1 + 0.05 * i))
    for i, method in enumerate(["bm25", "dense", "grad_dot", "grad_cosine", "trackstar"]):
        write(root, record("table2", method, 0.3 + 0.01 * i, corpus="open"))
    for fn, mrr in (("logit", 0.21), (None, 0.23), ("margin", 0.22)):
        write(root, record("table_a3", "trackstar", mrr, output_fn=fn))
    for d, mrr in ((4096, 0.34), (256, 0.31), (1024, 0.33)):
        write(root, record("table_a4", "trackstar", mrr, d=d))
    for use_v, curv, lam, mrr in ((True, "mix", 0.9, 0.40), (True, "mix", "auto", 0.41), (False, "none", None, 0.20), (True, "train", None, 0.30)):
        write(root, record("table_a5", "trackstar", mrr, use_v=use_v, curvature=curv, lam=lam,
                           lam_used=0.95 if lam == "auto" else None))
    for size, mrr in (("micro", 0.1), ("small", 0.3), ("tiny", 0.2)):
        write(root, record("figure2_scale", "trackstar", mrr, size=size))
    for frac, mrr in ((0.25, 0.05), (0.5, 0.12)):
        write(root, record("figure2_scale", "trackstar", mrr, checkpoint=frac))
    for method, lds in (("random", 0.01), ("bm25", 0.5), ("trackstar", 0.4)):
        write(root, record("table_c1", method, lds / 2, corpus="open",
                           extra_metrics={"lds": lds, "loo_drop@10": 10 * lds, "random_drop@10": 0.03}))
    return root


def labels(table, header="Method") -> list[str]:
    return list(table.rows[label_column(header)])


def test_table1_rows_in_paper_order_with_ci_cells(results):
    table = TABLES["table1"](load_local_runs(results).frame)
    assert labels(table) == ["BM25", "Dense (MiniLM; stands in for Gecko)", "Gradient dot product", "Gradient cosine",
                             "TRAK", "Exp 1", "Exp 2", "Exp 3", "Exp 4", "Exp 5", "TrackStar"]
    md = to_markdown(table)
    assert "| Method | MRR | Recall@10 | Tail-patch@10 (pp) |" in md
    # BM25: mrr 0.1 -> [0.05, 0.15], recall 0.2, tail-patch@10 = 0.01
    assert "| BM25 | 0.100 [0.050, 0.150] | 0.200 [0.150, 0.250] | 0.010 [-0.040, 0.060] |" in md
    assert "TrackStar & 0.600 [0.550, 0.650]" in to_latex(table)


def test_table2_and_ablation_tables(results):
    runs = load_local_runs(results).frame
    t2 = TABLES["table2"](runs)
    assert labels(t2) == ["BM25", "Dense (MiniLM; stands in for Gecko)", "Gradient dot product", "Gradient cosine", "TrackStar"]
    assert t2.rows["mrr"].tolist() == pytest.approx([0.30, 0.31, 0.32, 0.33, 0.34])
    a3 = TABLES["table_a3"](runs)
    assert labels(a3, "Output function") == ["Loss", "Margin", "Logit"]
    assert a3.rows["mrr"].tolist() == pytest.approx([0.23, 0.22, 0.21])
    a4 = TABLES["table_a4"](runs)
    assert labels(a4, "d") == ["256", "1024", "4096"]
    a5 = TABLES["table_a5"](runs)
    got = [(r[label_column("V")], r[label_column("R")], r[label_column("λ")], r["mrr"]) for _, r in a5.rows.iterrows()]
    assert got == [("no", "none", "—", 0.20), ("yes", "R_train", "—", 0.30), ("yes", "R_mix", "0.9", 0.40), ("yes", "R_mix", "auto (0.95)", 0.41)]
    assert "$\\lambda$" in to_latex(a5)


def test_counterfactual_table(results):
    c1 = TABLES["table_c1"](load_local_runs(results).frame)
    assert labels(c1) == ["BM25", "TrackStar", "Random scores (control)"]  # the control row last
    assert [c.key for c in c1.columns] == ["lds", "loo_drop@10", "random_drop@10", "tail_patch@10"]
    assert c1.rows["lds"].tolist() == pytest.approx([0.5, 0.4, 0.01])
    assert "| TrackStar | 0.400 [0.350, 0.450] | 4.000 [3.950, 4.050] | 0.030 [" in to_markdown(c1)


def test_a6_and_a7_fall_back_to_table1_runs(results):
    runs = load_local_runs(results).frame
    a6 = TABLES["table_a6"](runs)
    assert "table1 runs" in a6.note and len(a6.rows) == len(METHODS)
    assert [c.header for c in a6.columns] == [f"Tail-patch@{k} (pp)" for k in (1, 3, 5, 10)]
    assert a6.rows.loc[0, "tail_patch@3"] == pytest.approx(0.1 / 3)
    a7 = TABLES["table_a7"](runs)
    md = to_markdown(a7)
    assert "Correct: MRR" in md and "Incorrect: Tail-patch@10 (pp)" in md
    # BM25 (mrr 0.1): correct 0.3, incorrect -0.1
    assert md.splitlines()[4].startswith("| BM25 | 0.300 [0.250, 0.350] | 0.400 [0.350, 0.450] | 0.020 [-0.030, 0.070] | -0.100 [")


def test_cli_writes_every_format_with_provenance(results, tmp_path, capsys):
    out = tmp_path / "paper_tables"
    assert main(["--results", str(results), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "### Table 1" in stdout and "| TrackStar | 0.600 [0.550, 0.650]" in stdout
    for name in [*TABLES, "figure2"]:
        for ext in ("md", "tex", "csv", "provenance.json"):
            assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    bm25_dir = next((results / "table1").glob("bm25-*"))
    for ext in ("md", "tex", "csv"):
        text = (out / f"table1.{ext}").read_text()
        assert str(bm25_dir) in text and "c0ffee (11 runs)" in text and "trackstar-tables --results" in text
        assert ext == "csv" or "0.600 [0.550, 0.650]" in text
    csv = pd.read_csv(out / "table1.csv", comment="#")
    row = csv[csv["Method"] == "TrackStar"].iloc[0]
    assert (row["MRR mean"], row["MRR ci_low"], row["MRR ci_high"], row["MRR n"]) == pytest.approx((0.6, 0.55, 0.65, 20))
    prov = json.loads((out / "table1.provenance.json").read_text())
    assert prov["git_commits"] == {"c0ffee": 11} and str(bm25_dir) in prov["runs"] and not prov["mixed_commits"]
    readme = (out / "README.md").read_text()
    assert "[table1.md](table1.md)" in readme and str(results) in readme and "c0ffee" in readme
    # These records predate the environment field: said, not guessed.
    loaded = len(list(results.rglob("metrics.json")))
    assert f"Environment(s) of the runs (machine, instruction sets, libraries): not recorded ({loaded} runs)" in readme
    assert prov["environments"] == {"not recorded": loaded}
    png = (out / "figure2.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_provenance_names_each_environment_of_the_runs(results, tmp_path):
    """Runs from two machines: each file and the index list both, with their run counts."""
    path = next((results / "table1").glob("bm25-*")) / "metrics.json"
    rec = json.loads(path.read_text())
    rec["environment"] = {"cpu": "Some CPU", "torch_cpu_capability": "AVX512", "numpy_simd": "AVX512_SKX",
                          "python": "3.11.7", "packages": {"torch": "2.13.0", "numpy": "2.4.6"}}
    path.write_text(json.dumps(rec))
    out = tmp_path / "paper_tables"
    assert main(["--results", str(results), "--out", str(out), "--tables", "table1"]) == 0
    label = "Some CPU (torch AVX512, numpy AVX512_SKX); Python 3.11.7; torch 2.13.0, numpy 2.4.6"
    for text in ((out / "README.md").read_text(), (out / "table1.md").read_text()):
        assert f"{label} (1 run)" in text and "not recorded (" in text
    assert json.loads((out / "table1.provenance.json").read_text())["environments"][label] == 1


def test_figure2_panels(results):
    fig = figure2(load_local_runs(results).frame)
    assert "table_a4 runs" in fig.panels["d"].note  # no figure2_dim runs
    assert labels(fig.panels["d"], "Projection dimension d") == ["256", "1024", "4096"]
    assert labels(fig.panels["size"], "Model size") == ["micro", "tiny", "small"]
    # A line per model size in the training panel (one regime: not in the labels).
    assert list(zip(labels(fig.panels["step"]), labels(fig.panels["step"], "Fraction of training steps"))) == [
        ("TrackStar, micro model", "1"), ("TrackStar, tiny model", "0.25"), ("TrackStar, tiny model", "0.5"),
        ("TrackStar, tiny model", "1"), ("TrackStar, small model", "1")]
    # The final checkpoints are points of both panels; the provenance names each run once.
    frame = figure2_frame(fig)
    shared = set(fig.panels["size"].rows["run"]) & set(fig.panels["step"].rows["run"])
    assert shared and len(frame.runs) == len(set(frame.runs)) == len(set(frame.rows["run"]))
    assert sum(frame.commits.values()) == len(frame.runs)


def test_figure2_separates_training_regimes(results):
    """Runs of the paper regime (another world, 2 epochs) are lines of their own."""
    for size, frac, mrr in (("tiny", 1.0, 0.5), ("small", 1.0, 0.6), ("tiny", 0.5, 0.4)):
        rec = record("figure2_scale", "trackstar", mrr, size=size, checkpoint=frac)
        rec["world"]["profile"], rec["model"]["epochs"] = "small", 2
        rec["config_id"] += "-paper"
        write(results, rec)
    fig = figure2(load_local_runs(results).frame)
    size = list(zip(labels(fig.panels["size"]), labels(fig.panels["size"], "Model size")))
    assert size == [("TrackStar, small world, 2 epochs", "tiny"), ("TrackStar, small world, 2 epochs", "small"),
                    ("TrackStar, tiny world, preset epochs", "micro"), ("TrackStar, tiny world, preset epochs", "tiny"),
                    ("TrackStar, tiny world, preset epochs", "small")]
    assert "TrackStar, small world, 2 epochs, tiny model" in labels(fig.panels["step"])
    assert labels(fig.panels["d"])[0] == "TrackStar"  # the d panel has one regime


def test_absent_table_is_skipped_or_strict_error(results, tmp_path, capsys):
    out = tmp_path / "out"
    (results / "table2").rename(tmp_path / "elsewhere")
    assert main(["--results", str(results), "--out", str(out), "--tables", "table1,table2"]) == 0
    assert "table2: no runs tagged table2" in capsys.readouterr().err
    assert (out / "table1.md").is_file() and not (out / "table2.md").exists()
    assert "Skipped (no runs): table2" in (out / "README.md").read_text()
    assert main(["--results", str(results), "--out", str(out), "--tables", "table2", "--strict"]) == 2
    assert "--config-name table2" in capsys.readouterr().err
    assert main(["--results", str(results), "--out", str(out), "--tables", "table9"]) == 2
    assert "unknown ['table9']" in capsys.readouterr().err


def test_mixed_commits_warn_and_error_with_flag(results, tmp_path, capsys):
    write(results, record("table1", "trak", 0.9, commit="deadbeef-dirty", finished="2025-02-01T00:00:00+00:00"), name="trak-rerun")
    runs = load_local_runs(results)
    with pytest.warns(MixedCommitWarning, match=r"c0ffee \(\d+ runs\), deadbeef-dirty \(1 run\)"):
        check_commits(runs)
    with pytest.raises(TablesError, match="require-single-commit"):
        check_commits(runs, require_single=True)
    out = tmp_path / "out"
    assert main(["--results", str(results), "--out", str(out), "--tables", "table1"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: The runs come from 2 different git commits" in err
    assert "share a row with a later run" in err  # the older TRAK run is superseded
    text = (out / "table1.md").read_text()
    assert "MIXED COMMITS" in text and "deadbeef-dirty (1 run)" in text and "Superseded runs" in text
    # A table of one commit still tells that the results root is mixed.
    assert main(["--results", str(results), "--out", str(out), "--tables", "table2"]) == 0
    assert "the runs loaded with these span 2 commits" in (out / "table2.md").read_text()
    assert "| TRAK | 0.900 [" in text
    assert main(["--results", str(results), "--out", str(out), "--require-single-commit"]) == 2
    assert "deadbeef-dirty" in capsys.readouterr().err


def test_no_runs_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(TablesError, match=r"No run records.*trackstar-run -m --config-dir sweeps"):
        load_local_runs(tmp_path / "nothing")
    assert main(["--results", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_failed_runs_are_reported_and_left_out(results):
    failed = write(results, {**record("table1", "exp3", 0.99), "status": "failed", "error": "ValueError: boom",
                             "metrics": None}, name="exp3-failed")
    with pytest.warns(FailedRunsWarning, match="exp3-failed: failed: ValueError: boom"):
        runs = load_local_runs(results)
    assert [f["run"] for f in runs.failed] == [str(failed)]
    assert 0.99 not in TABLES["table1"](runs.frame).rows["mrr"].tolist()


class FakeSummary(dict):
    pass


class FakeRun:
    """What log_to_wandb leaves in W&B: the resolved config plus the record header, and the summary."""

    def __init__(self, rec: dict, run_id: str, state="finished"):
        record = RunRecord.from_dict(rec)
        self.path = ["me", "proj", run_id]
        self.state = state
        self.created_at = rec["finished"]
        self.metadata = {"git": {"commit": rec["git_commit"]}}
        self.config = {"table": rec["table"], "world": rec["world"], "model": rec["model"],
                       "method": {"name": rec["method"]["name"]}, "eval": rec["eval"], "logger": {"mode": "online"},
                       WANDB_CONFIG_KEY: record.header()}
        self.summary = FakeSummary(wandb_summary(record) if state == "finished" else {})


class FakeApi:
    def __init__(self, runs):
        self._runs = runs
        self.asked = None

    def runs(self, path):
        self.asked = path
        return self._runs


def test_wandb_source_with_a_fake_api(monkeypatch, tmp_path, capsys):
    recs = [record("table1", "bm25", 0.3), record("table1", "trackstar", 0.5), record("table1", "exp5", 0.4)]
    api = FakeApi([FakeRun(r, f"id{i}") for i, r in enumerate(recs)] + [FakeRun(recs[0], "crashed1", state="crashed")])
    with pytest.warns(FailedRunsWarning, match="wandb:me/proj/crashed1"):
        runs = load_wandb_runs("me", "proj", api=api)
    assert api.asked == "me/proj"
    table = TABLES["table1"](runs.frame)
    assert labels(table) == ["BM25", "Exp 5", "TrackStar"]
    trackstar = table.rows.iloc[2]
    assert (trackstar["curvature"], trackstar["lam"]) == ("mix", 0.9)
    assert "| TrackStar | 0.500 [0.450, 0.550] |" in to_markdown(table)
    # One flattening serves W&B and the local records: W&B tables equal local ones, split intervals included.
    local = tmp_path / "local"
    for r in recs:
        write(local, r)
    local_runs = load_local_runs(local).frame
    for name in ("table1", "table_a7"):
        assert to_markdown(TABLES[name](runs.frame)) == to_markdown(TABLES[name](local_runs))
    assert "| BM25 | 0.500 [0.450, 0.550] | 0.600 [" in to_markdown(TABLES["table_a7"](runs.frame))

    import wandb

    monkeypatch.setattr(wandb, "Api", lambda: api)
    out = tmp_path / "out"
    assert main(["--source", "wandb", "--entity", "me", "--project", "proj", "--out", str(out), "--tables", "table1"]) == 0
    assert "wandb:me/proj/id1" in (out / "table1.md").read_text()
    assert main(["--source", "wandb", "--out", str(out)]) == 2
    assert "--entity and --project" in capsys.readouterr().err


def test_markdown_is_printed_in_full_to_stdout(results, tmp_path, capsys):
    assert main(["--results", str(results), "--out", str(tmp_path / "o"), "--tables", "table_a4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(to_markdown(TABLES["table_a4"](load_local_runs(results).frame)))
    assert io.StringIO(printed).readline().startswith("### Table A.4")


def test_records_of_another_schema_are_left_out_with_a_message(results, tmp_path, capsys):
    old = record("table1", "trak", 0.77)
    old.pop("schema_version")
    write(results, old, name="trak-schema1")
    with pytest.warns(StaleRecordsWarning, match="trak-schema1.*schema 1.*Re-run"):
        runs = load_local_runs(results)
    assert 0.77 not in runs.frame["mrr"].tolist() and len(runs.stale) == 1
    assert main(["--results", str(results), "--out", str(tmp_path / "o"), "--tables", "table1", "--strict"]) == 2
    assert "another schema" in capsys.readouterr().err


def test_tables_import_no_lower_stage():
    """tables/ reads run records only: a fresh interpreter importing it loads no stage module."""
    import subprocess
    import sys

    code = ("import sys, trackstar.tables, trackstar.tables.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "[['trackstar', s] for s in ('attribution', 'evaluation', 'lm', 'retrieval', 'world')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tables_are_published_to_one_offline_wandb_run(results, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: auto means offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "tables"
    for name in ("table1", "table2", "table_a5"):  # the cells' W&B groups, as their records name them
        for path in (results / name).glob("*/metrics.json"):
            record = json.loads(path.read_text())
            path.write_text(json.dumps({**record, "wandb": {"mode": "offline", "group": f"{name}:{name}"}}))
    assert main(["--results", str(results), "--out", str(out), "--wandb", "--html"]) == 0
    wandb.teardown()  # the service writes the run log on its own schedule
    assert not (out / "wandb").exists()  # the offline copy goes beside the cells', not into the tables
    # The documented sync command finds it with the cells' runs.
    (run,) = results.glob("*/*/wandb/offline-run-*")
    assert run.parent.parent == results / "paper-tables" / "tables"
    assert b"table1:table1" in next(run.glob("*.wandb")).read_bytes()  # it joined the biggest group
    raw = next(run.glob("*.wandb")).read_bytes()
    for expected in (b"paper-tables", b"table1", b"table_a5", b"figure2"):
        assert expected in raw, expected
    tables = {p.name.split("_")[0] for p in (run / "files" / "media" / "table").glob("*.table.json")}
    assert "table1" in tables and "figure2" in tables
    assert list((run / "files" / "media" / "images" / "figure2").glob("*.png"))
    # The report rides along: a file of the run and an artifact of type report.
    assert (run / "files" / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert b"report.html" in raw


def test_runs_differing_only_in_seeds_are_one_row_over_seeds(tmp_path):
    """Seeds are no duplicates: a row over seeds has their mean, the per-query interval averaged,
    and a t-interval across seeds; a re-run of one seed still supersedes the older run."""
    from scipy import stats as st

    root = tmp_path / "results"
    write(root, record("table1", "bm25", 0.9))
    mrrs = {0: 0.50, 1: 0.56, 2: 0.47}
    for seed, mrr in mrrs.items():
        rec = record("table1", "trackstar", mrr)
        rec["model"]["seed"], rec["seedless_id"] = seed, "ts-setting"
        write(root, rec)
    old = record("table1", "trackstar", 0.1, finished="2024-01-01T00:00:00+00:00")  # seed 0, older
    old["config_id"] += "-old"
    old["seedless_id"] = "ts-setting"
    write(root, old)
    same = record("table1", "trackstar", 0.9, finished="2024-06-01T00:00:00+00:00")  # seed 1, same settings
    same["config_id"] += "-elsewhere"  # another config id (another ablation name), nothing result-bearing
    same["model"]["seed"], same["seedless_id"] = 1, "elsewhere-setting"
    write(root, same)
    with pytest.warns(UserWarning, match="share a row with a later run"):
        table = TABLES["table1"](load_local_runs(root).frame)
    # The older seed-0 run and the older run of an equal setting are superseded, never averaged in.
    assert len(table.rows) == 2 and len(table.superseded) == 2
    row = table.rows[table.rows["label:Method"] == "TrackStar"].iloc[0]
    values = list(mrrs.values())
    half = st.t.ppf(0.975, 2) * pd.Series(values).std() / 3 ** 0.5
    assert row["mrr"] == pytest.approx(sum(values) / 3)
    assert row["mrr/ci_low"] == pytest.approx(sum(values) / 3 - 0.05)
    assert (row["mrr/seed_low"], row["mrr/seed_high"], row["mrr/seeds"]) == pytest.approx(
        (row["mrr"] - half, row["mrr"] + half, 3))
    assert len(table.runs) == 4  # BM25 and the three seeds
    markdown = to_markdown(table)
    assert f"{row['mrr']:.3f} [{row['mrr/ci_low']:.3f}, {row['mrr/ci_high']:.3f}]; seeds [" in markdown
    assert "n=3" in markdown and "t-interval across seeds" in markdown


def _fp(rec: dict, dtype: str, seedless: str, finished: str) -> dict:
    rec["method"]["settings"]["model_dtype"] = dtype
    rec["config_id"] += f"-{dtype}"
    rec["seedless_id"], rec["finished"] = seedless, finished
    return rec


def test_a_row_never_silently_takes_one_of_two_settings(tmp_path, capsys):
    """An fp16 run lands in Table 1's TrackStar row beside the fp32 one: its labels do not show
    the dtype, so the tables refuse and name the setting instead of keeping the later run."""
    root = tmp_path / "results"
    write(root, record("table1", "bm25", 0.9))
    write(root, _fp(record("table1", "trackstar", 0.5), "float32", "fp32", "2025-01-01T00:00:00+00:00"))
    write(root, _fp(record("table1", "trackstar", 0.7), "float16", "fp16", "2025-02-01T00:00:00+00:00"))
    with pytest.raises(TablesError, match=r"row 'TrackStar'.*method\.model_dtype: \"float32\".*\"float16\""):
        TABLES["table1"](load_local_runs(root).frame)
    out = tmp_path / "tables"
    assert main(["--results", str(root), "--out", str(out), "--tables", "table1"]) != 0
    assert "model_dtype" in capsys.readouterr().err and not (out / "table1.md").exists()


def _world(rec: dict, *, profile: str | None = None, content: str | None = None, checkpoint: str | None = None) -> dict:
    if profile:
        rec["world"]["profile"] = profile
    rec["artifacts"] = {"world": {"content_hash": content or "w" * 64, "path": "x"},
                        "checkpoint": {"hash": checkpoint or "c" * 64, "id": "m/c", "path": "y"}}
    return rec


def test_a_table_of_runs_of_two_worlds_is_refused(tmp_path):
    """grad cosine on the tiny world beside TrackStar on the micro world would pair query Q00000
    of one world with Q00000 of the other: refused, naming the runs and the differing setting."""
    root = tmp_path / "results"
    write(root, _world(record("table1", "grad_cosine", 0.3), profile="tiny"), "cos-tiny")
    write(root, _world(record("table1", "trackstar", 0.5), profile="micro", content="m" * 64), "ts-micro")
    with pytest.raises(TablesError, match=r"2 different worlds.*profile: \"tiny\" \(.*cos-tiny\); \"micro\" \(.*ts-micro\)"):
        TABLES["table1"](load_local_runs(root).frame)


def test_one_seed_on_two_world_contents_or_two_checkpoints_is_refused(tmp_path):
    """Same settings, different content (the world or the model was rebuilt by other code)."""
    root = tmp_path / "results"
    write(root, _world(record("table1", "bm25", 0.3)), "old-world")
    write(root, _world(record("table1", "trackstar", 0.5), content="v" * 64), "new-world")
    with pytest.raises(TablesError, match="world seed 0 were made on 2 worlds with different content"):
        TABLES["table1"](load_local_runs(root).frame)
    root = tmp_path / "results2"
    write(root, _world(record("table1", "grad_dot", 0.3)), "old-model")
    write(root, _world(record("table1", "trackstar", 0.5), checkpoint="d" * 64), "new-model")
    with pytest.raises(TablesError, match="used 2 different checkpoints"):
        TABLES["table1"](load_local_runs(root).frame)
    root = tmp_path / "results3"  # the same content and checkpoint: a table
    write(root, _world(record("table1", "grad_dot", 0.3)))
    write(root, _world(record("table1", "trackstar", 0.5)))
    assert len(TABLES["table1"](load_local_runs(root).frame).rows) == 2


def test_results_of_baselines_only_make_their_tables(tmp_path, capsys):
    """Only baseline runs (no gradient settings in any record) failed with `missing field 'd'`."""
    root = tmp_path / "results"
    write(root, record("table1", "bm25", 0.5))
    write(root, record("table1", "dense", 0.4))
    out = tmp_path / "tables"
    assert main(["--results", str(root), "--out", str(out)]) == 0
    assert labels(TABLES["table1"](load_local_runs(root).frame)) == ["BM25", LABELS["dense"]]
    assert (out / "table1.md").is_file() and (out / "README.md").is_file()
