"""Typed schema of the Hydra config tree.

Registered in Hydra's ConfigStore as ``trackstar_schema`` and listed first in
``conf/config.yaml``'s defaults, so composition rejects an unknown key or a
wrong type before any work starts (OmegaConf struct mode on dataclasses).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore

from ..evaluation.counterfactual import CounterfactualSettings
from ..world.corpus import CorpusSpec
from ..world.profiles import NaturalKnobs


@dataclass
class WorldConf:
    #: micro, tiny, small or full (the embedded world), or ``release``: the
    #: paper's release files in ``path`` (world=release world.path=DIR).
    profile: str = "tiny"
    seed: int = 0
    #: natural (facts stated as T-REx states them: phrasings, aliases, pronouns,
    #: distractors, a heavy tail; the suite's default) or templated (each fact in
    #: its query's own words: the first world, where BM25 MRR is about 1).
    #: Ignored by profile=release.
    style: str = "natural"
    #: The natural style's knobs (world.natural.pronoun_share=0.5, ...): see
    #: trackstar.world.profiles.NaturalKnobs and docs/worlds.md.
    natural: NaturalKnobs = field(default_factory=NaturalKnobs)
    #: With profile=release: the directory of trex_facts.jsonl and trex_sentences.jsonl-*.
    path: Optional[str] = None
    #: With profile=release: facts sampled per frequency bucket as queries (null: 900).
    queries_per_bucket: Optional[int] = None


@dataclass
class ModelConf:
    family: str = "gpt2"
    size: str = "tiny"
    optimizer: str = "adafactor"
    seed: int = 0
    #: Override the size preset's number of epochs.
    epochs: Optional[int] = None
    #: Which checkpoint to trace: a fraction of training (1.0 = final), as
    #: listed in ``checkpoint_fractions``; Figure 2's training axis sweeps it.
    checkpoint: float = 1.0
    checkpoint_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0])
    #: A Hugging Face causal LM (hub name or local path) instead of our own.
    #: It has no optimizer state: V is estimated and tail-patch is skipped.
    hf_name_or_path: Optional[str] = None
    #: With hf_name_or_path: its published optimizer state (a torch
    #: optimizer.state_dict() of Adam/AdamW or Adafactor, by parameter name or
    #: position), so V is exact and tail-patch runs.
    optimizer_state: Optional[str] = None
    #: The learning rate tail-patch steps with (null: the state's own lr).
    learning_rate: Optional[float] = None
    #: With hf_name_or_path: a PEFT adapter directory (save_pretrained's, e.g. LoRA) on
    #: that base model. Attribution is then over the adapter's weights; optimizer_state,
    #: if given, is the adapter's optimizer (the trainable parameters' state).
    adapter: Optional[str] = None


@dataclass
class MethodConf:
    #: A registered retriever (trackstar.retrieval.retriever_names()): bm25,
    #: dense, grad_dot, grad_cosine, trak, exp1..exp5, trackstar.
    name: str = "trackstar"
    #: Gradient rows: overrides of the method preset; null keeps the preset's value.
    output_fn: Optional[str] = None
    use_v: Optional[bool] = None
    curvature: Optional[str] = None
    unit_norm: Optional[bool] = None
    #: λ: a number in [0, 1], ``auto``, or null for the corpus default
    #: (0.9 closed set, 0.99 open set, as the paper).
    lam: Any = None
    projection: str = "gaussian"
    #: 4096 = 256 per weight matrix of the tiny GPT-2 (16 x 16); smaller d loses
    #: influence faster than it saves time (Table A.4). The paper uses 2^16.
    d: int = 4096
    seed: int = 0
    damping: float = 0.1
    block_diagonal: bool = False
    batch_size: int = 16
    #: The model's forward and backward during extraction: null (float32),
    #: bfloat16 or float16 mixed precision (docs/real_data_and_scale.md says what it costs).
    model_dtype: Optional[str] = None
    #: The retriever's own options (checked by it): e.g. ``options.model`` for
    #: ``dense``, ``options.k1``/``options.b`` for ``bm25``, or any further
    #: attribution setting for a gradient row (``+method.options.adam_mode=rank1``:
    #: the group starts empty, so Hydra needs the ``+``).
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConf:
    #: closed (T-REx-like sentences) or open (the pretraining corpus).
    corpus: str = "closed"
    k: int = 10
    tail_patch: bool = True
    tail_patch_ks: list[int] = field(default_factory=lambda: [1, 3, 5, 10])
    #: Evaluate only the first n queries (null: all).
    n_queries: Optional[int] = None
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    #: Which open-set proponents are correct: exact (the world's annotations)
    #: or nli (an entailment model, as the paper's AIS judge, for corpora
    #: without annotations): judge_model by hub name or local path.
    judge: str = "exact"
    judge_model: Optional[str] = None
    #: Correct = entailment probability >= this (the release viewer's 0.5).
    judge_threshold: float = 0.5


@dataclass
class LoggerConf:
    #: auto: online when logged in to W&B, else offline; or online, offline, disabled.
    mode: str = "auto"
    project: str = "trackstar-repro"
    entity: Optional[str] = None
    #: Per-query table rows logged to W&B (null: all queries).
    max_table_rows: Optional[int] = None
    #: Seconds to wait for the W&B server before logging the run offline instead.
    init_timeout: float = 20.0


@dataclass
class ShardConf:
    #: Training features written by ``count`` jobs, each owning a contiguous row
    #: range. A job with ``index`` set extracts that shard (the map) and writes no
    #: run record; a job without it scores (the reduce) once every shard is done:
    #:   trackstar-run -m method=trackstar shard.count=3 shard.index=0,1,2
    #:   trackstar-run method=trackstar shard.count=3
    index: Optional[int] = None
    count: int = 1
    #: What a job with ``index`` does: ``extract`` its shard's features (the
    #: first map), or ``score``: rank its shard's rows against the queries once
    #: every shard is extracted (a second map), so the reduce only merges:
    #:   trackstar-run -m method=trackstar shard.count=3 shard.index=0,1,2 shard.step=score
    step: str = "extract"


def _group_of(settings_cls, name: str, first: tuple = ()) -> type:
    """A config group with exactly the fields (names, types, defaults) of the library's
    ``settings_cls``, after the group's own ``first`` fields: each setting is declared
    once, where the library uses it."""
    fields = [*first, *((f.name, f.type, field(default=f.default)) for f in dataclasses.fields(settings_cls))]
    return dataclasses.make_dataclass(name, fields)


#: LDS and leave-top-k-out by retraining our own model from scratch (SPEC §2.5,
#: Table C.1): ``enabled`` and every field of
#: :class:`~trackstar.evaluation.counterfactual.CounterfactualSettings`. Needs
#: eval=open (the training corpus) and model.checkpoint=1.0; every retrain is
#: cached and shared by all methods.
CounterfactualConf = _group_of(CounterfactualSettings, "CounterfactualConf", (("enabled", bool, field(default=False)),))

#: A real corpus as the open set and our models' pretraining corpus: every field of
#: :class:`~trackstar.world.corpus.CorpusSpec` (source unset: the world's own open set).
CorpusConf = _group_of(CorpusSpec, "CorpusConf")


@dataclass
class TrackStarConfig:
    world: WorldConf = field(default_factory=WorldConf)
    model: ModelConf = field(default_factory=ModelConf)
    method: MethodConf = field(default_factory=MethodConf)
    eval: EvalConf = field(default_factory=EvalConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    shard: ShardConf = field(default_factory=ShardConf)
    counterfactual: CounterfactualConf = field(default_factory=CounterfactualConf)
    corpus: CorpusConf = field(default_factory=CorpusConf)
    #: Which paper table or figure this run belongs to (a W&B tag and the
    #: aggregation key); ``adhoc`` for single runs.
    table: str = "adhoc"
    #: Where cached stage artifacts (worlds, models, features) live.
    artifacts_dir: str = "artifacts"
    #: Where run records land.
    results_dir: str = "results"
    #: Re-run a job whose finished run record already exists.
    force: bool = False
    progress: bool = True
    #: Threads of every numeric stage (pretraining, retrieval, tail-patch), whatever
    #: the launcher gives a job, so results do not depend on it; null: all cores.
    #: Stages run at most cores // stage_threads at a time (see trackstar.runtime).
    stage_threads: Optional[int] = None
    #: Where models train and attribution computes: auto (CUDA when present,
    #: else the CPU), cpu, cuda, cuda:N or mps. Results agree across devices to
    #: float tolerance; the device is recorded, not part of a run's identity.
    device: str = "auto"
    #: Gradient rows with R also record the R diagnostic (query and training energy in
    #: R_eval's and R_train's top eigendirections; seconds per run): on for Tables 1
    #: and 2, whose findings report it. Not part of a run's identity.
    diagnostics: bool = False


def register() -> None:
    ConfigStore.instance().store(name="trackstar_schema", node=TrackStarConfig)
