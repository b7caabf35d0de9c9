"""Scale benchmark on the ``full`` world: sharded extraction and streaming scoring.

    python benchmarks/scale.py --world artifacts/worlds/full-s0 \
        --checkpoint artifacts/models/tiny-s0/<run>/<final checkpoint> --rows 40000 --out scale-out

Measures, on this machine, with the TrackStar method at d = 4096:

- extraction throughput (training rows/s) of one process with all cores
  against ``--cores`` shard processes with one thread each, on the first
  ``--rows`` closed-set sentences (the row count is a knob: throughput does
  not depend on it);
- scoring: R_train from the shards' sums plus R^{-1/2} (a fixed cost in d),
  then the streaming top-k (rows/s), and the peak RSS of the scoring process
  at N/2 and N rows, which should not grow with N.

Each measurement runs in a process of its own (peak RSS is per process).
Writes ``scale.json`` and prints a Markdown table. Use any checkpoint (the
``tiny`` model trained on the ``tiny`` world is enough: throughput does not
depend on what the model learned).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _engine(checkpoint: str, work: Path):
    from trackstar.attribution import METHODS, TrackStar
    from trackstar.lm import load_checkpoint

    ck = load_checkpoint(checkpoint)
    return TrackStar(ck.model, ck.tokenizer, METHODS["trackstar"].replace(d=4096, k=10, lam=0.9),
                     optimizer=ck.optimizer, work_dir=work)


def _texts(world: str, rows: int) -> list[str]:
    from trackstar.world import load_world

    return [s["text"] for s in load_world(world, validate=False).sentences[:rows]]


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    engine = _engine(args.checkpoint, Path(args.work))
    texts = _texts(args.world, args.rows)
    t = time.perf_counter()
    out = {}
    if args.mode == "extract":
        engine.extract_shard(texts, args.index, args.count)
    else:  # score: queries, R from the shard sums, R^{-1/2}, streaming top-k
        from trackstar.attribution.store import FeatureStore, open_store
        from trackstar.world import load_world

        world = load_world(args.world, validate=False)
        queries = [(q["prompt"], q["target"]) for q in world.queries[: args.queries]]
        train_examples = engine.training_examples(texts)
        v = engine.second_moment(train_examples)
        meta = engine._meta("train", list(range(len(texts))), v, "loss", train_examples)
        path = engine.store_path("train", meta)
        train = open_store(path, meta) if args.part is None else FeatureStore.open(path / args.part)
        query = engine.featurize(engine.query_examples(queries), "query", list(range(len(queries))), v)
        t = time.perf_counter()
        whitening = engine.whitening(train, query)
        out["curvature_s"] = time.perf_counter() - t
        t = time.perf_counter()
        from trackstar.attribution.scoring import top_k

        q = engine.transform(query.rows(), whitening)
        rows = max(engine.settings.chunk_rows, (64 << 20) // (4 * train.d))
        top_k(q, train.chunks(rows), 10, whitening.apply, normalize_train=True)
        out["scored_rows"] = train.n_rows
    out["seconds"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out), flush=True)


def _spawn(args, **extra) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", "--world", args.world, "--checkpoint", args.checkpoint,
           "--rows", str(args.rows), "--queries", str(args.queries)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(extra.get("threads", 1))}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"a benchmark process failed ({proc.returncode}); run it with --child to see why")
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--queries", type=int, default=120)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default="scale-out")
    parser.add_argument("--score-only", action="store_true", help="reuse the stores of an earlier run in --out")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="extract", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"rows": args.rows, "cores": args.cores, "d": 4096, "checkpoint": args.checkpoint}
    if args.score_only:
        report.update({k: v for k, v in json.loads((out / "scale.json").read_text()).items() if k.startswith("extract")})
    else:
        report.update(_extract(args, out))
    report.update(_score(args, out))
    (out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _extract(args, out: Path) -> dict:
    report = {}
    t = time.perf_counter()
    one = _result(_spawn(args, mode="extract", work=out / "one", threads=args.cores, index=0, count=1))
    # rows/s from the time spent extracting (tokenizing included; process start,
    # world and model loading excluded), wall_s with them.
    report["extract_1_process"] = {"wall_s": time.perf_counter() - t, "rows_per_s": args.rows / one["seconds"],
                                   "threads": args.cores, "peak_rss_mb": one["peak_rss_mb"]}
    t = time.perf_counter()
    procs = [_spawn(args, mode="extract", work=out / "sharded", threads=1, index=i, count=args.cores)
             for i in range(args.cores)]
    shards = [_result(p) for p in procs]
    wall = time.perf_counter() - t
    report[f"extract_{args.cores}_shards"] = {"wall_s": wall, "rows_per_s": args.rows / max(s["seconds"] for s in shards),
                                             "threads_each": 1,
                                             "peak_rss_mb_per_process": max(s["peak_rss_mb"] for s in shards)}
    return report


def _score(args, out: Path) -> dict:
    from trackstar.attribution.store import shard_dir

    report = {}
    store = next((out / "sharded").glob("train-*"))
    half = _result(_spawn(args, mode="score", work=out / "sharded", threads=args.cores,
                          part=shard_dir(store, 0, args.cores).name))
    full = _result(_spawn(args, mode="score", work=out / "sharded", threads=args.cores))
    for name, r in (("score_first_shard", half), ("score_all_shards", full)):
        report[name] = {"rows": r["scored_rows"], "curvature_s": r["curvature_s"], "topk_s": r["seconds"],
                        "topk_rows_per_s": r["scored_rows"] / r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}
    return report


if __name__ == "__main__":
    raise SystemExit(main())
