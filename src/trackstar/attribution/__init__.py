"""Gradient-based training-data attribution: TrackStar and its ablations (SPEC §1).

Modules, one concern each:

- ``settings``: one run's settings, a plain dataclass;
- ``output``: f and tokenized examples;
- ``fused``: fused kernels for extraction (GELU, RMSNorm, the loss with its head): same functions, fewer passes;
- ``gradients``: per-example gradients;
- ``second_moment``: V;
- ``projection``: P_d;
- ``features``: the three combined;
- ``store``: on-disk features;
- ``curvature``: R, R^{-1/2};
- ``diagnostics``: where query and training gradients put their energy along R's top directions;
- ``optimizer_step``: the optimizer's own step on a passage as a map on its features (``train_side``);
- ``scoring``: streaming top-k;
- ``methods``: named rows of the paper's tables;
- ``api``: the one-call entry point.
"""

from .api import AttributionResult, TrackStar, attribute
from .methods import METHODS, method_settings
from .settings import AttributionSettings

__all__ = ["AttributionResult", "AttributionSettings", "METHODS", "TrackStar", "attribute", "method_settings"]
