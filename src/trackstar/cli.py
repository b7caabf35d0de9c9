"""The ``trackstar`` command: build the embedded world, pretrain our own LMs, run the quick job.

    trackstar world    --profile tiny --seed 0            build (or reuse) a fact world
    trackstar pretrain --world PATH --size tiny            pretrain (or resume) a model on it
    trackstar quick                                        world, model, every table's sweep, paper tables
    trackstar scale-study                                  Figure 2 at every size, two regimes (hours; resumable)
    trackstar scale-study --full-world                     the paper's regime on the full world (hours; resumable)
    trackstar sanity                                       top proponents per method; gold vs random tail-patch
    trackstar run method=bm25 eval=open                    one table cell (as trackstar-run, without Hydra's app)
    trackstar score FILE...                                metrics of release-schema retrieval files

Artifacts go under ``--artifacts`` (default ``$TRACKSTAR_ARTIFACTS`` or
``./artifacts``), addressed by the settings that determine them, so re-running
reuses what is finished and resumes what was killed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from types import SimpleNamespace

# Only what the parser needs is imported here, so `trackstar --help` and a mistyped
# option answer at once; each command imports its stages (torch, transformers) itself.
from .errors import debug_requested, describe_error
from .experiment.schema import ModelConf
from .io import ArtifactError, read_json, read_jsonl
from .lm.presets import FAMILIES, MODEL_SIZES, OPTIMIZERS
from .sweeps import OWN_SETTING, SWEEPS_DIR, sweep_names, swept_keys
from .world import PROFILES, build_world, load_world
from .world.corpus import JUDGES as CORPUS_JUDGES
from .world.corpus import SOURCES, CorpusSpec, corpus_world
from .world.profiles import STYLES, style_knobs
from .world.release import world_from_release


def _artifacts_root(value: str | None) -> Path:
    return Path(value or os.environ.get("TRACKSTAR_ARTIFACTS", "artifacts"))


def _pretrain_config(args):
    """The same PretrainConfig the Hydra runs build, so both share one model directory."""
    from .experiment.settings import pretrain_config

    return pretrain_config(SimpleNamespace(
        family=args.family, size=args.size, optimizer=args.optimizer, seed=args.model_seed,
        epochs=args.epochs, checkpoint_fractions=ModelConf().checkpoint_fractions,
    ))


def cmd_world(args) -> Path:
    from .evaluation.world_card import CARD_MD, card_markdown, write_card
    from .experiment.ids import release_world_dir, world_dir
    from .experiment.stages import corpus_world_stage

    t0 = time.perf_counter()
    if getattr(args, "from_release", None):
        out = Path(args.out) if args.out and not _corpus(args) else release_world_dir(_artifacts_root(args.artifacts), args.from_release,
                                                                args.queries_per_bucket, args.seed)
        path = world_from_release(args.from_release, out, args.queries_per_bucket, args.seed)
        name = f"from the release in {args.from_release}"
    else:
        style, knobs = _style(args)
        out = Path(args.out) if args.out and not _corpus(args) else world_dir(_artifacts_root(args.artifacts),
                                                                              args.profile, args.seed, style, knobs)
        path = build_world(out, args.profile, args.seed, style, knobs)
        name = f"{args.profile} ({style})"
    spec = _corpus(args)
    if spec is not None:
        path = (corpus_world(path, spec, Path(args.out)) if args.out
                else corpus_world_stage(_artifacts_root(args.artifacts), path, spec))
        name += f" with the {spec.source} corpus {spec.name or spec.path} as its open set"
    card = write_card(path)
    counts = read_json(path / "manifest.json")["counts"]
    print(
        f"world {name} seed={args.seed} at {path} ({time.perf_counter() - t0:.1f}s): "
        f"{counts['facts']} facts, {counts['sentences']} closed-set sentences, "
        f"{counts['documents']} documents, {counts['queries']} queries; its card ({path / CARD_MD}):\n"
    )
    print(card_markdown(card))
    return path


def _style(args):
    """(style, knobs or None) of the --style and --knob arguments."""
    values = {}
    for item in args.knob:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--knob {item!r}: write NAME=VALUE, e.g. --knob pronoun_share=0.5.")
        try:
            values[name.strip()] = int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            raise ValueError(f"--knob {item!r}: {value!r} is not a number.") from None
    return args.style, style_knobs(args.style, values or None)


def _corpus(args):
    """The --corpus-* arguments as a CorpusSpec (keyword by keyword, from its own
    fields: see :func:`corpus_flags`), or None without --corpus-source."""
    if not getattr(args, "corpus_source", None):
        return None
    return CorpusSpec(**{f.name: getattr(args, dest) for f, _, dest in corpus_flags()})


def corpus_flags() -> list[tuple]:
    """(CorpusSpec field, its flag, its argparse dest) for every corpus setting."""
    flags = []
    for f in dataclasses.fields(CorpusSpec):
        flag = f.metadata.get("flag") or f"--corpus-{f.name.replace('_', '-')}"
        flags.append((f, flag, flag.lstrip("-").replace("-", "_")))
    return flags


def cmd_pretrain(args, world: Path | None = None) -> Path:
    from .experiment.ids import model_dir
    from .experiment.stages import corpus_world_stage, stage_lock
    from .lm import final_checkpoint
    from .lm.pretrain import pretrain_model
    from .runtime import compute_stage

    world = Path(world or args.world)
    if not (world / "manifest.json").is_file():
        raise ArtifactError(f"--world {str(world)!r} is not a built world. Build one with `trackstar world`.")
    spec = _corpus(args)
    if spec is not None:  # pretrain on the corpus: the world with it as its open set
        world = corpus_world_stage(_artifacts_root(args.artifacts), world, spec)
    config = _pretrain_config(args)
    out = Path(args.out) if getattr(args, "out", None) else model_dir(_artifacts_root(args.artifacts), world, config)
    t0 = time.perf_counter()
    root = _artifacts_root(args.artifacts)
    # The same lock and thread count as a sweep job's pretraining stage.
    with stage_lock(root, f"model-{out.parent.name}-{out.name}"), compute_stage(root):
        pretrain_model(world, out, config, device=args.device)
    summary = read_json(out / "pretrain.json")
    print(
        f"model {config.family}-{config.size} ({summary['n_parameters']:,} parameters, "
        f"{summary['total_steps']} steps, {config.optimizer}) at {out} ({time.perf_counter() - t0:.1f}s)"
    )
    report_accuracy(final_checkpoint(out))
    return out


def report_accuracy(checkpoint: Path) -> None:
    from .lm.evaluate import QUERY_EVAL_FILE, accuracy_by_bucket

    table = accuracy_by_bucket(read_jsonl(checkpoint / QUERY_EVAL_FILE))
    print(f"\nfact accuracy (greedy decoding reproduces the target) per frequency bucket, {checkpoint.name}:")
    print(table.to_string(float_format=lambda x: f"{x:.3f}"))


def _run_sweep(name: str, overrides: list[str]) -> float:
    """One sweep of sweeps/ as a Hydra multirun (``trackstar-run -m``), in this process: the
    libraries are imported once for all the sweeps instead of once per sweep. Its wall time in
    seconds. A failed job is recorded by the sweep and does not stop the next sweep."""
    from .experiment import run as sweep_runner  # Hydra's app: imported only where sweeps run

    argv = ["trackstar-run", "-m", "--config-dir", str(SWEEPS_DIR), "--config-name", name, *overrides]
    print(f"\n== {name}: {' '.join(argv[1:])}", flush=True)
    t = time.perf_counter()
    saved, sys.argv = sys.argv, argv
    try:
        sweep_runner.main()  # Hydra reads sys.argv, and clears its global state when done
        failed = False
    except SystemExit as exc:
        failed = exc.code not in (0, None)
    finally:
        sys.argv = saved
    if failed:
        print(f"{name}: the sweep exited with an error; its run records say which jobs failed", file=sys.stderr)
    elapsed = time.perf_counter() - t
    print(f"== {name} done in {elapsed / 60:.1f} min", flush=True)
    return elapsed


def _tables(results: str, paper_tables: str, timings: dict, t0: float, what: str) -> None:
    from .tables.cli import main as tables_main

    print()
    rc = tables_main(["--results", str(results), "--out", str(paper_tables)])
    print("\nwall time per sweep (min): " + ", ".join(f"{k} {v / 60:.1f}" for k, v in timings.items()))
    print(f"{what}: {(time.perf_counter() - t0) / 60:.1f} min in all; tables in {paper_tables}/")
    if rc:
        raise ValueError("table aggregation failed; see the message above")


def cmd_quick(args) -> None:
    """World, model, then every table's sweep (quick setting), then the tables themselves."""
    args.out = None
    t0 = time.perf_counter()
    world = cmd_world(args)
    cmd_pretrain(args, world)
    root = _artifacts_root(args.artifacts)
    known = sweep_names()
    sweeps = sweep_names(optional=False) if args.tables == "all" else [t for t in args.tables.split(",") if t]
    unknown = sorted(set(sweeps) - set(known))
    if unknown:
        raise ValueError(f"--tables: unknown {unknown}; choose from {', '.join(known)} or 'all'.")
    # The world's style and knobs reach every sweep, also those with a world of their own.
    style = [f"world.style={args.style}", *(f"world.natural.{k}" for k in args.knob)]
    setting = [f"model={args.size}", f"world.profile={args.profile}", f"world.seed={args.seed}", *style,
               f"model.family={args.family}", f"model.optimizer={args.optimizer}", f"model.seed={args.model_seed}",
               *([f"model.epochs={args.epochs}"] if args.epochs is not None else [])]
    timings = {}
    for name in sweeps:
        # Quick's world and model, but never over what the sweep itself sweeps (figure2_scale's
        # model, table1_seeds' model.seed); the sweeps with a setting of their own keep it.
        swept = swept_keys(name)
        own = [o for o in (setting if name not in OWN_SETTING else style) if o.split("=", 1)[0] not in swept]
        timings[name] = _run_sweep(name, [f"artifacts_dir={root}", f"results_dir={args.results}", *own,
                                          f"device={args.device}", *args.override])
    if sweeps:
        _tables(args.results, args.paper_tables, timings, t0, "quick reproduction")


#: The scale study: (sweep, extra overrides). Table 1 and the λ grid (Table A.5)
#: in the paper's regime, then Figure 2 at every size in both regimes (the
#: longest, last: medium dominates it).
SCALE_STUDY = (("table1", ("regime=paper",)), ("table_a5", ("regime=paper",)), ("scale_study", ()))
#: ``--full-world``: the same in the paper's regime on the full world (154,676
#: documents), Figure 2 for the sizes that pretrain there within hours on a few cores
#: (docs/scale_study.md has the measured times).
SCALE_STUDY_FULL = (("table1", ("regime=paper_full",)), ("table_a5", ("regime=paper_full",)),
                    ("figure2_scale", ("regime=paper_full",)))
FULL_WORLD_SIZES = "micro,tiny,small"


def scale_study_plan(full_world: bool, sizes: str | None) -> list[tuple[str, tuple[str, ...]]]:
    """The sweeps ``trackstar scale-study`` runs, in order, with their overrides."""
    if sizes is not None:
        given = [s.strip() for s in sizes.split(",")]
        unknown = sorted(set(given) - set(MODEL_SIZES))
        if unknown:
            raise ValueError(f"--sizes {sizes!r}: unknown {unknown}; give a comma-separated subset of "
                             f"{','.join(MODEL_SIZES)}.")
        sizes = ",".join(dict.fromkeys(given))  # each once, in the order given
    plan = SCALE_STUDY_FULL if full_world else SCALE_STUDY
    sizes = sizes or (FULL_WORLD_SIZES if full_world else None)
    return [(name, extra + ((f"model={sizes}",) if sizes and name.startswith(("scale_study", "figure2")) else ()))
            for name, extra in plan]


def cmd_scale_study(args) -> None:
    """Figure 2 at every model size and checkpoint in both training regimes, and Table 1
    and the λ grid in the paper's regime, into their own results root and tables
    (``--full-world``: all of it in the paper's regime on the full world)."""
    t0 = time.perf_counter()
    plan = scale_study_plan(args.full_world, args.sizes)
    results = args.results or ("results/paper_full" if args.full_world else "results/scale_study")
    tables = args.paper_tables or ("paper_tables/paper_full" if args.full_world else "paper_tables/scale_study")
    root = _artifacts_root(args.artifacts)
    timings = {}
    for name, extra in plan:
        label = name if not extra else f"{name} ({' '.join(extra)})"
        timings[label] = _run_sweep(name, [f"artifacts_dir={root}", f"results_dir={results}", *extra,
                                           f"device={args.device}", *args.override])
    _tables(results, tables, timings, t0, "scale study")


def cmd_sanity(args) -> None:
    from .experiment.sanity import sanity_report
    from .lm import final_checkpoint, load_checkpoint

    args.out = None
    world = cmd_world(args)
    run = cmd_pretrain(args, world)
    root = _artifacts_root(args.artifacts)
    print()
    print(sanity_report(load_world(world), load_checkpoint(final_checkpoint(run)), n_facts=args.facts,
                        work_dir=root / "features" / f"sanity-{run.name}"))


def cmd_run(args) -> None:
    """One cell (world, model, method, corpus) through the same function as trackstar-run."""
    from .experiment.cell import run_cell
    from .experiment.compose import compose_config
    from .experiment.shard import shard_job

    overrides = list(args.override)
    if args.artifacts:
        overrides.append(f"artifacts_dir={args.artifacts}")
    elif os.environ.get("TRACKSTAR_ARTIFACTS"):
        overrides.append(f"artifacts_dir={os.environ['TRACKSTAR_ARTIFACTS']}")
    cfg = compose_config(overrides)
    if cfg.shard.index is not None:  # the map step of a sharded run
        shard_job(cfg)
        return
    record = run_cell(cfg)
    for name, stats in record.metrics.items():
        print(f"  {name:<22} {stats['mean']:.4f} [{stats['ci_low']:.4f}, {stats['ci_high']:.4f}]")


def cmd_score(args) -> None:
    """Score release-schema retrieval files: ours, or the paper's released ones."""
    from .evaluation.metrics import RETRIEVAL_METRICS, score_retrievals
    from .evaluation.splits import summarize
    from .retrieval import label_retrievals

    world = None
    if args.world:
        world = load_world(args.world)
    for path in args.files:
        records = read_jsonl(path)
        if not records:
            raise ArtifactError(f"{path!r} holds no retrieval records (it is empty). Give a JSONL file with "
                                "one release-schema record per query.")
        if world is not None:
            records = label_retrievals(records, world, args.corpus, source=path)
        per_query = score_retrievals(records, source=path)
        scored = per_query[per_query["has_trex_sentence"]]
        table = summarize(scored, list(RETRIEVAL_METRICS))
        print(f"{path}: {len(scored)} queries scored ({len(per_query) - len(scored)} without a gold sentence left out)")
        for row in table.to_dict("records"):
            print(f"  {row['metric']:<13} {row['mean']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trackstar", description=__doc__.split("\n\n")[0])

    def global_args(p, default) -> None:
        p.add_argument("--artifacts", default=default(None), help="artifact root (default $TRACKSTAR_ARTIFACTS or ./artifacts)")
        p.add_argument("-v", "--verbose", action="store_true", default=default(False), help="log progress details")
        p.add_argument("--debug", action="store_true", default=default(False),
                       help="show the full traceback of an error (also TRACKSTAR_DEBUG=1)")

    global_args(parser, lambda value: value)
    # The same options after the subcommand (trackstar world --artifacts DIR); SUPPRESS
    # keeps a value given before it when they are not repeated.
    common = argparse.ArgumentParser(add_help=False)
    global_args(common, lambda value: argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def world_args(p, profile_default: str) -> None:
        p.add_argument("--profile", default=profile_default, choices=list(PROFILES), help="world size profile")
        p.add_argument("--seed", type=int, default=0, help="world seed (non-negative integer)")
        p.add_argument("--style", default="natural", choices=list(STYLES),
                       help="natural (facts stated as T-REx states them; default) or templated (in the query's words)")
        p.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE",
                       help="a natural-style knob (repeatable), e.g. --knob pronoun_share=0.5 (see docs/worlds.md)")

    def corpus_args(p) -> None:
        g = p.add_argument_group("a real corpus as the open set and pretraining corpus (through `datasets`)")
        for f, flag, _ in corpus_flags():
            if f.type in ("bool", bool):
                g.add_argument(flag, action="store_true", help=f.metadata["help"])
                continue
            kind = {"int | None": int, "int": int}.get(f.type, str)
            choices = {"source": list(SOURCES), "judge": list(CORPUS_JUDGES)}.get(f.name)
            default = f"; default {f.default}" if f.default not in (None, False) else ""
            g.add_argument(flag, type=kind, default=f.default, choices=choices, help=f.metadata["help"] + default)

    def model_args(p, size_default: str) -> None:
        p.add_argument("--size", default=size_default, choices=list(MODEL_SIZES), help="model size preset")
        model = ModelConf()  # the run config's defaults: one home for each
        p.add_argument("--family", default=model.family, choices=list(FAMILIES), help="model family")
        p.add_argument("--optimizer", default=model.optimizer, choices=list(OPTIMIZERS))
        p.add_argument("--model-seed", type=int, default=model.seed, help="model initialization and data-order seed")
        p.add_argument("--epochs", type=int, help="override the preset's number of epochs")
        p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")

    p = sub.add_parser("world", parents=[common], help="build (or reuse) an embedded fact world, or one from the paper's release")
    world_args(p, "tiny")
    p.add_argument("--out", help="output directory (default ARTIFACTS/worlds/PROFILE-natural-KNOBHASH-sSEED, or PROFILE-sSEED when templated)")
    p.add_argument("--from-release", metavar="DIR",
                   help="the release's trex_facts.jsonl and trex_sentences.jsonl-* in DIR, as a world (--profile is ignored)")
    p.add_argument("--queries-per-bucket", type=int, default=900,
                   help="with --from-release: facts sampled per frequency bucket as queries (default 900: the paper's 5.4k)")
    corpus_args(p)
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("pretrain", parents=[common], help="pretrain (or resume) one of our LMs on a world's corpus")
    p.add_argument("--world", required=True, help="a built world directory")
    model_args(p, "tiny")
    p.add_argument("--out", help="output directory (default under ARTIFACTS/models/)")
    corpus_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("quick", parents=[common], help="the quick reproduction of every table: world, model, all sweeps, paper tables")
    world_args(p, "tiny")
    model_args(p, "tiny")
    p.add_argument("--tables", default="all", help="comma-separated sweeps of sweeps/ (default: all but the optional table_c1, which "
                   "runs on its own micro setting when named)")
    p.add_argument("--results", default="results", help="run records root (default ./results)")
    p.add_argument("--paper-tables", default="paper_tables", help="where the tables go (default ./paper_tables)")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for every job, e.g. logger=none method.d=256")
    p.set_defaults(func=cmd_quick)

    p = sub.add_parser("scale-study", parents=[common],
                       help="Figure 2 at every model size in two training regimes, Table 1 and the λ grid in the paper's "
                            "(hours; resumable)")
    p.add_argument("--full-world", action="store_true",
                   help="the paper's regime on the full world (154,676 documents): Table 1, the λ grid and Figure 2 "
                        f"for --sizes (default {FULL_WORLD_SIZES}); results/paper_full and paper_tables/paper_full")
    p.add_argument("--sizes", default=None,
                   help="comma-separated model sizes of Figure 2's sweep (default micro,tiny,small,medium; "
                        f"{FULL_WORLD_SIZES} with --full-world)")
    p.add_argument("--results", default=None,
                   help="run records root (default ./results/scale_study, ./results/paper_full with --full-world)")
    p.add_argument("--paper-tables", default=None,
                   help="where the tables go (default ./paper_tables/scale_study, ./paper_tables/paper_full "
                        "with --full-world)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("override", nargs="*", help="extra Hydra overrides for every job, e.g. logger=none")
    p.set_defaults(func=cmd_scale_study)

    p = sub.add_parser("run", parents=[common], help="one table cell (method x corpus) with Hydra-style overrides, as trackstar-run")
    p.add_argument("override", nargs="*", help="config overrides, e.g. method=bm25 eval=open world=micro model=micro")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("score", parents=[common], help="MRR / recall@10 / precision@10 of release-schema retrieval files")
    p.add_argument("files", nargs="+", help="retrieval JSONL files (ours, or the paper's release)")
    p.add_argument("--world", help="label proponents against this world (for files without correctness labels)")
    p.add_argument("--corpus", default="closed", choices=["closed", "open"], help="which corpus the proponents come from")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("sanity", parents=[common], help="top proponents of frequent facts per method; gold vs random tail-patch")
    world_args(p, "tiny")
    model_args(p, "tiny")
    p.add_argument("--facts", type=int, default=4, help="how many frequent facts to show")
    p.set_defaults(func=cmd_sanity)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except Exception as exc:  # noqa: BLE001 - one clear line; the traceback on request
        if args.debug or debug_requested():
            raise
        print(f"trackstar {args.command}: error: {describe_error(exc)}", file=sys.stderr)
        print("  (--debug or TRACKSTAR_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
