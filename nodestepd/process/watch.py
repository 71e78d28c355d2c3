"""Watching processes through pidfds: on the event loop without SIGCHLD or waitpid(-1), or blocking off it.

A Pidfd owns one pidfd: the process's exit (it polls readable), its signals (never a
recycled pid) and, for a process someone else reaped, the exit status the kernel keeps
for it (PIDFD_INFO_EXIT).

A ProcessWatch watches one process through its Pidfd. The exit status of a child is read
with WNOWAIT first, so the process stays a zombie (and its pid, and the process group it
leads, stay reserved) until `reap()`: nothing that runs after the exit, RunTimeKill with
`%p` or a final SIGKILL to the group, can hit a recycled pid. While a process runs the
watch costs one reader on the loop and no timer: the pidfd wakes us when it ends.

A process that is not our child (a task's process whose parent is its monitor, after a
daemon restart or once the monitor is released) is watched the same way: its pidfd
becomes readable when it exits, and the kernel hands its exit status to any pidfd holder
once its parent has reaped it. That reap comes a moment after the exit, so for a
non-child only, a few timers look for the status over the next 1.3 s (_EXIT_INFO_DELAYS)
before it is reported as unknown.

ExitWatch is what a step needs of whatever tells it that a task ended: ProcessWatch
here, monitor.MonitoredProcess (a task under its nodestepd-monitor), and the step's own
(a polled container, recovered tasks).

The daemon is a child subreaper (reaper.py): what gets orphaned to it becomes its child.
The pids in CLAIMED are the children a ProcessWatch owns; the reaper takes care of the
rest. A thread that is spawning (from fork to pidfd, spawn.py) is in SPAWNING, and the
reaper's sweep leaves that thread's children alone, so it never mistakes a child being
spawned for an orphan. SPAWN_LOCK guards SPAWNING and is held by the sweep; nobody holds
it while waiting for a process (a child stopped before its exec must not hold up the
sweep, which runs on the event loop, nor other spawns).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import signal
import struct
import threading
from collections.abc import Collection, Iterator
from typing import Protocol

_WAIT_FLAGS = os.WEXITED | os.WNOHANG

SPAWN_LOCK = threading.Lock()
SPAWNING: set[int] = set()  # native ids of the threads between a fork and its pidfd
CLAIMED: set[int] = set()

# linux/pidfd.h: PIDFD_GET_INFO = _IOWR(0xFF, 11, struct pidfd_info), 64 bytes in its first version.
_PIDFD_GET_INFO = 0xC040FF0B
_PIDFD_INFO_SIZE = 64
_PIDFD_INFO_EXIT = 1 << 3
_EXIT_CODE_OFFSET = 60
# A non-child's exit status appears once its parent reaps it: a runtime's monitor does
# that at once, so we look a few times right after the exit, then give up.
_EXIT_INFO_DELAYS = (0.001, 0.004, 0.016, 0.064, 0.25, 1.0)


class NotWatchable(Exception):
    """The pid named by a runtime is gone, or is not the process it should be."""


def exit_status(info: os.waitid_result) -> int:
    """Shell convention: the exit code, or 128+N for death by signal N."""
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return 128 + info.si_status  # CLD_KILLED, CLD_DUMPED


def exit_status_from_wait_status(wstatus: int) -> int:
    if os.WIFSIGNALED(wstatus):
        return 128 + os.WTERMSIG(wstatus)
    return os.WEXITSTATUS(wstatus)


@contextlib.contextmanager
def spawning() -> Iterator[int]:
    """Mark this thread as spawning for the block (yields its native id): the reaper's
    sweep leaves its children alone until the block ends, by when the new child must be
    CLAIMED (or gone). The lock is held only to update SPAWNING, never during the spawn."""
    tid = threading.get_native_id()
    with SPAWN_LOCK:
        SPAWNING.add(tid)
    try:
        yield tid
    finally:
        with SPAWN_LOCK:
            SPAWNING.discard(tid)


def thread_children(tid: int) -> list[int]:
    """The children forked by one of our threads (a fork's parent is the thread), from
    /proc/self/task/TID/children."""
    try:
        with open(f"/proc/self/task/{tid}/children") as f:
            return [int(k) for k in f.read().split()]
    except FileNotFoundError:
        return []


def children(pid: int, skip_threads: Collection[int] = ()) -> list[int]:
    """pid's child processes, from /proc/PID/task/*/children (empty when pid is gone),
    leaving out those of the threads in skip_threads."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return kids
    for tid in tids:
        if int(tid) in skip_threads:
            continue
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
        except FileNotFoundError:
            continue
    return kids


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (the state) on; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data.rpartition(b")")[2].split()
    return fields if len(fields) >= 20 else None  # too short: gone while we read it


def start_time(pid: int) -> int | None:
    """When pid started, in clock ticks since boot (field 22 of /proc/PID/stat); None when gone.

    A recycled pid has another start time, so (pid, start_time) names one process for the
    life of the node: a pid recorded before a daemon restart is that process only if its
    start time still matches. A zombie still has its start time.
    """
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def running(pid: int) -> bool:
    """Whether pid is a process that still runs: gone and zombies (exited, not yet reaped) are not."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def proc_ids(pid: int) -> tuple[int, int]:
    """(parent pid, real uid) from /proc/PID/status."""
    ppid = uid = -1
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith("Uid:"):
                uid = int(line.split()[1])
    return ppid, uid


class Pidfd:
    """One pidfd: its only owner, which closes it (close(), idempotent).

    The fd names one process for as long as it is open, whatever happens to the pid: a
    signal sent through it can never reach a process that recycled the pid.
    """

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd  # -1 once closed

    @classmethod
    def open(cls, pid: int) -> "Pidfd":
        """Pin pid (close-on-exec). Raises ProcessLookupError when there is no such process."""
        return cls(pid, os.pidfd_open(pid))

    def dup(self) -> "Pidfd":
        """Another pidfd on the same process, owned by the caller."""
        return Pidfd(self.pid, os.dup(self.fd))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __del__(self) -> None:
        # The owner forgot to close it (an exception on the way): do not leak the fd.
        self.close()

    def readable(self, timeout: float | None = 0) -> bool:
        """Whether the process has exited (a zombie, or reaped): a pidfd polls readable from then on.

        timeout: seconds to block for the exit (None: for as long as it takes; 0: not at all).
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def waitid(self, flags: int) -> os.waitid_result | None:
        """waitid(P_PIDFD) on our child: see os.waitid for flags."""
        return os.waitid(os.P_PIDFD, self.fd, flags)

    def exit_info(self) -> int | None:
        """The exit status the kernel keeps for a process once it is reaped (PIDFD_INFO_EXIT),
        or None if not (yet) known."""
        buf = bytearray(_PIDFD_INFO_SIZE)
        struct.pack_into("=Q", buf, 0, _PIDFD_INFO_EXIT)
        try:
            fcntl.ioctl(self.fd, _PIDFD_GET_INFO, buf)
        except OSError:
            return None  # ESRCH once gone without exit info; EINVAL/ENOTTY on kernels without it
        (mask,) = struct.unpack_from("=Q", buf, 0)
        if not mask & _PIDFD_INFO_EXIT:
            return None
        (wstatus,) = struct.unpack_from("=i", buf, _EXIT_CODE_OFFSET)
        return exit_status_from_wait_status(wstatus)

    def send_signal(self, sig: int) -> bool:
        """Signal the process itself. False when it is gone (reaped).

        A zombie takes the signal (and nothing comes of it): a caller that must not count
        an exited process asks readable() first."""
        try:
            signal.pidfd_send_signal(self.fd, sig)
        except ProcessLookupError:
            return False
        return True

    def signal_group(self, sig: int) -> None:
        """Signal the process group this process leads (its pid is the group id); quiet when
        the group is empty.

        By pid, not by fd: the caller must know the group id is still this group's, that
        is, the leader runs or its zombie is held by someone (us, or its monitor)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


class ExitWatch(Protocol):
    """What a step needs of whatever tells it that a task ended: ProcessWatch here,
    monitor.MonitoredProcess, and the step's own watches.

    `pid` is the process (None when there is none to name). `status` is None until the
    end is known; then the exit code, or 128+N for signal N (with status_known False, a
    stand-in that must be reported as unknown). `running` is True until the end is known.
    The methods: wait() for the status, poll() for it without blocking (None while it
    runs), send_signal() to the process (False once it has ended), kill_group() for the
    process group it leads, reap() to release it.
    """

    pid: int | None
    status_known: bool

    @property
    def status(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    async def wait(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> bool: ...

    def kill_group(self, sig: int) -> None: ...

    def reap(self) -> None: ...


class ProcessWatch(ExitWatch):
    """An ExitWatch on one process through its pidfd. Created in any thread (spawning may
    run off the loop); waited on in the loop's (wait), or blocking off it (wait_blocking)."""

    def __init__(self, pidfd: Pidfd, *, child: bool = True) -> None:
        self.pid: int = pidfd.pid
        self.child = child
        self._pidfd: Pidfd | None = pidfd  # None once reaped
        self._status: int | None = None
        self.status_known = True  # False only for a non-child whose exit status the kernel never gave us
        self._exited: asyncio.Future[int] | None = None
        self._reading = False
        if child:
            CLAIMED.add(self.pid)

    @classmethod
    def open(cls, pid: int) -> "ProcessWatch":
        """Watch a child we just spawned. Our child cannot be reaped by anyone else, so the pid is still ours."""
        return cls(Pidfd.open(pid))

    @classmethod
    def adopt(cls, pid: int, uid: int, start: int | None = None) -> "ProcessWatch":
        """Watch a process we did not start (a task's, named by its record after a restart),
        checking it is the one it should be.

        The pid is pinned by the pidfd first; then /proc must show it running as `uid` (a
        recycled pid would belong to someone else) and, given `start` (a start time
        recorded earlier, see start_time), started at that very time. One that has already
        exited is fine: its status is still to be had. Raises NotWatchable.
        """
        try:
            pidfd = Pidfd.open(pid)
        except OSError as e:  # ProcessLookupError among them
            raise NotWatchable(f"pid {pid} cannot be watched: {e.strerror or e}") from None
        try:
            try:
                ppid, real_uid = proc_ids(pid)
            except FileNotFoundError:
                raise NotWatchable(f"pid {pid} has already exited and been reaped") from None
            if real_uid != uid:
                raise NotWatchable(f"pid {pid} runs as uid {real_uid}, not {uid}: not the container's process")
            if start is not None and start_time(pid) != start:
                raise NotWatchable(f"pid {pid} is another process now (it started at tick {start_time(pid)}, "
                                   f"not {start}): the pid was recycled")
        except BaseException:
            pidfd.close()
            raise
        return cls(pidfd, child=ppid == os.getpid())

    @property
    def status(self) -> int | None:
        return self._status

    @property
    def running(self) -> bool:
        return self._status is None

    async def wait(self) -> int:
        if self._status is not None:
            return self._status
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited = loop.create_future()
            if self._pidfd is not None:
                self._reading = True
                loop.add_reader(self._pidfd.fd, self._on_readable)
                self._peek()  # it may have ended before we started watching
        return await asyncio.shield(self._exited)

    def wait_blocking(self, timeout: float | None) -> int | None:
        """Block until our child has exited, for at most `timeout` seconds (None: no limit).

        Its exit status, or None when it still runs at the deadline. Does not reap. For a
        caller off the event loop (a worker thread, the CLI) that owns this watch alone:
        never mixed with wait(). A non-child's status can come only later than its exit
        (once its parent reaps it), so only our children are waited for this way.
        """
        if not self.child:
            raise RuntimeError(f"pid {self.pid} is not our child: wait_blocking() cannot learn its status")
        if self._status is None and self._pidfd is not None and self._pidfd.readable(timeout):
            self._peek()
        return self._status

    def poll(self) -> int | None:
        """The exit status if the process has ended (without reaping it), else None. Never blocks."""
        self._peek()
        return self._status

    def fileno(self) -> int:
        """The pidfd, for select.poll off the loop: readable once the process has exited."""
        assert self._pidfd is not None, "reaped"
        return self._pidfd.fd

    def _on_readable(self) -> None:
        self._peek()

    def _peek(self) -> bool:
        """Record the exit status if the process has ended, without reaping it. True if it has."""
        if self._status is not None:
            return True
        if self._pidfd is None:
            return False
        if not self.child:
            return self._peek_non_child()
        info = self._pidfd.waitid(_WAIT_FLAGS | os.WNOWAIT)
        if info is None:
            return False  # still running (or a spurious wake-up)
        self._set_status(exit_status(info))
        return True

    def _peek_non_child(self) -> bool:
        assert self._pidfd is not None
        if not self._pidfd.readable():
            return False  # still running
        status = self._pidfd.exit_info()
        if status is not None:
            self._set_status(status)
        elif self._reading:
            self._stop_reading()  # stays readable from now on: wait for the parent's reap instead
            asyncio.get_running_loop().call_later(_EXIT_INFO_DELAYS[0], self._retry_exit_info, 1)
        return True

    def _retry_exit_info(self, attempt: int) -> None:
        if self._pidfd is None or self._status is not None:
            return
        status = self._pidfd.exit_info()
        if status is not None:
            self._set_status(status)
        elif attempt < len(_EXIT_INFO_DELAYS):
            asyncio.get_running_loop().call_later(_EXIT_INFO_DELAYS[attempt], self._retry_exit_info, attempt + 1)
        else:
            self.status_known = False
            self._set_status(0)

    def _set_status(self, status: int) -> None:
        self._status = status
        self._stop_reading()
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(status)

    def _stop_reading(self) -> None:
        if self._reading and self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd.fd)
            self._reading = False

    def send_signal(self, sig: int) -> bool:
        """Signal the process itself. False when it has already exited."""
        if self._pidfd is None or self._peek():
            return False
        return self._pidfd.send_signal(sig)

    def kill_group(self, sig: int) -> None:
        """Signal the process group this process leads (its pid). Safe until reap(): the
        unreaped leader keeps the group id from being reused."""
        if self._pidfd is not None:
            self._pidfd.signal_group(sig)

    def reap(self) -> None:
        """Collect the zombie and release the pidfd. The one place a watched process is released.

        The process must have exited (kill it and wait() first): reaping never blocks.
        A non-child is reaped by its own parent; here only the pidfd is released.
        """
        if self._pidfd is None:
            return
        if self.child:
            info = self._pidfd.waitid(_WAIT_FLAGS)
            if info is None:
                raise RuntimeError(f"pid {self.pid} is still running: reap() needs it to have exited")
            if self._status is None:
                self._set_status(exit_status(info))
            CLAIMED.discard(self.pid)
        self._stop_reading()
        self._pidfd.close()
        self._pidfd = None

    def __del__(self) -> None:
        # Dropped unreaped (an exception on the way): its Pidfd closes itself; the zombie
        # is left to the reaper's next sweep.
        if self._pidfd is not None and self.child:
            CLAIMED.discard(self.pid)
