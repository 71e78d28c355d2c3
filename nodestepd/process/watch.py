"""Watching processes through pidfds on the event loop: no timers, no SIGCHLD, no waitpid(-1).

A ProcessWatch owns one pidfd. The exit status of a child is read with WNOWAIT first,
so the process stays a zombie (and its pid, and the process group it leads, stay
reserved) until `reap()`: nothing that runs after the exit, RunTimeKill with `%p` or a
final SIGKILL to the group, can hit a recycled pid.

A process that is not our child (a container's init that some other process adopted)
is watched the same way: its pidfd becomes readable when it exits, and the kernel
hands its exit status to any pidfd holder (PIDFD_GET_INFO with PIDFD_INFO_EXIT) once
its parent has reaped it.

The daemon is a child subreaper (reaper.py), so orphans of the runtimes become our
children. The pids in CLAIMED are the children a ProcessWatch owns; the reaper takes
care of the rest. SPAWN_LOCK is held from fork to pidfd so the reaper never mistakes a
child being spawned for an orphan.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import signal
import struct
import threading

_WAIT_FLAGS = os.WEXITED | os.WNOHANG

SPAWN_LOCK = threading.Lock()
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


def pidfd_exit_status(pidfd: int) -> int | None:
    """The exit status the kernel keeps for a reaped process (PIDFD_INFO_EXIT), or None if not (yet) known."""
    buf = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", buf, 0, _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf)
    except OSError:
        return None  # ESRCH once gone without exit info; EINVAL/ENOTTY on kernels without it
    (mask,) = struct.unpack_from("=Q", buf, 0)
    if not mask & _PIDFD_INFO_EXIT:
        return None
    (wstatus,) = struct.unpack_from("=i", buf, _EXIT_CODE_OFFSET)
    return exit_status_from_wait_status(wstatus)


def _pidfd_readable(pidfd: int) -> bool:
    """A pidfd polls readable once the process has exited (zombie or reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def children(pid: int) -> list[int]:
    """pid's child processes, from /proc/PID/task/*/children (empty when pid is gone)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
        except FileNotFoundError:
            continue
    return kids


def start_time(pid: int) -> int | None:
    """When pid started, in clock ticks since boot (field 22 of /proc/PID/stat); None when gone.

    A recycled pid has another start time, so (pid, start_time) names one process for the
    life of the node: a pid recorded before a daemon restart is that process only if its
    start time still matches. A zombie still has its start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data.rpartition(b")")[2].split()
    if len(fields) < 20:
        return None  # gone while we read it
    return int(fields[19])


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


class ExitWatch:
    """What a step needs of whatever tells it that a task ended: ProcessWatch here,
    monitor.MonitoredProcess, container.PolledContainer, and recovery's watches.

    `status` is None until the end is known; then the exit code, or 128+N for signal N
    (with status_known False, a stand-in that must be reported as unknown). The other
    methods: wait() for the status, poll() without blocking, send_signal() to the process
    (False once it has ended), kill_group() for its process group, reap() to release it.
    """

    pid: int | None
    status_known: bool = True
    _status: int | None = None

    @property
    def status(self) -> int | None:
        return self._status

    @property
    def running(self) -> bool:
        return self._status is None


class ProcessWatch(ExitWatch):
    """Created in any thread (spawning may run off the loop); waited on in the loop's."""

    def __init__(self, pid: int, pidfd: int, *, child: bool = True) -> None:
        self.pid = pid
        self.child = child
        self._pidfd: int | None = pidfd
        self._status: int | None = None
        self.status_known = True  # False only for a non-child whose exit status the kernel never gave us
        self._exited: asyncio.Future[int] | None = None
        self._reading = False
        if child:
            CLAIMED.add(pid)

    @classmethod
    def open(cls, pid: int) -> "ProcessWatch":
        """Watch a child we just spawned. Our child cannot be reaped by anyone else, so the pid is still ours."""
        return cls(pid, os.pidfd_open(pid))

    @classmethod
    def adopt(cls, pid: int, uid: int, start: int | None = None) -> "ProcessWatch":
        """Watch a process a runtime named (a container's init), checking it is the one it should be.

        The pid is pinned by the pidfd first; then /proc must show it running as `uid` (a
        recycled pid would belong to someone else) and, given `start` (a start time
        recorded earlier, see start_time), started at that very time. One that has already
        exited is fine: its status is still to be had. Raises NotWatchable.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError) as e:
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
            os.close(pidfd)
            raise
        return cls(pid, pidfd, child=ppid == os.getpid())

    async def wait(self) -> int:
        if self._status is not None:
            return self._status
        if self._exited is None:
            loop = asyncio.get_running_loop()
            self._exited = loop.create_future()
            if self._pidfd is not None:
                self._reading = True
                loop.add_reader(self._pidfd, self._on_readable)
                self._peek()  # it may have ended before we started watching
        return await asyncio.shield(self._exited)

    def poll(self) -> int | None:
        """The exit status if the process has ended (without reaping it), else None. Never blocks."""
        self._peek()
        return self._status

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
        info = os.waitid(os.P_PIDFD, self._pidfd, _WAIT_FLAGS | os.WNOWAIT)
        if info is None:
            return False  # still running (or a spurious wake-up)
        self._set_status(exit_status(info))
        return True

    def _peek_non_child(self) -> bool:
        assert self._pidfd is not None
        if not _pidfd_readable(self._pidfd):
            return False  # still running
        status = pidfd_exit_status(self._pidfd)
        if status is not None:
            self._set_status(status)
        elif self._reading:
            self._stop_reading()  # stays readable from now on: wait for the parent's reap instead
            asyncio.get_running_loop().call_later(_EXIT_INFO_DELAYS[0], self._retry_exit_info, 1)
        return True

    def _retry_exit_info(self, attempt: int) -> None:
        if self._pidfd is None or self._status is not None:
            return
        status = pidfd_exit_status(self._pidfd)
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
            asyncio.get_running_loop().remove_reader(self._pidfd)
            self._reading = False

    def send_signal(self, sig: int) -> bool:
        """Signal the process itself. False when it has already exited."""
        if self._pidfd is None or self._peek():
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self, sig: int) -> None:
        """Signal the process group this process leads (its pid). Safe until reap(): the
        unreaped leader keeps the group id from being reused."""
        if self._pidfd is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def reap(self) -> None:
        """Collect the zombie and release the pidfd. The one place a watched process is released.

        The process must have exited (kill it and wait() first): reaping never blocks.
        A non-child is reaped by its own parent; here only the pidfd is released.
        """
        if self._pidfd is None:
            return
        if self.child:
            info = os.waitid(os.P_PIDFD, self._pidfd, _WAIT_FLAGS)
            if info is None:
                raise RuntimeError(f"pid {self.pid} is still running: reap() needs it to have exited")
            if self._status is None:
                self._set_status(exit_status(info))
            CLAIMED.discard(self.pid)
        self._stop_reading()
        os.close(self._pidfd)
        self._pidfd = None

    def __del__(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            if self.child:
                CLAIMED.discard(self.pid)
