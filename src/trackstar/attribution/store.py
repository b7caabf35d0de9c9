"""The feature store: a flat memory-mapped (rows × d) array plus JSON metadata.

Layout of a store directory:

* ``meta.json``: the settings that determine a row (model id and parameter
  hash, parameter names and projection layout, d, seed, V source, output
  function, dtype, row ids). Written once, before any row.
* ``features.npy``: ``np.lib.format.open_memmap`` array, filled chunk by chunk.
  bfloat16 rows are stored as their raw uint16 bit patterns (numpy has no
  bfloat16) and widened to float32 on read.
* ``progress.json``: ``rows_done``, rewritten atomically only after a chunk
  has been flushed to disk, so a killed run resumes from the last finished
  chunk and never trusts a half-written one.
* ``COMPLETE``: written last (see :mod:`trackstar.io`).

Opening or resuming a store whose metadata differs from the expected settings
raises :class:`~trackstar.io.ArtifactError` naming the file and the setting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..io import (
    COMPLETE_MARKER,
    ArtifactError,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    read_json,
    sha256_dir,
)

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}

# Metadata keys that must agree for features to be combined or resumed.
IDENTITY_KEYS = (
    "model_id", "model_hash", "param_names", "layout", "d", "seed", "projection",
    "v_source", "use_v", "adam_mode", "output_fn", "reduction", "dtype", "kind",
    "row_ids", "examples_hash", "n_rows", "format",
)


def model_fingerprint(model: torch.nn.Module) -> tuple[str, str]:
    """(model id, sha256 of every parameter's name, shape, dtype and bytes)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    ident = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return f"{type(model).__name__}:{ident}", h.hexdigest()


def compare_meta(found: dict, expected: dict, where: Path, keys=IDENTITY_KEYS) -> None:
    for key in keys:
        if key in expected and found.get(key) != expected.get(key):
            shown_f, shown_e = found.get(key), expected.get(key)
            if isinstance(shown_f, list) and len(str(shown_f)) > 200:
                shown_f, shown_e = f"<list of {len(shown_f)}>", f"<list of {len(shown_e or [])}>"
            raise ArtifactError(
                f"Feature store {str(where)!r} was made with {key}={shown_f!r}, but this run "
                f"uses {key}={shown_e!r}. Features made under different settings cannot be "
                "mixed: use another store directory, or delete this one to rebuild it."
            )


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def from_storage(x: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(x).view(np.int16)).view(torch.bfloat16).float()
    if x.dtype == np.float32 and x.flags.writeable:
        return torch.from_numpy(x)
    return torch.from_numpy(np.array(x, dtype=np.float32))


class FeatureStore:
    """A store directory; create with :meth:`create` and read with :meth:`open`."""

    def __init__(self, path: Path, meta: dict, array: np.ndarray, rows_done: int):
        self.path = path
        self.meta = meta
        self.array = array
        self.rows_done = rows_done

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])

    @property
    def d(self) -> int:
        return int(self.meta["d"])

    @property
    def dtype(self) -> str:
        return self.meta["dtype"]

    @property
    def row_ids(self) -> list:
        return self.meta["row_ids"]

    @property
    def complete(self) -> bool:
        return is_complete(self.path)

    def layer_slices(self) -> list[tuple[str, slice]]:
        return [(b["name"], slice(b["offset"], b["offset"] + b["p_left"] * b["p_right"]))
                for b in self.meta["layout"]]

    @classmethod
    def create(cls, path, meta: dict) -> "FeatureStore":
        """Start a new store, or resume a partial one made under the same settings."""
        path = Path(path)
        meta = dict(meta, format=1, n_rows=len(meta["row_ids"]))
        meta_file = path / "meta.json"
        if meta_file.exists():
            compare_meta(read_json(meta_file), meta, meta_file)
            found = read_json(meta_file)
            progress_file = path / "progress.json"
            features = path / "features.npy"
            if progress_file.exists() and features.exists():
                rows_done = int(read_json(progress_file)["rows_done"])
                array = np.load(features, mmap_mode="r+")
                return cls(path, found, array, rows_done)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_file, meta)
        array = np.lib.format.open_memmap(
            path / "features.npy", mode="w+", dtype=_NUMPY_DTYPES[meta["dtype"]],
            shape=(meta["n_rows"], meta["d"]),
        )
        atomic_write_json(path / "progress.json", {"rows_done": 0})
        return cls(path, meta, array, 0)

    @classmethod
    def open(cls, path, expected: dict | None = None) -> "FeatureStore":
        """Open a finished store read-only, checking ``expected`` settings if given."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not is_complete(path):
            raise ArtifactError(
                f"Feature store {str(path)!r} is missing or incomplete (no {COMPLETE_MARKER}); "
                "re-run feature extraction with the same settings to finish it."
            )
        meta = read_json(meta_file)
        if expected is not None:
            compare_meta(meta, expected, meta_file)
        # Copy-on-write: reads are zero-copy torch views and nothing can
        # write back to the finished file.
        array = np.load(path / "features.npy", mmap_mode="c")
        return cls(path, meta, array, meta["n_rows"])

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Write rows [start, start+len) and record them as done (crash-safe)."""
        if start != self.rows_done:
            raise ArtifactError(
                f"Feature store {str(self.path)!r}: rows must be written in order; expected "
                f"row {self.rows_done}, got {start}."
            )
        stop = start + rows.shape[0]
        self.array[start:stop] = to_storage(rows, self.dtype)
        self.array.flush()
        atomic_write_json(self.path / "progress.json", {"rows_done": stop})
        self.rows_done = stop

    def finish(self) -> None:
        if self.rows_done != self.n_rows:
            raise ArtifactError(
                f"Feature store {str(self.path)!r} has {self.rows_done} of {self.n_rows} rows; "
                "it cannot be marked complete."
            )
        self.array.flush()
        atomic_write_text(self.path / COMPLETE_MARKER, sha256_dir(self.path) + "\n")

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.rows_done if stop is None else stop
        return from_storage(self.array[start:stop], self.dtype)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the finished rows as float32 (start, tensor) chunks."""
        for start in range(0, self.rows_done, chunk_rows):
            yield start, self.rows(start, min(start + chunk_rows, self.rows_done))


# Keys on which a training store and a query store must agree to be scored
# against each other (the query's own output function may differ).
SHARED_KEYS = (
    "model_id", "model_hash", "param_names", "layout", "d", "seed", "projection",
    "v_source", "use_v", "adam_mode",
)


def check_compatible(train: FeatureStore, query: FeatureStore) -> None:
    """Refuse to score features of two stores made under different settings."""
    compare_meta(query.meta, {k: train.meta.get(k) for k in SHARED_KEYS},
                 query.path / "meta.json", SHARED_KEYS)
