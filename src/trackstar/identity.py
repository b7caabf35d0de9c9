"""The identity scheme: which settings enter a run id or a cache key, in one place.

Every cached artifact (a feature store, a retrieval, a run record) is found by
a hash of exactly the settings that determine it. When a setting is added to
the suite, artifacts made before it existed were made with the setting at one
value (the one that reproduces the earlier behaviour). Such a setting enters an
identity only when it differs from that value, so earlier runs keep their ids
and caches keep their keys.

Each such setting is listed once in :data:`LATER`, with the version of this
scheme that added it. ``tests/test_identity.py`` freezes the keys each scope had
at version 0: a setting added to a config group, to
:class:`~trackstar.attribution.settings.AttributionSettings` or to a feature
store's metadata without an entry here fails it. To add one: append an entry
with ``since=IDENTITY_VERSION + 1`` and bump :data:`IDENTITY_VERSION`.

Scopes: ``run.<group>`` (a config group in a run's id and config id: world,
model, method, eval, counterfactual, corpus), ``run`` (whole groups of the run
config), ``retriever.gradient`` (a gradient row's settings in its retrieval
cache key) and ``store`` (a feature store's metadata).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: The newest version of the scheme (the highest ``since`` in :data:`LATER`).
IDENTITY_VERSION = 8


def _templated_or_release(world: Mapping) -> bool:
    return world.get("style", "templated") == "templated" or world.get("profile") == "release"


def _off(key: str, off: Any) -> Callable[[Mapping], bool]:
    return lambda group: group.get(key, off) == off


@dataclass(frozen=True)
class Later:
    """A setting added after artifacts existed: left out of ``scope``'s identities
    while it equals ``default`` (or, with ``omit``, while ``omit(mapping)`` holds for
    the mapping that holds it)."""

    scope: str
    key: str
    since: int
    default: Any = None
    omit: Callable[[Mapping], bool] | None = None

    def left_out(self, mapping: Mapping) -> bool:
        if self.key not in mapping:
            return True
        if self.omit is not None:
            return self.omit(mapping)
        return mapping[self.key] == self.default


#: Every setting added after artifacts existed, oldest first.
LATER: tuple[Later, ...] = (
    # v1: mixed-precision extraction; stores in float32 keep their keys.
    Later("store", "model_dtype", 1, "float32"),
    # v2: release worlds, foreign models' optimizer state, the NLI judge.
    Later("run.world", "path", 2, None),
    Later("run.world", "queries_per_bucket", 2, None),
    Later("run.model", "optimizer_state", 2, None),
    Later("run.model", "learning_rate", 2, None),
    Later("run.eval", "judge", 2, "exact"),
    Later("run.eval", "judge_model", 2, None),
    Later("run.eval", "judge_threshold", 2, 0.5),
    # v3: how d is split among weight matrices (balanced: the strict rule's layout wherever it works).
    Later("retriever.gradient", "split", 3, "balanced"),
    # v4: counterfactual evaluation and external corpora, whole groups, off by default.
    Later("run", "counterfactual", 4, omit=lambda run: _off("enabled", False)(run["counterfactual"])),
    Later("run", "corpus", 4, omit=lambda run: _off("source", None)(run["corpus"])),
    # v5: the first-order row's train side.
    Later("retriever.gradient", "train_side", 5, "features"),
    # v6: world styles; only a generated natural world has a style and knobs in its identity.
    Later("run.world", "style", 6, omit=_templated_or_release),
    Later("run.world", "natural", 6, omit=_templated_or_release),
    # v7: scoring a model whose main weights the sites leave out, when asked (off: refused).
    Later("retriever.gradient", "allow_partial", 7, False),
    # v8: a mixture-of-experts block's router weights among the sites, when asked (off: as before).
    Later("retriever.gradient", "routers", 8, False),
    # v8: a PEFT adapter on a Hugging Face base model.
    Later("run.model", "adapter", 8, None),
)


def later_keys(scope: str) -> set[str]:
    """The settings of ``scope`` that :data:`LATER` lists."""
    return {entry.key for entry in LATER if entry.scope == scope}


def stable(scope: str, mapping: Mapping) -> dict:
    """``mapping`` (the settings of ``scope``) as it enters an identity: without the
    later settings that are at their earlier value. Omission rules see the whole
    mapping, so one setting may depend on another (a world's style on its profile)."""
    entries = [entry for entry in LATER if entry.scope == scope]
    return {k: v for k, v in mapping.items()
            if not any(entry.key == k and entry.left_out(mapping) for entry in entries)}
