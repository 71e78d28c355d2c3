"""One task of a step: its spool dir, its pattern context, and what tells the step it ended."""

from __future__ import annotations

from dataclasses import dataclass

from nodestepd.config.patterns import PatternContext
from nodestepd.process.monitor import Monitor
from nodestepd.process.watch import ExitWatch, start_time


@dataclass(frozen=True)
class ProcessId:
    """One process for the life of the node: a recycled pid has another start time."""

    pid: int
    start: int  # /proc/PID/stat field 22: clock ticks after boot

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        """Read while the process is held unreaped (by its monitor, or by us): /proc still shows it."""
        started = start_time(pid)
        return cls(pid, started if started is not None else 0)


@dataclass
class Task:
    task_id: int
    dir: str  # the path, for patterns and messages
    context: PatternContext
    cwd: str = ""  # the same dir pinned through the spool's fd: where runtime commands start
    # What the task's end is the end of: run mode, the runtime's shell; create/start, the
    # container's init (or the RunTimeQuery poller when there is no pid to watch). After
    # a daemon restart, the watch recovery.py gives it.
    watch: ExitWatch | None = None
    monitor: Monitor | None = None  # this daemon's link to the task's monitor (None after a restart)
    process: ProcessId | None = None  # the watched process, for the record
    monitor_process: ProcessId | None = None
    deleted: bool = False  # RunTimeDelete has run for it
    not_deleted: bool = False  # RunTimeDelete hung every time: the runtime may still hold the container

    @property
    def status_known(self) -> bool:
        return self.watch is not None and self.watch.status_known

    @property
    def status(self) -> int | None:
        return self.watch.status if self.watch is not None else None

    @property
    def running(self) -> bool:
        return self.watch is not None and self.watch.running

    @property
    def ended(self) -> bool:
        return self.watch is not None and not self.watch.running


class EndedProcess:
    """The watch of a task that ended while no daemon watched it (an ExitWatch): its status
    from a record, or unknown (None)."""

    pid = None

    def __init__(self, status: int | None) -> None:
        self.status_known = status is not None
        self._status = status if status is not None else 0

    @property
    def status(self) -> int:
        return self._status

    @property
    def running(self) -> bool:
        return False

    async def wait(self) -> int:
        return self._status

    def poll(self) -> int:
        return self._status

    def send_signal(self, sig: int) -> bool:
        return False

    def kill_group(self, sig: int) -> None:
        pass  # its pid (and group) may belong to someone else by now

    def reap(self) -> None:
        pass
