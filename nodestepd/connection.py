"""One client connection on the event loop: framed messages with file descriptors.

asyncio's streams read eagerly and drop ancillary data, so this reads with recvmsg
itself, waking on readiness from the loop (add_reader), never polling.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct

import msgspec

from . import protocol
from .protocol import ProtocolError

_RECV_CHUNK = 64 * 1024
_ANCILLARY = socket.CMSG_SPACE(protocol.MAX_FDS * array.array("i").itemsize)


class ConnectionClosed(Exception):
    pass


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._eof = False
        self.peer_pid, self.peer_uid, self.peer_gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )

    async def receive(self) -> tuple[bytes, list[int]] | None:
        """The next message body and the fds that came with it, or None at end of stream.

        Raises ProtocolError for an oversized message (the stream cannot be trusted after
        that) and ConnectionClosed when the peer vanished mid-message.
        """
        while True:
            if len(self._buffer) >= protocol.HEADER.size:
                length = protocol.frame_length(bytes(self._buffer[: protocol.HEADER.size]))
                end = protocol.HEADER.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[protocol.HEADER.size : end])
                    del self._buffer[:end]
                    fds, self._fds = self._fds, []
                    return body, fds
            if self._eof:
                if self._buffer:
                    self._close_fds()
                    raise ConnectionClosed("peer closed the connection in the middle of a message")
                return None
            await self._readable()
            self._read_some()

    def _read_some(self) -> None:
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(_RECV_CHUNK, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self._eof = True
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self._close_fds()
            raise ProtocolError(f"too many file descriptors in one message (at most {protocol.MAX_FDS})")
        if not data:
            self._eof = True
        self._buffer.extend(data)
        if len(self._fds) > protocol.MAX_FDS:
            self._close_fds()
            raise ProtocolError(f"too many file descriptors in one message (at most {protocol.MAX_FDS})")

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    async def send(self, message: msgspec.Struct) -> bool:
        """False when the peer is gone: replies to a vanished client are not an error."""
        try:
            await asyncio.get_running_loop().sock_sendall(self.sock, protocol.frame(message))
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> None:
        self._close_fds()
        self.sock.close()
