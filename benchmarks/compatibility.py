"""Which causal-LM architectures TrackStar attributes, measured: the compatibility matrix.

For every model type in transformers' causal-LM mapping, build a tiny model
from its config class (random weights, 2 layers, width 32; mixture-of-experts
models with 4 experts, top-2), then

1. run TrackStar with its default settings (d = 4096 or all the entries when
   the tiny model has fewer) on a few texts and queries, with V estimated;
2. read the coverage report (sites, share of the matrices, parts left out);
3. compare the engine's per-example gradients (identity projection, no V)
   with plain autograd over the same weights, one example at a time.

Each architecture lands in one row: ``full`` (every block matrix attributed
and the brute-force check passed), ``refused`` (coverage named the weights it
cannot reach, or the engine named what it cannot do, e.g. a layer run twice;
scoring would be partial or wrong), ``no tiny config`` (this script could not
build a small model from the config class that runs a plain forward and
backward: not a verdict on the engine), ``error`` (the engine failed
otherwise: the first line of the error) or ``differs`` (the gradients do not
match autograd). Nothing here downloads
anything.

    python benchmarks/compatibility.py --out docs/compatibility.md [--json out.json] [--only llama,gpt2]
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

WORDS = ("<pad> <bos> <eos> <unk> the a of is capital city paris france rome italy berlin germany river runs "
         "through lives in was born at and famous for its old town big small north south").split()
TEXTS = ["the capital of france is paris", "paris is a big city in the north of france",
         "the river runs through rome", "rome is the capital of italy and famous for its old town",
         "berlin is in germany", "a small town in the south of italy"]
QUERIES = [("the capital of france is", "paris"), ("berlin is in", "germany")]

#: Small values for the size attributes configs commonly have (those a config lacks are ignored
#: by most and kept as plain attributes by the rest); attribute_map renames them per family.
TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, max_position_embeddings=128, n_positions=128,
    num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=0, decoder_sparse_step=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


#: A tiny model is far below this; a config whose model stays bigger is reported, not built.
MAX_PARAMETERS = 5_000_000


#: Tried in turn on top of TINY until a model builds and runs a plain forward and backward:
#: attention with latent (MLA) and grouped routing, rotary dims, encoder-decoder sizes; then
#: four layers (hybrids whose first two layers are all linear attention); then even KV heads.
EXTRAS = dict(
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
    topk_group=1, rotary_dim=8, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=2,
)
ATTEMPTS = (TINY, {**TINY, **EXTRAS}, {**TINY, **EXTRAS, "num_hidden_layers": 4},
            {**TINY, **EXTRAS, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8})


class Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int):
    def fire(signum, frame):
        raise Timeout(f"took over {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<bos>", eos_token="<eos>")


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build_tiny(model_type: str):
    """A tiny model of ``model_type`` that runs a plain forward and backward: the first of
    :data:`ATTEMPTS` that does (the last attempt's error otherwise)."""
    error = None
    for sizes in ATTEMPTS:
        try:
            model = _build(model_type, sizes)
            ids = torch.tensor([[1, 4, 5, 6, 7, 8, 2]])
            model(input_ids=ids).logits.sum().backward()
            model.zero_grad(set_to_none=True)
            return model
        except Timeout:
            raise
        except Exception as exc:  # noqa: BLE001 - the next sizes may do
            error = exc
    raise error


def _build(model_type: str, sizes: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **sizes)
    if hasattr(config, "get_text_config"):  # composite configs: size their text model too
        text = config.get_text_config()
        if text is not config:
            for key, value in sizes.items():
                if hasattr(text, key):
                    setattr(text, key, value)
    with torch.device("meta"):  # sized first, for nothing: a config that ignores the small sizes stays big
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config, attn_implementation="eager").parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the config kept {size:,} parameters with the small sizes set (over {MAX_PARAMETERS:,}); "
                         "it sizes its model by other attributes")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # zero-initialized weights (some families' experts, biases) would hide paths
        for name, p in model.named_parameters():
            if p.dim() >= 2 and p.abs().max() == 0:
                p.normal_(0, 0.1)
    return model


def brute_force_gap(model, tok, sites) -> float:
    """Largest |engine - autograd| / max|autograd| over the examples' per-site gradients."""
    from trackstar.attribution.features import FeatureExtractor
    from trackstar.attribution.output import collate, query_example, training_example, forward_objective
    from trackstar.attribution.projection import Projector

    examples = [training_example(tok, t, f"t{i}", 32) for i, t in enumerate(TEXTS[:2])]
    examples.append(query_example(tok, *QUERIES[0], "q0", 32))
    got = FeatureExtractor(model, sites, Projector(sites, "identity"))(collate(examples)).double()
    params = dict(model.named_parameters())
    rows = []
    for example in examples:
        batch = collate([example])
        value = forward_objective(model, batch)
        wanted = [params[n] for n in dict.fromkeys(s.parameter for s in sites)]
        grads = dict(zip(dict.fromkeys(s.parameter for s in sites),
                         torch.autograd.grad(value, wanted, allow_unused=True)))
        parts = []
        for s in sites:
            g = grads[s.parameter]
            g = torch.zeros_like(params[s.parameter]) if g is None else g
            g = g if s.expert is None else g[s.expert]
            parts.append((g.T if s.stored_transposed else g).reshape(-1))
        rows.append(torch.cat(parts).double())
    want = torch.stack(rows)
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def check(model_type: str, tok, seconds: int = 120) -> dict:
    from trackstar.attribution import METHODS, TrackStar
    from trackstar.attribution.coverage import PartialCoverageError
    from trackstar.attribution.gradients import AttributionError

    row = {"type": model_type}
    start = time.perf_counter()
    try:
        with time_limit(seconds), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = build_tiny(model_type)
            except Timeout:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to build or run is reported as such
                row.update(status="no tiny config", detail=_first_line(exc))
                return row
            row["architecture"] = type(model).__name__
            row["parameters"] = sum(p.numel() for p in model.parameters())
            settings = METHODS["trackstar"]
            try:
                engine = TrackStar(model, tok, settings)
            except PartialCoverageError as exc:
                row.update(status="refused", detail=_first_line(exc))
                return row
            except ValueError as exc:
                if "exceeds the" not in str(exc):
                    raise
                from trackstar.attribution.gradients import attribution_sites

                total = sum(s.out_features * s.in_features for s in attribution_sites(model))
                engine = TrackStar(model, tok, settings.replace(d=total))
            cover = engine.coverage
            row.update(sites=cover["sites"], share=cover["share"], matrix_share=cover["matrix_share"],
                       experts=cover["by_kind"].get("experts", {}).get("parameters", 0) > 0)
            list(engine.all_scores(TEXTS, QUERIES))
            row["gap"] = brute_force_gap(model, tok, engine.sites)
            row["status"] = "full" if row["gap"] < 1e-3 else "differs"
    except Timeout as exc:  # building the model, or the engine, took too long
        row.update(status="no tiny config" if "architecture" not in row else "error", detail=_first_line(exc))
    except AttributionError as exc:  # the engine named what it cannot do for this architecture
        row.update(status="refused", detail=_first_line(exc))
    except Exception as exc:  # noqa: BLE001 - the matrix records every failure
        row.update(status="error", detail=_first_line(exc))
    finally:
        row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with local changes" if dirty else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def markdown(rows: list[dict], header: str) -> str:
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [header, "", "Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".", "",
             "| model type | architecture | status | sites | share of matrices | max rel. gap vs autograd | detail |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        share = f"{r['matrix_share']:.1%}" if "matrix_share" in r else ""
        gap = f"{r['gap']:.1e}" if "gap" in r else ""
        detail = r.get("detail", "MoE" if r.get("experts") else "").replace("|", "\\|")
        lines.append(f"| {r['type']} | {r.get('architecture', '')} | {r['status']} | {r.get('sites', '')} | {share} | "
                     f"{gap} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="the markdown table (e.g. docs/compatibility.md)")
    parser.add_argument("--json", type=Path, help="the rows as JSON")
    parser.add_argument("--only", help="comma-separated model types (default: every causal-LM type)")
    parser.add_argument("--seconds", type=int, default=120, help="time limit per architecture")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    types = args.only.split(",") if args.only else causal_lm_types()
    tok = tokenizer()
    started = time.perf_counter()
    rows = []
    for model_type in types:
        row = check(model_type, tok, args.seconds)
        rows.append(row)
        print(f"{model_type:32s} {row['status']:14s} {row.get('detail', '')[:100]}", flush=True)
    import transformers

    from trackstar.io import atomic_write_json, atomic_write_text

    header = (f"# Compatibility matrix\n\nGenerated by `python benchmarks/compatibility.py --out "
              f"docs/compatibility.md` at commit {_commit()} in {(time.perf_counter() - started) / 60:.1f} min "
              f"({torch.get_num_threads()} torch threads), with transformers {transformers.__version__} and torch "
              f"{torch.__version__.split('+')[0]}: every causal-LM model type transformers maps, as a tiny random "
              "model (2 layers, width 32, 4 experts top-2 where the family has experts), run with TrackStar's "
              "default settings; the gap is the engine's per-example gradients (identity projection) against "
              "plain autograd over the same weights. `full`: every block matrix attributed and the gap below "
              "1e-3; `refused`: coverage names weights attribution cannot reach, or the engine names what it "
              "cannot do; `no tiny config`: the script could not build a small model of the type that runs a "
              "plain forward and backward (not a verdict on the engine); `error`: the engine failed otherwise "
              "(the first line of the error).")
    if args.out:
        atomic_write_text(args.out, markdown(rows, header))
    if args.json:
        atomic_write_json(args.json, rows)
    return 0 if all(r["status"] != "differs" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
