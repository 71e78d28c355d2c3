"""The daemon as child subreaper: orphans of the runtimes become ours, and we reap them.

A create/start runtime leaves the container's init behind when RunTimeCreate exits.
As a subreaper (PR_SET_CHILD_SUBREAPER) the daemon inherits it instead of PID 1, so it
can wait for it through a pidfd and collect its real exit status (see container.py).

Whatever else gets orphaned into the daemon (a process a runtime left running, a
container init whose runc was killed) must be reaped too, or it stays a zombie. There is
no SIGCHLD to tell us (uvloop owns it) and waitpid(-1) would steal the statuses that
ProcessWatch owns, so `sweep()` looks at our children in /proc, skips the ones a
ProcessWatch has claimed, reaps the dead ones and watches the live ones through a pidfd
until they end. Steps call it when they release their processes, which is when their
leftovers appear. `reap_later` takes over a child its owner lets go of while it still
runs: a task monitor after release (monitor.py), which exits once its task has.
"""

from __future__ import annotations

import asyncio
import os

from nodestepd.logs import get_logger
from nodestepd.process.kernel import become_subreaper  # noqa: F401 (the daemon's import, until it takes it from kernel)
from nodestepd.process.watch import CLAIMED, SPAWN_LOCK, ProcessWatch, children


def _log():
    """The logger, looked up when used: one bound at import would miss configure_logging()."""
    return get_logger()


class Reaper:
    """Owns the orphans: the daemon's children that no ProcessWatch claimed."""

    def __init__(self) -> None:
        self._orphans: dict[int, ProcessWatch] = {}
        self._released: dict[int, ProcessWatch] = {}  # children let go of by their owner (task monitors)
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def orphans(self) -> list[int]:
        return sorted(self._orphans)

    def sweep(self) -> None:
        """Reap dead orphans and watch live ones. Call on the event loop."""
        with SPAWN_LOCK:
            for pid in children(os.getpid()):
                if pid in CLAIMED or pid in self._orphans:
                    continue
                try:
                    watch = ProcessWatch.open(pid)
                except ProcessLookupError:
                    continue
                status = watch.poll()
                if status is not None:
                    watch.reap()
                    _log().info("reaped an orphaned process", pid=pid, status=status)
                    continue
                self._orphans[pid] = watch
                task = asyncio.create_task(self._reap(watch), name=f"orphan {pid}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def reap_later(self, watch: ProcessWatch, what: str) -> None:
        """Take over a child its owner has let go of (a task monitor after release) and reap
        it when it exits, without blocking anyone. Call on the event loop."""
        self._released[watch.pid] = watch
        task = asyncio.create_task(self._reap_released(watch, what), name=f"{what} {watch.pid}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def released(self) -> list[int]:
        return sorted(self._released)

    async def _reap_released(self, watch: ProcessWatch, what: str) -> None:
        status = await watch.wait()
        del self._released[watch.pid]
        watch.reap()
        if status == 0:
            _log().debug(f"reaped a {what}", pid=watch.pid)
        else:
            _log().warning(f"a {what} ended with a failure", pid=watch.pid, status=status)

    async def _reap(self, watch: ProcessWatch) -> None:
        status = await watch.wait()
        if self._orphans.get(watch.pid) is watch:
            del self._orphans[watch.pid]
            watch.reap()
            _log().info("reaped an orphaned process", pid=watch.pid, status=status)
