"""One prepared GPU run: CPU-vs-GPU agreement, and trackstar against bergson on Pythia shapes.

    python benchmarks/gpu_check.py [--device cuda] [--out DIR] [--budget-s 270]
    python benchmarks/gpu_check.py --dry-run        # on the CPU, tiny shapes: proves it runs end to end

A GPU is lent now and then, for minutes: this is the one command to fire then.
It never needs more than one GPU and aims to finish within ``--budget-s``
(default 270 s; measurements that would start after it are skipped, and say so).

1. **Agreement** (micro world and model, pretrained on the CPU in seconds):
   TrackStar's features, top-10 and scores on the CPU against the GPU.
2. **Throughput** of per-example projected gradient features on randomly
   initialised Pythia-160M- and Pythia-1B-shaped GPT-NeoX models (1,024-token
   random sequences), in float32 and bfloat16: examples/s and tokens/s of
   this project's extraction and of bergson's ``collect_gradients`` side by
   side (d ≈ 4,096 features each: ours split over the block matrices, bergson's
   p × p per module), when bergson is installed; otherwise its rows say why not.
   bfloat16 is autocast for trackstar and the model cast to bfloat16 for
   bergson (each tool's own low-precision mode).

Writes ``gpu_check.json`` and ``gpu_check.md`` (one table) to ``--out``.
Without a GPU (and without ``--dry-run``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: GPT-NeoX shapes (hidden, layers, heads, MLP width, vocabulary) of the Pythia models, and
#: a tiny one for the dry run.
SHAPES = {
    "pythia-160m": (768, 12, 12, 3072, 50304),
    "pythia-1b": (2048, 16, 8, 8192, 50304),
    "tiny": (64, 2, 2, 256, 512),
}
FEATURES = 4096


def _agreement(device: str, work: Path) -> dict:
    from trackstar.attribution import METHODS, TrackStar
    from trackstar.attribution.store import FeatureStore
    from trackstar.lm import PretrainConfig, final_checkpoint, load_checkpoint, pretrain_model
    from trackstar.world import build_world, load_world

    world = load_world(build_world(work / "world", "micro", 0))
    run = pretrain_model(world.path, work / "model", PretrainConfig.preset("micro"), progress=False)
    texts = [s["text"] for s in world.sentences]
    queries = [(q["prompt"], q["target"]) for q in world.queries]
    out = {}
    for side, where in (("cpu", "cpu"), ("device", device)):
        ck = load_checkpoint(final_checkpoint(run), device=where)
        engine = TrackStar(ck.model, ck.tokenizer, METHODS["trackstar"].replace(d=256, k=10),
                           optimizer=ck.optimizer, work_dir=work / f"features-{side}")
        result = engine.attribute(texts, queries)
        out[side] = (result, FeatureStore.open(result.train_store).rows().numpy())
    (cpu, a), (gpu, b) = out["cpu"], out["device"]
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(cpu.proponent_ids, gpu.proponent_ids)])
    same = [x == y for x, y in zip(cpu.proponent_ids, gpu.proponent_ids)]
    score_diff = float(np.max(np.abs(np.array(cpu.proponent_scores) - np.array(gpu.proponent_scores))))
    return {"feature_rel_err_max": float(rel.max()), "feature_rel_err_median": float(np.median(rel)),
            "top10_overlap": float(overlap), "identical_rankings": f"{sum(same)}/{len(same)}",
            "proponent_score_abs_diff_max": score_diff}


def _model(shape: str, device: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, mlp, vocab = SHAPES[shape]
    torch.manual_seed(0)
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=mlp, vocab_size=vocab, max_position_embeddings=2048,
                           attn_implementation="eager")
    with torch.device(device):
        model = GPTNeoXForCausalLM(config)
    return model.eval()


def _data(vocab: int, n: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _trackstar(model, ids: torch.Tensor, batch: int, dtype: str, device: str) -> tuple[float, int]:
    """Seconds to extract features of every row of ``ids`` after one warm-up batch, and the feature width."""
    from trackstar.attribution import AttributionSettings
    from trackstar.attribution.features import FeatureExtractor
    from trackstar.attribution.gradients import block_linear_sites
    from trackstar.attribution.output import Batch, Example
    from trackstar.attribution.projection import Projector

    sites = block_linear_sites(model)
    settings = AttributionSettings(d=FEATURES, use_v=False)
    projector = Projector(sites, "gaussian", settings.d, 0)
    extractor = FeatureExtractor(model, sites, projector, None,
                                 autocast_dtype=None if dtype == "float32" else getattr(torch, dtype))
    seq = ids.shape[1]

    def make(rows: torch.Tensor) -> Batch:
        weights = (0.0,) + (1 / (seq - 1),) * (seq - 1)  # the mean loss over the predicted tokens
        examples = [Example(tuple(r.tolist()), weights, "loss", f"x{i}") for i, r in enumerate(rows)]
        return Batch(rows, torch.ones_like(rows), torch.arange(seq).expand_as(rows).contiguous(),
                     torch.ones(rows.shape, dtype=torch.float32), examples)

    batches = [make(ids[i:i + batch]) for i in range(0, len(ids), batch)]
    width = extractor(batches[0]).shape[1]  # warm-up
    _sync(device)
    t = time.perf_counter()
    for b in batches[1:]:
        extractor(b).cpu()
    _sync(device)
    return time.perf_counter() - t, int(width)


def _bergson(model, ids: torch.Tensor, batch: int, dtype: str, device: str, work: Path) -> tuple[float, int]:
    """The same for bergson's collect_gradients (two-sided p × p projection per module, on disk)."""
    from bergson import collect_gradients
    from bergson.config.config import IndexConfig, PreprocessConfig
    from bergson.data import allocate_batches
    from bergson.utils.worker_utils import processor_for
    from datasets import Dataset

    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    model.requires_grad_(False)
    model.get_input_embeddings().requires_grad_(True)  # as bergson's own set-up: no weight gradients
    prefix = model.base_model_prefix + "."
    targets = {n[len(prefix):] for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    side = max(1, int(math.sqrt(FEATURES / len(targets))))

    def once(rows: torch.Tensor, name: str) -> float:
        path = work / name
        for p in (path, Path(str(path) + ".part")):
            shutil.rmtree(p, ignore_errors=True)
        data = Dataset.from_dict({"input_ids": rows.tolist(), "length": [rows.shape[1]] * len(rows)})
        cfg = IndexConfig(run_path=str(path), projection_dim=side, token_batch_size=rows.shape[1] * batch,
                          loss_reduction="mean")
        cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
        _sync(device)
        t = time.perf_counter()
        collect_gradients(model=model, data=data, processor=processor_for(cfg), cfg=cfg,
                          batches=allocate_batches(data["length"][:], cfg.token_batch_size),
                          target_modules=targets, preprocess_cfg=PreprocessConfig())
        _sync(device)
        return time.perf_counter() - t

    once(ids[:batch], "warmup")
    return once(ids[batch:], "timed"), side * side * len(targets)


def _throughput(device: str, shapes: list[str], dtypes: list[str], seq: int, count: dict, batch: dict,
                deadline: float, work: Path) -> list[dict]:
    try:
        import bergson  # noqa: F401

        bergson_missing = None
    except ImportError as exc:
        bergson_missing = f"bergson not installed ({exc}); pip install bergson to compare"
    rows = []
    for shape in shapes:
        n = count[shape]
        ids = _data(SHAPES[shape][4], n + batch[shape], seq)
        for dtype in dtypes:
            for tool in ("trackstar", "bergson"):
                row = {"shape": shape, "dtype": dtype, "tool": tool, "seq_len": seq, "examples": n,
                       "batch": batch[shape]}
                if tool == "bergson" and bergson_missing:
                    rows.append({**row, "skipped": bergson_missing})
                    continue
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "over the time budget (--budget-s)"})
                    continue
                model = _model(shape, device)
                try:
                    if tool == "trackstar":
                        seconds, width = _trackstar(model, ids, batch[shape], dtype, device)
                    else:
                        seconds, width = _bergson(model, ids, batch[shape], dtype, device, work)
                except Exception as exc:  # noqa: BLE001 - recorded: one tool's failure must not lose the others
                    rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:500]})
                    continue
                finally:
                    del model
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                rows.append({**row, "seconds": seconds, "feature_dim": width,
                             "examples_per_s": n / seconds, "tokens_per_s": n * seq / seconds})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(report: dict) -> str:
    """The throughput table, trackstar and bergson side by side, and the agreement line."""
    lines = [f"GPU check on {report['gpu']} (torch {report['torch']}{', DRY RUN on the CPU' if report['dry_run'] else ''})",
             "", "| shape | dtype | tool | examples/s | tokens/s | features |", "|---|---|---|---:|---:|---:|"]
    for r in report["throughput"]:
        if "examples_per_s" in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['tool']} | {r['examples_per_s']:.2f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['feature_dim']} |")
        else:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['tool']} | — | — | {r.get('skipped') or r.get('error')} |")
    a = report.get("agreement_micro")
    if a:
        lines += ["", f"CPU vs {report['device']} on the micro model: features' largest relative difference "
                      f"{a['feature_rel_err_max']:.2e} (median {a['feature_rel_err_median']:.2e}), top-10 overlap "
                      f"{a['top10_overlap']:.3f}, identical rankings {a['identical_rankings']}, largest score "
                      f"difference {a['proponent_score_abs_diff_max']:.2e}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=".")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="start no measurement after this many seconds (the lent GPU's minutes are few)")
    parser.add_argument("--dry-run", action="store_true",
                        help="everything on the CPU with a tiny shape and short sequences: proves the script runs")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.dry_run:
        device, shapes, seq, count, batch = "cpu", ["tiny"], 32, {"tiny": 8}, {"tiny": 4}
    else:
        from trackstar.device import DeviceError, resolve_device

        try:
            device = str(resolve_device(args.device))
        except DeviceError as exc:
            print(f"no GPU here ({exc}); nothing to check (--dry-run runs it on the CPU)")
            return 0
        shapes, seq = ["pythia-160m", "pythia-1b"], 1024
        count, batch = {"pythia-160m": 256, "pythia-1b": 64}, {"pythia-160m": 8, "pythia-1b": 4}
    report = {"device": device, "dry_run": args.dry_run, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
              "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        report["agreement_micro"] = _agreement(device, Path(tmp))
        report["throughput"] = _throughput(device, shapes, ["float32", "bfloat16"], seq, count, batch,
                                           start + args.budget_s, Path(tmp))
    report["seconds"] = time.monotonic() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "gpu_check.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
