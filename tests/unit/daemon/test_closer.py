"""daemon/closer.py and the fd counting of daemon/connection.py, with real sockets (no root needed)."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import struct
import time

import pytest

from nodestepd.daemon.closer import FdCloser
from nodestepd.daemon.connection import Connection
from nodestepd.protocol.messages import ProtocolError


def lingering_socket() -> tuple[socket.socket, socket.socket]:
    """(listener, sock): sock's last close blocks until the listener is closed (its peer is
    reset then): the listener never accepts, sock's send buffer is full, SO_LINGER {1, 3600}."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    sock = socket.create_connection(listener.getsockname())
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.send(b"x" * 65536)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
    return listener, sock


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.01)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_stuck_close_holds_up_only_its_own_lane():
    closer = FdCloser()
    listener, stuck = lingering_socket()
    stuck_fd = stuck.detach()
    try:
        closer.close([stuck_fd], account=1)
        wait_until(lambda: not is_open(stuck_fd))  # being closed: gone from the table, the call still blocked
        time.sleep(0.2)
        assert closer.backlog(1) == 1  # still in close(2)
        other = os.open(os.devnull, os.O_RDONLY)
        closer.close([other, None], account=2)
        wait_until(lambda: closer.backlog(2) == 0)  # another user's close is not held up
        assert not is_open(other)
    finally:
        listener.close()  # the lingering peer is reset: its close returns
    wait_until(lambda: closer.backlog(1) == 0)
    wait_until(lambda: closer.threads == 0)


def test_threads_are_bounded_and_waiting_lanes_are_worked_later():
    closer = FdCloser(max_threads=1)
    listener, stuck = lingering_socket()
    try:
        closer.close([stuck.detach()], account=1)
        other = os.open(os.devnull, os.O_RDONLY)
        closer.close([other], account=2)
        time.sleep(0.2)
        assert (closer.threads, closer.backlog(2)) == (1, 1)  # lane 2 waits for the one thread
    finally:
        listener.close()
    wait_until(lambda: closer.backlog(2) == 0 and closer.threads == 0)
    assert not is_open(other)


def _rights(fds: list[int]) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY)
    yield ours, theirs, null
    theirs.close()
    os.close(null)


async def test_fds_are_counted_per_message_not_per_read(pair):
    """Issue 19.4: fds with each byte of a message still incomplete were within the limit
    of every recvmsg, and piled up."""
    ours, theirs, null = pair
    conn = Connection(ours, (1, os.getuid(), os.getgid()), closer=FdCloser())
    theirs.sendmsg([struct.pack(">I", 100) + b"{"], _rights([null] * 6))
    theirs.sendmsg([b" "], _rights([null] * 6))
    with pytest.raises(ProtocolError, match=r"too many file descriptors in one message \(at most 11\)"):
        await conn.receive()
    conn.close()


async def test_a_message_with_more_fds_than_eleven_in_one_read_is_refused(pair):
    ours, theirs, null = pair
    conn = Connection(ours, (1, os.getuid(), os.getgid()), closer=FdCloser())
    theirs.sendmsg([struct.pack(">I", 2) + b"{}"], _rights([null] * 12))
    with pytest.raises(ProtocolError, match=r"too many file descriptors in one message \(at most 11\)"):
        await conn.receive()
    conn.close()


async def test_each_message_keeps_its_own_fds(pair):
    ours, theirs, null = pair
    conn = Connection(ours, (1, os.getuid(), os.getgid()), closer=FdCloser())
    body = b'{"v":1,"op":"status"}'
    for _ in range(3):
        theirs.sendmsg([struct.pack(">I", len(body)) + body[:3]], _rights([null] * 3))
        theirs.sendall(body[3:])
    for _ in range(3):
        got, fds = await conn.receive()
        assert got == body and len(fds) == 3
        conn.release(fds)
    conn.close()
