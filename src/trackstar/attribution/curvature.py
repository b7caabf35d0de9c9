"""The Hessian approximation R and its inverse square root (SPEC §1.5).

R_train and R_eval are means of outer products G Gᵀ of the features that are
scored (V-corrected where the method uses V, projected, NOT unit-normalized),
accumulated in float64 chunk by chunk so no more than one chunk is in memory.
R = λ R_eval + (1 − λ) R_train, damped R + δ·mean(eig R)·I (in block mode
each per-parameter block with its own mean eigenvalue). Scoring applies any W
with W Wᵀ = R⁻¹ to both sides: the inverse transposed Cholesky factor, in
float64, for scoring; R^{-1/2} itself (an eigendecomposition) where a measure
depends on which W (the R diagnostic). :class:`CurvatureCache` keeps R and the
whitenings on disk for the runs that share them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..device import float64_device
from ..io import ArtifactError, atomic_write_checked, config_hash, read_checked

log = logging.getLogger("trackstar")


class CurvatureError(ValueError):
    """R cannot be inverted as configured."""


def outer_product_sums(
    chunks: Iterable[torch.Tensor], d: int, blocks: list[slice] | None = None,
    device: torch.device | str | None = None, total: int | None = None, desc: str | None = None,
) -> tuple[list[torch.Tensor], int]:
    """(Σ g gᵀ per block, number of rows), float64: R's sufficient statistics, which
    add up across shards. Accumulated on ``device`` (the CPU when None, or for
    MPS, which has no float64); the sums are returned on the CPU. ``desc`` shows a
    progress bar over the ``total`` rows."""
    blocks = blocks or [slice(0, d)]
    device = float64_device(torch.device(device or "cpu"))
    if device.type == "cpu":
        return _cpu_outer_product_sums(chunks, blocks, total, desc)
    sums = [torch.zeros((s.stop - s.start,) * 2, dtype=torch.float64, device=device) for s in blocks]
    count = 0
    with tqdm(total=total, desc=desc, unit="row", disable=desc is None) as bar:
        for chunk in chunks:
            x = chunk.to(device).double()
            for acc, s in zip(sums, blocks):
                xs = x[:, s]
                acc.addmm_(xs.T, xs)
            count += x.shape[0]
            bar.update(x.shape[0])
    return [acc.cpu() for acc in sums], count


def _torch_share_of_blas():
    """scipy's BLAS threads limited to torch's: a job sharing the machine keeps its share."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=torch.get_num_threads(), user_api="blas")


def _cpu_outer_product_sums(chunks: Iterable[torch.Tensor], blocks: list[slice], total: int | None,
                            desc: str | None) -> tuple[list[torch.Tensor], int]:
    """:func:`outer_product_sums` on the CPU by BLAS's syrk, which computes one triangle of
    xᵀx: half the multiply-adds of a matrix product (0.7 s instead of 1.2-2.0 s for 2,048
    rows at d = 4,096 on two cores), with as many BLAS threads as torch has."""
    from scipy.linalg import blas

    # Column-major upper triangles; a row-major (n, b) chunk is its (b, n) transpose there.
    sums = [np.zeros((s.stop - s.start,) * 2, order="F") for s in blocks]
    count = 0
    with tqdm(total=total, desc=desc, unit="row", disable=desc is None) as bar, _torch_share_of_blas():
        for chunk in chunks:
            x = chunk.cpu().double()
            for j, s in enumerate(blocks):
                xt = x[:, s].contiguous().numpy().T
                sums[j] = blas.dsyrk(1.0, xt, beta=1.0, c=sums[j], trans=0, lower=0, overwrite_c=1)
            count += x.shape[0]
            bar.update(x.shape[0])
    out = []
    for acc in sums:
        lower = torch.from_numpy(acc.T)  # row-major: the sums below the diagonal, zeros above
        full = lower + lower.T  # exact: each entry plus zero, the diagonal twice ...
        full.diagonal().mul_(0.5)  # ... and halved again, exactly
        out.append(full)
    return out, count


def curvature_matrix(
    chunks: Iterable[torch.Tensor], d: int, blocks: list[slice] | None = None,
    device: torch.device | str | None = None, total: int | None = None, desc: str | None = None,
) -> list[torch.Tensor]:
    """R_train or R_eval: the mean outer product (1/N) Σ g gᵀ of the scored
    features, full (one block) or per block, float64, on the CPU."""
    sums, count = outer_product_sums(chunks, d, blocks, device, total, desc)
    if count == 0:
        raise CurvatureError("Cannot estimate R from zero feature rows.")
    return [acc.div_(count) for acc in sums]


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
    # The same two products and sum as lam * e + (1 - lam) * t, with one temporary fewer.
    return [e.mul(lam).add_(t.mul(1.0 - lam)) for e, t in zip(r_eval, r_train)]


# Below this size one thread is quick, while LAPACK's threaded eigh on a busy
# machine can be far slower from threads spinning for cores.
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


def inverse_factor(matrix: torch.Tensor, damping: float) -> torch.Tensor:
    """A W with W Wᵀ = (R + δ·mean(eig R)·I)^{-1}, from a Cholesky factor, float64.

    Scores only need such a W applied to both sides (x W · y W = x R⁻¹ yᵀ, and
    the unit norms likewise), so the symmetric R^{-1/2} is not needed for them:
    W = U⁻¹ with Uᵀ U the damped R costs two triangular passes instead
    of an eigendecomposition. mean(eig R) is trace(R)/d. With no damping, or a
    damped R that Cholesky cannot factor, the eigendecomposition decides (and
    says why R cannot be inverted).
    """
    n = matrix.shape[0]
    if damping > 0 and n:
        r = matrix.double()
        r = (r + r.T).mul_(0.5)
        shift = damping * float(torch.diagonal(r).sum()) / n
        r.diagonal().add_(shift)
        # Upper factor: R = Uᵀ U, so W = U⁻¹ gives W Wᵀ = R⁻¹ with no transpose to copy.
        factor, info = torch.linalg.cholesky_ex(r, upper=True)
        if int(info) == 0 and shift > 0:
            del r
            return triangular_inverse(factor)
    return inverse_sqrt(matrix, damping)


def triangular_inverse(upper: torch.Tensor) -> torch.Tensor:
    """U⁻¹ of an invertible upper-triangular float64 U (its lower triangle zero).

    On the CPU, LAPACK's trtri (scipy's, with as many BLAS threads as torch has:
    jobs sharing a machine keep their share): n³/3 multiply-adds against the n³ of a
    triangular solve with the identity, 0.45 s instead of 1.9 s at n = 4,096 on two
    cores. Elsewhere, the solve. ``upper`` may be overwritten."""
    if upper.device.type != "cpu":
        return torch.linalg.solve_triangular(upper, torch.eye(upper.shape[0], dtype=upper.dtype,
                                                              device=upper.device), upper=True)
    from scipy.linalg import lapack

    # U in row-major order is Uᵀ (lower triangular) in LAPACK's column-major order:
    # inverting that in place gives (U⁻¹)ᵀ column-major, which is U⁻¹ row-major. No copies.
    with _torch_share_of_blas():
        inverse, info = lapack.dtrtri(upper.contiguous().numpy().T, lower=1, overwrite_c=1)
    if info != 0:
        raise CurvatureError(f"The Cholesky factor of R is singular at its diagonal entry {info} (LAPACK dtrtri).")
    return torch.from_numpy(inverse.T)


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


#: How a whitening is factored: "cholesky" (W = L^{-T}, for scoring) or
#: "symmetric" (R^{-1/2} itself, for the R diagnostic, which measures the
#: whitened rows along R's eigendirections and so needs this one W).
FACTORS = ("cholesky", "symmetric")


@dataclass
class Whitening:
    """A W with W Wᵀ = R⁻¹ (damped), one matrix or per-block matrices; applied on the right.

    ``factor`` says which W (:data:`FACTORS`). Computed in float64, kept and
    applied in float32: the product's rounding is far below the projection's
    own noise, and it halves the cost per chunk.
    """

    blocks: list[slice]
    matrices: list[torch.Tensor]  # float32
    lam: float | None = None
    factor: str = "cholesky"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x, dtype=torch.float32)
        if self.matrices and self.matrices[0].device != x.device:  # once per device, not per chunk
            self.matrices = [m.to(x.device) for m in self.matrices]
        for s, m in zip(self.blocks, self.matrices):
            # Rows times W: (x W)(y W)ᵀ = x R⁻¹ yᵀ.
            out[:, s] = x[:, s].float() @ m
        return out

    @classmethod
    def build(
        cls,
        r_blocks: list[torch.Tensor],
        blocks: list[slice],
        damping: float,
        lam: float | None = None,
        factor: str = "cholesky",
    ) -> "Whitening":
        if factor not in FACTORS:
            raise ValueError(f"Whitening factor {factor!r}: use one of {', '.join(FACTORS)}")
        # Symmetric: one eigendecomposition per block, minutes for 4096 × 4096 on a
        # CPU; Cholesky: seconds.
        size = max((m.shape[0] for m in r_blocks), default=0)
        how = "eigh" if factor == "symmetric" else "Cholesky"
        bar = tqdm(r_blocks, desc=f"R^-1 factor ({len(r_blocks)} × {how} ≤{size}²)", unit="block")
        make = inverse_sqrt if factor == "symmetric" else inverse_factor
        return cls(blocks, [make(m, damping).float() for m in bar], lam, factor)


#: A feature store's kind -> the R its rows make.
_R_NAMES = {"train": "R_train", "query": "R_eval"}


class CurvatureCache:
    """R_train, R_eval and R^{-1/2} on disk, so runs that share them compute them once.

    R_train or R_eval is keyed by its feature store's metadata (which
    names the model, the examples, V, the projection and the output function)
    and the block layout; a whitening by the keys of the matrices it mixes, λ
    (the setting: a number or ``auto``) and the damping. A sweep over λ then
    streams each store once, and methods with the same R (exp1 and TRAK, both
    on R_train of the un-corrected features) share one eigendecomposition.
    Files are written to a temporary name and renamed, so a killed run leaves
    no half file, each with a checksum beside it: a damaged file is recomputed
    (with a warning), never used; ``directory=None`` caches nothing.
    """

    def __init__(self, directory: str | os.PathLike | None):
        self.dir = Path(directory) if directory is not None else None

    def _path(self, kind: str, key: str) -> Path | None:
        return self.dir / f"{kind}-{key}.pt" if self.dir is not None else None

    def _load(self, path: Path | None):
        """The cached value, or None when absent or damaged (it is then recomputed)."""
        if path is None or not path.is_file():
            return None
        try:
            return torch.load(io.BytesIO(read_checked(path)), weights_only=True)
        except (ArtifactError, RuntimeError, EOFError) as exc:
            log.warning("recomputing %s: %s", path.name, exc)
            return None

    def _save(self, path: Path | None, value) -> None:
        if path is None:
            return
        buffer = io.BytesIO()
        torch.save(value, buffer)
        atomic_write_checked(path, buffer.getvalue())

    def curvature(self, store, blocks: list[slice], chunk_rows: int,
                  device: torch.device | None = None) -> tuple[str, Callable[[], list[torch.Tensor]]]:
        """(key, loader) of R_train or R_eval (the mean outer product of ``store``'s
        rows); computed on first load."""
        key = config_hash({"store": store.meta, "blocks": [(b.start, b.stop) for b in blocks]})

        def load() -> list[torch.Tensor]:
            path = self._path("r", key)
            cached = self._load(path)
            if cached is not None:
                return cached
            if hasattr(store, "shards"):  # a sharded store: add up each shard's sums
                parts = [self.shard_sums(shard, blocks, chunk_rows, device) for shard in store.shards]
                count = sum(c for _, c in parts)
                if count == 0:
                    raise CurvatureError("Cannot estimate R from zero feature rows.")
                value = [sum(p[0][i] for p in parts) / count for i in range(len(blocks))]
            else:
                value = curvature_matrix((x for _, x in store.chunks(chunk_rows)), store.d, blocks, device,
                                         total=store.n_rows, desc=_R_NAMES.get(store.meta.get("kind"), "R"))
            self._save(path, value)
            return value

        return key, load

    def shard_sums(self, shard, blocks: list[slice], chunk_rows: int,
                   device: torch.device | None = None) -> tuple[list[torch.Tensor], int]:
        """One shard's (Σ g gᵀ, count), cached: the map step computes it, the reduce adds."""
        path = self._path("rsum", config_hash({"store": shard.meta, "blocks": [(b.start, b.stop) for b in blocks]}))
        cached = self._load(path)
        if cached is not None:
            return cached["sums"], cached["count"]
        sums, count = outer_product_sums((x for _, x in shard.chunks(chunk_rows)), shard.d, blocks, device,
                                         total=shard.n_rows, desc=f"{_R_NAMES.get(shard.meta.get('kind'), 'R')} (shard)")
        self._save(path, {"sums": sums, "count": count})
        return sums, count

    def whitening(self, key: dict, blocks: list[slice], build: Callable[[], Whitening]) -> Whitening:
        """The whitening of ``key`` (which names its factor), built on first use."""
        path = self._path("whitening", config_hash(key))
        cached = self._load(path)
        if cached is not None:
            return Whitening(blocks, cached["matrices"], cached["lam"], cached.get("factor", "symmetric"))
        result = build()
        self._save(path, {"matrices": [m.cpu() for m in result.matrices], "lam": result.lam,
                          "factor": result.factor})
        return result
