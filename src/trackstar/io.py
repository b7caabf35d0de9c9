"""Atomic, resumable artifact I/O shared by every stage.

Every artifact directory is written under a temporary sibling name and renamed
into place only when complete, then marked by a ``COMPLETE`` file: its content
hash and every file's size and sha256 (:func:`write_marker`). A directory
without that marker is a partial write from a killed run and is never mistaken
for a finished artifact; :func:`check_complete` also checks that every recorded
file is there with its recorded size (cheap, always), :func:`verify_complete`
re-hashes the content and names the file that changed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write to a temporary file, then rename it over ``path``: readers see the old file or
    the new one, never half of it. ``durable`` also flushes it to disk before the rename
    (fsync); a checksummed cache skips that, as its check catches what a power loss leaves."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ArtifactError(f"No space left on the device (or quota) of {str(path.parent)!r} while writing "
                                f"{path.name} ({len(data):,} bytes). Free space there or point the run elsewhere "
                                "(results_dir / artifacts_dir); what was written before is kept.") from None
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, so equal content gives equal bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def atomic_write_checked(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` and, beside it, ``<name>.sha256`` with its size and hash.

    :func:`read_checked` refuses the file unless both agree, so a truncated or
    overwritten cache file is never read as if it were what was written.
    """
    path = Path(path)
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{len(data)} {hashlib.sha256(data).hexdigest()}\n")


def read_checked(path: str | os.PathLike) -> bytes:
    """The bytes written by :func:`atomic_write_checked`; :class:`ArtifactError` if they changed."""
    path = Path(path)
    data = path.read_bytes()
    side = path.with_name(path.name + ".sha256")
    try:
        size, digest = side.read_text().split()
    except (OSError, ValueError):
        raise ArtifactError(f"{str(path)!r} has no valid checksum file {side.name!r} (a killed write?).") from None
    if int(size) != len(data) or digest != hashlib.sha256(data).hexdigest():
        raise ArtifactError(
            f"{str(path)!r} is damaged: it has {len(data)} bytes and another hash than the "
            f"{size} bytes recorded in {side.name!r} when it was written."
        )
    return data


def atomic_write_json_checked(path: str | os.PathLike, obj: Any) -> None:
    """JSON holding ``obj`` and the sha256 of its canonical form (see :func:`read_json_checked`).
    Not flushed to disk (fsync): a file torn by a power loss fails its check and is recomputed."""
    text = dumps_json({"data": obj, "sha256": hashlib.sha256(dumps_json(obj).encode()).hexdigest()})
    atomic_write_bytes(path, text.encode("utf-8"), durable=False)


def read_json_checked(path: str | os.PathLike) -> Any:
    found = read_json(path)
    if not isinstance(found, dict) or set(found) != {"data", "sha256"} or (
        hashlib.sha256(dumps_json(found["data"]).encode()).hexdigest() != found["sha256"]
    ):
        raise ArtifactError(f"{str(path)!r} does not match its recorded checksum: it was edited or damaged.")
    return found["data"]


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{str(path)!r} does not exist.") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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


@functools.lru_cache(maxsize=4096)
def _input_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def input_digest(path: str | os.PathLike) -> str:
    """sha256 of a user's input file (a release shard, a corpus file) for a cache key,
    computed once per process while its size and modification time stay the same.
    Not for integrity checks of our own artifacts, which always re-hash."""
    st = os.stat(path)
    return _input_digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _file_digests(path: Path, exclude: Iterable[str]) -> dict[str, dict]:
    excluded = set(exclude)
    out = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel not in excluded:
            out[rel] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def _combine(digests: dict[str, dict]) -> str:
    h = hashlib.sha256()
    for rel, digest in digests.items():
        h.update(rel.encode())
        h.update(b"\0")
        h.update(digest["sha256"].encode())
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, exclude: Iterable[str] = (COMPLETE_MARKER,)) -> str:
    """Hash of every file's relative name and content, in sorted order."""
    return _combine(_file_digests(Path(path), exclude))


def dir_digests(path: str | os.PathLike) -> tuple[dict[str, str], str]:
    """(each file's sha256 by relative name, :func:`sha256_dir`), every file read once."""
    digests = _file_digests(Path(path), (COMPLETE_MARKER,))
    return {rel: d["sha256"] for rel, d in digests.items()}, _combine(digests)


def write_marker(path: str | os.PathLike) -> str:
    """Mark a finished artifact directory: its content hash and each file's size and sha256."""
    path = Path(path)
    digests = _file_digests(path, (COMPLETE_MARKER,))
    content_hash = _combine(digests)
    atomic_write_json(path / COMPLETE_MARKER, {"content_hash": content_hash, "files": digests, "format": 2})
    return content_hash


def read_marker(path: str | os.PathLike) -> dict:
    """The ``COMPLETE`` marker of ``path``; an old marker (a bare hash) has ``files: None``."""
    marker = Path(path) / COMPLETE_MARKER
    text = marker.read_text(encoding="utf-8").strip()
    if not text.startswith("{"):
        return {"content_hash": text, "files": None}
    try:
        found = json.loads(text)
        return {"content_hash": found["content_hash"], "files": found["files"]}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{str(marker)!r} is not a valid completion marker ({exc}).") from exc


def config_hash(obj: Any, length: int = 16) -> str:
    """Content address of a config: hash of its canonical JSON."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file()


def check_complete(path: str | os.PathLike, what: str, rebuild_hint: str) -> Path:
    """Return ``path`` if it is a finished artifact whose files all have their recorded
    sizes (no content is read), else raise a clear error."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what} {str(path)!r} does not exist. {rebuild_hint}")
    if not path.is_dir() or not is_complete(path):
        raise ArtifactError(
            f"{what} {str(path)!r} is incomplete (no {COMPLETE_MARKER} marker): it was "
            f"left by a killed or failed run. Delete it and rebuild. {rebuild_hint}"
        )
    files = read_marker(path)["files"]
    for rel, digest in (files or {}).items():
        f = path / rel
        size = f.stat().st_size if f.is_file() else None
        if size != digest["size"]:
            found = "is missing" if size is None else f"has {size} bytes, not the {digest['size']} recorded when it was written"
            raise ArtifactError(
                f"{what} {str(path)!r} is damaged: {rel} {found}. {rebuild_hint}".strip()
            )
    return path


def verify_complete(path: str | os.PathLike, what: str, rebuild_hint: str) -> Path:
    """Like :func:`check_complete`, and also re-hash the content against the marker."""
    path = check_complete(path, what, rebuild_hint)
    marker = read_marker(path)
    if marker["files"] is not None:
        # Files added later (an editor's backup, a lock) are not read, so they do not count.
        for rel, digest in marker["files"].items():
            if sha256_file(path / rel) != digest["sha256"]:
                raise ArtifactError(
                    f"{what} {str(path)!r} is corrupted: {rel} has changed since it was written "
                    f"(its sha256 differs). {rebuild_hint}".strip()
                )
        return path
    expected, actual = marker["content_hash"], sha256_dir(path)
    if expected != actual:
        raise ArtifactError(
            f"{what} {str(path)!r} is corrupted: its content hash {actual[:12]} does not "
            f"match the one recorded when it was written ({expected[:12]}). Delete it "
            f"and rebuild. {rebuild_hint}"
        )
    return path


def discard_if_damaged(path: str | os.PathLike, what: str, action: str = "rebuilding it") -> bool:
    """Whether the finished artifact ``path`` is intact; a damaged one (see
    :func:`verify_complete`) is deleted with a warning so that its caller rebuilds it.
    Only for artifacts that are a deterministic function of their key. Call under its lock."""
    path = Path(path)
    if not is_complete(path):
        return False
    try:
        verify_complete(path, what, "")
    except ArtifactError as exc:
        logging.getLogger("trackstar").warning("%s; %s", exc, action)
        shutil.rmtree(path)
        return False
    return True


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
        write_marker(tmp)
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
