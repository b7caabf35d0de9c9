"""The named method rows of the paper's Tables 1 and 2 (SPEC §1.6) as presets.

Exp 1–5 are this project's definition of the path from TRAK to TrackStar (the
paper's own definitions could not be confirmed); change them here or override
fields with ``METHODS[name].replace(...)``.
"""

from __future__ import annotations

from .settings import AttributionSettings

_BASE = AttributionSettings()

METHODS: dict[str, AttributionSettings] = {
    "grad_dot": _BASE.replace(output_fn="loss", use_v=False, curvature="none", unit_norm=False),
    "grad_cosine": _BASE.replace(output_fn="loss", use_v=False, curvature="none", unit_norm=True),
    "trak": _BASE.replace(output_fn="margin", use_v=False, curvature="train", unit_norm=False),
    "exp1": _BASE.replace(output_fn="loss", use_v=False, curvature="train", unit_norm=False),
    "exp2": _BASE.replace(output_fn="loss", use_v=True, curvature="train", unit_norm=False),
    "exp3": _BASE.replace(output_fn="loss", use_v=True, curvature="none", unit_norm=True),
    "exp4": _BASE.replace(output_fn="loss", use_v=True, curvature="train", unit_norm=True),
    "exp5": _BASE.replace(output_fn="loss", use_v=False, curvature="mix", unit_norm=True),
    "trackstar": _BASE.replace(output_fn="loss", use_v=True, curvature="mix", unit_norm=True),
    # Not an attribution method: the first-order prediction of tail-patch itself (the
    # reference row of the tail-patch column; see attribution.optimizer_step).
    "first_order": _BASE.replace(output_fn="loss", use_v=True, curvature="none", unit_norm=False,
                                 train_side="optimizer_step"),
}


def method_settings(name: str, **overrides) -> AttributionSettings:
    """Preset ``name`` with ``overrides`` applied (e.g. ``d=1024``)."""
    try:
        base = METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown attribution method {name!r}; known methods: {sorted(METHODS)}."
        ) from None
    return base.replace(**overrides)
