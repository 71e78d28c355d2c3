"""The listening socket: one the daemon binds itself, or the one systemd passed.

Like aiohttp's UnixSite and SockSite, one object each: they differ in where the socket
comes from and in what closing means. A socket we bound is ours and its file goes with
it; a passed socket is the service manager's, and clients that connect while we are down
wait in it for the next start.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import MutableMapping
from typing import Protocol

from nodestepd.systemd.activation import ACTIVATION_VARIABLES, activated_listener, socket_path


class Listener(Protocol):
    sock: socket.socket
    path: str  # where clients connect
    passed: bool  # by the service manager

    def close(self) -> None: ...


class BoundListener:
    passed = False

    def __init__(self, path: str) -> None:
        """Bind path, replacing a stale socket but never a live daemon's. Raises OSError."""
        self.path = path
        self.sock = _bind(path)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class PassedListener:
    passed = True

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.path = socket_path(sock)

    @classmethod
    def take(cls, env: MutableMapping[str, str], pid: int) -> PassedListener | None:
        """The socket the service manager passed, if any (ActivationError when it is unusable).
        The LISTEN_* variables are consumed (as sd_listen_fds(1) does), so nothing started
        later mistakes them for its own."""
        try:
            sock = activated_listener(env, pid)
        finally:
            for name in ACTIVATION_VARIABLES:
                env.pop(name, None)
        return None if sock is None else cls(sock)

    def close(self) -> None:
        self.sock.close()  # the manager's socket stays bound: only our fd goes


def _bind(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody is listening
        else:
            raise OSError(f"another nodestepd is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    # Every local user may connect: who may do what is decided per request from SO_PEERCRED.
    os.chmod(path, 0o666)
    sock.listen(128)
    sock.setblocking(False)
    return sock
