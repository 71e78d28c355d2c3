"""One client connection on the event loop: framed messages with file descriptors.

asyncio's streams read eagerly and drop ancillary data, so this reads with recvmsg
itself, waking on readiness from the loop (add_reader), never polling.
"""

from __future__ import annotations

import array
import asyncio
import socket
from collections.abc import Iterable

import msgspec

from nodestepd.daemon.closer import FdCloser
from nodestepd.protocol import messages as protocol
from nodestepd.protocol.messages import ProtocolError

_RECV_CHUNK = 64 * 1024
# Room for as many fds as the kernel passes in one sendmsg (SCM_MAX_FD): with less, recvmsg
# drops the excess itself, and the last close of a dropped fd (a lingering socket's, say)
# would run on the loop's thread (closer.py). Every fd is received, then refused here.
_SCM_MAX_FD = 253
_ANCILLARY = socket.CMSG_SPACE(_SCM_MAX_FD * array.array("i").itemsize)
# The fds a connection may hold that no request has taken yet: one message's, and the
# first batch of the next one, read along with the end of the first.
MAX_HELD_FDS = 2 * protocol.MAX_FDS


class ConnectionClosed(Exception):
    pass


class Connection:
    def __init__(
        self, sock: socket.socket, peer: tuple[int, int, int], *, closer: FdCloser, account: int | None = None,
        max_message: int = protocol.MAX_MESSAGE, send_timeout: float | None = None,
    ) -> None:
        """peer: (pid, uid, gid) of the client, from the kernel (process/kernel.py peer_credentials).
        account: whose the connection counts as (server.py; default: the peer's uid). The
        fds it receives and its socket are closed by `closer`, off the loop."""
        sock.setblocking(False)
        self.closer = closer
        self.sock = sock
        self.max_message = max_message
        # A peer that stops reading must not hold a handler forever on a full socket buffer.
        self.send_timeout = send_timeout
        self._buffer = bytearray()
        self._offset = 0  # stream offset of self._buffer[0]
        # (stream offset of the last byte of the recvmsg chunk they came with, stream offset
        # of the message that byte is in, fds). The kernel ends a read right after the
        # segment that carried fds, and a client sends a message's fds with its first bytes
        # in one sendmsg, so a batch belongs to the message that holds the last byte of its
        # chunk: fds are counted per message, however many reads it takes to arrive.
        self._fd_batches: list[tuple[int, int, list[int]]] = []
        self._eof = False
        self.peer_pid, self.peer_uid, self.peer_gid = peer
        self.account = self.peer_uid if account is None else account

    async def receive(self) -> tuple[bytes, list[int]] | None:
        """The next message body and the fds that came with it, or None at end of stream.

        Raises ProtocolError for an oversized message (the stream cannot be trusted after
        that) and ConnectionClosed when the peer vanished mid-message.
        """
        # A request has usually arrived by the time it is asked for (a client sends its
        # request right after connecting): the first read is tried at once, without a
        # round through the loop. Later ones wait for the socket to be readable, so that
        # a large message is read a chunk per turn of the loop.
        waited = False
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
                    self._release_fds()
                    raise ConnectionClosed("peer closed the connection in the middle of a message")
                return None
            if waited:
                await self._readable()
            waited = True
            self._read_some()

    def _take_fds(self, message_end: int) -> list[int]:
        """The fds of every batch whose chunk ended inside the message now complete."""
        fds: list[int] = []
        while self._fd_batches and self._fd_batches[0][0] < message_end:
            fds.extend(self._fd_batches.pop(0)[2])
        return fds

    def _message_start(self, offset: int) -> int:
        """The stream offset of the message that holds stream byte `offset` (in the buffer)."""
        pos = 0
        while pos + protocol.HEADER.size <= len(self._buffer):
            end = pos + protocol.HEADER.size + protocol.frame_length(
                bytes(self._buffer[pos : pos + protocol.HEADER.size]), self.max_message)
            if offset - self._offset < end:
                break
            pos = end
        return self._offset + pos

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
        if not data:
            self._eof = True
        start = len(self._buffer)
        self._buffer.extend(data)
        if received:
            # Held until the message is complete, and counted now: a message whose bytes
            # trickle in must not gather fds without bound in the meantime (issue 19.4).
            last_byte = self._offset + start + max(len(data), 1) - 1
            try:
                message = self._message_start(last_byte)
            except ProtocolError:  # an oversized header: the batch is still ours to release
                self._fd_batches.append((last_byte, -1, received))
                raise
            self._fd_batches.append((last_byte, message, received))
            in_message = sum(len(fds) for _, m, fds in self._fd_batches if m == message)
            if in_message > protocol.MAX_FDS or sum(len(fds) for _, _, fds in self._fd_batches) > MAX_HELD_FDS:
                raise ProtocolError(f"too many file descriptors in one message (at most {protocol.MAX_FDS})")
        if flags & socket.MSG_CTRUNC:
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
        """False when the peer is gone or stopped reading: replies to a vanished client are not an error.

        After a timed-out send the stream may hold half a reply: the connection is shut down.
        """
        try:
            async with asyncio.timeout(self.send_timeout):  # a timeout scope: no task made per send
                await asyncio.get_running_loop().sock_sendall(self.sock, protocol.frame(message))
        except (BrokenPipeError, ConnectionResetError):
            return False
        except TimeoutError:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        return True

    def release(self, fds: Iterable[int | None]) -> None:
        """Hand fds this connection's client sent (or that were opened for it) to the closer."""
        self.closer.close(fds, self.account)

    def _release_fds(self) -> None:
        batches, self._fd_batches = self._fd_batches, []
        self.release(fd for _, _, fds in batches for fd in fds)

    def close(self) -> None:
        """Let go of the fds not taken by a request, and of the socket (what may still be in
        flight in it, fds among it, goes when the kernel drops it): both off the loop."""
        self._release_fds()
        if self.sock.fileno() >= 0:
            self.closer.close_socket(self.sock, self.account)
