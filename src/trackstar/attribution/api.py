"""Plain-Python entry point: settings in, top-k proponents/opponents out.

    ts = TrackStar(model, tokenizer, METHODS["trackstar"], optimizer=opt)
    result = ts.attribute(train_texts, [("The capital of France is", "Paris")])

Pipeline: examples -> features (÷ sqrt V, P_d) in on-disk stores -> R and
R^{-1/2} from those stores -> R^{-1/2} on both sides -> unit norm -> streaming
top-k.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import config_hash
from .curvature import CurvatureCache, Whitening, auto_lambda, mix
from .features import FeatureExtractor, extract_to_store
from .gradients import all_parameter_sites, block_linear_sites
from ..lm.data import context_length
from .output import Example, collate, query_example, training_example
from .projection import Projector
from .scoring import TopK, faiss_top_k, top_k, unit_normalize
from .second_moment import SecondMoment, estimate_second_moment, second_moment_from_optimizer
from .settings import AttributionSettings
from .store import FeatureStore, check_compatible, model_fingerprint


@dataclass
class AttributionResult:
    query_ids: list
    proponent_ids: list[list]
    proponent_scores: list[list[float]]
    opponent_ids: list[list]
    opponent_scores: list[list[float]]
    lam: float | None
    v_source: str | None
    settings: AttributionSettings
    train_store: Path | None = None
    query_store: Path | None = None


def _query_parts(q, i) -> tuple[str, str, object]:
    if isinstance(q, dict):
        return q["prompt"], q["target"], q.get("id", i)
    prompt, target = q[0], q[1]
    return prompt, target, (q[2] if len(q) > 2 else i)


class TrackStar:
    """One model + tokenizer + settings; computes features, R and scores.

    ``optimizer``: the checkpoint's optimizer (torch Adafactor, transformers
    Adafactor, Adam/AdamW) or its ``state_dict()`` when it was built over
    ``model.named_parameters()``; None estimates V (with a warning) when the
    settings use V. ``work_dir`` holds the feature stores, named by a hash of
    their settings so a re-run resumes or reuses them; a temporary directory
    when None. Queries are ``(prompt, target[, id])`` tuples or dicts with
    ``prompt``, ``target`` and optionally ``id``.
    """

    def __init__(
        self,
        model,
        tokenizer,
        settings: AttributionSettings = AttributionSettings(),
        optimizer=None,
        work_dir: str | Path | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.optimizer = optimizer
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="trackstar-")
            work_dir = self._tmp.name
        self.work_dir = Path(work_dir)
        self.sites = (
            all_parameter_sites(model) if settings.params == "all" else block_linear_sites(model)
        )
        self.projector = Projector(self.sites, settings.projection, settings.d, settings.seed)
        self.limit = context_length(model)
        self.model_id, self.model_hash = model_fingerprint(model)
        # V is read (or estimated) once per TrackStar object and reused.
        self._second_moment: SecondMoment | None = None

    # --- examples -----------------------------------------------------------------
    def training_examples(self, texts: Sequence[str], ids: Sequence | None = None) -> list[Example]:
        ids = list(range(len(texts))) if ids is None else list(ids)
        return [training_example(self.tokenizer, t, f"train[{i!r}]", self.limit) for t, i in zip(texts, ids)]

    def query_examples(self, queries: Sequence) -> list[Example]:
        out = []
        for i, q in enumerate(queries):
            prompt, target, qid = _query_parts(q, i)
            out.append(query_example(self.tokenizer, prompt, target, f"query[{qid!r}]", self.limit,
                                     self.settings.output_fn, self.settings.reduction))
        return out

    # --- V --------------------------------------------------------------------------
    def second_moment(self, train_examples: list[Example]) -> SecondMoment | None:
        s = self.settings
        if not s.use_v:
            return None
        if self._second_moment is None:
            if self.optimizer is not None:
                self._second_moment = second_moment_from_optimizer(
                    self.model, self.optimizer, self.sites, s.adam_mode)
            else:
                bs = s.batch_size
                batches = [collate(train_examples[i:i + bs], s.padding_side)
                           for i in range(0, min(len(train_examples), bs * s.v_estimate_batches), bs)]
                self._second_moment = estimate_second_moment(
                    self.model, batches, self.sites, adam_mode=s.adam_mode)
        return self._second_moment

    # --- features ---------------------------------------------------------------------
    def _meta(self, kind: str, row_ids: list, v: SecondMoment | None, output_fn: str,
              examples: list[Example] | None = None) -> dict:
        s = self.settings
        return {
            "kind": kind,
            # The token ids and weights themselves: equal row ids over other
            # texts must not reuse a store.
            "examples_hash": config_hash([[e.ids, e.weights] for e in examples or []], 64),
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "param_names": [site.name for site in self.sites],
            "layout": self.projector.describe(),
            "d": self.projector.dim,
            "projection": s.projection,
            "seed": s.seed if s.projection == "gaussian" else None,
            "use_v": s.use_v,
            "adam_mode": s.adam_mode if s.use_v else None,
            "v_source": v.source if v is not None else None,
            "output_fn": output_fn,
            "reduction": s.reduction if kind == "query" else "mean",
            "dtype": s.storage_dtype,
            "row_ids": [str(r) if not isinstance(r, (int, str)) else r for r in row_ids],
        }

    def featurize(self, examples: list[Example], kind: str, row_ids: list,
                  v: SecondMoment | None, path: str | Path | None = None) -> FeatureStore:
        """Features of ``examples`` in a (resumable) store under work_dir."""
        output_fn = "loss" if kind == "train" else self.settings.output_fn
        meta = self._meta(kind, row_ids, v, output_fn, examples)
        path = Path(path) if path is not None else self.work_dir / f"{kind}-{config_hash(meta)}"
        store = FeatureStore.create(path, meta)
        extractor = FeatureExtractor(self.model, self.sites, self.projector, v,
                                     dense=self.settings.params == "all")
        extract_to_store(store, examples, extractor, self.settings.batch_size,
                         self.settings.chunk_rows, self.settings.padding_side, desc=f"{kind} features")
        return FeatureStore.open(path, meta)

    # --- curvature and scoring ---------------------------------------------------------------
    def whitening(self, train: FeatureStore, query: FeatureStore) -> Whitening | None:
        """R^{-1/2} of the settings' R, from the curvature cache under work_dir when there."""
        s = self.settings
        if s.curvature == "none":
            return None
        blocks = [sl for _, sl in train.layer_slices()] if s.block_diagonal else [slice(0, train.d)]
        cache = CurvatureCache(self.work_dir / "curvature")
        train_key, r_train = cache.second_moment(train, blocks, s.chunk_rows)
        if s.curvature == "train":
            key = {"r_train": train_key, "damping": s.damping}
            return cache.whitening(key, blocks, lambda: Whitening.build(r_train(), blocks, s.damping))
        eval_key, r_eval = cache.second_moment(query, blocks, s.chunk_rows)

        def build() -> Whitening:
            rt, re = r_train(), r_eval()
            lam = auto_lambda(re, rt, train.d) if s.lam == "auto" else float(s.lam)
            return Whitening.build(mix(re, rt, lam), blocks, s.damping, lam)

        key = {"r_train": train_key, "r_eval": eval_key, "lam": s.lam, "damping": s.damping}
        return cache.whitening(key, blocks, build)

    def transform(self, x: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
        """R^{-1/2} then unit norm: the same map for query and training rows."""
        if whitening is not None:
            x = whitening.apply(x)
        return unit_normalize(x) if self.settings.unit_norm else x

    def score(self, train: FeatureStore, query: FeatureStore) -> tuple[TopK, Whitening | None]:
        check_compatible(train, query)
        whitening = self.whitening(train, query)
        q = self.transform(query.rows(), whitening)
        # Scoring streams bigger chunks than extraction writes: a 64 MiB slab
        # per step keeps the per-chunk top-k bookkeeping small next to the matmul.
        rows = max(self.settings.chunk_rows, (64 << 20) // (4 * train.d))
        scorer = faiss_top_k if self.settings.scorer == "faiss" else top_k
        result = scorer(q, train.chunks(rows), self.settings.k,
                       whitening.apply if whitening is not None else None,
                       normalize_train=self.settings.unit_norm)
        return result, whitening

    def attribute(self, train_texts: Sequence[str], queries: Sequence,
                  train_ids: Sequence | None = None) -> AttributionResult:
        train_ids = list(range(len(train_texts))) if train_ids is None else list(train_ids)
        train_examples = self.training_examples(train_texts, train_ids)
        query_examples = self.query_examples(queries)
        query_ids = [_query_parts(q, i)[2] for i, q in enumerate(queries)]
        v = self.second_moment(train_examples)
        train = self.featurize(train_examples, "train", train_ids, v)
        query = self.featurize(query_examples, "query", query_ids, v)
        top, whitening = self.score(train, query)
        ids = train.row_ids
        return AttributionResult(
            query_ids=query_ids,
            proponent_ids=[[ids[j] for j in row] for row in top.proponent_rows.tolist()],
            proponent_scores=top.proponent_scores.tolist(),
            opponent_ids=[[ids[j] for j in row] for row in top.opponent_rows.tolist()],
            opponent_scores=top.opponent_scores.tolist(),
            lam=whitening.lam if whitening is not None else None,
            v_source=v.source if v is not None else None,
            settings=self.settings,
            train_store=train.path,
            query_store=query.path,
        )


def attribute(model, tokenizer, train_texts: Sequence[str], queries: Sequence,
              settings: AttributionSettings = AttributionSettings(), optimizer_state=None,
              work_dir: str | Path | None = None, train_ids: Sequence | None = None) -> AttributionResult:
    """One-call attribution; see :class:`TrackStar`."""
    return TrackStar(model, tokenizer, settings, optimizer_state, work_dir).attribute(
        train_texts, queries, train_ids)
