"""The registry of retrievers: every row of the paper's tables, found by name.

A retriever turns a world's queries into ranked proponents over the closed or
the open set, as release-schema retrieval records. Each one declares

- ``name`` (the ``method=`` choice) and its own ``Options`` dataclass (what
  ``method.options`` may set; the gradient rows take their attribution
  settings instead, see :mod:`.gradient`);
- ``settings``: the resolved values that determine its results. Its cache key
  is built from them, so two retrievers never share cached records;
- ``label`` and ``rank``: how the tables name it and where its row goes;
- ``family``: ``baseline`` (text only), ``gradient`` (needs a checkpoint; takes
  the shared attribution settings) or ``influence`` (needs a checkpoint with its
  optimizer state; its own options only: the tail-patch oracle).

Adding a baseline is one module in this package that calls :func:`register`
at import time, plus a ``conf/method/<name>.yaml``. The modules of this
package are imported on first lookup, so nothing else needs to list them.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..io import config_hash
from .records import CORPORA, Corpus

FAMILIES = ("baseline", "gradient", "influence")
#: Families that score with the model, so need a checkpoint (and key their cache by it).
CHECKPOINT_FAMILIES = ("gradient", "influence")


@dataclass
class RetrievalTask:
    """What every retriever is given: the queries and where to look for proponents."""

    world: Any  # trackstar.world.LoadedWorld
    corpus: str
    queries: Sequence[dict]
    k: int = 10
    #: A :class:`trackstar.lm.Checkpoint`, for the gradient rows.
    checkpoint: Any = None
    #: Where a retriever may keep its own reusable artifacts (feature stores,
    #: curvature); None uses a temporary directory.
    work_dir: Path | None = None
    #: Where a retriever computes (a torch.device); None: its own default.
    device: Any = None
    #: Shards the training features are written in (by jobs of their own; see
    #: :meth:`~trackstar.retrieval.gradient.GradientRetriever.extract_shard`).
    shards: int = 1
    #: Gradient rows with R: also record the R diagnostic in the info.
    diagnose: bool = False
    #: The checkpoint's tail-patch cache (one directory per checkpoint), which the
    #: tail-patch oracle fills and the evaluation's tail-patch reads; None: no cache.
    tail_patch_cache: Path | None = None


class Retriever(ABC):
    """One configured method; subclasses set the class attributes and :meth:`retrieve`."""

    name: ClassVar[str]
    family: ClassVar[str] = "baseline"
    #: Position of the row in the tables (lower first).
    rank: ClassVar[float] = 50.0

    @dataclass(frozen=True)
    class Options:
        """No options."""

    def __init__(self, options: Mapping[str, Any] | None = None, corpus: str = "closed"):
        if corpus not in CORPORA:
            raise ValueError(f"eval.corpus={corpus!r}: use one of {CORPORA}.")
        self.corpus = corpus
        self.options = _build_options(self.Options, dict(options or {}), self.name)

    @property
    def label(self) -> str:
        """The row label in the paper's tables."""
        return self.name

    @property
    def settings(self) -> dict:
        """Every value that determines this retriever's records (JSON-able)."""
        return dataclasses.asdict(self.options)

    def cache_key(self) -> dict:
        return {"retriever": self.name, "family": self.family, "settings": self.settings}

    def key_hash(self) -> str:
        return config_hash(self.cache_key())

    def check_model(self, model) -> None:
        """Raise ValueError if the settings do not fit ``model``'s architecture (given on
        the meta device: shapes only). Called before any work; text baselines take any."""

    @abstractmethod
    def retrieve(self, task: RetrievalTask) -> tuple[list[dict], dict]:
        """(release-schema records in query order, info the run record keeps)."""

    def subset_sums(self, task: RetrievalTask, masks: np.ndarray) -> np.ndarray:
        """(queries, subsets) float64: each query's summed score over each subset's passages.

        ``masks`` is (corpus rows, subsets) boolean. This is what LDS predicts a
        retrained model's outcome with (:mod:`trackstar.evaluation.counterfactual`),
        so it covers every passage, not only the top k. A retriever that can
        score every passage overrides it.
        """
        raise NotImplementedError(
            f"method {self.name!r} cannot score every passage of the corpus, which LDS needs; "
            "implement Retriever.subset_sums for it or leave it out of the counterfactual sweep."
        )


def sum_row_chunks(chunks: Iterable[tuple[int, Any]], masks: np.ndarray, n_queries: int) -> np.ndarray:
    """Σ over row chunks ``(first row, (queries, rows) scores)`` of scores @ masks, in float64."""
    out = np.zeros((n_queries, masks.shape[1]))
    seen = 0
    for start, scores in chunks:
        scores = np.asarray(scores.cpu() if hasattr(scores, "cpu") else scores, dtype=np.float64)
        out += scores @ masks[start:start + scores.shape[1]]
        seen += scores.shape[1]
    if seen != masks.shape[0]:
        raise ValueError(f"the scores cover {seen} passages but the subsets {masks.shape[0]}")
    return out


def sum_query_rows(rows: Iterable[np.ndarray], masks: np.ndarray) -> np.ndarray:
    """Σ per query of its (corpus rows,) scores over each subset, in float64."""
    return np.stack([np.asarray(r, dtype=np.float64) @ masks for r in rows])


def _build_options(options_type, values: dict, name: str):
    values = {k: v for k, v in values.items() if v is not None}  # null keeps the default
    known = {f.name for f in dataclasses.fields(options_type)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"method.options for {name!r}: unknown option(s) {unknown}; "
            f"{name!r} takes {sorted(known) or 'no options'}."
        )
    try:
        return options_type(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"method.options for {name!r}: {exc}") from None


_REGISTRY: dict[str, type[Retriever]] = {}
_discovered = False


def register(name: str, retriever: type[Retriever], replace: bool = False) -> None:
    """Make ``retriever(options, corpus)`` available as method ``name``."""
    if not (isinstance(retriever, type) and issubclass(retriever, Retriever)):
        raise TypeError(f"register({name!r}, ...) needs a Retriever subclass, got {retriever!r}.")
    if name in _REGISTRY and not replace:
        raise ValueError(f"A retriever named {name!r} is already registered; pass replace=True to override it.")
    _REGISTRY[name] = retriever


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import every module of this package once, so each registers its retrievers."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in ("registry", "records"):
            importlib.import_module(f"{__package__}.{module.name}")


def retriever_names() -> list[str]:
    """Registered method names, in table order."""
    _discover()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].rank, n))


def check_method(name: str) -> str:
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown method {name!r}. Choose one of: {', '.join(retriever_names())}.")
    return name


def retriever_class(name: str) -> type[Retriever]:
    """The registered class of method ``name`` (its family and rank, before configuring it)."""
    return _REGISTRY[check_method(name)]


def get_retriever(name: str, options: Mapping[str, Any] | None = None, corpus: str = "closed") -> Retriever:
    """The retriever ``name`` configured by ``options`` for ``corpus``."""
    return retriever_class(name)(options, corpus)


def retrieve(
    name: str,
    world,
    corpus: str,
    queries: Sequence[dict] | None = None,
    k: int = 10,
    checkpoint=None,
    options: Mapping[str, Any] | None = None,
    work_dir: str | Path | None = None,
) -> tuple[list[dict], dict]:
    """Top-``k`` proponents of each query under method ``name``, as release-schema records."""
    retriever = get_retriever(name, options, corpus)
    task = RetrievalTask(world=world, corpus=corpus, queries=list(world.queries if queries is None else queries), k=k,
                         checkpoint=checkpoint, work_dir=Path(work_dir) if work_dir is not None else None)
    return run(retriever, task)


def run(retriever: Retriever, task: RetrievalTask) -> tuple[list[dict], dict]:
    """Run a configured retriever after the checks every method shares."""
    size = len(Corpus.from_world(task.world, task.corpus))
    if task.k > size:
        raise ValueError(f"k={task.k} exceeds the {task.corpus} corpus size {size}; lower eval.k.")
    if retriever.family in CHECKPOINT_FAMILIES and task.checkpoint is None:
        raise ValueError(
            f"method {retriever.name!r} needs a model checkpoint; pass checkpoint=load_checkpoint(...)."
        )
    records, info = retriever.retrieve(task)
    return records, {"method": retriever.name, "corpus": task.corpus, "k": task.k, **info}
