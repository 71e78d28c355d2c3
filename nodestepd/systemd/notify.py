"""Talking to the service manager: sd_notify datagrams and the watchdog setting.

The protocol (sd_notify(3)): newline-separated VAR=value assignments in one datagram
sent to the AF_UNIX socket named by NOTIFY_SOCKET; a leading '@' names an abstract
socket. systemd is not needed: a test can bind a datagram socket and read what we say.
"""

from __future__ import annotations

import socket
import time
from typing import Mapping

from nodestepd.logs import get_logger


class WatchdogSettingError(ValueError):
    """WATCHDOG_USEC or WATCHDOG_PID is set but unusable."""


def notify_address(value: str) -> str:
    """NOTIFY_SOCKET's value as an address for socket.sendto: '@name' is the abstract '\\0name'."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if not value.startswith("/"):
        raise ValueError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an abstract '@' address")
    return value


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """How often to send WATCHDOG=1, in seconds: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

    None when no watchdog is asked for, or when WATCHDOG_PID names another process (the
    setting was inherited and is not ours). Raises WatchdogSettingError on values that
    are not numbers.
    """
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            watchdog_pid = int(pid_text)
        except ValueError:
            raise WatchdogSettingError(f"WATCHDOG_PID={pid_text!r} is not a process id") from None
        if watchdog_pid != pid:
            return None
    try:
        usec = int(usec_text)
    except ValueError:
        raise WatchdogSettingError(f"WATCHDOG_USEC={usec_text!r} is not a number of microseconds") from None
    if usec <= 0:
        raise WatchdogSettingError(f"WATCHDOG_USEC={usec_text!r} must be positive")
    return usec / 2 / 1_000_000


class Notifier:
    """Sends notifications to NOTIFY_SOCKET; without it every call does nothing.

    Sends never block the event loop (MSG_DONTWAIT): a manager that stopped reading gets
    a logged warning, once, and the daemon goes on.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> "Notifier":
        value = env.get("NOTIFY_SOCKET")
        return cls(notify_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> None:
        """Send VAR=value assignments in one datagram (sent together, applied together)."""
        if self._sock is None:
            return
        for a in assignments:
            if "\n" in a or "=" not in a:
                raise ValueError(f"not a single VAR=value assignment: {a!r}")
        try:
            self._sock.sendto("\n".join(assignments).encode(), socket.MSG_DONTWAIT, self.address)
        except OSError as e:
            if not self._warned:
                self._warned = True
                display = self.address.replace("\0", "@") if self.address else self.address
                get_logger().warning(
                    "cannot notify the service manager (further failures are not logged)",
                    notify_socket=display, error=str(e),
                )

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def status_line(text: str, limit: int = 200) -> str:
    """A STATUS= value: one line, bounded (systemctl status shows it on one line)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: systemd 253+ wants it with RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
