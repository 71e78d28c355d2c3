"""What gets orphaned to the daemon: reaped, dead or alive.

The daemon is a child subreaper (kernel.become_subreaper): a process orphaned below it
becomes its child instead of PID 1's, which is why the daemon must reap it, or it stays a
zombie. A task's processes do not come here: the task's monitor (monitor.py,
docs/monitor.md) is their parent, a subreaper too, and adopts and reaps what its task
leaves behind, a create/start container's init among them. What reaches the daemon:

- the orphans of its own short commands (RunTimeQuery, RunTimeStart, RunTimeKill,
  RunTimeDelete, run by spawn.run_helper as its children): a process a runtime left
  running in the background;
- the children of a monitor that died (killed, or a bug): they are handed to us, and
  monitor.py watches those it knows of through their pidfds; any other is an orphan here;
- the monitors themselves once released (`reap_later`): each exits when its last child
  has, and is reaped then.

There is no SIGCHLD to tell us (uvloop owns it) and waitpid(-1) would steal the statuses
that ProcessWatch owns, so `sweep()` looks at the main thread's children in /proc, skips
the ones a ProcessWatch has claimed (CLAIMED, which its own orphan watches join), reaps
the dead ones and watches the live ones through a pidfd until they end. The main thread's
alone: the kernel hands every orphan to the first live thread of the subreaper, its main
thread (find_new_reaper), and so are the children of a thread that exits; the other
threads' children are what they spawned, each claimed by its ProcessWatch as soon as its
pidfd is open (the main thread never spawns: it would be in SPAWNING meanwhile). Reading
one children file, not one per thread (the daemon keeps a dozen or more idle threads),
is what keeps the sweep cheap. Steps call it when they release their processes, which
is when their leftovers appear.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine

from nodestepd.logs import get_logger
from nodestepd.process.watch import CLAIMED, SPAWN_LOCK, SPAWNING, ProcessWatch, thread_children


def _log():
    """The logger, looked up when used: one bound at import would miss configure_logging()."""
    return get_logger()


class Reaper:
    """Owns the orphans: the daemon's children that no ProcessWatch claimed.

    Each one it watches is owned by an asyncio task of its own, which reaps it when it
    ends; _tasks keeps those tasks referenced until then.
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def sweep(self) -> None:
        """Reap dead orphans and watch live ones. Call on the event loop."""
        # Held for the sweep alone (/proc reads, pidfd opens, WNOHANG peeks: nothing waits for
        # a process); a spawn holds it only to enter or leave SPAWNING.
        with SPAWN_LOCK:
            if os.getpid() in SPAWNING:
                return  # never: the loop's thread does not spawn (its new child is not claimed yet)
            for pid in thread_children(os.getpid()):  # the main thread's: where orphans go
                if pid in CLAIMED:  # a ProcessWatch's, this reaper's own among them
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
                self._run(self._reap_orphan(watch), f"orphan {pid}")

    def reap_later(self, watch: ProcessWatch, what: str) -> None:
        """Take over a child its owner has let go of (a task monitor after release) and reap
        it when it exits, without blocking anyone. Call on the event loop."""
        self._run(self._reap_released(watch, what), f"{what} {watch.pid}")

    def _run(self, coroutine: Coroutine[object, object, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_released(self, watch: ProcessWatch, what: str) -> None:
        status = await watch.wait()
        watch.reap()
        if status == 0:
            _log().debug(f"reaped a {what}", pid=watch.pid)
        else:
            _log().warning(f"a {what} ended with a failure", pid=watch.pid, status=status)

    async def _reap_orphan(self, watch: ProcessWatch) -> None:
        status = await watch.wait()
        watch.reap()
        _log().info("reaped an orphaned process", pid=watch.pid, status=status)
