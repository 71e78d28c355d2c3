"""The wire protocol against a real daemon over its real Unix socket, with raw sockets.

Identity comes from the kernel (SO_PEERCRED): requests "from a user" are sent by a forked child
of the test that has switched to that user's uid, gid and groups.
"""

from __future__ import annotations

import array
import json
import os
import pickle
import pwd
import select
import signal
import socket
import struct
import subprocess
import traceback
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, SYSTEM_PATH, read_line_from, runc_containers, spool_entries
from reply_decoder import decode_reply
from nodestepd.protocol import messages as protocol
from nodestepd.protocol.messages import ErrorReply, ExitReply, StartedReply, StatusReply, StepsReply

HEADER = struct.Struct(">I")
MAX = protocol.MAX_MESSAGE


# ---- raw protocol helpers ------------------------------------------------------------------


def connect(path, timeout: float = 30) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def send_raw(sock: socket.socket, data: bytes, fds=()) -> None:
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        data = data[sent:]
    if data:  # sendall(b"") still calls send(): EPIPE if the daemon already answered and closed
        sock.sendall(data)


def send_body(sock: socket.socket, body: bytes, fds=()) -> None:
    send_raw(sock, HEADER.pack(len(body)) + body, fds)


def send(sock: socket.socket, message: dict, fds=()) -> None:
    send_body(sock, json.dumps(message).encode(), fds)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            assert not data, f"connection closed in the middle of a reply after {data!r}"
            return None
        data += chunk
    return data


def receive(sock: socket.socket):
    """The next reply, or None at end of stream."""
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    body = _recv_exact(sock, protocol.frame_length(header))
    assert body is not None
    return decode_reply(body)


def assert_closed(sock: socket.socket) -> None:
    """The daemon closed the connection (EOF, or a reset when our unread bytes were dropped)."""
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def finish(sock: socket.socket) -> None:
    """End a connection and wait until the daemon has closed its side (and everything it held)."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the daemon had closed it already
    assert_closed(sock)
    sock.close()


def msg(op: str, **fields) -> dict:
    return {"v": protocol.VERSION, "op": op, **fields}


def run_msg(bundle: Path, args: list[str], **fields) -> dict:
    return msg("run", bundle=str(bundle), args=args, config_json=(bundle / "config.json").read_text(), **fields)


def request(path, message: dict, fds=()):
    """One request and its reply; returns once the daemon has closed its side too."""
    with connect(path) as sock:
        send(sock, message, fds)
        reply = receive(sock)
        finish(sock)
        return reply


def status(daemon) -> StatusReply:
    reply = request(daemon.socket, msg("status"))
    assert isinstance(reply, StatusReply), reply
    return reply


def daemon_fds(daemon) -> list[str]:
    """The daemon's open fds, each as 'N -> target', so a failure says what leaked."""
    fd_dir = f"/proc/{daemon.proc.pid}/fd"
    fds = []
    for fd in sorted(os.listdir(fd_dir), key=int):
        try:
            fds.append(f"{fd} -> {os.readlink(f'{fd_dir}/{fd}')}")
        except FileNotFoundError:
            pass  # closed while we looked
    return fds


def ps_as_root(daemon) -> list[dict]:
    out = subprocess.run([str(NODESTEPCTL), "--socket", str(daemon.socket), "ps", "--json"], capture_output=True,
                         env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}, timeout=30, check=True)
    return json.loads(out.stdout)


def as_uid(uid: int, gid: int, groups: list[int], fn, *args):
    """fn(*args) in a forked child running as uid/gid/groups; its (picklable) result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            result = ("ok", fn(*args))
        except BaseException:
            result = ("error", traceback.format_exc())
        try:
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(result))
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        ready, _, _ = select.select([f], [], [], 60)
        assert ready, "the child did not answer within 60 s"
        data = f.read()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0 and data, "the child failed to report"
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"in the child running as uid {uid}:\n{value}")
    return value


def as_user(user, fn, *args):
    return as_uid(user.uid, user.gid, os.getgrouplist(user.name, user.gid), fn, *args)


def _send_and_receive(path: str, message: dict, fds: list[int], replies: int = 1):
    """For children: one request, then the replies (None once the daemon closed)."""
    with connect(path) as sock:
        send(sock, message, fds)
        return [receive(sock) for _ in range(replies)]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def daemon(start_daemon):
    daemon = start_daemon()
    yield daemon
    log = daemon.log()
    assert "connection handler failed" not in log and "Traceback" not in log, log


@pytest.fixture
def null_fds():
    fds = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(12)]
    yield fds
    for fd in fds:
        os.close(fd)


def assert_nothing_left(daemon) -> None:
    assert spool_entries(daemon) == []
    reply = status(daemon)
    assert (reply.steps_running, reply.steps_finished) == (0, 0)
    assert not (daemon.state_dir / "next-job-id").exists()  # no job id was even allocated


# ---- framing and decoding -----------------------------------------------------------------


def test_garbage_gets_an_error_and_the_connection_serves_on(daemon):
    with connect(daemon.socket) as sock:
        send_body(sock, b"{this is not json")
        reply = receive(sock)
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.status) == ("bad-request", None)
        assert reply.error.startswith("malformed request: JSON is malformed")

        send(sock, msg("status"))
        reply = receive(sock)
        assert isinstance(reply, StatusReply)
        assert (reply.socket, reply.node_name, reply.oci_mode) == (str(daemon.socket), "testnode", "run")

        # Pipelined in one write: garbage (not UTF-8), a valid request, an empty message, a valid request.
        frames = [b"\xff\xfe\x00", json.dumps(msg("ps")).encode(), b"", json.dumps(msg("status")).encode()]
        send_raw(sock, b"".join(HEADER.pack(len(f)) + f for f in frames))
        replies = [receive(sock) for _ in frames]
        assert [type(r) for r in replies] == [ErrorReply, StepsReply, ErrorReply, StatusReply]
        assert replies[0].error.startswith("malformed request: ")
        assert replies[2].error == "malformed request: Input data was truncated"
        finish(sock)


@pytest.mark.parametrize("length", [MAX + 1, 0xFFFFFFFF])
def test_oversized_length_gets_an_error_and_the_connection_is_closed(daemon, length):
    with connect(daemon.socket) as sock:
        send_raw(sock, HEADER.pack(length))  # no body: the daemon must not wait for it
        reply = receive(sock)
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.error) == ("bad-request", f"message of {length} bytes is larger than the limit of {MAX}")
        assert_closed(sock)
    assert "bad message; closing connection" in daemon.log()
    assert isinstance(status(daemon), StatusReply)  # others are served as before


def test_a_message_of_exactly_the_limit_is_read(daemon):
    body = json.dumps(msg("status")).encode()
    body += b" " * (MAX - len(body))  # JSON allows trailing white space
    with connect(daemon.socket) as sock:
        send_body(sock, body)
        assert isinstance(receive(sock), StatusReply)
        finish(sock)


@pytest.mark.parametrize(
    "message, error",
    [
        ({"v": 2, "op": "status"}, "unsupported protocol version 2 (this daemon speaks 1)"),
        ({"v": 0, "op": "ps"}, "unsupported protocol version 0 (this daemon speaks 1)"),
        (msg("frobnicate"), "malformed request: Invalid value 'frobnicate' - at `$.op`"),
        ({"op": "status"}, "malformed request: Object missing required field `v`"),
        (msg("status", uid=0), "malformed request: Object contains unknown field `uid`"),
        (msg("cancel", job_id="3001", step_id=0), "malformed request: Expected `int`, got `str` - at `$.job_id`"),
        ([1, 2], "malformed request: Expected `object`, got `array`"),
    ],
)
def test_bad_requests_get_an_error_and_the_connection_serves_on(daemon, message, error):
    with connect(daemon.socket) as sock:
        send(sock, message)
        reply = receive(sock)
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.error, reply.status) == ("bad-request", error, None)
        send(sock, msg("status"))
        assert isinstance(receive(sock), StatusReply)
        finish(sock)


# ---- run requests that must be refused ------------------------------------------------------


_WRONG_FDS = ("a run request carries 3 + preserve_fds file descriptors (stdin, stdout, stderr, then 0 to "
              "preserve), got {}")
_TOO_MANY_FDS = "too many file descriptors in one message (at most 11)"


@pytest.mark.parametrize("nfds, error, status", [
    (0, _WRONG_FDS.format(0), protocol.STATUS_LAUNCH_FAILED),
    (2, _WRONG_FDS.format(2), protocol.STATUS_LAUNCH_FAILED),
    # More than a message may carry: the stream is refused as a whole.
    (4, _WRONG_FDS.format(4), protocol.STATUS_LAUNCH_FAILED),
    (12, _TOO_MANY_FDS, None),
])
def test_run_with_the_wrong_number_of_fds_is_refused(daemon, bundle, null_fds, nfds, error, status):
    with connect(daemon.socket) as sock:
        send(sock, run_msg(bundle, ["true"]), null_fds[:nfds])
        reply = receive(sock)
        assert isinstance(reply, ErrorReply)
        assert (reply.code, reply.status, reply.error) == ("bad-request", status, error)
        assert_closed(sock)
    assert_nothing_left(daemon)


def test_invalid_run_requests_are_refused_clearly(daemon, bundle, null_fds):
    """Each refused with bad-request, status 125, one clear sentence, and the connection closed."""
    cases = {
        "relative bundle": ({"bundle": "images/busybox"}, "bundle must be an absolute path, got 'images/busybox'"),
        "NUL in bundle": ({"bundle": "/tmp/x\0y"}, "bundle contains a NUL byte"),
        "relative chdir": ({"chdir": "tmp"}, "chdir must be an absolute path, got 'tmp'"),
        "NUL in an arg": ({"args": ["echo", "a\0b"]}, "command arguments cannot contain NUL bytes"),
        "empty env name": ({"env": {"": "x"}}, "an environment variable name must not be empty"),
        "= in env name": ({"env": {"A=B": "x"}}, "environment variable name 'A=B' must not contain '='"),
        "NUL in env name": ({"env": {"A\0B": "x"}}, "environment variable name 'A\\x00B' must not contain a NUL byte"),
        "NUL in env value": ({"env": {"A": "x\0y"}}, "environment variable A contains a NUL byte"),
        "ntasks 0": ({"ntasks": 0}, "ntasks must be between 1 and 1024, got 0"),
        "ntasks 5000": ({"ntasks": 5000}, "ntasks must be between 1 and 1024, got 5000"),
        "ntasks -1": ({"ntasks": -1}, "ntasks must be between 1 and 1024, got -1"),
        "job id 0": ({"job_id": 0}, "job id must be between 1 and 4294967279, got 0"),
        "job id too large": ({"job_id": 0xFFFFFFF0}, "job id must be between 1 and 4294967279, got 4294967280"),
        "job id huge": ({"job_id": 2**70}, f"job id must be between 1 and 4294967279, got {2**70}"),
        "step id -1": ({"job_id": 3001, "step_id": -1}, "step id must be between 0 and 4294967279, got -1"),
        "step id too large": ({"job_id": 3001, "step_id": 0xFFFFFFF0},
                              "step id must be between 0 and 4294967279, got 4294967280"),
    }
    got = {}
    for name, (fields, _) in cases.items():
        message = run_msg(bundle, ["true"])
        message.update(fields)
        with connect(daemon.socket) as sock:
            send(sock, message, null_fds[:3])
            reply = receive(sock)
            assert_closed(sock)
        got[name] = (reply.code, reply.status, reply.error) if isinstance(reply, ErrorReply) else reply
    assert got == {name: ("bad-request", 125, error) for name, (_, error) in cases.items()}
    assert_nothing_left(daemon)


def test_refused_requests_leak_no_fds_in_the_daemon(daemon, bundle, null_fds):
    def round_trip(message, fds=(), body=None, replies=1):
        with connect(daemon.socket) as sock:
            if body is None:
                send(sock, message, fds)
            else:
                send_raw(sock, body, fds)
            for _ in range(replies):
                assert isinstance(receive(sock), ErrorReply)
            finish(sock)

    round_trip(None, body=HEADER.pack(2) + b"{}", replies=1)  # warm up whatever the daemon opens lazily
    assert isinstance(status(daemon), StatusReply)
    baseline = daemon_fds(daemon)
    three = null_fds[:3]
    round_trip(None, three, body=HEADER.pack(5) + b"{oops")  # undecodable, with fds
    round_trip(msg("status", v=2), three)  # wrong version, with fds
    round_trip(run_msg(bundle, ["true"], v=2), three)  # a run of the wrong version
    round_trip(run_msg(bundle, ["true"]), null_fds[:2])  # too few
    round_trip(run_msg(bundle, ["true"]), null_fds[:4])  # too many
    round_trip({**run_msg(bundle, ["true"]), "bundle": "relative"}, three)  # refused after decoding
    round_trip(None, three, body=HEADER.pack(MAX + 1))  # oversized, fds on the header
    with connect(daemon.socket) as sock:  # fds with the start of a message the peer never finishes
        send_raw(sock, HEADER.pack(100) + b'{"v": 1, "op"', three)
        finish(sock)
    with connect(daemon.socket) as sock:  # fds on a request that takes none
        send(sock, msg("status"), three)
        assert isinstance(receive(sock), StatusReply)
        finish(sock)
    assert daemon_fds(daemon) == baseline
    with connect(daemon.socket) as sock:  # the count is live: an open connection is one more
        send(sock, msg("status"))
        assert isinstance(receive(sock), StatusReply)
        assert len(daemon_fds(daemon)) == len(baseline) + 1
        finish(sock)
    assert_nothing_left(daemon)


# ---- robustness: other clients and running steps are not disturbed ------------------------------


def test_broken_clients_do_not_disturb_others_or_a_running_step(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "3010", "--bundle", str(bundle), "--",
        "sh", "-c", "echo ready; read line; echo got:$line; exit 7", stdin=subprocess.PIPE,
    )
    read_line_from(client.stdout, b"ready")

    stalled = connect(daemon.socket)  # half a message, and then nothing: stays open throughout
    send_raw(stalled, HEADER.pack(100) + b'{"v": 1, "op": "st')
    with connect(daemon.socket) as half:  # half a message, then gone
        send_raw(half, HEADER.pack(100) + b'{"v": 1')
    with connect(daemon.socket) as oversized:
        send_raw(oversized, HEADER.pack(MAX + 1))
        assert isinstance(receive(oversized), ErrorReply)
    with connect(daemon.socket) as garbage:
        send_body(garbage, b"\x00\x01\x02")
        assert isinstance(receive(garbage), ErrorReply)
        # and vanishes without reading anything more

    reply = status(daemon)
    assert (reply.steps_running, reply.steps_finished) == (1, 0)
    (step,) = ps_as_root(daemon)
    assert (step["job_id"], step["state"], step["user"]) == (3010, "running", user.name)

    out, err = client.communicate(b"go\n", timeout=30)
    assert client.returncode == 7, err
    assert out == b"got:go\n"  # "ready" was read above

    reply = status(daemon)
    assert (reply.steps_running, reply.steps_finished) == (0, 1)
    stalled.close()
    assert isinstance(status(daemon), StatusReply)
    assert spool_entries(daemon) == []
    assert "attached client went away" not in daemon.log()


def test_many_concurrent_status_connections(daemon):
    stalled = connect(daemon.socket)
    send_raw(stalled, HEADER.pack(50) + b"{")
    socks = [connect(daemon.socket) for _ in range(50)]
    try:
        for sock in reversed(socks):  # all requests in flight before any reply is read
            send(sock, msg("status"))
        replies = [receive(sock) for sock in socks]
        assert [type(r) for r in replies] == [StatusReply] * 50
        assert {r.socket for r in replies} == {str(daemon.socket)}
        for sock in socks:
            finish(sock)
    finally:
        for sock in socks:
            sock.close()
        stalled.close()


# ---- identity comes from the kernel ----------------------------------------------------------------


def test_attached_raw_run_accepts_only_signals(daemon, user, bundle):
    """Attached: requests other than id-less signals are refused, the step runs on, a signal reaches it."""
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    with connect(daemon.socket) as sock, os.fdopen(out_r, "rb", buffering=0) as out:
        send(sock, run_msg(bundle, ["sh", "-c", 'trap "echo got-usr1; exit 9" USR1; sleep 1000 & echo ready; wait'],
                           job_id=3030), [stdin_r, out_w, out_w])
        os.close(stdin_r)
        os.close(out_w)
        started = receive(sock)
        assert started == StartedReply(job_id=3030, step_id=0, ntasks=1)
        read_line_from(out, b"ready")

        send(sock, msg("status"))
        refused = receive(sock)
        assert isinstance(refused, ErrorReply)
        assert refused.error == "an attached run accepts only signal requests without ids"
        send(sock, msg("signal", signal="NOSUCHSIG"))
        assert receive(sock).error == "unknown signal 'NOSUCHSIG'"
        send_body(sock, b"not json")
        assert receive(sock).error.startswith("malformed request: ")
        assert ps_as_root(daemon)[0]["state"] == "running"

        send(sock, msg("signal", signal="USR1"))
        done = receive(sock)
        assert isinstance(done, ExitReply)
        assert (done.job_id, done.status, done.cancelled) == (3030, 9, False)
        assert b"got-usr1" in out.read()  # everything, up to end of file: all writers are gone
        assert_closed(sock)
    os.close(stdin_w)
    assert runc_containers(user) == []


def test_peer_credentials_decide_who_runs_the_step(daemon, user, other_user, bundle):
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    out = os.fdopen(out_r, "rb", buffering=0)
    try:
        message = run_msg(bundle, ["sh", "-c", "echo ready; read x; echo got:$x"], job_id=3020, detach=True)
        (reply,) = as_user(user, _send_and_receive, str(daemon.socket), message, [stdin_r, out_w, out_w])
        os.close(stdin_r)
        os.close(out_w)
        stdin_r = out_w = -1
        assert reply == StartedReply(job_id=3020, step_id=0, ntasks=1)
        read_line_from(out, b"ready")

        (step,) = ps_as_root(daemon)
        assert (step["job_id"], step["user"], step["uid"], step["attached"]) == (3020, user.name, user.uid, False)
        runtime_pid = step["tasks"][0]["pid"]
        with open(f"/proc/{runtime_pid}/status") as f:
            ids = {line.split(":")[0]: line.split()[1:] for line in f if line.startswith(("Uid:", "Gid:"))}
        assert ids == {"Uid": [str(user.uid)] * 4, "Gid": [str(user.gid)] * 4}

        # Another user does not see it, and cannot wait for it.
        (ps,) = as_user(other_user, _send_and_receive, str(daemon.socket), msg("ps"), [])
        assert ps == StepsReply(steps=[])
        (wait,) = as_user(other_user, _send_and_receive, str(daemon.socket), msg("wait", job_id=3020, step_id=0), [])
        assert (wait.code, wait.error) == ("not-found", "no step 3020.0 of yours on this node")

        os.write(stdin_w, b"hi\n")
        os.close(stdin_w)
        stdin_w = -1
        done = request(daemon.socket, msg("wait", job_id=3020, step_id=0))  # root may wait for anyone's
        assert isinstance(done, ExitReply) and (done.job_id, done.status) == (3020, 0)
        assert out.read() == b"got:hi\n"
    finally:
        out.close()
        for fd in (stdin_r, stdin_w, out_w):
            if fd >= 0:
                os.close(fd)
    assert runc_containers(user) == []


def test_a_uid_field_is_rejected_not_obeyed(daemon, user, bundle, null_fds):
    message = run_msg(bundle, ["true"], job_id=3021, uid=0)
    (reply,) = as_user(user, _send_and_receive, str(daemon.socket), message, null_fds[:3])
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.error) == ("bad-request", "malformed request: Object contains unknown field `uid`")
    assert_nothing_left(daemon)


def test_a_uid_without_a_passwd_entry_cannot_run(daemon, bundle, null_fds):
    uid = 54321
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            break
        uid += 1
    message = run_msg(bundle, ["true"], job_id=3022)
    (reply,) = as_uid(uid, uid, [], _send_and_receive, str(daemon.socket), message, null_fds[:3])
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.status, reply.error) == (
        "bad-request", protocol.STATUS_LAUNCH_FAILED, f"uid {uid} has no passwd entry on this node")
    assert_nothing_left(daemon)
    (ps,) = as_uid(uid, uid, [], _send_and_receive, str(daemon.socket), msg("ps"), [])
    assert ps == StepsReply(steps=[])  # status and ps need no passwd entry


# ---- fds and pipelining ----------------------------------------------------------------------------


def test_fds_belong_to_the_message_they_came_with(daemon, bundle, null_fds):
    # Both requests must be queued before the daemon reads: pause it (it is our child) while sending.
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        os.waitid(os.P_PID, daemon.proc.pid, os.WSTOPPED)
        sock = connect(daemon.socket)
        send(sock, msg("status"))
        send(sock, run_msg(bundle, ["true"], job_id=3040, detach=True), null_fds[:3])
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    with sock:
        first, second = receive(sock), receive(sock)
    assert isinstance(first, StatusReply)
    assert second == StartedReply(job_id=3040, step_id=0, ntasks=1)
    done = request(daemon.socket, msg("wait", job_id=3040, step_id=0))
    assert isinstance(done, ExitReply) and done.status == 0


def test_pipelined_requests_without_fds_are_answered_in_order(daemon):
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        os.waitid(os.P_PID, daemon.proc.pid, os.WSTOPPED)
        sock = connect(daemon.socket)
        for message in (msg("status"), msg("ps"), msg("wait", job_id=3041, step_id=0), msg("status")):
            send(sock, message)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    with sock:
        replies = [receive(sock) for _ in range(4)]
        finish(sock)
    assert [type(r) for r in replies] == [StatusReply, StepsReply, ErrorReply, StatusReply]
    assert replies[2].error == "no step 3041.0 of yours on this node"
