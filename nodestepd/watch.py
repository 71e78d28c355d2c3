"""Watching processes through pidfds on the event loop: no timers, no SIGCHLD, no waitpid(-1).

A ProcessWatch owns one pidfd. The exit status is read with WNOWAIT first, so the
process stays a zombie (and its pid, and the process group it leads, stay reserved)
until `reap()`: nothing that runs after the exit, RunTimeKill with `%p` or a final
SIGKILL to the group, can hit a recycled pid.
"""

from __future__ import annotations

import asyncio
import os
import signal

_WAIT_FLAGS = os.WEXITED | os.WNOHANG


def exit_status(info: os.waitid_result) -> int:
    """Shell convention: the exit code, or 128+N for death by signal N."""
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return 128 + info.si_status  # CLD_KILLED, CLD_DUMPED


class ProcessWatch:
    """Created in any thread (spawning may run off the loop); waited on in the loop's."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._status: int | None = None
        self._exited: asyncio.Future[int] | None = None
        self._reading = False

    @classmethod
    def open(cls, pid: int) -> "ProcessWatch":
        """Watch a child we just spawned. Our child cannot be reaped by anyone else, so the pid is still ours."""
        return cls(pid, os.pidfd_open(pid))

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
                loop.add_reader(self._pidfd, self._on_readable)
                self._peek()  # it may have ended before we started watching
        return await asyncio.shield(self._exited)

    def _on_readable(self) -> None:
        self._peek()

    def _peek(self) -> bool:
        """Record the exit status if the process has ended, without reaping it. True if it has."""
        if self._status is not None:
            return True
        if self._pidfd is None:
            return False
        info = os.waitid(os.P_PIDFD, self._pidfd, _WAIT_FLAGS | os.WNOWAIT)
        if info is None:
            return False  # still running (or a spurious wake-up)
        self._set_status(exit_status(info))
        return True

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
        """
        if self._pidfd is None:
            return
        info = os.waitid(os.P_PIDFD, self._pidfd, _WAIT_FLAGS)
        if info is None:
            raise RuntimeError(f"pid {self.pid} is still running: reap() needs it to have exited")
        if self._status is None:
            self._set_status(exit_status(info))
        self._stop_reading()
        os.close(self._pidfd)
        self._pidfd = None

    def __del__(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
