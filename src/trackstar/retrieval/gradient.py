"""The gradient-based rows of the paper's tables (SPEC §1.6): TrackStar and the path to it.

Each row is a preset of :data:`trackstar.attribution.METHODS`; its options are
any :class:`~trackstar.attribution.AttributionSettings` fields to override
(``d``, ``lam``, ``output_fn`` …). λ left unset takes the corpus default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..attribution.api import TrackStar
from ..attribution.gradients import attribution_sites
from ..attribution.methods import METHODS, method_settings
from ..attribution.projection import Projector
from ..attribution.settings import AttributionSettings
from ..identity import stable
from .records import Corpus, retrieval_record
from .registry import RetrievalTask, Retriever, register, sum_row_chunks

#: λ defaults per corpus (paper: ≈0.90 for T-REx, ≈0.99 for C4).
DEFAULT_LAMBDA = {"closed": 0.9, "open": 0.99}

#: Table row labels, in table order.
LABELS = {
    "grad_dot": "Gradient dot product",
    "grad_cosine": "Gradient cosine",
    "trak": "TRAK",
    **{f"exp{i}": f"Exp {i}" for i in range(1, 6)},
    "trackstar": "TrackStar",
    "first_order": "First-order tail-patch (reference)",
}


class GradientRetriever(Retriever):
    """One named row of :data:`~trackstar.attribution.METHODS` with overridden settings."""

    family = "gradient"
    name = "gradient"

    def __init__(self, options: Mapping[str, Any] | None = None, corpus: str = "closed"):
        super().__init__(None, corpus)
        overrides = dict(options or {})
        known = {f.name for f in dataclasses.fields(AttributionSettings)} - {"k"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown setting(s) {unknown}; it takes {sorted(known)}.")
        lam = overrides.get("lam")
        if isinstance(lam, str) and lam != "auto":
            try:
                overrides["lam"] = float(lam)
            except ValueError:
                raise ValueError(f"method.lam={lam!r}: give a number in [0, 1] or 'auto'.") from None
        overrides.setdefault("lam", DEFAULT_LAMBDA[corpus])
        self.attribution = method_settings(self.name, **overrides)

    @property
    def label(self) -> str:
        if self.name == "first_order" and self.attribution.params == "all":
            # The reference row predicts a step of the attributed matrices, or with params=all the full step.
            return "First-order tail-patch (reference, all parameters)"
        return LABELS.get(self.name, self.name)

    @property
    def settings(self) -> dict:
        # k is the stage's (eval.k), not the method's; settings added later enter the
        # key only away from their earlier value (trackstar.identity).
        return stable("retriever.gradient", {k: v for k, v in dataclasses.asdict(self.attribution).items() if k != "k"})

    def check_model(self, model) -> None:
        """Refuse settings the model's shape cannot take (the split of d), before any work."""
        s = self.attribution
        sites = attribution_sites(model, s.params, s.routers)
        try:
            Projector(sites, s.projection, s.d, s.seed, s.split)
        except ValueError as exc:
            raise ValueError(f"method.d={s.d}: {exc}") from None

    def _engine(self, task: RetrievalTask):
        checkpoint = task.checkpoint
        return TrackStar(checkpoint.model, checkpoint.tokenizer, self.attribution.replace(k=task.k),
                         optimizer=checkpoint.optimizer, work_dir=task.work_dir, device=task.device,
                         learning_rate=checkpoint.learning_rate)

    def extract_shard(self, task: RetrievalTask, index: int):
        """Shard ``index`` of ``task.shards`` of the corpus's training features (a map job)."""
        corpus = Corpus.from_world(task.world, task.corpus)
        return self._engine(task).extract_shard(corpus.texts, index, task.shards, train_ids=corpus.ids)

    def prepare_scoring(self, task: RetrievalTask) -> None:
        """Write what each scoring shard job reads (query features, R^{-1/2})."""
        corpus = Corpus.from_world(task.world, task.corpus)
        self._engine(task).prepare_scoring(corpus.texts, _queries(task), train_ids=corpus.ids, shards=task.shards)

    def score_shard(self, task: RetrievalTask, index: int):
        """The top-k among shard ``index`` of ``task.shards`` of the training rows (a map job)."""
        corpus = Corpus.from_world(task.world, task.corpus)
        return self._engine(task).score_shard(corpus.texts, _queries(task), index, task.shards, train_ids=corpus.ids)

    def score_matrix(self, task: RetrievalTask) -> np.ndarray:
        """(queries, passages) float64: every passage's score for every query (what it ranks)."""
        corpus = Corpus.from_world(task.world, task.corpus)
        out = np.zeros((len(task.queries), len(corpus)))
        for start, chunk in self._engine(task).all_scores(corpus.texts, _queries(task), train_ids=corpus.ids,
                                                          shards=task.shards):
            out[:, start:start + chunk.shape[1]] = chunk.double().cpu().numpy()
        return out

    def subset_sums(self, task: RetrievalTask, masks):
        corpus = Corpus.from_world(task.world, task.corpus)
        scores = self._engine(task).all_scores(corpus.texts, _queries(task), train_ids=corpus.ids, shards=task.shards)
        return sum_row_chunks(scores, masks, len(task.queries))

    def retrieve(self, task: RetrievalTask) -> tuple[list[dict], dict]:
        corpus = Corpus.from_world(task.world, task.corpus)
        engine = self._engine(task)
        result = engine.attribute(
            corpus.texts,
            _queries(task),
            train_ids=corpus.ids, shards=task.shards, diagnose=task.diagnose,
        )
        cover = dict(engine.coverage)
        if len(cover["unattributed_main"]) > 20:  # the record names the first ones and counts them all
            cover["unattributed_main"] = [*cover["unattributed_main"][:20], f"... {len(cover['unattributed_main'])} in all"]
        info = {"coverage": cover, "lambda": result.lam, "lambda_default": DEFAULT_LAMBDA[task.corpus],
                "v_source": result.v_source, "settings": self.settings,
                "train_store": str(result.train_store), "query_store": str(result.query_store),
                **({"curvature_diagnostic": result.curvature_diagnostic} if result.curvature_diagnostic else {})}
        records = [
            retrieval_record(q, corpus, pids, pscores, oids, oscores)
            for q, pids, pscores, oids, oscores in zip(
                task.queries, result.proponent_ids, result.proponent_scores, result.opponent_ids,
                result.opponent_scores, strict=True,
            )
        ]
        return records, info


def _queries(task: RetrievalTask) -> list[dict]:
    return [{"prompt": q["prompt"], "target": q["target"], "id": q["example_id"]} for q in task.queries]


def _register_rows() -> None:
    for i, row in enumerate(METHODS):
        register(row, type(row, (GradientRetriever,), {"name": row, "rank": 10.0 + i}))


_register_rows()
