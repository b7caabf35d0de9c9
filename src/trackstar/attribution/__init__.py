"""Gradient-based training-data attribution: TrackStar and its ablations (SPEC §1).

Modules, one concern each: ``output`` (f and tokenized examples),
``gradients`` (per-example gradients), ``second_moment`` (V), ``projection``
(P_d), ``features`` (the three combined), ``store`` (on-disk features),
``curvature`` (R, R^{-1/2}), ``scoring`` (streaming top-k), ``methods``
(named rows of the paper's tables), ``api`` (the one-call entry point).
"""

from .api import AttributionResult, TrackStar, attribute
from .methods import METHODS, method_settings
from .settings import AttributionSettings

__all__ = ["AttributionResult", "AttributionSettings", "METHODS", "TrackStar", "attribute", "method_settings"]
