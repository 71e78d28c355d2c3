"""Talking to nodestepd over its Unix socket: one request, one connection, synchronously.

Messages are plain dicts framed by nodestepd.protocol.wire (docs/protocol.md lists their
fields); the daemon validates them. Standard library and wire only: this module is on
every launch's path (bench/driver.py uses it too). It uses _socket, the C half of the
socket module: socket.py imports enum and selectors, milliseconds of the client's start.
"""

from __future__ import annotations

import _socket
import sys

from nodestepd.ctl.exits import EXIT_ERROR, ClientError
from nodestepd.protocol import wire
from nodestepd.protocol.wire import ProtocolError


class ConnectionLost(ClientError):
    """The daemon closed the connection while we were sending."""


class Connection(_socket.socket):
    """A connected socket, closed at the end of a `with` block as socket.socket is."""

    __slots__ = ()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unix_socket() -> Connection:
    return Connection(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)


def connect(path: str) -> Connection:
    sock = _unix_socket()
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise ClientError(f"nodestepd is not running: no socket at {path} (set --socket or NODESTEPD_SOCKET)") from None
    except PermissionError:
        raise ClientError(f"cannot connect to {path}: permission denied") from None
    except ConnectionRefusedError:
        raise ClientError(f"nodestepd is not running: nobody listens on {path}") from None
    return sock


def try_connect(path: str) -> Connection | None:
    """A connection to the daemon at `path`, or None while no daemon serves there yet (the
    socket missing, nobody listening, or not yet open to everyone: a daemon starting up)."""
    sock = _unix_socket()
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, PermissionError):
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    return sock


def send(sock: _socket.socket, message: dict, fds: list[int] | None = None) -> None:
    """Send one message (with the protocol version added), passing `fds` along with it."""
    data = wire.frame_dict({"v": wire.VERSION, **message})
    try:
        if fds:
            rights = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)  # C ints
            ancillary = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)]
            sent = sock.sendmsg([data], ancillary)
            data = data[sent:]
        if data:  # sendall(b"") still calls send(): EPIPE if the daemon already answered and closed
            sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        raise ConnectionLost("nodestepd closed the connection before the request was sent") from None


def _recv_exact(sock: _socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(n - len(chunks))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks.extend(chunk)
    return bytes(chunks)


def receive(sock: _socket.socket) -> dict | None:
    """The next reply, or None when the daemon closed the connection."""
    header = _recv_exact(sock, wire.HEADER_SIZE)
    if header is None:
        return None
    body = _recv_exact(sock, wire.frame_length(header))
    if body is None:
        return None
    try:
        reply = wire.loads(body)
    except ValueError as e:
        raise ProtocolError(f"malformed reply from nodestepd: {e}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("type"), str):
        raise ProtocolError("malformed reply from nodestepd: no type")
    return reply


def expect(reply: dict | None, kind: str, status: int = EXIT_ERROR) -> dict:
    """The reply if it is of `kind`; otherwise a ClientError exiting with the daemon's status, or `status`."""
    if reply is None:
        raise ClientError("nodestepd closed the connection without replying", status)
    if reply["type"] == "error":
        raise ClientError(reply.get("error", "unknown error"), reply.get("status") or status)
    if reply["type"] != kind:
        raise ClientError(f"unexpected reply from nodestepd: {reply['type']!r} instead of {kind!r}", status)
    return reply


def request(path: str, message: dict, kind: str) -> dict:
    """One message to the daemon at `path` and its one reply, which must be of `kind`."""
    with connect(path) as sock:
        send(sock, message)
        return expect(receive(sock), kind)
