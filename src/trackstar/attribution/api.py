"""Plain-Python entry point: settings in, top-k proponents/opponents out.

    ts = TrackStar(model, tokenizer, METHODS["trackstar"], optimizer=opt)
    result = ts.attribute(train_texts, [("The capital of France is", "Paris")])

Pipeline: examples -> features (÷ sqrt V, P_d) in on-disk stores -> R and
R^{-1/2} from those stores -> R^{-1/2} on both sides -> unit norm -> streaming
top-k.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..device import check_model_dtype, model_device, resolve_device
from ..identity import stable
from ..io import ArtifactError, atomic_write_checked, config_hash, is_complete, read_checked
from .curvature import CurvatureCache, Whitening, auto_lambda, mix
from .diagnostics import TRAIN_SAMPLE, curvature_diagnostic
from .features import FeatureExtractor, extract_to_store
from .coverage import check_coverage, coverage
from .gradients import attribution_sites
from ..lm.data import context_length
from .output import Example, collate, query_example, training_example
from .projection import Projector
from .scoring import TopK, faiss_top_k, merge_top_k, score_chunks, top_k, unit_normalize
from .second_moment import SecondMoment, estimate_second_moment, second_moment_from_optimizer
from .settings import AttributionSettings
from .optimizer_step import optimizer_step
from .store import (
    SHARDS_FILE,
    V_KEYS,
    FeatureStore,
    check_compatible,
    check_shard,
    create_shard,
    model_fingerprint,
    open_store,
    shard_bounds,
)


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
    #: Where queries and training rows put their energy among R's top eigendirections
    #: (:mod:`.diagnostics`); for rows with R (full, not block-diagonal).
    curvature_diagnostic: dict | None = None


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
    ``prompt``, ``target`` and optionally ``id``. ``device`` (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``, ``mps``) moves the model there first; None keeps it
    where it is. ``learning_rate``: the rate tail-patch steps with (the
    checkpoint's final one), for ``train_side='optimizer_step'``. Features, V and scores are computed on the model's device;
    stores and results are on the CPU.
    """

    def __init__(
        self,
        model,
        tokenizer,
        settings: AttributionSettings = AttributionSettings(),
        optimizer=None,
        work_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        learning_rate: float | None = None,
    ):
        if device is not None:
            model.to(resolve_device(device))
        #: Where features, V and scores are computed: the model's device.
        self.device = model_device(model)
        check_model_dtype(settings.model_dtype, self.device)
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.optimizer = optimizer
        #: The rate of the optimizer's next step (train_side='optimizer_step'); None: its groups' lr.
        self.learning_rate = learning_rate
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="trackstar-")
            work_dir = self._tmp.name
        self.work_dir = Path(work_dir)
        unused: list[str] = []
        self.sites = attribution_sites(model, settings.params, settings.routers, unused)
        #: Which weights the sites cover, by kind (recorded by every run; see .coverage).
        self.coverage = coverage(model, [site.name for site in self.sites], unused)
        check_coverage(self.coverage, settings.allow_partial)
        self.projector = Projector(self.sites, settings.projection, settings.d, settings.seed, settings.split)
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
            self._second_moment = self._second_moment.to(self.device)
        return self._second_moment

    # --- features ---------------------------------------------------------------------
    def _meta(self, kind: str, row_ids: list, v: SecondMoment | None, output_fn: str,
              examples: list[Example] | None = None) -> dict:
        s = self.settings
        meta = {
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
            # v is None where V is not applied to these rows (never with use_v, but for
            # the queries of train_side='optimizer_step'); equal to s.use_v otherwise.
            "use_v": v is not None,
            "adam_mode": s.adam_mode if v is not None else None,
            "v_source": v.source if v is not None else None,
            "output_fn": output_fn,
            "reduction": s.reduction if kind == "query" else "mean",
            "dtype": s.storage_dtype,
            "row_ids": [str(r) if not isinstance(r, (int, str)) else r for r in row_ids],
            "model_dtype": s.model_dtype,
        }
        # Settings added later enter the key only away from their earlier value (trackstar.identity).
        return stable("store", meta)

    def store_path(self, kind: str, meta: dict) -> Path:
        return self.work_dir / f"{kind}-{config_hash(meta)}"

    def featurize(self, examples: list[Example], kind: str, row_ids: list,
                  v: SecondMoment | None, path: str | Path | None = None,
                  shard: tuple[int, int] | None = None, expect_shards: int = 1):
        """Features of ``examples`` in a (resumable) store under work_dir.

        ``shard=(index, count)`` computes only that shard's contiguous rows (a
        job of a sharded extraction) and returns the shard; without it, a store
        that is being written by shards is read as one once every shard is
        finished (:func:`~.store.open_store` names the missing ones);
        ``expect_shards > 1`` insists on that (it never extracts them itself).
        """
        output_fn = "loss" if kind == "train" else self.settings.output_fn
        meta = self._meta(kind, row_ids, v, output_fn, examples)
        path = Path(path) if path is not None else self.store_path(kind, meta)
        if shard is None and not is_complete(path) and ((path / SHARDS_FILE).exists() or expect_shards > 1):
            if not (path / SHARDS_FILE).exists():
                raise ArtifactError(
                    f"No shard of the {kind} features {str(path)!r} exists yet: run the {expect_shards} "
                    f"extraction jobs first (shard.index=0..{expect_shards - 1} with shard.count={expect_shards})."
                )
            return open_store(path, meta)
        if shard is not None and is_complete(path):  # already written whole: nothing left to shard
            return FeatureStore.open(path, meta)
        if shard is None:
            store, todo = FeatureStore.create(path, meta), examples
        else:
            store = create_shard(path, meta, *shard)
            start, stop = shard_bounds(len(examples), shard[1])[shard[0]]
            todo = examples[start:stop]
        autocast = None if self.settings.model_dtype == "float32" else getattr(torch, self.settings.model_dtype)
        extractor = FeatureExtractor(self.model, self.sites, self.projector, v,
                                     dense=self.settings.params == "all", autocast_dtype=autocast)
        extract_to_store(store, todo, extractor, self.settings.batch_size,
                         self.settings.chunk_rows, self.settings.padding_side,
                         desc=f"{kind} features" + (f" (shard {shard[0]}/{shard[1]})" if shard else ""))
        return FeatureStore.open(store.path)

    def extract_shard(self, train_texts: Sequence[str], index: int, count: int,
                      train_ids: Sequence | None = None):
        """The map step of a sharded run: shard ``index`` of ``count`` of the training
        features, and its part of R_train (sum of outer products and count), so that
        :meth:`attribute` with the same texts only has to merge them and score. When an
        unsharded run already extracted them whole, that store is returned (no ``shard``
        in its meta) and the reduce reads it as it is."""
        check_shard(index, count)
        if self._step_side:  # refused before any extraction, as unsharded
            self._optimizer_step()
        train_ids = list(range(len(train_texts))) if train_ids is None else list(train_ids)
        examples = self.training_examples(train_texts, train_ids)
        shard = self.featurize(examples, "train", train_ids, self.second_moment(examples), shard=(index, count))
        if "shard" not in shard.meta:  # an unsharded run extracted them whole: nothing is left to map
            return shard
        if self.settings.curvature != "none":
            CurvatureCache(self.work_dir / "curvature").shard_sums(shard, self._blocks(shard), self.settings.chunk_rows,
                                                                   self.device)
        return shard

    # --- curvature and scoring ---------------------------------------------------------------
    def _blocks(self, store) -> list[slice]:
        return [sl for _, sl in store.layer_slices()] if self.settings.block_diagonal else [slice(0, store.d)]

    def whitening(self, train: FeatureStore, query: FeatureStore, factor: str = "cholesky") -> Whitening | None:
        """A W with W Wᵀ = R⁻¹ for the settings' R (``factor``: see :data:`.curvature.FACTORS`),
        from the curvature cache under work_dir when there."""
        s = self.settings
        if s.curvature == "none":
            return None
        blocks = self._blocks(train)
        cache = CurvatureCache(self.work_dir / "curvature")
        train_key, r_train = cache.curvature(train, blocks, s.chunk_rows, self.device)
        # The symmetric factor keeps the key it had before there was a choice.
        named = {} if factor == "symmetric" else {"factor": factor}
        if s.curvature == "train":
            key = {"r_train": train_key, "damping": s.damping, **named}
            return cache.whitening(key, blocks, lambda: Whitening.build(r_train(), blocks, s.damping, factor=factor))
        eval_key, r_eval = cache.curvature(query, blocks, s.chunk_rows, self.device)

        def build() -> Whitening:
            rt, re = r_train(), r_eval()
            lam = auto_lambda(re, rt, train.d) if s.lam == "auto" else float(s.lam)
            return Whitening.build(mix(re, rt, lam), blocks, s.damping, lam, factor)

        key = {"r_train": train_key, "r_eval": eval_key, "lam": s.lam, "damping": s.damping, **named}
        return cache.whitening(key, blocks, build)

    def transform(self, x: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
        """R^{-1/2} then unit norm: the same map for query and training rows."""
        if whitening is not None:
            x = whitening.apply(x)
        return unit_normalize(x) if self.settings.unit_norm else x

    def _scoring_inputs(self, train: FeatureStore, query: FeatureStore):
        """(transformed queries, training chunks, the chunks' transform, whitening)."""
        # Scoring streams bigger chunks than extraction writes: a 64 MiB slab
        # per step keeps the per-chunk top-k bookkeeping small next to the matmul.
        rows = max(self.settings.chunk_rows, (64 << 20) // (4 * train.d))
        if self._step_side:
            check_compatible(train, query, ignore=V_KEYS)
            step = self._optimizer_step()
            slices = train.layer_slices()
            return query.rows().to(self.device).float(), train.chunks(rows), lambda x: step.apply(x, slices), None
        check_compatible(train, query)
        whitening = self.whitening(train, query)
        q = self.transform(query.rows().to(self.device), whitening)
        return q, train.chunks(rows), whitening.apply if whitening is not None else None, whitening

    def score(self, train: FeatureStore, query: FeatureStore) -> tuple[TopK, Whitening | None]:
        q, chunks, transform, whitening = self._scoring_inputs(train, query)
        chunks = _counted(chunks, train.n_rows, "scoring")
        scorer = faiss_top_k if self.settings.scorer == "faiss" else top_k
        return scorer(q, chunks, self.settings.k, transform, normalize_train=self.settings.unit_norm), whitening

    def _stores(self, train_texts: Sequence[str], queries: Sequence, train_ids: Sequence | None, shards: int):
        train_ids = list(range(len(train_texts))) if train_ids is None else list(train_ids)
        train_examples = self.training_examples(train_texts, train_ids)
        query_examples = self.query_examples(queries)  # a bad query fails before any extraction
        query_ids = [_query_parts(q, i)[2] for i, q in enumerate(queries)]
        if self._step_side:  # no optimizer state: refused before any extraction
            self._optimizer_step()
        v = self.second_moment(train_examples)
        train = self.featurize(train_examples, "train", train_ids, v, expect_shards=shards)
        # The optimizer-step score divides by sqrt(V) once, on the training side.
        query = self.featurize(query_examples, "query", query_ids, None if self._step_side else v)
        return train, query, query_ids, v

    @property
    def _step_side(self) -> bool:
        return self.settings.train_side == "optimizer_step"

    def _optimizer_step(self):
        """The optimizer step's per-matrix geometry (train_side='optimizer_step'), built once."""
        if getattr(self, "_step", None) is None:
            self._step = optimizer_step(self.model, self.optimizer, self.sites, self.learning_rate)
        return self._step

    # --- sharded scoring: each job ranks its shard's rows, the reduce merges -------------------
    def _topk_dir(self, train, query) -> Path:
        s = self.settings
        transform = [s.curvature, s.lam, s.damping, s.block_diagonal, s.unit_norm]
        if self._step_side:  # the step's geometry scores the rows: it keys their ranking too
            transform.append([s.train_side, [(x.name, x.scale, x.clip) for x in self._optimizer_step().layers]])
        key = config_hash({"train": train.path.name, "query": query.path.name, "k": s.k, "transform": transform})
        return self.work_dir / "topk" / key

    @staticmethod
    def _shard_topk_file(index: int, count: int) -> str:
        return f"shard-{index:05d}-of-{count:05d}.pt"

    def score_shard(self, train_texts: Sequence[str], queries: Sequence, index: int, count: int,
                    train_ids: Sequence | None = None) -> Path:
        """The map step of sharded scoring: the top-k proponents and opponents among shard
        ``index`` of ``count`` of the training rows, kept for :meth:`attribute` to merge.

        Needs the whole training store, written by one job or by ``count`` shard
        jobs (R comes from every row; it never extracts), but reads only its
        shard's rows; the merged result equals unsharded scoring.
        """
        check_shard(index, count)
        train, query, _, _ = self._stores(train_texts, queries, train_ids, count)
        out = self._topk_dir(train, query) / self._shard_topk_file(index, count)
        if out.is_file():
            try:
                read_checked(out)
                return out
            except ArtifactError:
                pass  # damaged: rank the shard again
        q, _, transform, _ = self._scoring_inputs(train, query)
        start, stop = shard_bounds(train.n_rows, count)[index]
        rows = max(self.settings.chunk_rows, (64 << 20) // (4 * train.d))
        chunks = ((a, train.rows(a, min(a + rows, stop))) for a in range(start, stop, rows))
        top = top_k(q, chunks, self.settings.k, transform, normalize_train=self.settings.unit_norm)
        buffer = io.BytesIO()
        torch.save({"proponent_rows": top.proponent_rows, "proponent_scores": top.proponent_scores,
                    "opponent_rows": top.opponent_rows, "opponent_scores": top.opponent_scores}, buffer)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_checked(out, buffer.getvalue())
        return out

    def prepare_scoring(self, train_texts: Sequence[str], queries: Sequence, train_ids: Sequence | None = None,
                        shards: int = 1) -> None:
        """Write what every scoring shard reads (the query features, R and R^{-1/2}), so
        shard jobs started after it only read; call it under a lock shared by those jobs."""
        train, query, _, _ = self._stores(train_texts, queries, train_ids, shards)
        self.whitening(train, query)

    def _merged_shards(self, train, query) -> TopK | None:
        """The top-k from every shard's ranking, when all of one shard count are there."""
        folder = self._topk_dir(train, query)
        counts = sorted({int(p.stem.rsplit("-", 1)[1]) for p in folder.glob("shard-*-of-*.pt")}) if folder.is_dir() else []
        for count in counts:
            files = [folder / self._shard_topk_file(i, count) for i in range(count)]
            if not all(f.is_file() for f in files):
                continue
            parts = [torch.load(io.BytesIO(read_checked(f)), weights_only=True) for f in files]
            return merge_top_k([TopK(**part) for part in parts], self.settings.k)
        return None

    def all_scores(self, train_texts: Sequence[str], queries: Sequence, train_ids: Sequence | None = None,
                   shards: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
        """Every training row's score for every query, streamed as ``(first row,
        (queries, rows) scores)`` in row order on the model's device: the numbers
        :meth:`attribute` ranks, for uses that need all of them (LDS sums them
        over subsets) without an N × queries matrix in memory."""
        train, query, _, _ = self._stores(train_texts, queries, train_ids, shards)
        q, chunks, transform, _ = self._scoring_inputs(train, query)
        yield from score_chunks(q, chunks, transform, normalize_train=self.settings.unit_norm)

    def attribute(self, train_texts: Sequence[str], queries: Sequence,
                  train_ids: Sequence | None = None, shards: int = 1, diagnose: bool = False) -> AttributionResult:
        """Top-k proponents and opponents of each query among ``train_texts``.

        ``diagnose``: with R (full, not block-diagonal), also the R diagnostic
        (:mod:`.diagnostics`) in ``curvature_diagnostic``.

        ``shards > 1``: the training features must have been written by
        :meth:`extract_shard` jobs (all ``shards`` of them); this merges and scores.
        """
        train, query, query_ids, v = self._stores(train_texts, queries, train_ids, shards)
        merged = self._merged_shards(train, query)
        if merged is not None:  # the shards were ranked by jobs of their own
            top, whitening = merged, self.whitening(train, query)
        else:
            top, whitening = self.score(train, query)
        ids = train.row_ids
        diagnostic = self.curvature_diagnostic(train, query, whitening) if diagnose and self.settings.curvature != "none" \
            and not self.settings.block_diagonal else None
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
            curvature_diagnostic=diagnostic,
        )

    def curvature_diagnostic(self, train: FeatureStore, query: FeatureStore, whitening: Whitening | None) -> dict:
        """See :func:`.diagnostics.curvature_diagnostic`: R_train comes from the curvature
        cache (the whitening just used it), R_eval's eigenvectors from the query rows."""
        cache = CurvatureCache(self.work_dir / "curvature")
        _, r_train = cache.curvature(train, [slice(0, train.d)], self.settings.chunk_rows, self.device)
        n = min(train.n_rows, TRAIN_SAMPLE)
        rows = torch.randperm(train.n_rows, generator=torch.Generator().manual_seed(0))[:n].sort().values
        sample = torch.cat([train.rows(int(i), int(i) + 1) for i in rows]) if n < train.n_rows else train.rows()
        if whitening is not None and whitening.factor != "symmetric":
            # The shares after whitening are measured along R's eigendirections,
            # which only R^{-1/2} itself leaves in place: one eigendecomposition.
            whitening = self.whitening(train, query, factor="symmetric")
        with tqdm(total=1, desc="R diagnostic (top eigenvectors of R_train, R_eval)", unit="step") as bar:
            out = curvature_diagnostic(query.rows(), sample, r_train()[0],
                                       whitening.apply if whitening is not None else None)
            bar.update()
        return out


def _counted(chunks, total: int, desc: str):
    """``chunks`` ((start, rows) pairs) with a progress bar over their ``total`` rows."""
    with tqdm(total=total, desc=desc, unit="row") as bar:
        for start, rows in chunks:
            yield start, rows
            bar.update(rows.shape[0])


def attribute(model, tokenizer, train_texts: Sequence[str], queries: Sequence,
              settings: AttributionSettings = AttributionSettings(), optimizer_state=None,
              work_dir: str | Path | None = None, train_ids: Sequence | None = None,
              device: str | torch.device | None = None) -> AttributionResult:
    """One-call attribution; see :class:`TrackStar`."""
    return TrackStar(model, tokenizer, settings, optimizer_state, work_dir, device).attribute(
        train_texts, queries, train_ids)
