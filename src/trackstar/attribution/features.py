"""Feature vectors P_d(∇f / sqrt(V)) of a batch of examples (SPEC §1, first steps).

Order of operations: optimizer correction (÷ sqrt V) -> projection. The
Hessian correction and unit normalization come later (curvature, scoring),
because R is estimated from these very features.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import model_device
from .gradients import Site, check_finite, dense_gradients, layer_factors
from .output import Batch, collate
from .projection import Projector
from .second_moment import SecondMoment


class FeatureExtractor:
    """Turns a :class:`Batch` into an (n, d) float32 feature matrix.

    ``dense=True`` takes the plain-autograd path (``params: all``); otherwise
    per-layer hooks. With a factored (Adafactor) V, whose correction is
    G ⊙ r cᵀ = diag(r) G diag(c), the hook path is exact and free:
    (B diag r) P_Lᵀ = B (P_L diag r)ᵀ, so the row and column scalings are
    folded once into the projection matrices. With a dense V it materializes
    each example's O×I gradient for that layer only.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[Site],
        projector: Projector,
        second_moment: SecondMoment | None = None,
        dense: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.device = model_device(model)
        #: The model's forward and backward in this dtype (torch.autocast); None: as stored.
        self.autocast_dtype = autocast_dtype
        self.sites = sites
        self.projector = projector
        self.second_moment = second_moment
        self.dense = dense
        self._sides: dict[str, tuple] = {}
        self._stacks: dict[tuple[str, ...], tuple[torch.Tensor, list[int]]] = {}

    @property
    def dim(self) -> int:
        return self.projector.dim

    def _folded(self, name: str) -> tuple:
        """(left, right, row scale, col scale) for the factored hook path.

        Where a side is projected, its V factor is folded into the matrix and
        the returned scale is None; otherwise the scale is applied to B or A.
        """
        if name not in self._sides:
            left, right = (None if m is None else m.to(self.device) for m in self.projector.matrices(name))
            corr = self.second_moment[name] if self.second_moment is not None else None
            row = corr.row.to(self.device) if corr is not None and corr.row is not None else None
            col = corr.col.to(self.device) if corr is not None and corr.col is not None else None
            if left is not None and row is not None:
                left, row = left * row[None, :], None
            if right is not None and col is not None:
                right, col = right * col[None, :], None
            self._sides[name] = (left, right, row, col)
        return self._sides[name]

    def _right_projections(self, a: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        """Each named site's right projection of A (n, T, I), (n, T, p_R) each, by one product
        with the sites' matrices stacked (the same numbers as one product per site)."""
        key = tuple(names)
        if key not in self._stacks:
            mats = [self._folded(name)[1] for name in names]
            self._stacks[key] = (mats[0] if len(mats) == 1 else torch.cat(mats), [m.shape[0] for m in mats])
        stacked, sizes = self._stacks[key]
        return list((a.float() @ stacked.T).split(sizes, dim=-1))

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, batch: Batch) -> torch.Tensor:
        """The (n, d) float32 features of ``batch``, on the model's device."""
        n = len(batch.examples)
        batch = batch.to(self.device)
        out = torch.empty((n, self.dim), dtype=torch.float32, device=self.device)
        if self.dense:
            with self._autocast():
                grads = dense_gradients(self.model, batch, self.sites)
            for site in self.sites:
                g = grads.pop(site.name)
                if self.second_moment is not None:
                    g = g * self.second_moment[site.name].multiplier().to(self.device)
                block = self.projector.by_name[site.name]
                out[:, block.offset : block.stop] = self.projector.project_dense(site.name, g)
                check_finite(out[:, block.offset : block.stop], batch, site.name)
            return out
        # Pads are masked after projection (smallest tensors); where() rather
        # than a product so a NaN at a pad position cannot leak in. A batch
        # without pads skips it: on a busy CPU each small op costs a thread
        # wake-up, which is most of the extraction cost at small widths.
        mask = batch.attention_mask.bool().unsqueeze(-1)
        padded = not bool(mask.all())
        plain = contextlib.nullcontext() if self.autocast_dtype is None else \
            torch.autocast(self.device.type, enabled=False)

        def dense_v(name: str) -> bool:
            return self.second_moment is not None and not self.second_moment[name].factored

        def right_sides(names: tuple[str, ...], a: torch.Tensor) -> list[torch.Tensor]:
            # Runs in the forward pass: A's projection (or column scaling) is all
            # the block needs of A, and far smaller. Sites that read this one A
            # (q/k/v, gate/up) are projected by one product with their stacked
            # matrices, so A is read once.
            with plain:
                stacked = [s for s in names if not dense_v(s) and self._folded(s)[1] is not None]
                sides = dict(zip(stacked, self._right_projections(a, stacked))) if stacked else {}
                for name in names:
                    if name not in sides:
                        col = None if dense_v(name) else self._folded(name)[3]
                        sides[name] = a if col is None else a.float() * col
            return [sides[name] for name in names]

        def block(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
            # Runs inside the backward pass, as soon as the site's output gradient
            # exists; the model's dtype (autocast) stops at the model.
            span = self.projector.by_name[name]
            rows = out[:, span.offset : span.stop]
            with plain:
                if dense_v(name):
                    if padded:
                        a, b = torch.where(mask, a, 0.0), torch.where(mask, b, 0.0)
                    g = torch.bmm(b.transpose(1, 2), a) * self.second_moment[name].dense.to(self.device)
                    rows[:] = self.projector.project_dense(name, g)
                    return
                left, _, row, _ = self._folded(name)
                b = b @ left.T if left is not None else (b * row if row is not None else b)
                if padded:
                    a, b = torch.where(mask, a, 0.0), torch.where(mask, b, 0.0)
                rows[:] = self.projector.keep(name, torch.bmm(b.transpose(1, 2), a).flatten(1))

        with self._autocast():
            layer_factors(self.model, batch, self.sites, consume=block, prepare=right_sides)
        if not bool(torch.isfinite(out).all()):
            # Slow path, only on failure: find the first example and parameter.
            for site in self.sites:
                span = self.projector.by_name[site.name]
                check_finite(out[:, span.offset : span.stop], batch, site.name)
        return out


def extract_to_store(
    store,
    examples: list,
    extractor: FeatureExtractor,
    batch_size: int,
    chunk_rows: int,
    padding_side: str = "right",
    desc: str = "features",
) -> None:
    """Fill ``store`` with the features of ``examples``, resuming where it stopped.

    Rows are computed in chunks of ``chunk_rows``; each finished chunk is
    flushed and recorded before the next starts.
    """
    if store.complete:
        return
    with tqdm(total=len(examples), initial=store.rows_done, desc=desc, unit="ex") as bar:
        for start in range(store.rows_done, len(examples), chunk_rows):
            chunk = examples[start : start + chunk_rows]
            parts = []
            for i in range(0, len(chunk), batch_size):
                batch = collate(chunk[i : i + batch_size], padding_side)
                parts.append(extractor(batch))
                bar.update(len(batch.examples))
            store.write(start, torch.cat(parts))
    store.finish()
