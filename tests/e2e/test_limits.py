"""Input limits (config/settings.py, daemon/admission.py) against a real daemon: every limit refuses cleanly and
holds nothing; the daemon serves on. Job ids 7000-7999 belong to this file."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import NODESTEPD, RUNC_RUN_CONF, make_bundle, spool_entries
from nodestepd.protocol.messages import ErrorReply, StartedReply, StatusReply
from test_server_protocol import (
    HEADER, as_user, assert_closed, connect, daemon_fds, finish, msg, receive, request, run_msg, send, send_body,
    send_raw,
    status,
)


def settings(workdir: Path, text: str) -> str:
    path = Path(tempfile.mkstemp(prefix="limits-", suffix=".toml", dir=workdir)[1])
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


@pytest.fixture
def null_fds():
    fds = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(3)]
    yield fds
    for fd in fds:
        os.close(fd)


# ---- connections -------------------------------------------------------------------------------


def test_max_connections_refuses_beyond_the_limit_cleanly(start_daemon, workdir):
    daemon = start_daemon(RUNC_RUN_CONF, "--config", settings(workdir, "max_connections = 5\n"))
    held = [connect(daemon.socket) for _ in range(5)]
    try:
        for sock in held:  # all five are being served
            send(sock, msg("status"))
            assert isinstance(receive(sock), StatusReply)
        with connect(daemon.socket) as extra:
            reply = receive(extra)
            assert isinstance(reply, ErrorReply)
            assert (reply.code, reply.error) == ("busy", "nodestepd has too many connections (limit 5); try again later")
            assert_closed(extra)
        finish(held.pop())
        assert isinstance(status(daemon), StatusReply)  # a place is free again
    finally:
        for sock in held:
            sock.close()
    assert "connection refused: too many connections" in daemon.log()


def test_one_user_cannot_take_every_connection(start_daemon, workdir, user, other_user):
    """max_connections_per_user: a user at the cap is refused `busy`; other users, and
    operators (root here), are served all the while."""
    daemon = start_daemon(RUNC_RUN_CONF, "--config",
                          settings(workdir, "max_connections = 10\nmax_connections_per_user = 2\n"))
    report_r, report_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the user holding its two connections until released
        code = 1
        try:
            os.setgroups(os.getgrouplist(user.name, user.gid))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            held = [connect(daemon.socket) for _ in range(2)]
            for sock in held:
                send(sock, msg("status"))
                assert isinstance(receive(sock), StatusReply)
            with connect(daemon.socket) as extra:
                reply = receive(extra)
            os.write(report_w, f"{reply.code}|{reply.error}".encode())
            os.read(release_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(release_r)
    try:
        code, error = os.read(report_r, 4096).decode().split("|", 1)
        assert (code, error) == (
            "busy", "you have too many connections to nodestepd (limit 2 per user); try again later")
        assert isinstance(as_user(other_user, status, daemon), StatusReply)
        root_held = [connect(daemon.socket) for _ in range(3)]  # an operator: not held to the cap
        for sock in root_held:
            send(sock, msg("status"))
            assert isinstance(receive(sock), StatusReply)
            sock.close()
    finally:
        os.write(release_w, b"x")
        os.close(release_w)
        os.close(report_r)
        _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert f"peer_uid={user.uid}" in daemon.log() and "per user" in daemon.log()


@pytest.mark.parametrize("what", ["idle", "half a message", "a slow trickle"])
def test_idle_and_slow_clients_time_out_and_hold_nothing(start_daemon, workdir, null_fds, what):
    daemon = start_daemon(RUNC_RUN_CONF, "--config", settings(workdir, "client_timeout = 1\n"))
    assert isinstance(status(daemon), StatusReply)
    baseline = daemon_fds(daemon)
    begun = time.monotonic()  # before the connection: the daemon's clock starts at its accept
    with connect(daemon.socket) as sock:
        if what == "half a message":  # with fds attached: they must be closed too
            send_raw(sock, HEADER.pack(100) + b'{"v": 1, "op": "st', null_fds)
        elif what == "a slow trickle":
            send_raw(sock, HEADER.pack(200))
            for _ in range(4):  # progress, but never a whole message within the timeout
                time.sleep(0.3)
                try:
                    send_raw(sock, b" ")
                except BrokenPipeError:
                    break
        reply = receive(sock)
        elapsed = time.monotonic() - begun
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.error) == ("timeout", "no complete request within 1 s")
        assert_closed(sock)
    # The daemon's timer runs on its loop's cached time, which may lag the clock by a few
    # ms when the timer is set: it can fire that much before a full second by the clock.
    assert 0.99 <= elapsed < 10
    assert daemon_fds(daemon) == baseline


def test_max_message_size_from_the_settings(start_daemon, workdir):
    daemon = start_daemon(RUNC_RUN_CONF, "--config", settings(workdir, "max_message_size = 4096\n"))
    with connect(daemon.socket) as sock:
        send_raw(sock, HEADER.pack(4097) + b"{")
        reply = receive(sock)
        assert (reply.code, reply.error) == ("bad-request", "message of 4097 bytes is larger than the limit of 4096")
        assert_closed(sock)
    with connect(daemon.socket) as sock:  # exactly the limit is a message like any other
        body = b'{"v":1,"op":"status"}'
        send_raw(sock, HEADER.pack(4096) + body + b" " * (4096 - len(body)))
        assert isinstance(receive(sock), StatusReply)
        finish(sock)


# ---- launches ----------------------------------------------------------------------------------


def test_argv_and_environment_size_limits(start_daemon, workdir, bundle, null_fds):
    daemon = start_daemon(RUNC_RUN_CONF, "--config", settings(workdir, "max_args_bytes = 1024\nmax_env_bytes = 2048\n"))
    cases = [
        (run_msg(bundle, ["echo", "x" * 1020], job_id=7001), "the command is 1026 bytes, more than max_args_bytes (1024)"),
        (run_msg(bundle, ["true"], env={"BIG": "y" * 2100}, job_id=7002),
         "the environment is 2105 bytes, more than max_env_bytes (2048)"),
    ]
    for message, error in cases:
        reply = request(daemon.socket, message, null_fds)
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.status, reply.error) == ("limit", 125, error)
    reply = request(daemon.socket, run_msg(bundle, ["echo", "x" * 1000], job_id=7003, detach=True), null_fds)
    assert reply == StartedReply(job_id=7003, step_id=0, ntasks=1)
    assert request(daemon.socket, msg("wait", job_id=7003, step_id=0)).status == 0


@pytest.fixture(scope="module")
def other_bundle(workdir, other_user) -> Path:
    return make_bundle(other_user, workdir / "other-bundle")


def test_steps_per_user_and_in_total(start_daemon, workdir, user, other_user, bundle, other_bundle, null_fds):
    daemon = start_daemon(RUNC_RUN_CONF, "--config", settings(workdir, "max_steps = 3\nmax_steps_per_user = 2\n"))

    def launch(who, job_id):
        message = run_msg(bundle if who == user else other_bundle, ["sleep", "1000"], job_id=job_id, detach=True)
        path = str(daemon.socket)

        def go():
            with connect(path) as sock:
                send(sock, message, null_fds)
                return receive(sock)
        return as_user(who, go)

    assert isinstance(launch(user, 7010), StartedReply)
    assert isinstance(launch(user, 7011), StartedReply)
    refused = launch(user, 7012)
    assert (refused.code, refused.status, refused.error) == (
        "limit", 125, f"{user.name} already has 2 steps on this node, the maximum (max_steps_per_user)")
    assert isinstance(launch(other_user, 7013), StartedReply)
    refused = launch(other_user, 7014)
    assert (refused.code, refused.error) == ("limit", "this node runs its maximum of 3 steps (max_steps); try again later")
    for job_id in (7010, 7011, 7013):
        assert request(daemon.socket, msg("cancel", job_id=job_id, step_id=0)).cancelled
    assert isinstance(launch(user, 7015), StartedReply)  # finished steps free their places
    assert request(daemon.socket, msg("cancel", job_id=7015, step_id=0)).cancelled
    assert spool_entries(daemon) == []


@pytest.mark.parametrize("fields, error", [
    ({"args": []}, "no command given: args must not be empty"),
    ({"bundle": "/" + "b" * 5000}, "bundle is longer than 4096 bytes"),
    ({"output": "relative.log"}, "output must be an absolute path, got 'relative.log'"),
    ({"error": "/tmp/x\0y"}, "error contains a NUL byte"),
    ({"user": "no-such-user-here", "config_json": None}, "no user 'no-such-user-here' on this node"),
    ({"user": "99999999999", "config_json": None}, "uid 99999999999 is out of range"),
    ({"user": "root"}, "a run with user must not carry config_json: the daemon reads it as that user"),
])
def test_more_launch_fields_are_validated(daemon_with_defaults, bundle, null_fds, fields, error):
    message = run_msg(bundle, ["true"], job_id=7020)
    message.update(fields)
    reply = request(daemon_with_defaults.socket, message, null_fds)
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.status, reply.error) == ("bad-request", 125, error)


def test_config_json_nested_too_deep_is_a_bad_request(daemon_with_defaults, bundle, null_fds):
    """Issue 14.5: a config_json nested 100,000 levels is refused as a bad request (it was
    an internal error with a RecursionError), and the daemon serves on."""
    message = run_msg(bundle, ["true"], job_id=7021)
    message["config_json"] = '{"a":' * 100_000 + "1" + "}" * 100_000
    reply = request(daemon_with_defaults.socket, message, null_fds)
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.status, reply.error) == (
        "bad-request", 125, "config_json nests arrays and objects more than 64 levels deep")
    with connect(daemon_with_defaults.socket) as sock:  # and a request itself nested that deep
        send_body(sock, b'{"v":1,"op":"status","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        reply = receive(sock)
        finish(sock)
    assert (reply.code, reply.error) == (
        "bad-request", "malformed request: the request nests arrays and objects more than 64 levels deep")
    assert isinstance(request(daemon_with_defaults.socket, msg("status")), StatusReply)
    assert "RecursionError" not in daemon_with_defaults.log()


@pytest.mark.parametrize("name", ["ＵＳＲ1", "USR1\u0000", "SIGUSR1" * 10, "0", "65", "１"])
def test_unknown_signal_names_are_refused(daemon_with_defaults, name):
    reply = request(daemon_with_defaults.socket, msg("signal", signal=name, job_id=7030, step_id=0))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "bad-request" and reply.error.startswith("unknown signal ")


@pytest.fixture
def daemon_with_defaults(start_daemon):
    return start_daemon(RUNC_RUN_CONF)


# ---- the daemon's own paths --------------------------------------------------------------------


def test_the_daemon_refuses_to_start_with_a_spool_dir_others_can_write(start_daemon, workdir):
    base = Path(tempfile.mkdtemp(prefix="untrusted-", dir=workdir))
    base.chmod(0o755)
    spool = base / "spool"
    spool.mkdir(mode=0o777)
    spool.chmod(0o777)
    conf = base / "oci.conf"
    conf.write_text(RUNC_RUN_CONF)
    result = subprocess.run([str(NODESTEPD), "--oci-conf", str(conf), "--spool-dir", str(spool), "--state-dir",
                             str(base / "state"), "--socket", str(base / "sock")], capture_output=True, timeout=30)
    assert result.returncode == 1
    assert f"spool_dir {spool} is not safe for a root daemon: {spool} is writable by others (mode 0777)" in (
        result.stderr.decode())
    assert not (base / "sock").exists()
