"""One client connection on the event loop: framed messages with file descriptors.

asyncio's streams read eagerly and drop ancillary data, so this reads with recvmsg
itself, waking on readiness from the loop (add_reader), never polling.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket

import msgspec

from nodestepd.process.kernel import peer_credentials
from nodestepd.protocol import messages as protocol
from nodestepd.protocol.messages import ProtocolError

_RECV_CHUNK = 64 * 1024
_ANCILLARY = socket.CMSG_SPACE(protocol.MAX_FDS * array.array("i").itemsize)


class ConnectionClosed(Exception):
    pass


class Connection:
    def __init__(
        self, sock: socket.socket, *, max_message: int = protocol.MAX_MESSAGE, send_timeout: float | None = None
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_message = max_message
        # A peer that stops reading must not hold a handler forever on a full socket buffer.
        self.send_timeout = send_timeout
        self._buffer = bytearray()
        self._offset = 0  # stream offset of self._buffer[0]
        # (stream offset of the last byte of the recvmsg chunk they came with, fds). The
        # kernel ends a read right after the segment that carried fds, and a client sends
        # a message's fds with its first bytes in one sendmsg, so a batch belongs to the
        # message that holds the last byte of its chunk.
        self._fd_batches: list[tuple[int, list[int]]] = []
        self._eof = False
        self.peer_pid, self.peer_uid, self.peer_gid = peer_credentials(sock)

    async def receive(self) -> tuple[bytes, list[int]] | None:
        """The next message body and the fds that came with it, or None at end of stream.

        Raises ProtocolError for an oversized message (the stream cannot be trusted after
        that) and ConnectionClosed when the peer vanished mid-message.
        """
        while True:
            if len(self._buffer) >= protocol.HEADER.size:
                length = protocol.frame_length(bytes(self._buffer[: protocol.HEADER.size]), self.max_message)
                end = protocol.HEADER.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[protocol.HEADER.size : end])
                    del self._buffer[:end]
                    fds = self._take_fds(self._offset + end)
                    self._offset += end
                    return body, fds
            if self._eof:
                if self._buffer:
                    self._close_fds()
                    raise ConnectionClosed("peer closed the connection in the middle of a message")
                return None
            await self._readable()
            self._read_some()

    def _take_fds(self, message_end: int) -> list[int]:
        """The fds of every batch whose chunk ended inside the message now complete."""
        fds: list[int] = []
        while self._fd_batches and self._fd_batches[0][0] < message_end:
            fds.extend(self._fd_batches.pop(0)[1])
        return fds

    def _read_some(self) -> None:
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(_RECV_CHUNK, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self._eof = True
            return
        received: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                received.extend(fds)
        if received:
            last_byte = self._offset + len(self._buffer) + len(data) - 1
            self._fd_batches.append((last_byte, received))
        if flags & socket.MSG_CTRUNC or len(received) > protocol.MAX_FDS:
            self._close_fds()
            raise ProtocolError(f"too many file descriptors in one message (at most {protocol.MAX_FDS})")
        if not data:
            self._eof = True
        self._buffer.extend(data)

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
        """False when the peer is gone or stopped reading: replies to a vanished client are not an error.

        After a timed-out send the stream may hold half a reply: the connection is shut down.
        """
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_sendall(self.sock, protocol.frame(message)), self.send_timeout
            )
        except (BrokenPipeError, ConnectionResetError):
            return False
        except TimeoutError:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        return True

    def _close_fds(self) -> None:
        for _, fds in self._fd_batches:
            for fd in fds:
                os.close(fd)
        self._fd_batches = []

    def close(self) -> None:
        self._close_fds()
        self.sock.close()
