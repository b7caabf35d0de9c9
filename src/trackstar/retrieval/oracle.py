"""The tail-patch oracle: passages ranked by their exact one-step effect on each query.

Tail-patch@k (SPEC §2.3) takes one optimizer step on a proponent and measures
the change of the query's target log-probability. On our worlds that change is
computable for every passage: one step per passage, then every query's target
under the stepped model. Ranking each query's passages by it gives the best
top k any method can retrieve for tail-patch, so this row's tail-patch@k is the
ceiling of every other row's (the tables report each row as a share of it),
and its MRR and recall say how often the most influential passages state the
fact.

The values are :func:`trackstar.evaluation.tail_patch.one_step_effects`: the
same step, kernels and per-checkpoint cache as the evaluation's tail-patch,
so the evaluation reads this row's values back bit for bit (and every other
row's top k is scored on the same numbers). One step per passage serves every
query; a run that stops keeps every finished passage (the cache is written
per chunk) and the next run goes on from there.

Beside the ranking, the run records how well gradient rows' scores over every
passage rank-correlate with the truth, per query (``info.rank_agreement``; the
first-order prediction of tail-patch projected and not, Exp 3, TrackStar).

The cost is passages × queries forward passes of a query plus one step per
passage: :attr:`OracleTailPatch.Options.max_pairs` refuses a corpus where it
would not finish in reasonable time (docs/results.md states the measured rate).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ..evaluation.tail_patch import one_step_effects
from .records import Corpus, retrieval_record
from .registry import RetrievalTask, Retriever, get_retriever, register, sum_query_rows

#: About 5 minutes at the rate measured on the tiny model on a 2-core CPU
#: (docs/results.md); the tiny world's closed and open sets fit, the small world does not.
DEFAULT_MAX_PAIRS = 400_000
#: The rows whose rank agreement with the truth the oracle records by default: the first-order
#: prediction of tail-patch as Table 1 runs it, unprojected, and over every parameter the step
#: touches; Exp 3 and TrackStar at their table settings.
DEFAULT_AGREEMENT = ("first_order", "first_order:projection=identity", "first_order:params=all,projection=identity",
                     "exp3", "trackstar")


class OracleTailPatch(Retriever):
    """Each query's passages ranked by the exact change of its target log-probability
    after one optimizer step on the passage (the tail-patch step)."""

    name = "oracle_tail_patch"
    family = "influence"
    rank = 90.0

    @dataclass(frozen=True)
    class Options:
        #: Refuse a (corpus, queries) with more (passage, query) measurements than this;
        #: null keeps the default.
        max_pairs: int = DEFAULT_MAX_PAIRS
        #: Gradient rows whose scores over every passage are rank-correlated, per query,
        #: with the exact one-step change (the run's ``info.rank_agreement``): a method
        #: name, optionally with settings, ``first_order:projection=identity``.
        agreement: tuple = DEFAULT_AGREEMENT

        def __post_init__(self):
            if int(self.max_pairs) < 1:
                raise ValueError(f"max_pairs must be a positive integer, got {self.max_pairs!r}")
            object.__setattr__(self, "agreement", tuple(str(a) for a in self.agreement))
            for spec in self.agreement:
                _parse(spec)

    @property
    def label(self) -> str:
        return "Tail-patch oracle (exact one-step effect)"

    @property
    def settings(self) -> dict:
        # max_pairs decides whether it runs, never what it returns.
        return {"agreement": list(self.options.agreement)} if self.options.agreement != DEFAULT_AGREEMENT else {}

    def _effects(self, task: RetrievalTask, corpus: Corpus, progress: bool = True) -> tuple[np.ndarray, dict]:
        pairs = len(corpus) * len(task.queries)
        if pairs > self.options.max_pairs:
            raise ValueError(
                f"method {self.name!r}: {len(corpus):,} {task.corpus}-set passages × {len(task.queries):,} "
                f"queries = {pairs:,} one-step measurements, over method.options.max_pairs="
                f"{self.options.max_pairs:,} (about 5 minutes on a 2-core CPU with the tiny model). Lower "
                "eval.n_queries, or raise +method.options.max_pairs=N if the machine can afford it."
            )
        t0 = time.perf_counter()
        before, after = one_step_effects(task.checkpoint, task.queries, dict(zip(corpus.ids, corpus.texts)),
                                         progress=progress, cache_dir=task.tail_patch_cache,
                                         desc="oracle one-step effects")
        info = {"passages": len(corpus), "queries": len(task.queries), "pairs": pairs,
                "seconds": round(time.perf_counter() - t0, 3)}
        return after - before[:, None], info

    def rank_agreement(self, task: RetrievalTask, effects: np.ndarray) -> dict:
        """Per row of ``options.agreement``: Spearman's rank correlation, per query, between its
        scores over every passage and the exact one-step change (``effects``); mean, median,
        range, and each query's value."""
        out = {}
        for spec in self.options.agreement:
            name, options = _parse(spec)
            row = get_retriever(name, options, task.corpus)
            if row.family != "gradient":
                raise ValueError(f"method.options.agreement: {spec!r} is not a gradient row")
            t0 = time.perf_counter()
            identity = options.get("projection") == "identity"
            # Unprojected features are large (every attributed weight per passage): kept only while used.
            with tempfile.TemporaryDirectory() if identity or task.work_dir is None else nullcontext(task.work_dir) as work:
                scores = row.score_matrix(dataclasses.replace(task, work_dir=Path(work)))
            rho = np.array([spearmanr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else np.nan
                            for a, b in zip(scores, effects, strict=True)])
            ok = rho[~np.isnan(rho)]
            out[spec] = {
                "label": row.label, "settings": row.settings, "queries": int(len(ok)),
                "mean": float(ok.mean()) if len(ok) else None, "median": float(np.median(ok)) if len(ok) else None,
                "min": float(ok.min()) if len(ok) else None, "max": float(ok.max()) if len(ok) else None,
                "per_query": {q["example_id"]: (None if np.isnan(r) else float(r)) for q, r in zip(task.queries, rho)},
                "seconds": round(time.perf_counter() - t0, 3),
            }
        return out

    def retrieve(self, task: RetrievalTask) -> tuple[list[dict], dict]:
        corpus = Corpus.from_world(task.world, task.corpus)
        effects, info = self._effects(task, corpus)
        extra = {"rank_agreement": self.rank_agreement(task, effects)} if self.options.agreement else {}
        # Ties keep corpus order; the opponents are the passages that lower the target most.
        order = np.argsort(-effects, axis=1, kind="stable")
        records = []
        for q, row, ranked in zip(task.queries, effects, order, strict=True):
            top, bottom = ranked[:task.k], ranked[::-1][:task.k]
            records.append(retrieval_record(q, corpus, [corpus.ids[j] for j in top], row[top].tolist(),
                                            [corpus.ids[j] for j in bottom], row[bottom].tolist()))
        return records, {"oracle": info, **extra}

    def subset_sums(self, task: RetrievalTask, masks):
        effects, _ = self._effects(task, Corpus.from_world(task.world, task.corpus))
        return sum_query_rows(effects, masks)


def _parse(spec: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> (name, options)."""
    name, _, rest = str(spec).partition(":")
    options = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"method.options.agreement: {spec!r}: write settings as name:key=value,key=value")
        options[key.strip()] = value.strip()
    return name.strip(), options


register("oracle_tail_patch", OracleTailPatch)
