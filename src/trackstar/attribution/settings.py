"""Settings of one attribution run (SPEC §1), as a plain dataclass.

The feature store records the fields that change a feature vector (see
``TrackStar._meta``) and refuses to mix features made under different ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Union

OutputFn = Literal["loss", "margin", "logit"]
Curvature = Literal["none", "train", "mix"]

OUTPUT_FNS = ("loss", "margin", "logit")
CURVATURES = ("none", "train", "mix")
PROJECTIONS = ("identity", "gaussian")
PARAM_SETS = ("default", "all")
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
ADAM_MODES = ("exact", "rank1")
SCORERS = ("stream", "faiss")
TRAIN_SIDES = ("features", "optimizer_step")


@dataclass(frozen=True)
class AttributionSettings:
    """What to compute; the defaults are the paper's TrackStar row.

    output_fn: the query output function f (SPEC §1.1); training examples
        always use their mean LM loss.
    reduction: how a query's per-target-token values combine (``mean``/``sum``).
    use_v: divide gradients by sqrt(V), the optimizer second moment (§1.3).
    adam_mode: for a full (Adam) V, ``exact`` materializes each example's
        per-layer gradient; ``rank1`` uses the best rank-1 approximation of
        1/(sqrt(V̂)+eps) so the fast path applies (approximate).
    v_estimate_batches: when no optimizer state is given, V is estimated as
        the mean squared mini-batch gradient over this many training batches.
    projection, d, seed: the random projection P_d (§1.4).
    split: how d is shared among the attributed weight matrices: ``balanced``
        (any d, shares as equal as possible) or ``equal`` (d / L each, which
        must divide and factor); they agree wherever ``equal`` works (see
        :mod:`.projection`).
    curvature, lam, damping, block_diagonal: R and R^{-1/2} (§1.5).
    unit_norm: normalize each feature to unit length after R^{-1/2}.
    train_side: ``features`` (the paper's symmetric score: the same map on
        both sides) or ``optimizer_step``: the first-order prediction of
        tail-patch itself, the query's loss gradient (no V) against the step
        the checkpoint's optimizer would take on the training example (V on
        that side only, then the optimizer's per-matrix scaling and update
        clipping; :mod:`.optimizer_step`). Needs ``use_v``, no R, no unit norm.
    allow_partial: score a model whose main weights (an MLP's or its experts'
        matrices) the sites leave out; off, such a model is refused with the
        weights named (:mod:`.coverage`). Every run records its coverage.
    routers: attribute a mixture-of-experts block's router weight too
        (``params: default``). Off by default: the paper's parameter set is the
        blocks' projection matrices, a router is a sliver of the parameters
        (num_experts × hidden per layer), and its gradient reaches the loss only
        through the mixing weights of the experts it chose, not through the
        choice itself.
    k: number of proponents and opponents kept per query.
    scorer: ``stream`` multiplies streamed training chunks against all
        queries (exact, memory flat in N); ``faiss`` builds a FAISS
        inner-product index of the transformed training features (needs the
        ``faiss`` extra; its memory grows with N).
    params: ``default`` = weight matrices of the block linear layers (fast
        path); ``all`` = every parameter through plain per-example autograd.
    model_dtype: the model's forward and backward during feature extraction
        (``torch.autocast``; the weights are not changed): ``float32``, or
        ``bfloat16`` / ``float16`` mixed precision. Projections, V, R and
        scores stay float32/float64 (docs/real_data_and_scale.md says what bf16 costs).
    """

    output_fn: OutputFn = "loss"
    reduction: Literal["mean", "sum"] = "mean"
    use_v: bool = True
    adam_mode: Literal["exact", "rank1"] = "exact"
    v_estimate_batches: int = 8
    projection: Literal["identity", "gaussian"] = "gaussian"
    d: int = 4096
    seed: int = 0
    split: Literal["balanced", "equal"] = "balanced"
    curvature: Curvature = "mix"
    lam: Union[float, str] = 0.99
    damping: float = 0.1
    block_diagonal: bool = False
    unit_norm: bool = True
    k: int = 10
    batch_size: int = 16
    chunk_rows: int = 1024
    params: Literal["default", "all"] = "default"
    storage_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    padding_side: Literal["right", "left"] = "right"
    scorer: Literal["stream", "faiss"] = "stream"
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    train_side: Literal["features", "optimizer_step"] = "features"
    allow_partial: bool = False
    routers: bool = False

    def __post_init__(self) -> None:
        choices = {
            "output_fn": OUTPUT_FNS,
            "reduction": ("mean", "sum"),
            "projection": PROJECTIONS,
            "split": ("balanced", "equal"),
            "curvature": CURVATURES,
            "params": PARAM_SETS,
            "storage_dtype": STORAGE_DTYPES,
            "adam_mode": ADAM_MODES,
            "padding_side": ("right", "left"),
            "scorer": SCORERS,
            "model_dtype": MODEL_DTYPES,
            "train_side": TRAIN_SIDES,
        }
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"AttributionSettings.{name}={value!r} is not one of {allowed}; "
                    f"pick one of those."
                )
        if isinstance(self.lam, str):
            if self.lam != "auto":
                raise ValueError(
                    f"AttributionSettings.lam={self.lam!r}: give a number in [0, 1] or 'auto'."
                )
        elif not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError(f"AttributionSettings.lam={self.lam} must lie in [0, 1] (or be 'auto').")
        for name in ("k", "batch_size", "chunk_rows", "v_estimate_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"AttributionSettings.{name}={getattr(self, name)} must be >= 1.")
        if self.projection == "gaussian" and self.d < 1:
            raise ValueError(f"AttributionSettings.d={self.d} must be >= 1 for a Gaussian projection.")
        if self.damping < 0:
            raise ValueError(f"AttributionSettings.damping={self.damping} must be >= 0.")
        if self.train_side == "optimizer_step" and (not self.use_v or self.curvature != "none" or self.unit_norm):
            raise ValueError(
                "AttributionSettings.train_side='optimizer_step' is the optimizer's own step: it needs use_v=True, "
                f"curvature='none' and unit_norm=False (got use_v={self.use_v}, curvature={self.curvature!r}, "
                f"unit_norm={self.unit_norm})."
            )

    def replace(self, **changes) -> "AttributionSettings":
        return dataclasses.replace(self, **changes)
