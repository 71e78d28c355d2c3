"""A stand-in for nodestepd on a Unix socket, for the client's tests without a daemon.

fake_daemon(serve) listens on a new socket and hands each connection, as a Peer, to
serve() in a thread. At the end of the test it checks that serve() ran to its end and
raises what it raised, so an assertion that fails in the fake's script fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator

import pytest

from nodestepd.protocol import wire


class Peer:
    """The daemon's end of one connection: messages in (with the fds passed along), replies out."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)  # a client that never sends what the script waits for fails the test, not hangs it
        self.buffer = b""
        self.fds: list[int] = []  # every fd received, closed by close()

    def read(self) -> tuple[dict, list[int]]:
        """The next message and the fds that came with it; EOFError when the client closed."""
        fds: list[int] = []
        while True:
            if len(self.buffer) >= wire.HEADER.size:
                end = wire.HEADER.size + wire.frame_length(self.buffer[:wire.HEADER.size])
                if len(self.buffer) >= end:
                    body, self.buffer = self.buffer[wire.HEADER.size:end], self.buffer[end:]
                    return json.loads(body), fds
            data, received, _, _ = socket.recv_fds(self.sock, 65536, wire.MAX_FDS)
            self.fds += received
            fds += received
            if not data:
                raise EOFError("the client closed the connection")
            self.buffer += data

    def write(self, message: dict) -> None:
        self.sock.sendall(wire.frame_dict(message))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


class FakeDaemon:
    def __init__(self, path: str, serve: Callable[[Peer], None], connections: int) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, args=(serve, connections), daemon=True)
        self.thread.start()

    def _serve(self, serve: Callable[[Peer], None], connections: int) -> None:
        for _ in range(connections):
            try:
                sock, _ = self.listener.accept()
            except OSError as e:  # stop() woke us: the client never came
                self.errors.append(AssertionError(f"the client did not connect: {e}"))
                return
            peer = Peer(sock)
            try:
                serve(peer)
            except BaseException as e:  # raised in the test by stop()
                self.errors.append(e)
            finally:
                peer.close()

    def stop(self) -> None:
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a thread still in accept()
            self.thread.join(timeout=10)
        self.listener.close()
        assert not self.thread.is_alive(), "the fake daemon is stuck in its script"
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def fake_daemon() -> Iterator[Callable[..., FakeDaemon]]:
    """fake_daemon(serve, connections=1) -> a FakeDaemon at a new socket path (its .path)."""
    made: list[FakeDaemon] = []
    # Not under tmp_path: a socket's path must fit in 108 bytes, and test names are long.
    directory = tempfile.mkdtemp(prefix="nsdctl-")

    def make(serve: Callable[[Peer], None], connections: int = 1) -> FakeDaemon:
        daemon = FakeDaemon(os.path.join(directory, f"{len(made)}.sock"), serve, connections)
        made.append(daemon)
        return daemon

    try:
        yield make
        for daemon in made:
            daemon.stop()
    finally:
        shutil.rmtree(directory)
