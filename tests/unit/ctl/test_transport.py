"""Talking to the daemon (nodestepd/ctl/transport.py): connecting, framing, fds, replies."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from fakedaemon import fake_daemon  # noqa: F401 - a fixture
from nodestepd.ctl import transport
from nodestepd.ctl.exits import ClientError
from nodestepd.protocol import wire
from nodestepd.protocol.wire import ProtocolError


@pytest.fixture
def pair():
    client, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with client, daemon:
        yield client, daemon


# ---- connecting ---------------------------------------------------------------------------------


def test_no_socket_means_the_daemon_is_not_running(tmp_path):
    path = tmp_path / "nobody.sock"
    with pytest.raises(ClientError) as e:
        transport.connect(str(path))
    assert str(e.value) == f"nodestepd is not running: no socket at {path} (set --socket or NODESTEPD_SOCKET)"
    assert e.value.status == 1


def test_a_socket_nobody_listens_on_means_the_daemon_is_not_running(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(path))  # bound, never listening: what a daemon that died leaves
        with pytest.raises(ClientError) as e:
            transport.connect(str(path))
    assert str(e.value) == f"nodestepd is not running: nobody listens on {path}"


# ---- sending ------------------------------------------------------------------------------------


def test_a_message_goes_out_framed_with_the_protocol_version(pair):
    client, daemon = pair
    transport.send(client, {"op": "ps"})
    data = daemon.recv(65536)
    assert data == wire.frame_dict({"v": wire.VERSION, "op": "ps"})


def test_fds_go_along_with_the_message(pair, tmp_path):
    client, daemon = pair
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        transport.send(client, {"op": "run"}, [fd])
    finally:
        os.close(fd)
    data, fds, _, _ = socket.recv_fds(daemon, 65536, 3)
    assert data == wire.frame_dict({"v": wire.VERSION, "op": "run"})
    assert len(fds) == 1
    try:
        os.write(fds[0], b"through the passed fd")
    finally:
        os.close(fds[0])
    assert path.read_bytes() == b"through the passed fd"


def test_sending_to_a_daemon_that_closed_is_a_lost_connection(pair):
    client, daemon = pair
    daemon.close()
    with pytest.raises(transport.ConnectionLost) as e:
        transport.send(client, {"op": "ps"})
    assert str(e.value) == "nodestepd closed the connection before the request was sent"


# ---- receiving ----------------------------------------------------------------------------------


def test_a_reply_is_read_across_short_reads(pair):
    client, daemon = pair
    frame = wire.frame_dict({"type": "ok", "text": "é" * 1000})

    def trickle():  # the header and the body each in pieces, as a busy daemon's may arrive
        for piece in (frame[:2], frame[2:9], frame[9:1000], frame[1000:]):
            daemon.sendall(piece)
            time.sleep(0.05)

    writer = threading.Thread(target=trickle)
    writer.start()
    try:
        assert transport.receive(client) == {"type": "ok", "text": "é" * 1000}
    finally:
        writer.join()


@pytest.mark.parametrize("sent", [b"", b"\0\0", wire.frame_dict({"type": "ok"})[:-1]], ids=["nothing", "half a header",
                                                                                          "half a body"])
def test_a_closed_connection_is_no_reply(pair, sent):
    client, daemon = pair
    daemon.sendall(sent)
    daemon.close()
    assert transport.receive(client) is None


def test_a_daemon_that_hung_up_without_reading_is_no_reply(pair):
    client, daemon = pair
    transport.send(client, {"op": "ps"})
    daemon.close()  # with our request unread: our next read is ECONNRESET, not the end of the stream
    assert transport.receive(client) is None


@pytest.mark.parametrize("body, error", [
    (b"{not json", "malformed reply from nodestepd: Expecting property name enclosed in double quotes"),
    (b"[1, 2]", "malformed reply from nodestepd: no type"),
    (b'{"status": 0}', "malformed reply from nodestepd: no type"),
    (b'{"type": 7}', "malformed reply from nodestepd: no type"),
])
def test_a_malformed_reply_is_a_protocol_error(pair, body, error):
    client, daemon = pair
    daemon.sendall(wire.frame_body(body))
    with pytest.raises(ProtocolError) as e:
        transport.receive(client)
    assert str(e.value).startswith(error)


def test_a_reply_over_the_limit_is_a_protocol_error(pair):
    client, daemon = pair
    daemon.sendall(wire.HEADER.pack(wire.MAX_MESSAGE + 1))
    with pytest.raises(ProtocolError, match="larger than the limit"):
        transport.receive(client)


# ---- expecting a kind of reply ------------------------------------------------------------------


def test_expect_passes_the_reply_of_the_kind_asked():
    reply = {"type": "steps", "steps": []}
    assert transport.expect(reply, "steps") is reply


@pytest.mark.parametrize("reply, status, message, exit_status", [
    (None, 1, "nodestepd closed the connection without replying", 1),
    (None, 125, "nodestepd closed the connection without replying", 125),
    ({"type": "error", "error": "no step 4.0", "status": 3}, 1, "no step 4.0", 3),  # the daemon's status first
    ({"type": "error", "error": "no step 4.0", "status": None}, 125, "no step 4.0", 125),
    ({"type": "error"}, 1, "unknown error", 1),
    ({"type": "exit", "status": 0}, 1, "unexpected reply from nodestepd: 'exit' instead of 'ok'", 1),
])
def test_expect_turns_any_other_reply_into_a_client_error(reply, status, message, exit_status):
    with pytest.raises(ClientError) as e:
        transport.expect(reply, "ok", status)
    assert (str(e.value), e.value.status) == (message, exit_status)


def test_a_request_is_one_connection_one_message_one_reply(fake_daemon):
    seen = []

    def serve(peer):
        seen.append(peer.read())
        peer.write({"type": "status", "version": "9"})
        with pytest.raises(EOFError):
            peer.read()  # and then the client hangs up

    daemon = fake_daemon(serve)
    assert transport.request(daemon.path, {"op": "status"}, "status") == {"type": "status", "version": "9"}
    daemon.stop()
    assert seen == [({"v": wire.VERSION, "op": "status"}, [])]
