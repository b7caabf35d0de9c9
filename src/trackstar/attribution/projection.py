"""The random projection P_d (SPEC §1.4).

Per parameter (an O×I gradient G), a two-sided Gaussian projection
P_L G P_Rᵀ with P_L (p_L×O), P_R (p_R×I), entries N(0, 1/p_side), so that
E||P_L G P_Rᵀ||² = ||G||². The matrices are regenerated on demand from
(global seed, parameter name, side) with a torch.Generator: never stored,
identical in every process.

Split rules for d over the L parameters (``split``; both recorded in the
feature store's layout):

- ``balanced`` (default): any d up to Σ O·I. Shares as equal as possible
  (d // L, one more for the first d % L parameters; a parameter with fewer
  than its share of entries O·I gets them all and the rest is spread over the
  others). A share s is projected by the smallest p_L×p_R ≥ s (p_L ≤ O,
  p_R ≤ I; among those, ratio p_L/p_R closest to O/I in log scale, ties:
  larger p_L), of which the first s entries are kept and scaled by
  sqrt(p_L·p_R / s) so that E||feature||² = ||G||² still holds.
- ``equal``: every parameter gets s = d / L, which must divide, and s must
  factor exactly as p_L · p_R.

Where ``equal`` accepts d, ``balanced`` gives the same layout (exact
factorizations waste nothing, so they are chosen), so features do not
change. A side of dimension 1 (a bias viewed as 1×n) is not projected.

For an example with activations A (T×I) and output gradients B (T×O):
P_L Bᵀ A P_Rᵀ = (B P_Lᵀ)ᵀ (A P_Rᵀ), so G is never formed; that hook path is in
:mod:`.features`, where the V correction is folded into P_L and P_R.

``identity`` keeps each G whole (p_L = O, p_R = I), flattened row-major.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from .gradients import Site


class ProjectionError(ValueError):
    """The requested d cannot be split across the parameters by the rule."""


SPLITS = ("balanced", "equal")


@dataclass(frozen=True)
class Block:
    """One parameter's span of the feature vector: ``keep`` of the p_L×p_R projected
    entries (all of them, unless the balanced split needed fewer)."""

    name: str
    out_features: int
    in_features: int
    p_left: int
    p_right: int
    offset: int
    keep: int | None = None

    @property
    def size(self) -> int:
        return self.p_left * self.p_right if self.keep is None else self.keep

    @property
    def truncated(self) -> bool:
        return self.size < self.p_left * self.p_right

    @property
    def stop(self) -> int:
        return self.offset + self.size


def _factor(share: int, out_f: int, in_f: int) -> tuple[int, int] | None:
    if out_f == 1:
        return (1, share) if share <= in_f else None
    target = math.log(out_f / in_f)
    best = None
    for p_left in range(1, share + 1):
        if share % p_left:
            continue
        p_right = share // p_left
        if p_left > out_f or p_right > in_f:
            continue
        key = (abs(math.log(p_left / p_right) - target), -p_left)
        if best is None or key < best[0]:
            best = (key, (p_left, p_right))
    return None if best is None else best[1]


def _cover(share: int, out_f: int, in_f: int) -> tuple[int, int]:
    """The smallest p_L×p_R ≥ ``share`` within O×I, shaped like O×I (see the module doc)."""
    if out_f == 1:
        return 1, share
    target = math.log(out_f / in_f)
    best = None
    for p_left in range(1, min(out_f, share) + 1):
        p_right = -(-share // p_left)
        if p_right > in_f:
            continue
        key = (p_left * p_right - share, abs(math.log(p_left / p_right) - target), -p_left)
        if best is None or key < best[0]:
            best = (key, (p_left, p_right))
    return best[1]


def _balanced_shares(sites: list[Site], d: int) -> list[int]:
    """Shares of d as equal as possible, none above its parameter's O·I (see the module doc)."""
    capacity = [s.out_features * s.in_features for s in sites]
    if d < len(sites):
        raise ProjectionError(
            f"d={d} leaves some of the {len(sites)} parameters being attributed without a dimension; "
            f"choose d >= {len(sites)}."
        )
    if d > sum(capacity):
        raise ProjectionError(
            f"d={d} exceeds the {sum(capacity)} entries of the {len(sites)} parameters being attributed; "
            "choose a smaller d, or projection='identity' for the whole gradients."
        )
    shares = [0] * len(sites)
    open_ = sorted(range(len(sites)), key=lambda i: capacity[i])
    left = d
    while open_:
        even = left // len(open_)
        if capacity[open_[0]] <= even:  # the smallest cannot take an even share: it takes all it has
            i = open_.pop(0)
            shares[i], left = capacity[i], left - capacity[i]
            continue
        extra = left - even * len(open_)
        for rank, i in enumerate(sorted(open_)):
            shares[i] = even + (1 if rank < extra else 0)
        break
    return shares


def valid_dims(sites: list[Site], near: int, count: int = 3) -> list[int]:
    """Some d values near ``near`` that the split rule accepts."""
    n = len(sites)
    found = []
    for delta in range(0, max(near, 64 * n) + 1):
        for d in {near - delta, near + delta}:
            if d > 0 and d % n == 0 and all(_factor(d // n, *s.shape) for s in sites):
                found.append(d)
        if len(found) >= count:
            break
    return sorted(set(found))[:count]


def layout(sites: list[Site], projection: str, d: int | None, split: str = "balanced") -> list[Block]:
    """The feature layout: one contiguous block per parameter, in site order."""
    blocks, offset = [], 0
    if projection == "identity":
        for s in sites:
            blocks.append(Block(s.name, *s.shape, *s.shape, offset))
            offset += s.out_features * s.in_features
        return blocks
    if split not in SPLITS:
        raise ProjectionError(f"split={split!r}: use one of {SPLITS}.")
    if split == "balanced":
        for s, share in zip(sites, _balanced_shares(sites, d), strict=True):
            p_left, p_right = _cover(share, *s.shape)
            blocks.append(Block(s.name, *s.shape, p_left, p_right, offset,
                                share if share < p_left * p_right else None))
            offset += share
        return blocks
    n = len(sites)
    if d % n:
        raise ProjectionError(
            f"d={d} cannot be split equally over the {n} parameters being attributed "
            f"(the rule gives each d/{n}). Choose d divisible by {n}, e.g. "
            f"{valid_dims(sites, d)}, or split='balanced'."
        )
    share = d // n
    for s in sites:
        pair = _factor(share, *s.shape)
        if pair is None:
            raise ProjectionError(
                f"d={d} gives each parameter {share} dimensions, which cannot be factored "
                f"as p_L×p_R with p_L ≤ {s.out_features} and p_R ≤ {s.in_features} for "
                f"{s.name} (O×I = {s.out_features}×{s.in_features}). Choose a smaller d "
                f"(at most {n * min(x.out_features * x.in_features for x in sites)}, e.g. "
                f"{valid_dims(sites, min(d, n * min(x.out_features * x.in_features for x in sites)))}"
                "), or projection='identity'."
            )
        blocks.append(Block(s.name, *s.shape, *pair, offset))
        offset += share
    return blocks


def _seed(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"{seed}|{name}|{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def gaussian_matrix(seed: int, name: str, side: str, rows: int, cols: int) -> torch.Tensor:
    """P (rows×cols), entries N(0, 1/rows), regenerated from (seed, name, side)."""
    gen = torch.Generator(device="cpu").manual_seed(_seed(seed, name, side))
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32) / math.sqrt(rows)


class Projector:
    """Applies P_d block by block; caches the regenerated matrices in memory."""

    def __init__(self, sites: list[Site], projection: str, d: int | None = None, seed: int = 0,
                 split: str = "balanced"):
        self.projection = projection
        self.seed = seed
        self.blocks = layout(sites, projection, d, split)
        self.by_name = {b.name: b for b in self.blocks}
        self.dim = self.blocks[-1].stop
        self._cache: dict[tuple[str, str], torch.Tensor | None] = {}

    def matrices(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(P_L, P_R); None for a side that is not projected. A truncated block's
        rescaling sqrt(p_L·p_R / keep) is folded into the first projected side."""
        if (name, "L") not in self._cache:
            b = self.by_name[name]
            gaussian = self.projection == "gaussian"
            left = (gaussian_matrix(self.seed, name, "left", b.p_left, b.out_features)
                    if gaussian and b.out_features > 1 else None)
            right = (gaussian_matrix(self.seed, name, "right", b.p_right, b.in_features)
                     if gaussian and b.in_features > 1 else None)
            if b.truncated:
                scale = math.sqrt(b.p_left * b.p_right / b.size)
                if left is not None:
                    left = left * scale
                else:
                    right = right * scale
            self._cache[(name, "L")], self._cache[(name, "R")] = left, right
        return self._cache[(name, "L")], self._cache[(name, "R")]

    def keep(self, name: str, projected: torch.Tensor) -> torch.Tensor:
        """The block's kept entries of (n, p_L·p_R) projected gradients."""
        b = self.by_name[name]
        return projected[:, :b.size] if b.truncated else projected

    def project_dense(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """P_L G P_Rᵀ per example, its kept entries: G (n, O, I) -> (n, block size)."""
        left, right = (None if m is None else m.to(g.device) for m in self.matrices(name))
        if left is not None:
            g = left @ g
        if right is not None:
            g = g @ right.T
        return self.keep(name, g.flatten(1))

    def describe(self) -> list[dict]:
        # "keep" only where a block is truncated, so layouts (and the feature
        # stores keyed by them) of untruncated splits are those of before.
        return [
            {"name": b.name, "shape": [b.out_features, b.in_features],
             "p_left": b.p_left, "p_right": b.p_right, "offset": b.offset,
             **({"keep": b.size} if b.truncated else {})}
            for b in self.blocks
        ]
