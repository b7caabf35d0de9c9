"""One clear line per failure, for the command-line shells (``trackstar``, ``trackstar-run``).

The shells print :func:`describe_error` and no traceback unless it is asked for
(:func:`debug_requested`); a run's record keeps the traceback in any case.
"""

from __future__ import annotations

import errno
import os


def debug_requested() -> bool:
    """Whether the user asked for tracebacks (TRACKSTAR_DEBUG=1 or Hydra's HYDRA_FULL_ERROR=1)."""
    return any(os.environ.get(v, "").strip() not in ("", "0") for v in ("TRACKSTAR_DEBUG", "HYDRA_FULL_ERROR"))


def describe_error(exc: BaseException) -> str:
    """The message of ``exc``, with the file and a fix for the operating system's errors."""
    if isinstance(exc, OSError) and exc.filename is not None:
        where = str(exc.filename)
        if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (f"no permission to write {where!r} ({exc.strerror}). Choose a directory you can write to "
                    "(artifacts_dir=..., results_dir=... or --artifacts), or fix its permissions.")
        if exc.errno == errno.ENOSPC:
            return f"no space left on the device while writing {where!r}. Free space and re-run: finished stages are kept."
        if isinstance(exc, FileNotFoundError):
            return f"{where!r} does not exist ({exc.strerror})."
        return f"{exc.strerror or exc} ({where!r})"
    if isinstance(exc, KeyError):
        return f"missing field {exc.args[0]!r}" if exc.args else "missing field"
    text = str(exc)
    return text if text else type(exc).__name__
