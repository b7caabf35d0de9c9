"""CPU against GPU: the same features and top-k, and extraction throughput on a GPU.

    python benchmarks/gpu_check.py [--out DIR] [--device cuda]

Run it whenever a GPU is at hand (the project never needs one). It

1. pretrains the micro model on the micro world (CPU, seconds), attributes the
   micro world's queries with TrackStar on the CPU and on the GPU, and reports
   the features' largest relative difference, the top-10 overlap and the
   largest score difference;
2. times feature extraction on the peers' 4.2M-parameter GPT-2-shaped model
   (4 layers, width 256, vocabulary 4096; 512 random sequences of 64 tokens,
   batch 32, d = 4096) on the CPU and on the GPU, in float32 and bfloat16.

It prints a table and writes ``gpu_check.json`` to ``--out``. Without a GPU it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


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
    for where in ("cpu", device):
        ck = load_checkpoint(final_checkpoint(run), device=where)
        engine = TrackStar(ck.model, ck.tokenizer, METHODS["trackstar"].replace(d=256, k=10),
                           optimizer=ck.optimizer, work_dir=work / f"features-{where}")
        result = engine.attribute(texts, queries)
        out[where] = (result, FeatureStore.open(result.train_store).rows().numpy())
    (cpu, a), (gpu, b) = out["cpu"], out[device]
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30)
    overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(cpu.proponent_ids, gpu.proponent_ids)])
    same = [x == y for x, y in zip(cpu.proponent_ids, gpu.proponent_ids)]
    score_diff = float(np.max(np.abs(np.array(cpu.proponent_scores) - np.array(gpu.proponent_scores))))
    return {"feature_rel_err_max": float(rel.max()), "feature_rel_err_median": float(np.median(rel)),
            "top10_overlap": float(overlap), "identical_rankings": f"{sum(same)}/{len(same)}",
            "proponent_score_abs_diff_max": score_diff}


def _throughput(device: str, model_dtype: str, n: int = 512, warmup: int = 64) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    from trackstar.attribution import AttributionSettings
    from trackstar.attribution.features import FeatureExtractor
    from trackstar.attribution.gradients import block_linear_sites
    from trackstar.attribution.output import Batch, Example
    from trackstar.attribution.projection import Projector

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=64, n_embd=256, n_layer=4, n_head=4)).eval()
    model.to(device)
    sites = block_linear_sites(model)
    settings = AttributionSettings(d=4096, use_v=False)
    autocast = None if model_dtype == "float32" else getattr(torch, model_dtype)
    extractor = FeatureExtractor(model, sites, Projector(sites, "gaussian", settings.d, 0), None, autocast_dtype=autocast)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (n + warmup, 64), generator=gen)

    def batch(rows: torch.Tensor) -> Batch:
        weights = (0.0,) + (1 / 63,) * 63  # the mean loss over the 63 predicted tokens
        examples = [Example(tuple(r.tolist()), weights, "loss", f"x{i}") for i, r in enumerate(rows)]
        return Batch(rows, torch.ones_like(rows), torch.arange(64).expand_as(rows).contiguous(),
                     torch.ones(rows.shape, dtype=torch.float32), examples)

    batches = [batch(ids[i:i + 32]) for i in range(0, n + warmup, 32)]
    for b in batches[: warmup // 32]:
        extractor(b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches[warmup // 32:]:
        extractor(b).cpu()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "mps")
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    from trackstar.device import DeviceError, resolve_device

    try:
        device = str(resolve_device(args.device))
    except DeviceError as exc:
        print(f"no GPU here ({exc}); nothing to check")
        return 0
    report = {"device": device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else device}
    with tempfile.TemporaryDirectory() as tmp:
        report["agreement_micro"] = _agreement(device, Path(tmp))
    report["extraction_ex_per_s"] = {
        f"{where}/{dtype}": _throughput(where, dtype)
        for where, dtype in (("cpu", "float32"), (device, "float32"), (device, "bfloat16"))
    }
    print(json.dumps(report, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
