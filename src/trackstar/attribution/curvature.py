"""The Hessian approximation R and its inverse square root (SPEC §1.5).

R_train and R_eval are means of outer products G Gᵀ of the features that are
scored (V-corrected where the method uses V, projected, NOT unit-normalized),
accumulated in float64 chunk by chunk so no more than one chunk is in memory.
R = λ R_eval + (1 − λ) R_train. R^{-1/2} is a matrix inverse square root from
an eigendecomposition in float64 after damping R + δ·mean(eig R)·I; in block
mode each per-parameter block is damped with its own mean eigenvalue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


class CurvatureError(ValueError):
    """R cannot be inverted as configured."""


def second_moment_matrix(
    chunks: Iterable[torch.Tensor], d: int, blocks: list[slice] | None = None
) -> list[torch.Tensor]:
    """Mean outer product (1/N) Σ g gᵀ, full (one block) or per block, float64."""
    blocks = blocks or [slice(0, d)]
    sums = [torch.zeros((s.stop - s.start,) * 2, dtype=torch.float64) for s in blocks]
    count = 0
    for chunk in chunks:
        x = chunk.double()
        for acc, s in zip(sums, blocks):
            xs = x[:, s]
            acc.addmm_(xs.T, xs)
        count += x.shape[0]
    if count == 0:
        raise CurvatureError("Cannot estimate R from zero feature rows.")
    return [acc / count for acc in sums]


def auto_lambda(r_eval: list[torch.Tensor], r_train: list[torch.Tensor], d: int) -> float:
    """λ with λ·σ_eval[k] = (1 − λ)·σ_train[k], k = max(1, d // 64) (1-based).

    σ are the eigenvalues in descending order (in block mode, of all blocks
    together, i.e. of the block-diagonal matrix).
    """
    k = min(max(1, d // 64), d)
    s_eval = torch.cat([eigvalsh(m) for m in r_eval]).sort(descending=True).values
    s_train = torch.cat([eigvalsh(m) for m in r_train]).sort(descending=True).values
    e, t = float(s_eval[k - 1]), float(s_train[k - 1])
    if e + t <= 0:
        raise CurvatureError(
            f"The {k}-th eigenvalues of R_eval ({e:.3g}) and R_train ({t:.3g}) are not "
            "positive, so λ='auto' is undefined; give lam as a number."
        )
    return t / (e + t)


def mix(r_eval: list[torch.Tensor], r_train: list[torch.Tensor], lam: float) -> list[torch.Tensor]:
    return [lam * e + (1.0 - lam) * t for e, t in zip(r_eval, r_train)]


# Below this size one thread is fast (< 0.1 s), while LAPACK's threaded eigh
# on a busy machine can be 100x slower from threads spinning for cores.
_SINGLE_THREAD_EIGH = 2048


@contextlib.contextmanager
def _eigh_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    if n <= _SINGLE_THREAD_EIGH:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of a symmetric matrix in float64."""
    r = matrix.double()
    with _eigh_threads(r.shape[0]):
        return torch.linalg.eigh((r + r.T) / 2)


def eigvalsh(matrix: torch.Tensor) -> torch.Tensor:
    r = matrix.double()
    with _eigh_threads(r.shape[0]):
        return torch.linalg.eigvalsh((r + r.T) / 2)


def inverse_sqrt(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """(R + δ·mean(eig R)·I)^{-1/2} by eigendecomposition, float64."""
    eig, vec = eigh(matrix)
    # Round-off can make the eigenvalues of a PSD matrix slightly negative.
    eig = eig.clamp(min=0)
    damped = eig + damping * eig.mean()
    if bool((damped <= 0).any()):
        raise CurvatureError(
            f"R is singular (smallest eigenvalue {float(eig.min()):.3g}) and damping={damping} "
            "does not lift it; use damping > 0 or more examples than dimensions."
        )
    return (vec * damped.rsqrt()) @ vec.T


@dataclass
class Whitening:
    """R^{-1/2} as one matrix or per-block matrices; applied on the right."""

    blocks: list[slice]
    matrices: list[torch.Tensor]  # float64, as computed
    lam: float | None = None

    def __post_init__(self) -> None:
        # Computed in float64, applied in float32: the product's rounding is far
        # below the projection's own noise, and it halves the cost per chunk.
        self._applied = [m.float() for m in self.matrices]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x, dtype=torch.float32)
        for s, m in zip(self.blocks, self._applied):
            # R^{-1/2} is symmetric, so x R^{-1/2} applies it to every row.
            out[:, s] = x[:, s].float() @ m
        return out

    @classmethod
    def build(
        cls,
        r_blocks: list[torch.Tensor],
        blocks: list[slice],
        damping: float,
        lam: float | None = None,
    ) -> "Whitening":
        return cls(blocks, [inverse_sqrt(m, damping) for m in r_blocks], lam)
