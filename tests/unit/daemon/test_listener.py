"""daemon/listener.py: a socket the daemon binds itself, or the one systemd passed (no root)."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from nodestepd.daemon.listener import BoundListener, PassedListener
from nodestepd.systemd.activation import ActivationError


def test_a_bound_socket_is_open_to_everyone_and_goes_with_the_listener(tmp_path):
    path = str(tmp_path / "run" / "nodestepd.sock")
    listener = BoundListener(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 and listener.path == path and not listener.passed
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.close()
    listener.close()
    assert not os.path.exists(path)


def test_a_stale_socket_is_replaced(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # nobody listens, the file stays
    listener = BoundListener(path)
    assert listener.sock.getsockname() == path
    listener.close()


def test_a_live_daemons_socket_is_never_replaced(tmp_path):
    path = str(tmp_path / "s")
    live = BoundListener(path)
    with pytest.raises(OSError, match=f"another nodestepd is already listening on {path}"):
        BoundListener(path)
    live.close()


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path):
    path = tmp_path / "s"
    path.write_text("precious")
    with pytest.raises(OSError, match=f"{path} exists and is not a socket; refusing to replace it"):
        BoundListener(str(path))
    assert path.read_text() == "precious"


def test_without_activation_there_is_no_passed_socket_and_the_variables_are_consumed():
    env = {"LISTEN_FDNAMES": "stale", "PATH": "/bin"}
    assert PassedListener.take(env, os.getpid()) is None
    assert env == {"PATH": "/bin"}


def test_sockets_passed_to_another_process_are_refused_and_the_variables_consumed():
    env = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "nodestepd.socket"}
    with pytest.raises(ActivationError, match="LISTEN_PID=1 is not this process"):
        PassedListener.take(env, os.getpid())
    assert env == {}
