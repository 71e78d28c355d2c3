"""Socket activation: the listening socket the service manager passes (sd_listen_fds(3)).

The manager binds the socket (systemd/nodestepd.socket) and starts the daemon with the
socket as fd 3 and LISTEN_FDS=1, LISTEN_PID=<the daemon's pid>, LISTEN_FDNAMES. Clients
that connect before the daemon runs wait in the socket's backlog and are served once it
does. The daemon serves exactly one socket, so anything else passed is an error, never
guessed around.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

SD_LISTEN_FDS_START = 3
ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The manager passed something the daemon cannot serve; the message says what and why."""


@dataclass(frozen=True)
class PassedSockets:
    """What LISTEN_* announce: `count` fds from SD_LISTEN_FDS_START, with their names."""

    count: int
    names: tuple[str, ...]


def parse_listen_env(env: Mapping[str, str], pid: int) -> PassedSockets | None:
    """The sockets LISTEN_* announce for process pid; None when there are none (bind as usual)."""
    fds_text = env.get("LISTEN_FDS")
    if fds_text is None:
        return None
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        raise ActivationError("LISTEN_FDS is set without LISTEN_PID: cannot tell whom the sockets are for")
    try:
        listen_pid = int(pid_text)
    except ValueError:
        raise ActivationError(f"LISTEN_PID={pid_text!r} is not a process id") from None
    if listen_pid != pid:
        raise ActivationError(
            f"LISTEN_PID={listen_pid} is not this process ({pid}): the sockets were passed to another "
            "process and the variables inherited; unset LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES"
        )
    try:
        count = int(fds_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={fds_text!r} is not a number") from None
    if count < 0:
        raise ActivationError(f"LISTEN_FDS={count} is negative")
    names_text = env.get("LISTEN_FDNAMES")
    names = tuple(names_text.split(":")) if names_text else ()
    if names and len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES={names_text!r} names {len(names)} sockets but LISTEN_FDS={count}")
    return PassedSockets(count, names)


def listener_from_fd(fd: int, name: str = "") -> socket.socket:
    """The passed fd as our listening socket, after checking it is one we can serve.

    Takes ownership of fd (made close-on-exec: the runtimes must never inherit it).
    """
    what = f"passed fd {fd}" + (f" ({name})" if name else "")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ActivationError(f"{what} is not a socket: {e.strerror}") from None
    try:
        if sock.family != socket.AF_UNIX:
            raise ActivationError(f"{what} is a {sock.family.name} socket; nodestepd serves a Unix socket (ListenStream=/path)")
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(f"{what} is a {sock.type.name} socket; nodestepd needs SOCK_STREAM (ListenStream=)")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(f"{what} is not listening (Accept=yes is not supported; use Accept=no)")
    except BaseException:
        sock.detach()  # not ours to close: report, and let the caller decide
        raise
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


def activated_listener(env: Mapping[str, str], pid: int, first_fd: int = SD_LISTEN_FDS_START) -> socket.socket | None:
    """The listening socket passed by the service manager, validated; None when not socket-activated."""
    passed = parse_listen_env(env, pid)
    if passed is None:
        return None
    if passed.count != 1:
        names = f" ({', '.join(passed.names)})" if passed.names else ""
        raise ActivationError(
            f"the service manager passed {passed.count} sockets{names}; nodestepd serves exactly one "
            "(one ListenStream= in nodestepd.socket)"
        )
    return listener_from_fd(first_fd, passed.names[0] if passed.names else "")


def socket_path(sock: socket.socket) -> str:
    """The path a Unix socket is bound to ('@name' for an abstract one, '' when unnamed)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name else ""
    return name
