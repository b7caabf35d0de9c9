"""Atomic, resumable artifact I/O shared by every stage.

Every artifact directory is written under a temporary sibling name and renamed
into place only when complete, then marked by a ``COMPLETE`` file holding its
manifest hash. A directory without that marker is a partial write from a
killed run and is never mistaken for a finished artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, partial, corrupted or from other settings."""


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` (and parents) and check that we can write into it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ArtifactError(
            f"{what} {str(path)!r} is not writable ({exc.strerror or exc}). "
            "Choose a directory you can write to, or fix its permissions."
        ) from exc
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{str(path)!r} does not exist.") from exc
    except json.JSONDecodeError as exc:
        raise ArtifactError(
            f"{str(path)!r} is not valid JSON ({exc}); it may be from a killed run. "
            "Delete it and re-run the stage that writes it."
        ) from exc


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Write JSON Lines with canonical key order (byte-identical for equal data)."""
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{str(path)!r} does not exist.")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise ArtifactError(
                    f"{str(path)!r} line {lineno} is not valid JSON ({exc}). "
                    "The file is corrupted; delete it and rebuild."
                ) from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, exclude: Iterable[str] = (COMPLETE_MARKER,)) -> str:
    """Hash of every file's relative name and content, in sorted order."""
    path = Path(path)
    excluded = set(exclude)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in excluded:
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def config_hash(obj: Any, length: int = 16) -> str:
    """Content address of a config: hash of its canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def check_complete(path: str | os.PathLike, what: str, rebuild_hint: str) -> Path:
    """Return ``path`` if it is a finished artifact, else raise a clear error."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what} {str(path)!r} does not exist. {rebuild_hint}")
    if not path.is_dir() or not is_complete(path):
        raise ArtifactError(
            f"{what} {str(path)!r} is incomplete (no {COMPLETE_MARKER} marker): it was "
            f"left by a killed or failed run. Delete it and rebuild. {rebuild_hint}"
        )
    return path


def verify_complete(path: str | os.PathLike, what: str, rebuild_hint: str) -> Path:
    """Like :func:`check_complete`, and also re-hash the content against the marker."""
    path = check_complete(path, what, rebuild_hint)
    expected = (path / COMPLETE_MARKER).read_text().strip()
    actual = sha256_dir(path)
    if expected != actual:
        raise ArtifactError(
            f"{what} {str(path)!r} is corrupted: its content hash {actual[:12]} does not "
            f"match the one recorded when it was written ({expected[:12]}). Delete it "
            f"and rebuild. {rebuild_hint}"
        )
    return path


def remove_stale_partials(parent: str | os.PathLike, pattern: str = ".*.partial-*") -> None:
    """Delete temp dirs of :func:`atomic_directory` whose writer process is gone (a kill).

    Temp dirs of live processes (a concurrent multirun job) are kept.
    """
    for tmp in Path(parent).glob(pattern):
        pid = tmp.name.rsplit(".partial-", 1)[-1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name; publish it by rename when done.

    The body writes into the yielded path. On success the content is hashed into
    a ``COMPLETE`` marker and the directory is renamed to ``final``. On failure
    the temporary directory is removed and ``final`` is left untouched. If
    another process published ``final`` first (concurrent multirun jobs), ours
    is discarded and theirs kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        atomic_write_text(tmp / COMPLETE_MARKER, sha256_dir(tmp) + "\n")
        if final.exists() and not is_complete(final):
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if is_complete(final):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
