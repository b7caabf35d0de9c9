"""Threads for the numeric stages, so that results do not depend on how jobs were scheduled.

Floating-point sums in torch's CPU kernels are split by thread, so a model
trained, or features extracted, with 1 thread differ in the last bits from the
same computation with 2. A cached stage fixes its numbers for every later run
that reuses it, so whichever job got there first, under whichever launcher,
would fix them for all. :func:`compute_stage` therefore runs every numeric
stage with one thread count, ``stage_threads`` (default: every core this
process may use), whatever the launcher gave the job; at most
``cores // stage_threads`` such stages run at once on a machine (a file-lock
semaphore under ``artifacts_dir/locks``, named by the host, so jobs on other
nodes of a cluster sharing the directory do not wait for it), so parallel jobs
wait for a slot instead of oversubscribing the cores.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def stage_threads(setting: int | None) -> int:
    """The thread count of numeric stages: ``setting``, or every available core if None."""
    if setting is None:
        return available_cores()
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ValueError(f"stage_threads={setting!r}: give a positive number of threads, or null for all cores.")
    return setting


@contextlib.contextmanager
def compute_stage(artifacts: str | os.PathLike, threads: int | None = None) -> Iterator[int]:
    """Hold one of the machine's compute slots and run torch with ``stage_threads(threads)``.

    Take it inside any stage lock, never around one (locks are always taken in
    the order stage, then compute, so jobs cannot wait on each other in a cycle).
    """
    n = stage_threads(threads)
    slots = max(1, available_cores() // n)
    locks = Path(artifacts) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    host = "".join(c if c.isalnum() or c in "-_." else "_" for c in socket.gethostname()) or "host"
    held = None
    for i in range(slots):  # the first free slot
        lock = FileLock(str(locks / f"compute-{host}-{i}.lock"))
        try:
            lock.acquire(timeout=0)
            held = lock
            break
        except Timeout:
            continue
    if held is None:  # all busy: wait for one (spread over the slots by pid)
        held = FileLock(str(locks / f"compute-{host}-{os.getpid() % slots}.lock"))
        held.acquire()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
        held.release()
