"""The feature store: a flat memory-mapped (rows × d) array plus JSON metadata.

Layout of a store directory:

* ``meta.json``: the settings that determine a row (model id and parameter
  hash, parameter names and projection layout, d, seed, V source, output
  function, dtype, row ids). Written once, before any row.
* ``features.npy``: ``np.lib.format.open_memmap`` array, filled chunk by chunk.
  bfloat16 rows are stored as their raw uint16 bit patterns (numpy has no
  bfloat16) and widened to float32 on read.
* ``progress.json``: ``rows_done`` and a CRC-32 of each written chunk's bytes,
  rewritten atomically only after the chunk has been flushed to disk, so a
  killed run resumes from the last finished chunk and never trusts a
  half-written one.
* ``COMPLETE``: written last, with each file's size and hash (see :mod:`trackstar.io`).

Integrity: opening a store checks that ``features.npy`` has exactly the size
its header and row count imply (never growing or rewriting a file it did not
just create), and every read checks each chunk's CRC as the chunk streams by,
so a truncated, zeroed or overwritten store is an error naming the file, never
a silent score against the wrong rows. Opening or resuming a store whose
metadata differs from the expected settings raises
:class:`~trackstar.io.ArtifactError` naming the file and the setting.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..io import (
    COMPLETE_MARKER,
    ArtifactError,
    atomic_write_json,
    check_complete,
    is_complete,
    read_json,
    write_marker,
)

log = logging.getLogger("trackstar")
REBUILD_HINT = "Feature stores are a cache: deleting the directory makes the next run rebuild it."

_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}

# Metadata keys that must agree for features to be combined or resumed.
IDENTITY_KEYS = (
    "model_id", "model_hash", "param_names", "layout", "d", "seed", "projection",
    "v_source", "use_v", "adam_mode", "output_fn", "reduction", "dtype", "kind",
    "row_ids", "examples_hash", "n_rows", "format", "model_dtype",
)


def model_fingerprint(model: torch.nn.Module) -> tuple[str, str]:
    """(model id, sha256 of every parameter's name, shape, dtype and bytes).

    The id is the model's class, never where it was loaded from (``config._name_or_path``
    is a path for a local checkpoint): an artifacts directory copied, moved or mounted
    elsewhere keeps its feature stores. The hash says which weights.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return type(model).__name__, h.hexdigest()


def reserve_disk(file: Path) -> None:
    """Give the (sparse) memory-mapped ``file`` its blocks now: on a full disk, writing
    through the map later kills the process with SIGBUS and no message; reserving
    them up front fails here instead, naming the file and the space it needs."""
    size = file.stat().st_size
    if not hasattr(os, "posix_fallocate") or size == 0:
        return
    try:
        with file.open("r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            file.unlink(missing_ok=True)
            raise ArtifactError(f"No space left for the feature store {str(file.parent)!r}: it needs "
                                f"{size / 2**20:,.1f} MiB. Free disk space or set artifacts_dir to a larger disk; "
                                "finished stages are kept.") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # filesystems without fallocate
            raise


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
    x = x.detach().cpu()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).numpy()


def from_storage(x: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(x).view(np.int16)).view(torch.bfloat16).float()
    if x.dtype == np.float32 and x.flags.writeable:
        return torch.from_numpy(x)
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _release(array: np.ndarray, start: int, stop: int) -> None:
    """Drop the pages of rows [start, stop) of a memory-mapped array from this process.

    They are on disk (written and flushed, or never modified), so a later read
    maps them again; without this, every row streamed or written stays resident
    and a process's memory grows with N.
    """
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED") or stop <= start:
        return
    row = array.shape[1] * array.itemsize
    base = array.offset % mmap.ALLOCATIONGRANULARITY  # where the data starts inside the mapping
    lo, hi = base + start * row, base + stop * row
    lo -= lo % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _crc(block: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1))


def _expected_bytes(path: Path, meta: dict) -> tuple[int, str | None]:
    """(size ``features.npy`` must have, a reason it cannot be used or None)."""
    dtype = np.dtype(_NUMPY_DTYPES[meta["dtype"]])
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                return 0, f"its .npy format version {version} is not one this suite writes"
            shape, _, found = read_header(fh)
            header = fh.tell()
    except (OSError, ValueError) as exc:
        return 0, f"its header cannot be read ({exc})"
    if tuple(shape) != (meta["n_rows"], meta["d"]) or found != dtype:
        return 0, f"it holds {found} {tuple(shape)}, not {dtype} {(meta['n_rows'], meta['d'])}"
    return header + meta["n_rows"] * meta["d"] * dtype.itemsize, None


class FeatureStore:
    """A store directory; create with :meth:`create` and read with :meth:`open`."""

    def __init__(self, path: Path, meta: dict, array: np.ndarray, rows_done: int, chunks: list):
        self.path = path
        self.meta = meta
        self.array = array
        self.rows_done = rows_done
        self.chunk_crcs = [tuple(c) for c in chunks]  # (start, stop, crc32), in row order
        self._verified: set[int] = set()

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
        return [(b["name"], slice(b["offset"], b["offset"] + b.get("keep", b["p_left"] * b["p_right"])))
                for b in self.meta["layout"]]

    @staticmethod
    def _size_problem(path: Path, meta: dict) -> str | None:
        features = path / "features.npy"
        if not features.is_file():
            return "features.npy is missing"
        expected, reason = _expected_bytes(features, meta)
        if reason is not None:
            return f"features.npy is not this store's array: {reason}"
        size = features.stat().st_size
        if size != expected:
            return f"features.npy has {size} bytes, not the {expected} its {meta['n_rows']} rows need (truncated or overwritten)"
        return None

    @classmethod
    def create(cls, path, meta: dict) -> "FeatureStore":
        """Start a new store, resume a partial one made under the same settings, or
        return the finished one.

        A partial store that fails its checks (wrong size, a chunk whose CRC does
        not match) is started over from its last good chunk, with a warning: it
        holds nothing that is not recomputed. A finished store that fails its
        size check is rebuilt the same way; it is a cache of a deterministic
        computation.
        """
        path = Path(path)
        meta = dict(meta, format=1, n_rows=len(meta["row_ids"]))
        meta_file = path / "meta.json"
        if meta_file.exists():
            found = read_json(meta_file)
            compare_meta(found, meta, meta_file)
            if is_complete(path):
                try:
                    return cls.open(path, meta)
                except ArtifactError as exc:
                    log.warning("rebuilding damaged feature store: %s", exc)
                    shutil.rmtree(path)
            else:
                resumed = cls._resume(path, found)
                if resumed is not None:
                    return resumed
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_file, meta)
        array = np.lib.format.open_memmap(
            path / "features.npy", mode="w+", dtype=_NUMPY_DTYPES[meta["dtype"]],
            shape=(meta["n_rows"], meta["d"]),
        )
        reserve_disk(path / "features.npy")
        atomic_write_json(path / "progress.json", {"rows_done": 0, "chunks": []})
        return cls(path, meta, array, 0, [])

    @classmethod
    def _resume(cls, path: Path, meta: dict) -> "FeatureStore | None":
        progress_file = path / "progress.json"
        if not progress_file.exists():
            return None
        problem = cls._size_problem(path, meta)
        progress = read_json(progress_file)
        if problem is None and "chunks" not in progress:
            problem = "progress.json records no chunk checksums (written by an older version)"
        if problem is not None:
            log.warning("starting partial feature store %s over: %s", path, problem)
            return None
        array = np.load(path / "features.npy", mmap_mode="r+")
        good = []
        for start, stop, crc in progress["chunks"]:
            if _crc(array[start:stop]) != crc:
                log.warning("feature store %s: rows %d-%d do not match their checksum; recomputing from row %d",
                            path, start, stop, start)
                break
            good.append((start, stop, crc))
        rows_done = good[-1][1] if good else 0
        if rows_done != progress["rows_done"]:
            atomic_write_json(progress_file, {"rows_done": rows_done, "chunks": good})
        return cls(path, meta, array, rows_done, good)

    @classmethod
    def open(cls, path, expected: dict | None = None) -> "FeatureStore":
        """Open a finished store read-only, checking ``expected`` settings if given,
        every file's recorded size, and (as rows are read) every chunk's CRC."""
        path = Path(path)
        meta_file = path / "meta.json"
        if not is_complete(path):
            raise ArtifactError(
                f"Feature store {str(path)!r} is missing or incomplete (no {COMPLETE_MARKER}); "
                "re-run feature extraction with the same settings to finish it."
            )
        check_complete(path, "Feature store", REBUILD_HINT)
        meta = read_json(meta_file)
        if expected is not None:
            compare_meta(meta, expected, meta_file)
        problem = cls._size_problem(path, meta)
        progress = read_json(path / "progress.json")
        if problem is None and "chunks" not in progress:
            problem = "it records no chunk checksums (written by an older version)"
        if problem is None and progress["rows_done"] != meta["n_rows"]:
            problem = f"progress.json records {progress['rows_done']} of {meta['n_rows']} rows"
        if problem is not None:
            raise ArtifactError(f"Feature store {str(path)!r} is damaged: {problem}. {REBUILD_HINT}")
        # Copy-on-write: reads are zero-copy torch views and nothing can
        # write back to the finished file.
        array = np.load(path / "features.npy", mmap_mode="c")
        return cls(path, meta, array, meta["n_rows"], progress["chunks"])

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Write rows [start, start+len) and record them as done (crash-safe)."""
        if start != self.rows_done:
            raise ArtifactError(
                f"Feature store {str(self.path)!r}: rows must be written in order; expected "
                f"row {self.rows_done}, got {start}."
            )
        stop = start + rows.shape[0]
        data = to_storage(rows, self.dtype)
        self.array[start:stop] = data
        self.array.flush()
        _release(self.array, start, stop)
        self.chunk_crcs.append((start, stop, _crc(data)))
        atomic_write_json(self.path / "progress.json",
                          {"rows_done": stop, "chunks": [list(c) for c in self.chunk_crcs]})
        self.rows_done = stop

    def finish(self) -> None:
        if self.rows_done != self.n_rows:
            raise ArtifactError(
                f"Feature store {str(self.path)!r} has {self.rows_done} of {self.n_rows} rows; "
                "it cannot be marked complete."
            )
        self.array.flush()
        write_marker(self.path)

    def _verify(self, start: int, stop: int) -> None:
        """Check the CRC of every written chunk overlapping rows [start, stop), once each."""
        for i, (c0, c1, crc) in enumerate(self.chunk_crcs):
            if c1 <= start or c0 >= stop or i in self._verified:
                continue
            if _crc(self.array[c0:c1]) != crc:
                raise ArtifactError(
                    f"Feature store {str(self.path)!r} is corrupted: rows {c0}-{c1} of features.npy "
                    f"do not match the checksum recorded when they were written. {REBUILD_HINT}"
                )
            self._verified.add(i)

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.rows_done if stop is None else stop
        self._verify(start, stop)
        return from_storage(self.array[start:stop], self.dtype)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Stream the finished rows as float32 (start, tensor) chunks; the mapped pages are
        released as they go, so memory stays flat in N.

        A float32 chunk is a view of the (copy-on-write) mapping, valid while the caller
        works on it: its pages are released when the next chunk is asked for (reading it
        later maps them again; writing into it never reaches the file). Copying a chunk
        is the caller's choice, which keeps scoring at the matmul's pace.
        """
        for start in range(0, self.rows_done, chunk_rows):
            stop = min(start + chunk_rows, self.rows_done)
            try:
                yield start, self.rows(start, stop)
            finally:  # also when the caller stops early
                _release(self.array, start, stop)


# --- sharded stores --------------------------------------------------------------------------

SHARDS_FILE = "shards.json"


def shard_bounds(n_rows: int, count: int) -> list[tuple[int, int]]:
    """The contiguous row range [start, stop) of each of ``count`` shards (sizes differ by ≤ 1)."""
    return [(i * n_rows // count, (i + 1) * n_rows // count) for i in range(count)]


def shard_dir(path: Path, index: int, count: int) -> Path:
    return Path(path) / f"shard-{index:04d}-of-{count:04d}"


def check_shard(index: int, count: int, what: str = "shard") -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{what} count={count!r}: give a positive number of shards.")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(f"{what} index={index!r} is out of range for {count} shard(s): use 0 to {count - 1}.")


def create_shard(path, meta: dict, index: int, count: int) -> FeatureStore:
    """Start (or resume, or return the finished) shard ``index`` of ``count`` of the store at ``path``.

    The store's ``meta.json`` holds the settings of all its rows; each shard is a
    store of its own contiguous row range, so N jobs can write one store at once.
    """
    check_shard(index, count)
    path = Path(path)
    meta = dict(meta, format=1, n_rows=len(meta["row_ids"]))
    path.mkdir(parents=True, exist_ok=True)
    meta_file = path / "meta.json"
    if meta_file.exists():
        compare_meta(read_json(meta_file), meta, meta_file)
    else:
        atomic_write_json(meta_file, meta)
    layout = path / SHARDS_FILE
    if layout.exists():
        found = read_json(layout)["count"]
        if found != count:
            raise ArtifactError(
                f"Feature store {str(path)!r} is being written as {found} shards, not {count}. Use "
                f"shard count {found}, or delete the store to start over with {count}."
            )
    else:
        atomic_write_json(layout, {"count": count})
    start, stop = shard_bounds(meta["n_rows"], count)[index]
    shard_meta = dict(meta, row_ids=meta["row_ids"][start:stop],
                      shard={"index": index, "count": count, "start": start, "stop": stop})
    return FeatureStore.create(shard_dir(path, index, count), shard_meta)


def missing_shards(path) -> list[int]:
    """The shards of a sharded store that are not finished (all of them if none started)."""
    count = read_json(Path(path) / SHARDS_FILE)["count"]
    return [i for i in range(count) if not is_complete(shard_dir(path, i, count))]


class ShardedFeatureStore:
    """The finished shards of one store, read as one (rows in order, global row numbers)."""

    def __init__(self, path: Path, meta: dict, shards: list[FeatureStore]):
        self.path = path
        self.meta = meta
        self.shards = shards
        self.rows_done = sum(s.n_rows for s in shards)

    n_rows = FeatureStore.n_rows
    d = FeatureStore.d
    dtype = FeatureStore.dtype
    row_ids = FeatureStore.row_ids
    layer_slices = FeatureStore.layer_slices

    @property
    def complete(self) -> bool:
        return True

    @property
    def offsets(self) -> list[int]:
        return [s.meta["shard"]["start"] for s in self.shards]

    def rows(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.n_rows if stop is None else stop
        parts = [s.rows(max(start - o, 0), min(stop - o, s.n_rows))
                 for o, s in zip(self.offsets, self.shards) if o < stop and o + s.n_rows > start]
        return torch.cat(parts) if parts else torch.empty((0, self.d))

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for offset, shard in zip(self.offsets, self.shards):
            for start, rows in shard.chunks(chunk_rows):
                yield offset + start, rows


def open_store(path, expected: dict | None = None):
    """A finished store, whether written by one job (:class:`FeatureStore`) or by shards
    (:class:`ShardedFeatureStore`); an unfinished shard is an error naming it."""
    path = Path(path)
    if is_complete(path) or not (path / SHARDS_FILE).exists():
        return FeatureStore.open(path, expected)
    meta = read_json(path / "meta.json")
    if expected is not None:
        compare_meta(meta, dict(expected, format=1, n_rows=len(expected["row_ids"])), path / "meta.json")
    count = read_json(path / SHARDS_FILE)["count"]
    missing = missing_shards(path)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise ArtifactError(
            f"Feature store {str(path)!r} is written as {count} shards and shard(s) {shown} are not "
            f"finished. Run the extraction of each (e.g. `trackstar-run ... shard.count={count} "
            f"shard.index={missing[0]}`, or all of them with shard.index={','.join(map(str, missing[:3]))}"
            f"{',...' if len(missing) > 3 else ''} under -m); a killed shard job resumes."
        )
    shards = [FeatureStore.open(shard_dir(path, i, count)) for i in range(count)]
    for i, shard in enumerate(shards):
        compare_meta(shard.meta, {k: v for k, v in meta.items() if k not in ("row_ids", "n_rows")},
                     shard.path / "meta.json", [k for k in IDENTITY_KEYS if k not in ("row_ids", "n_rows")])
        start, stop = shard_bounds(meta["n_rows"], count)[i]
        if shard.meta.get("shard", {}).get("start") != start or shard.n_rows != stop - start:
            raise ArtifactError(f"Shard {str(shard.path)!r} does not hold rows {start}-{stop} of its store. {REBUILD_HINT}")
    return ShardedFeatureStore(path, meta, shards)


# Keys on which a training store and a query store must agree to be scored
# against each other (the query's own output function may differ).
SHARED_KEYS = (
    "model_id", "model_hash", "param_names", "layout", "d", "seed", "projection",
    "v_source", "use_v", "adam_mode",
)


#: Where V was applied: the optimizer-step score applies it to the training side only.
V_KEYS = ("v_source", "use_v", "adam_mode")


def check_compatible(train: FeatureStore, query: FeatureStore, ignore: tuple[str, ...] = ()) -> None:
    """Refuse to score features of two stores made under different settings (but ``ignore``)."""
    keys = tuple(k for k in SHARED_KEYS if k not in ignore)
    compare_meta(query.meta, {k: train.meta.get(k) for k in keys}, query.path / "meta.json", keys)
