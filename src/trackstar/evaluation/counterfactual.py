"""Counterfactual validation (SPEC §2.5): LDS and leave-top-k-out, judged by retraining.

Tail-patch asks what one optimizer step on a proponent does. These ask what
the model would have been without some passages, by retraining it from
scratch without them (:mod:`trackstar.lm.retrain`):

- LDS (linear datamodeling score): M seeded random subsets S_j of the training
  corpus, one retrain each. A method predicts a retrain's outcome for query q
  by g_j = Σ_{i ∈ S_j} τ(q, i) over every passage of the subset; the query's
  LDS is the Spearman correlation of g_j with the measured target
  log-probability y_j over the subsets. Random scores give 0 in expectation.
- Leave-top-k-out: retrain without the query's top-k proponents and report
  the drop of the target log-probability from the model trained on
  everything; the baseline removes k random passages (the same draw for every
  method, so the difference between them is paired).

This module judges; retraining and its caching come in as a function
(``retrain_many``: a list of keep masks in, their outcomes out), so the same
code runs on one machine or over a cluster's jobs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: Fewer subsets than this and a Spearman correlation takes too few values to mean anything.
MIN_SUBSETS = 5
LDS = "lds"


def loo_column(k: int) -> str:
    return f"loo_drop@{k}"


def random_column(k: int) -> str:
    return f"random_drop@{k}"


def is_counterfactual_metric(column: str) -> bool:
    return column == LDS or column.startswith(("loo_drop@", "random_drop@"))


@dataclass(frozen=True)
class CounterfactualSettings:
    """How many retrains and which: M subsets of ``subset_fraction`` of the corpus, and
    leave-top-``k``-out on ``loo_queries`` queries (None: all), all seeded by ``seed``."""

    subsets: int = 32
    subset_fraction: float = 0.5
    seed: int = 0
    k: int = 10
    loo_queries: int | None = None

    def __post_init__(self) -> None:
        name = "counterfactual"
        if isinstance(self.subsets, bool) or not isinstance(self.subsets, int) or self.subsets < MIN_SUBSETS:
            raise ValueError(f"{name}.subsets={self.subsets!r}: LDS needs at least {MIN_SUBSETS} subsets for a "
                             "Spearman correlation (32 or more give a usable interval).")
        if not (isinstance(self.subset_fraction, (int, float)) and 0 < self.subset_fraction < 1):
            raise ValueError(f"{name}.subset_fraction={self.subset_fraction!r}: give a fraction in (0, 1) "
                             "(0.5 is the usual half of the corpus).")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"{name}.k={self.k!r}: give a positive number of passages to leave out.")
        n = self.loo_queries
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"{name}.loo_queries={n!r}: give a number of queries (0 skips leave-top-k-out), "
                             "or null for all of them.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"{name}.seed={self.seed!r}: give a non-negative integer.")


def subset_masks(n: int, settings: CounterfactualSettings) -> np.ndarray:
    """(n, M) boolean: subset j keeps round(fraction × n) passages, drawn with seed (seed, j)."""
    size = round(settings.subset_fraction * n)
    if not 0 < size < n:
        raise ValueError(f"counterfactual.subset_fraction={settings.subset_fraction} keeps {size} of {n} passages; "
                         "a subset must keep some passages and leave some out.")
    masks = np.zeros((n, settings.subsets), dtype=bool)
    for j in range(settings.subsets):
        masks[np.random.default_rng([settings.seed, j]).permutation(n)[:size], j] = True
    return masks


def random_removal(n: int, k: int, seed: int, query_index: int) -> np.ndarray:
    """``k`` passage positions drawn for query ``query_index`` (the same for every method)."""
    return np.random.default_rng([seed, 1_000_003, query_index]).choice(n, size=k, replace=False)


def loo_sample(n_queries: int, settings: CounterfactualSettings) -> list[int]:
    """Positions of the queries that get leave-top-k-out retrains (seeded, in query order)."""
    want = n_queries if settings.loo_queries is None else min(settings.loo_queries, n_queries)
    picked = np.random.default_rng([settings.seed, 2_000_003]).permutation(n_queries)[:want]
    return sorted(int(i) for i in picked)


def lds_per_query(predicted: np.ndarray, measured: np.ndarray) -> tuple[np.ndarray, dict]:
    """Each query's LDS from (queries, subsets) predictions and outcomes (NaN: failed retrain).

    Returns (lds, counts of the special cases). A query whose outcome never
    changes across subsets has no LDS for any method (``constant_outcome``,
    NaN), nor one with fewer than :data:`MIN_SUBSETS` finished subsets, nor a
    prediction that is not finite. A method whose prediction is the same for
    every subset (e.g. BM25 for a query with no word in the corpus) predicts
    nothing: its LDS is 0 (``constant_prediction``), not left out, so that
    dropping its hard queries cannot raise its mean.
    """
    from scipy import stats  # here, not at the top: the run config's schema imports this module

    out = np.full(predicted.shape[0], np.nan)
    counts = {"constant_outcome": 0, "too_few_subsets": 0, "constant_prediction": 0, "non_finite_prediction": 0}
    for q in range(predicted.shape[0]):
        ok = np.isfinite(measured[q])
        if ok.sum() < MIN_SUBSETS:
            counts["too_few_subsets"] += 1
        elif np.ptp(measured[q, ok]) == 0:
            counts["constant_outcome"] += 1
        elif not np.isfinite(predicted[q, ok]).all():
            counts["non_finite_prediction"] += 1
        elif np.ptp(predicted[q, ok]) == 0:
            counts["constant_prediction"] += 1
            out[q] = 0.0
        else:
            out[q] = float(stats.spearmanr(predicted[q, ok], measured[q, ok]).statistic)
    return out, counts


def _logprobs(outcome: dict, example_ids: Sequence) -> np.ndarray:
    if outcome.get("status") != "finished":
        return np.full(len(example_ids), np.nan)
    lp = outcome["target_logprob"]
    return np.array([lp.get(e, math.nan) for e in example_ids], dtype=float)


def counterfactual(
    records: Sequence[dict],
    corpus_ids: Sequence[str],
    subset_sums: Callable[[np.ndarray], np.ndarray],
    retrain_many: Callable[[list[np.ndarray]], list[dict]],
    settings: CounterfactualSettings = CounterfactualSettings(),
) -> tuple[pd.DataFrame, dict]:
    """Per-query LDS, leave-top-k-out drop and random-removal drop, and what was excluded.

    ``records``: the method's retrieval records (release schema) over the
    training corpus ``corpus_ids`` (in the corpus's order). ``subset_sums``
    maps (passages, subsets) masks to (queries, subsets) summed scores, in the
    records' query order. ``retrain_many`` maps keep masks to retrain outcomes
    (:func:`trackstar.lm.retrain.retrain`). A diverged retrain is left out of
    every mean, and counted.
    """
    import pandas as pd

    n = len(corpus_ids)
    example_ids = [r["example_id"] for r in records]
    position = {doc: i for i, doc in enumerate(corpus_ids)}
    masks = subset_masks(n, settings)
    sample = loo_sample(len(records), settings)
    k = settings.k
    if k > n:
        raise ValueError(f"counterfactual.k={k} exceeds the corpus size {n}; lower it.")

    def without(rows) -> np.ndarray:
        keep = np.ones(n, dtype=bool)
        keep[np.asarray(rows, dtype=np.int64)] = False
        return keep

    loo_masks = []
    for q in sample:
        ids = records[q]["proponent_ids"][:k]
        if len(ids) < k:
            raise ValueError(f"query {example_ids[q]!r} has {len(ids)} proponents; leave-top-{k}-out needs {k} "
                             f"(raise eval.k to at least {k}).")
        unknown = [d for d in ids if d not in position]
        if unknown:
            raise KeyError(f"query {example_ids[q]!r}: proponent id {unknown[0]!r} is not a passage of the training "
                           f"corpus ({n} passages such as {corpus_ids[0]!r}); were its retrievals made over another corpus?")
        loo_masks.append(without([position[d] for d in ids]))
    random_masks = [without(random_removal(n, k, settings.seed, q)) for q in sample]
    full = np.ones(n, dtype=bool)
    outcomes = retrain_many([*(masks[:, j] for j in range(masks.shape[1])), full, *loo_masks, *random_masks])
    m = settings.subsets
    subset_out, full_out = outcomes[:m], outcomes[m]
    loo_out, random_out = outcomes[m + 1:m + 1 + len(sample)], outcomes[m + 1 + len(sample):]

    measured = np.stack([_logprobs(o, example_ids) for o in subset_out], axis=1)
    lds, excluded = lds_per_query(subset_sums(masks), measured)
    full_lp = _logprobs(full_out, example_ids)
    loo = np.full(len(records), np.nan)
    rnd = np.full(len(records), np.nan)
    for q, lo, ro in zip(sample, loo_out, random_out, strict=True):
        loo[q] = full_lp[q] - _logprobs(lo, example_ids)[q]
        rnd[q] = full_lp[q] - _logprobs(ro, example_ids)[q]
    failed = [o for o in outcomes if o.get("status") != "finished"]
    info = {
        "subsets": m, "subset_fraction": settings.subset_fraction, "seed": settings.seed, "k": k,
        "loo_queries": len(sample), "retrains": len(outcomes), "failed_retrains": len(failed),
        "failed_subsets": int(sum(o.get("status") != "finished" for o in subset_out)),
        "lds_excluded": excluded,
        "retrain_seconds": float(sum(o.get("seconds", 0.0) for o in outcomes)),
    }
    if failed:
        log.warning("%d of %d retrains diverged and are left out of the counterfactual metrics",
                    len(failed), len(outcomes))
    if any(excluded.values()):
        log.warning("LDS special cases (see lds_per_query): %s", excluded)
    per_query = pd.DataFrame({"example_id": example_ids, LDS: lds, loo_column(k): loo, random_column(k): rnd})
    return per_query, info
