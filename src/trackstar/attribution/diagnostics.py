"""Why R helps or does not: where query and training gradients put their energy.

R^{-1/2} with damping shrinks a feature along R's top eigendirections. Whether
that helps attribution depends on what those directions carry: if the
queries' gradients share a few directions (the cloze template, the output
layer's common part) that R_eval's top eigendirections capture, R_mix takes
them out and what is left is the fact; R_train's top directions describe the
training sentences and may carry little of a query's energy.

:func:`curvature_diagnostic` reports, for k in ``ks``, the mean share of each
row's squared norm that lies in the span of the top-k eigenvectors of R_eval
and of R_train, for the queries and for (a sample of) the training rows, the
same shares after the run's own R^{-1/2}, and k/d, the share of a random
direction set. R_eval's eigenvectors come exactly from the query rows' SVD
(R_eval has rank ≤ the number of queries); R_train's top ones from a
randomized SVD of R_train (:func:`torch.svd_lowrank`), ample for the top few.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

KS = (1, 10)
TRAIN_SAMPLE = 2048


def energy_share(x: torch.Tensor, basis: torch.Tensor) -> float:
    """Mean over rows of ‖basisᵀ x‖² / ‖x‖² (``basis``: d × k orthonormal columns)."""
    x = x.double()
    total = x.pow(2).sum(dim=1)
    keep = total > 0
    inside = (x[keep] @ basis).pow(2).sum(dim=1)
    return float((inside / total[keep]).mean()) if keep.any() else float("nan")


def top_eigenvectors_of_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvectors of (1/M) rowsᵀ rows, exactly, from the rows' SVD."""
    _, _, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return vh[:k].T


def top_eigenvectors(matrix: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Top-k eigenvectors of a symmetric PSD matrix by randomized SVD (oversampled, 6 power steps)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, _, _ = torch.svd_lowrank(matrix.double(), q=min(matrix.shape[0], k + 20), niter=6)
    finally:
        torch.random.set_rng_state(state)
    return u[:, :k]


def curvature_diagnostic(queries: torch.Tensor, train_sample: torch.Tensor, r_train: torch.Tensor,
                         whiten: Callable[[torch.Tensor], torch.Tensor] | None, ks: Sequence[int] = KS) -> dict:
    """The energy shares described in the module doc, as a flat dict of floats."""
    d = queries.shape[1]
    k_max = min(max(ks), d, queries.shape[0])
    bases = {"r_eval": top_eigenvectors_of_rows(queries, k_max), "r_train": top_eigenvectors(r_train, min(max(ks), d))}
    rows = {"query": queries, "train": train_sample}
    if whiten is not None:
        rows["query_whitened"] = whiten(queries.float())
        rows["train_whitened"] = whiten(train_sample.float())
    out: dict[str, float] = {}
    for k in ks:
        out[f"random/top{k}"] = k / d
        for name, x in rows.items():
            for r, basis in bases.items():
                if k <= basis.shape[1]:
                    out[f"{name}/{r}_top{k}"] = energy_share(x, basis[:, :k])
    return out
