"""One connection to nodestepd on the running event loop: framed messages out (the first
may carry file descriptors), replies in. Non-blocking sockets and the loop's sock_*
methods only, which plain asyncio and uvloop both provide: no thread per connection.
"""

from __future__ import annotations

import array
import asyncio
import json
import socket
from collections.abc import Sequence
from typing import Any

from nodestepd.client.errors import DaemonUnavailable, ProtocolError, socket_unavailable
from nodestepd.protocol import wire

# A Unix socket's connect() fails with EAGAIN while the daemon's listen backlog is full
# (a program launching hundreds of steps at once): tried again, backing off, this long.
BACKLOG_RETRY_FIRST, BACKLOG_RETRY_MAX, BACKLOG_PATIENCE = 0.001, 0.05, 30.0


class Lost(Exception):
    """The daemon closed the connection while we were sending."""


async def open_connection(path: str) -> Connection:
    """A connection to the daemon at `path`; DaemonUnavailable when none serves there."""
    loop = asyncio.get_running_loop()
    delay, deadline = BACKLOG_RETRY_FIRST, loop.time() + BACKLOG_PATIENCE
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)  # a Unix socket connects at once, or not at all: never EINPROGRESS
            return Connection(sock)
        except (BlockingIOError, InterruptedError) as e:
            sock.close()
            if loop.time() >= deadline:
                raise socket_unavailable(path, e) from None
        except OSError as e:
            sock.close()
            raise socket_unavailable(path, e) from None
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKLOG_RETRY_MAX)


async def try_connection(path: str) -> Connection | None:
    """A connection, or None while no daemon serves at `path` (one restarting)."""
    try:
        return await open_connection(path)
    except DaemonUnavailable:
        return None


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._sending = asyncio.Lock()  # one message at a time: concurrent signals must not interleave

    async def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """One message (the protocol version added), `fds` riding on its first bytes; Lost
        when the daemon has closed the connection."""
        data = wire.frame_dict({"v": wire.VERSION, **message})
        async with self._sending:
            try:
                if fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    while True:
                        try:
                            sent = self.sock.sendmsg([data], ancillary)
                            break
                        except (BlockingIOError, InterruptedError):
                            await self._writable()
                    data = data[sent:]
                if data:
                    await self._loop.sock_sendall(self.sock, data)
            except (BrokenPipeError, ConnectionResetError):
                raise Lost("nodestepd closed the connection") from None

    async def _writable(self) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()
        fd = self.sock.fileno()

        def writable() -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._loop.add_writer(fd, writable)
        try:
            await waiter
        finally:
            self._loop.remove_writer(fd)

    async def receive(self) -> dict[str, Any] | None:
        """The next reply, or None when the daemon closed the connection."""
        while True:
            if len(self._buffer) >= wire.HEADER.size:
                try:
                    length = wire.frame_length(bytes(self._buffer[:wire.HEADER.size]))
                except wire.ProtocolError as e:
                    raise ProtocolError(f"malformed reply from nodestepd: {e}") from None
                end = wire.HEADER.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[wire.HEADER.size:end])
                    del self._buffer[:end]
                    return _decode(body)
            try:
                chunk = await self._loop.sock_recv(self.sock, 65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def close(self) -> None:
        self.sock.close()


def _decode(body: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"malformed reply from nodestepd: {e}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("type"), str):
        raise ProtocolError("malformed reply from nodestepd: no type")
    return reply
