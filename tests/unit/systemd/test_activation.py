"""Socket activation: what LISTEN_* announce and what a passed fd must be, on real sockets."""

from __future__ import annotations

import os
import socket

import pytest

from nodestepd.systemd.activation import (
    ActivationError,
    PassedSockets,
    activated_listener,
    listener_from_fd,
    parse_listen_env,
    socket_path,
)


def test_not_activated():
    assert parse_listen_env({}, 42) is None
    assert activated_listener({"PATH": "/bin"}, 42) is None


def test_announced_sockets():
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "nodestepd.socket"}
    assert parse_listen_env(env, 42) == PassedSockets(1, ("nodestepd.socket",))
    assert parse_listen_env({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == PassedSockets(2, ())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_FDS": "1"}, "without LISTEN_PID"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "41"}, "LISTEN_PID=41 is not this process \\(42\\)"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "x"}, "LISTEN_PID='x' is not a process id"),
        ({"LISTEN_FDS": "one", "LISTEN_PID": "42"}, "LISTEN_FDS='one' is not a number"),
        ({"LISTEN_FDS": "1", "LISTEN_PID": "42", "LISTEN_FDNAMES": "a:b"}, "names 2 sockets but LISTEN_FDS=1"),
    ],
)
def test_bad_announcements_are_errors(env, message):
    with pytest.raises(ActivationError, match=message):
        parse_listen_env(env, 42)


def test_exactly_one_socket_is_served(tmp_path):
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
    with pytest.raises(ActivationError, match=r"passed 2 sockets \(a, b\); nodestepd serves exactly one"):
        activated_listener(env, 42)


def test_a_listening_unix_stream_socket_is_taken(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s"))
    sock.listen()
    fd = sock.detach()
    os.set_inheritable(fd, True)  # as systemd passes it
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "nodestepd"}
    listener = activated_listener(env, os.getpid(), first_fd=fd)
    try:
        assert listener.fileno() == fd
        assert not os.get_inheritable(fd)  # the runtimes must never inherit it
        assert not listener.getblocking()
        assert socket_path(listener) == str(tmp_path / "s")
    finally:
        listener.close()


def _expect_refused(sock: socket.socket, message: str) -> None:
    try:
        with pytest.raises(ActivationError, match=message):
            listener_from_fd(sock.fileno(), "nodestepd.socket")
        sock.getsockname()  # still open: a refused fd is not closed behind the caller's back
    finally:
        sock.close()


def test_a_datagram_socket_is_refused(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "d"))
    _expect_refused(sock, r"passed fd \d+ \(nodestepd.socket\) is a SOCK_DGRAM socket; nodestepd needs SOCK_STREAM")


def test_a_tcp_socket_is_refused():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _expect_refused(sock, "is a AF_INET socket; nodestepd serves a Unix socket")


def test_a_socket_that_is_not_listening_is_refused(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "n"))
    _expect_refused(sock, "is not listening")


def test_a_file_is_refused(tmp_path):
    fd = os.open(tmp_path / "f", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(ActivationError, match="is not a socket"):
            listener_from_fd(fd)
        os.fstat(fd)
    finally:
        os.close(fd)


def test_abstract_socket_path():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(f"\0nodestepd-test-{os.getpid()}")
    try:
        assert socket_path(sock) == f"@nodestepd-test-{os.getpid()}"
    finally:
        sock.close()
