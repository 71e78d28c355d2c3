"""The asyncio API (nodestepd/client/) against a fake daemon: the requests it frames and the
fds it passes, every error reply as its exception, output collected and streamed, signals,
detach, many steps at once, letting go, and the ride through a daemon restart. Each test
runs on plain asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ctl"))
from fakedaemon import Peer, fake_daemon  # noqa: E402,F401 - a fixture

import nodestepd  # noqa: E402
from nodestepd import client as api  # noqa: E402
from nodestepd.client import errors  # noqa: E402


@pytest.fixture(params=["asyncio", "uvloop"])
def arun(request):
    """arun(coroutine) runs it to its end on a new loop of the kind the test is parametrized with."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def run(coroutine):
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coroutine, 30))
    return run


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "bundle"
    path.mkdir()
    (path / "config.json").write_text('{"ociVersion": "1.0.2"}')
    return path


def started(peer: Peer, job: int = 7, step: int = 0, ntasks: int = 1) -> None:
    peer.write({"v": 1, "type": "started", "job_id": job, "step_id": step, "ntasks": ntasks})


def exited(peer: Peer, job: int = 7, step: int = 0, statuses=(0,), cancelled=False) -> None:
    status = next((s for s in statuses if s), 0)
    peer.write({"v": 1, "type": "exit", "job_id": job, "step_id": step, "status": status, "cancelled": cancelled,
                "tasks": [{"task_id": i, "status": s} for i, s in enumerate(statuses)], "stage_out_error": None,
                "added_by_a_newer_daemon": 1})


# ---- the launch ---------------------------------------------------------------------------------


def test_run_sends_the_request_and_three_fds_and_returns_the_exit(fake_daemon, arun, bundle, tmp_path):
    seen = {}

    def serve(peer: Peer):
        message, fds = peer.read()
        seen["message"], seen["fds"] = message, len(fds)
        seen["stdin"] = os.readlink(f"/proc/self/fd/{fds[0]}")
        started(peer, 100000001, 0, 2)
        exited(peer, 100000001, 0, (0, 3))

    daemon = fake_daemon(serve)

    async def main():
        async with nodestepd.Client(daemon.path) as c:
            step = await c.run(bundle, ["app", "--x"], ntasks=2, env={"A": "1"}, chdir=tmp_path)
            assert (step.job_id, step.step_id, step.ntasks, step.ref) == (100000001, 0, 2, "100000001.0")
            return await step.wait()

    ended = arun(main())
    assert ended == api.StepExit(100000001, 0, 3, (api.TaskExit(0, 0), api.TaskExit(1, 3)), False, None)
    assert not ended.ok
    assert seen["fds"] == 3 and seen["stdin"] == "/dev/null"  # stdin defaults to /dev/null, not ours
    assert seen["message"] == {
        "v": 1, "op": "run", "bundle": str(bundle), "args": ["app", "--x"], "env": {"A": "1"}, "job_id": None,
        "step_id": None, "ntasks": 2, "chdir": str(tmp_path), "pty": False, "detach": False,
        "output_to_journal": False, "task_offset": None, "local_offset": None, "node_id": None,
        "container_id": None, "config_json": '{"ociVersion": "1.0.2"}', "config_json_error": None,
    }


def test_env_none_passes_this_process_environment_and_ids_and_offsets_go_along(fake_daemon, arun, bundle,
                                                                               monkeypatch):
    monkeypatch.setenv("FROM_HERE", "yes")
    seen = {}

    def serve(peer: Peer):
        seen["message"], _ = peer.read()
        started(peer, 42, 3)
        exited(peer, 42, 3)

    daemon = fake_daemon(serve)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.run(str(bundle), ["true"], job=42, step=3, task_offset=4, local_offset=1, node_id=2,
                               container_id="c1")
            await step.wait()

    arun(main())
    message = seen["message"]
    assert message["env"]["FROM_HERE"] == "yes"
    assert (message["job_id"], message["step_id"], message["task_offset"], message["local_offset"],
            message["node_id"], message["container_id"]) == (42, 3, 4, 1, 2, "c1")


def test_the_socket_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NODESTEPD_SOCKET", "/elsewhere.sock")
    assert api.Client().socket == "/elsewhere.sock"
    monkeypatch.delenv("NODESTEPD_SOCKET")
    assert api.Client().socket == "/run/nodestepd/nodestepd.sock"
    with pytest.raises(ValueError):
        api.Client(reattach_timeout=float("nan"))


@pytest.mark.parametrize("kwargs, said", [
    ({"args": "true"}, "args is a sequence of strings"),
    ({"args": []}, "no command given"),
    ({"args": ["x"], "env": {"A=B": "1"}}, "a name has no '='"),
    ({"args": ["x"], "env": {"A": "a\0b"}}, "contains a NUL byte"),
    ({"args": ["\udcff"]}, "command argument 0 is not valid UTF-8"),
    ({"args": ["x"], "journal": True}, "journal goes with detach"),
    ({"args": ["x"], "local_offset": 1}, "local_offset goes with a per-task launch"),
    ({"args": ["x"], "mounts": [("/a", "/b")]}, "mounts, entrypoint and workdir go with image"),
    ({"args": ["x"], "stdout": 3.5}, "stdout: expected None, DEVNULL, PIPE, COLLECT"),
    ({"args": ["x"], "stdin": api.PIPE}, "stdin cannot be"),
    ({"args": ["x"], "stdout": api.STDOUT}, "only stderr can be STDOUT"),
])
def test_arguments_it_can_judge_are_refused_before_anything_is_sent(arun, bundle, tmp_path, kwargs, said):
    async def main():
        # Nobody listens there: a request that got as far as connecting would be DaemonUnavailable.
        await api.Client(tmp_path / "nobody.sock").run(bundle, **kwargs)

    with pytest.raises(api.BadRequest, match=said) as e:
        arun(main())
    assert e.value.status == 125 and e.value.code == "bad-request"
    assert isinstance(e.value, ValueError)


def test_a_missing_bundle_fails_the_launch_here(arun, tmp_path):
    with pytest.raises(api.LaunchFailed, match="does not exist or is not a directory"):
        arun(api.Client(tmp_path / "s").run(tmp_path / "none", ["true"]))


# ---- every error reply as its exception ------------------------------------------------------

CODES = [
    ("bad-request", api.BadRequest), ("not-found", api.NotFound), ("permission-denied", api.PermissionDenied),
    ("launch-failed", api.LaunchFailed), ("conflict", api.Conflict), ("ambiguous", api.Ambiguous),
    ("reload-failed", api.ReloadFailed), ("limit", api.LimitExceeded), ("busy", api.Busy),
    ("timeout", api.Timeout), ("something-new", api.Refused), ("error", api.Refused),
]


def test_every_code_has_its_class():
    known = {code for code, cls in CODES if cls is not api.Refused}
    assert set(errors.REFUSALS) == known


@pytest.mark.parametrize("code, cls", CODES)
def test_an_error_reply_to_run_raises_its_class_with_status_125(fake_daemon, arun, bundle, code, cls):
    def serve(peer: Peer):
        peer.read()
        peer.write({"v": 1, "type": "error", "code": code, "error": f"refused: {code}", "status": 125})

    daemon = fake_daemon(serve)
    with pytest.raises(cls) as e:
        arun(api.Client(daemon.path).run(bundle, ["true"]))
    assert type(e.value) is cls
    assert (str(e.value), e.value.code, e.value.status) == (f"refused: {code}", code, 125)


@pytest.mark.parametrize("code, cls", CODES)
def test_an_error_reply_to_a_request_raises_its_class(fake_daemon, arun, code, cls):
    def serve(peer: Peer):
        assert peer.read()[0] == {"v": 1, "op": "cancel", "job_id": 5, "step_id": 1, "user": "alice"}
        peer.write({"v": 1, "type": "error", "code": code, "error": "no step 5.1 of yours on this node",
                    "status": None})

    daemon = fake_daemon(serve)
    with pytest.raises(cls, match="no step 5.1 of yours") as e:
        arun(api.Client(daemon.path).cancel(5, 1, user="alice"))
    assert e.value.code == code and e.value.status is None


def test_a_daemon_that_refuses_before_reading_is_heard(fake_daemon, arun, bundle):
    """Over its connection caps the daemon answers `busy` at once and closes: the request may
    not even be sent, and the reply is what the caller gets."""
    def serve(peer: Peer):
        peer.write({"v": 1, "type": "error", "code": "busy", "error": "too many connections", "status": None})
        peer.sock.shutdown(socket.SHUT_RDWR)

    daemon = fake_daemon(serve)
    with pytest.raises(api.Busy, match="too many connections") as e:
        arun(api.Client(daemon.path).run(bundle, ["true"]))
    assert e.value.status == 125  # a launch that did not start


def test_no_daemon_is_daemon_unavailable(arun, tmp_path, bundle):
    path = tmp_path / "nobody.sock"
    with pytest.raises(api.DaemonUnavailable, match=f"no socket at {path}"):
        arun(api.Client(path).ps())
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
        with pytest.raises(api.DaemonUnavailable, match="nobody listens"):
            arun(api.Client(path).run(bundle, ["true"]))


@pytest.mark.parametrize("reply, said", [
    (b"\x00\x00\x00\x02[]", "no type"),
    (b"\x00\x00\x00\x03{x}", "malformed reply"),
    (b"\xff\xff\xff\xff", "larger than the limit"),
])
def test_a_malformed_reply_is_a_protocol_error(fake_daemon, arun, reply, said):
    def serve(peer: Peer):
        peer.read()
        peer.sock.sendall(reply)

    daemon = fake_daemon(serve)
    with pytest.raises(api.ProtocolError, match=said):
        arun(api.Client(daemon.path).status())


def test_a_reply_of_the_wrong_kind_is_a_protocol_error(fake_daemon, arun):
    def serve(peer: Peer):
        peer.read()
        peer.write({"v": 1, "type": "ok"})

    daemon = fake_daemon(serve)
    with pytest.raises(api.ProtocolError, match="'ok' instead of 'steps'"):
        arun(api.Client(daemon.path).ps())


def test_a_daemon_closing_without_a_reply_is_connection_lost(fake_daemon, arun):
    daemon = fake_daemon(lambda peer: peer.read())
    with pytest.raises(api.ConnectionLost, match="without replying"):
        arun(api.Client(daemon.path).signal(4, 0, "TERM"))


# ---- requests and their typed answers ---------------------------------------------------------


def test_ps_status_wait_signal_reload(fake_daemon, arun):
    step = {"job_id": 4, "step_id": 0, "user": "alice", "uid": 1000, "state": "running", "attached": True,
            "bundle": "/b", "args": ["sleep", "9"], "started_at": 1.5, "status": None, "stage_out_failed": False,
            "tasks": [{"task_id": 0, "pid": 99, "status": None, "not_deleted": False}], "future_field": 1}
    answers = {
        "ps": {"type": "steps", "steps": [step]},
        "status": {"type": "status", "version": "0.1.0", "uptime": 3.0, "node_name": "n1", "oci_mode": "run",
                   "steps_running": 1, "new_counter": 5},
        "wait": {"type": "exit", "job_id": 4, "step_id": 0, "status": None, "tasks": [{"task_id": 0, "status": None}],
                 "cancelled": False, "stage_out_error": None},
        "signal": {"type": "ok"},
        "reload": {"type": "ok"},
    }
    requests = []

    def serve(peer: Peer):
        message, _ = peer.read()
        requests.append(message)
        peer.write({"v": 1, **answers[message["op"]]})

    daemon = fake_daemon(serve, connections=5)

    async def main():
        c = api.Client(daemon.path)
        return await c.ps(), await c.status(), await c.wait(4), await c.signal(4, 0, signal.SIGUSR1), await c.reload()

    steps, status, ended, signalled, reloaded = arun(main())
    assert steps == [api.StepInfo(4, 0, "alice", 1000, "running", True, "/b", ("sleep", "9"), 1.5,
                                  (api.TaskInfo(0, 99, None, False),))]
    assert (status.version, status.node_name, status.oci_mode, status.steps_running) == ("0.1.0", "n1", "run", 1)
    assert ended.status is None and ended.tasks == (api.TaskExit(0, None),) and not ended.ok
    assert signalled is None and reloaded is None
    assert [r["op"] for r in requests] == ["ps", "status", "wait", "signal", "reload"]
    assert requests[3] == {"v": 1, "op": "signal", "signal": "SIGUSR1", "job_id": 4, "step_id": 0}


@pytest.mark.parametrize("given, name", [
    (signal.SIGTERM, "SIGTERM"), (10, "SIGUSR1"), ("usr2", "SIGUSR2"), ("SIGINT", "SIGINT"), ("9", "SIGKILL"),
])
def test_signal_names(given, name):
    assert api.signal_name(given) == name


@pytest.mark.parametrize("given", ["NOPE", 0, 4096, True, "é", 1.0])
def test_a_signal_that_is_not_one_is_a_bad_request(given):
    with pytest.raises(api.BadRequest, match="unknown signal"):
        api.signal_name(given)


# ---- output ----------------------------------------------------------------------------------


def test_collect_gathers_each_streams_output(fake_daemon, arun, bundle):
    def script(peer: Peer):
        _, fds = peer.read()
        os.write(fds[1], b"out ")
        os.write(fds[2], b"err")
        os.write(fds[1], b"more")
        for fd in peer.fds:
            os.close(fd)
        peer.fds = []
        started(peer)
        exited(peer)

    daemon = fake_daemon(script)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.run(bundle, ["x"], stdout=api.COLLECT, stderr=api.COLLECT)
            assert step.stdout is None and step.stderr is None
            return await step.wait()

    ended = arun(main())
    assert (ended.stdout, ended.stderr, ended.status) == (b"out more", b"err", 0)


def test_pipe_streams_and_stderr_can_follow_stdout(fake_daemon, arun, bundle):
    def script(peer: Peer):
        _, fds = peer.read()
        assert os.fstat(fds[1]).st_ino == os.fstat(fds[2]).st_ino  # STDOUT: the one pipe
        started(peer)
        os.write(fds[1], b"line 1\n")
        assert peer.read()[0] == {"v": 1, "op": "signal", "signal": "SIGUSR1"}  # the client read line 1
        os.write(fds[2], b"line 2\n")
        for fd in peer.fds:
            os.close(fd)
        peer.fds = []
        exited(peer, statuses=(138,))

    daemon = fake_daemon(script)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.run(bundle, ["x"], stdout=api.PIPE, stderr=api.STDOUT)
            assert await step.stdout.readline() == b"line 1\n"
            await step.signal("USR1")
            rest = await step.stdout.read()
            return rest, await step.wait()

    rest, ended = arun(main())
    assert rest == b"line 2\n" and ended.status == 138 and ended.stdout is None


def test_outputs_to_paths_are_opened_here_and_given_to_the_daemon_as_fds(fake_daemon, arun, bundle, tmp_path):
    def script(peer: Peer):
        message, fds = peer.read()
        assert "output" not in message and "error" not in message
        os.write(fds[1], b"to the file")
        started(peer)
        exited(peer)

    daemon = fake_daemon(script)
    (tmp_path / "out").write_text("old content, truncated")

    async def main():
        async with api.Client(daemon.path) as c:
            await (await c.run(bundle, ["x"], stdout=tmp_path / "out", stderr=api.DEVNULL)).wait()

    arun(main())
    assert (tmp_path / "out").read_bytes() == b"to the file"


def test_an_operators_output_paths_are_the_daemons_to_open(fake_daemon, arun, bundle, tmp_path):
    seen = {}

    def script(peer: Peer):
        seen["message"], fds = peer.read()
        seen["stdout"] = os.readlink(f"/proc/self/fd/{fds[1]}")
        started(peer)

    daemon = fake_daemon(script)

    async def main():
        async with api.Client(daemon.path) as c:
            return await c.run(bundle, ["x"], user="alice", stdout=tmp_path / "o", stderr=tmp_path / "e",
                               detach=True)

    arun(main())
    message = seen["message"]
    assert (message["user"], message["output"], message["error"]) == ("alice", str(tmp_path / "o"),
                                                                       str(tmp_path / "e"))
    assert "config_json" not in message  # the daemon reads it as that user
    assert seen["stdout"] == "/dev/null" and not (tmp_path / "o").exists()


# ---- attached steps: signals, cancel, detach, letting go -------------------------------------


def test_detached_the_connection_closes_and_wait_asks_the_daemon(fake_daemon, arun, bundle):
    def launch(peer: Peer):
        message, fds = peer.read()
        assert message["detach"] and message["output_to_journal"]
        # Not our stdout and stderr: a step that outlives us must not hold them open.
        assert [os.readlink(f"/proc/self/fd/{fd}") for fd in fds] == ["/dev/null"] * 3
        started(peer, 9)
        with pytest.raises(EOFError):
            peer.read()  # the client closed at once

    def wait(peer: Peer):
        assert peer.read()[0] == {"v": 1, "op": "wait", "job_id": 9, "step_id": 0}
        exited(peer, 9, statuses=(1,))

    scripts = iter([launch, wait])
    daemon = fake_daemon(lambda peer: next(scripts)(peer), connections=2)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.run(bundle, ["x"], detach=True, journal=True)
            assert not step.attached
            return await step.wait()

    assert arun(main()).status == 1


def test_cancel_asks_the_daemon_and_the_exit_comes_on_the_steps_connection(arun, bundle, tmp_path):
    gate = threading.Event()

    def launch(peer: Peer):
        peer.read()
        started(peer, 11)
        assert gate.wait(10)
        exited(peer, 11, statuses=(137,), cancelled=True)

    def cancel(peer: Peer):
        assert peer.read()[0] == {"v": 1, "op": "cancel", "job_id": 11, "step_id": 0}
        exited(peer, 11, statuses=(137,), cancelled=True)
        gate.set()

    with concurrent_fake(tmp_path / "d.sock", [launch, cancel]) as path:
        async def main():
            async with api.Client(path) as c:
                step = await c.run(bundle, ["sleep", "99"])
                return await step.cancel()

        ended = arun(main())
    assert ended.cancelled and ended.status == 137


@contextlib.contextmanager
def concurrent_fake(path: Path, scripts: list):
    """A fake daemon serving each connection in a thread of its own, the n-th with scripts[n]."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    failures: list[BaseException] = []
    threads = []

    def serve(script, conn):
        peer = Peer(conn)
        try:
            script(peer)
        except BaseException as e:
            failures.append(e)
        finally:
            peer.close()

    def accept():
        for script in scripts:
            conn, _ = listener.accept()
            thread = threading.Thread(target=serve, args=(script, conn))
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    try:
        yield str(path)
    finally:
        acceptor.join(10)
        for thread in threads:
            thread.join(10)
        listener.close()
    assert not acceptor.is_alive() and not any(t.is_alive() for t in threads)
    if failures:
        raise failures[0]


def test_leaving_the_client_lets_go_of_attached_steps(fake_daemon, arun, bundle):
    """Their connections close, and the daemon cancels them (as for a killed nodestepctl)."""
    closed = threading.Event()

    def script(peer: Peer):
        peer.read()
        started(peer, 12)
        with pytest.raises(EOFError):
            peer.read()
        closed.set()

    daemon = fake_daemon(script)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.run(bundle, ["sleep", "99"], stdout=api.COLLECT)
            assert step.attached
        with pytest.raises(api.ConnectionLost, match="let go of step 12.0"):
            await step.wait()

    arun(main())
    assert closed.wait(10)  # the fake daemon saw the connection end


def test_signal_after_the_end_is_not_found(fake_daemon, arun, bundle):
    def script(peer: Peer):
        peer.read()
        started(peer)
        exited(peer)

    daemon = fake_daemon(script)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.run(bundle, ["x"])
            await step.wait()
            with pytest.raises(api.NotFound, match="already finished"):
                await step.signal("TERM")

    arun(main())


def test_many_steps_at_once_from_one_task_each(fake_daemon, arun, bundle):
    count = 60

    def script(peer: Peer):
        message, _ = peer.read()
        job = message["job_id"]
        started(peer, job)
        exited(peer, job, statuses=(job % 3,))

    daemon = fake_daemon(script, connections=count)

    async def main():
        async with api.Client(daemon.path) as c:
            async def one(i: int) -> api.StepExit:
                return await (await c.run(bundle, ["x", str(i)], job=1000 + i,
                                          stdout=api.COLLECT if i % 2 else api.DEVNULL)).wait()
            ended = await asyncio.gather(*(one(i) for i in range(count)))
            assert not c._holding  # every step waited for: nothing kept for them
            return ended

    ended = arun(main())
    assert [e.status for e in ended] == [(1000 + i) % 3 for i in range(count)]
    assert threading.active_count() < 10  # no thread per step (the fake daemon has one, the executor a few)


# ---- riding through a daemon restart ----------------------------------------------------------


def test_an_attached_step_rides_through_and_forwards_held_signals(fake_daemon, arun, bundle):
    """The first daemon goes after `started`; a signal sent meanwhile is held, then forwarded
    on the next daemon's connection once `attach` is answered."""
    signalled = threading.Event()

    def first(peer: Peer):
        peer.read()
        started(peer, 21, 0, 2)
        peer.sock.shutdown(socket.SHUT_RDWR)  # the daemon is gone
        assert signalled.wait(10)

    def second(peer: Peer):
        assert peer.read()[0] == {"v": 1, "op": "attach", "job_id": 21, "step_id": 0, "first_task": 0}
        started(peer, 21, 0, 2)
        assert peer.read()[0] == {"v": 1, "op": "signal", "signal": "SIGTERM"}
        exited(peer, 21, statuses=(0, 143))

    scripts = iter([first, second])
    daemon = fake_daemon(lambda peer: next(scripts)(peer), connections=2)

    async def main():
        async with api.Client(daemon.path, reattach_timeout=20) as c:
            step = await c.run(bundle, ["x"], ntasks=2)
            while step._conn is not None:  # until the client has seen the daemon go
                await asyncio.sleep(0.01)
            await step.signal("TERM")
            signalled.set()
            return await step.wait()

    ended = arun(main())
    assert ended.status == 143 and ended.tasks == (api.TaskExit(0, 0), api.TaskExit(1, 143))


def test_a_launch_lost_before_started_is_found_on_the_next_daemon(fake_daemon, arun, bundle):
    def first(peer: Peer):
        peer.read()  # then gone, before `started`

    def second(peer: Peer):
        assert peer.read()[0] == {"v": 1, "op": "attach", "job_id": 30, "step_id": 1, "first_task": 2}
        started(peer, 30, 1)
        exited(peer, 30, 1, statuses=(5,))

    scripts = iter([first, second])
    daemon = fake_daemon(lambda peer: next(scripts)(peer), connections=2)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.run(bundle, ["x"], job=30, step=1, task_offset=2)
            return await step.wait()

    assert arun(main()).status == 5


@pytest.mark.parametrize("before_started, cls, said", [
    (True, api.LaunchFailed, "went away while launching step 31.0, and the step did not start"),
    (False, api.StatusUnknown, "step 31.0 ended while nodestepd restarted"),
])
def test_a_launch_the_next_daemon_does_not_know(fake_daemon, arun, bundle, before_started, cls, said):
    def first(peer: Peer):
        peer.read()
        if not before_started:
            started(peer, 31)

    def second(peer: Peer):
        peer.read()
        peer.write({"v": 1, "type": "error", "code": "not-found", "error": "no step 31.0 of yours", "status": None})

    scripts = iter([first, second])
    daemon = fake_daemon(lambda peer: next(scripts)(peer), connections=2)

    async def main():
        async with api.Client(daemon.path) as c:
            await (await c.run(bundle, ["x"], job=31)).wait()

    with pytest.raises(cls, match=said):
        arun(main())


def test_a_launch_lost_before_started_without_a_job_id_cannot_be_found_again(fake_daemon, arun, bundle):
    daemon = fake_daemon(lambda peer: peer.read())
    with pytest.raises(api.ConnectionLost, match="before it acknowledged the launch; the step may be running"):
        arun(api.Client(daemon.path).run(bundle, ["x"]))


def test_a_daemon_that_does_not_come_back_is_daemon_unavailable(arun, bundle, tmp_path):
    path = str(tmp_path / "d.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()

    def daemon():
        conn, _ = listener.accept()
        peer = Peer(conn)
        peer.read()
        started(peer, 40)
        listener.close()
        os.unlink(path)  # gone for good
        peer.close()

    thread = threading.Thread(target=daemon)
    thread.start()

    async def main():
        async with api.Client(path, reattach_timeout=0.5) as c:
            step = await c.run(bundle, ["x"])
            began = asyncio.get_running_loop().time()
            with pytest.raises(api.DaemonUnavailable, match="did not come back within 0.5 s; step 40.0 may"):
                await step.wait()
            return asyncio.get_running_loop().time() - began

    waited = arun(main())
    thread.join(10)
    assert 0.4 <= waited < 10


def test_wait_rides_through_a_lost_connection(fake_daemon, arun):
    def first(peer: Peer):
        peer.read()  # gone while the step runs

    def second(peer: Peer):
        assert peer.read()[0]["op"] == "wait"
        exited(peer, 50)

    scripts = iter([first, second])
    daemon = fake_daemon(lambda peer: next(scripts)(peer), connections=2)
    assert arun(api.Client(daemon.path).wait(50)).status == 0


def test_attach_takes_up_a_launch(fake_daemon, arun):
    def script(peer: Peer):
        assert peer.read()[0] == {"v": 1, "op": "attach", "job_id": 60, "step_id": 2, "first_task": 0}
        started(peer, 60, 2, 3)
        exited(peer, 60, 2, statuses=(0, 0, 0))

    daemon = fake_daemon(script)

    async def main():
        async with api.Client(daemon.path) as c:
            step = await c.attach(60, 2)
            assert step.ntasks == 3
            return await step.wait()

    assert arun(main()).ok


# ---- what importing it costs ------------------------------------------------------------------


def test_the_api_imports_without_the_daemons_dependencies():
    code = ("import sys, nodestepd; nodestepd.Client; import nodestepd.client; "
            "print(sorted(m for m in ('msgspec', 'uvloop', 'structlog') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"
    light = subprocess.run([sys.executable, "-c", "import sys, nodestepd; print('asyncio' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout == "False\n"  # `import nodestepd` alone (nodestepctl's) does not load the API


def test_the_package_is_marked_typed():
    assert (Path(nodestepd.__file__).parent / "py.typed").is_file()


def test_attach_to_a_detached_launch_is_a_conflict(fake_daemon, arun):
    def script(peer: Peer):
        peer.read()
        peer.write({"v": 1, "type": "error", "code": "conflict", "status": None,
                    "error": "step 61.0 was launched detached (nodestepctl wait 61.0 gives its status)"})

    daemon = fake_daemon(script)
    with pytest.raises(api.Conflict, match="launched detached"):
        arun(api.Client(daemon.path).attach(61))


def test_a_step_the_next_daemon_will_not_give_back_is_its_refusal(fake_daemon, arun, bundle):
    def first(peer: Peer):
        peer.read()
        started(peer, 32)

    def second(peer: Peer):
        peer.read()
        peer.write({"v": 1, "type": "error", "code": "conflict", "error": "step 32.0 already has its attached client",
                    "status": None})

    scripts = iter([first, second])
    daemon = fake_daemon(lambda peer: next(scripts)(peer), connections=2)

    async def main():
        async with api.Client(daemon.path) as c:
            await (await c.run(bundle, ["x"])).wait()

    with pytest.raises(api.Conflict, match="cannot attach to step 32.0 again: step 32.0 already has its attached"):
        arun(main())


def test_a_run_cancelled_while_launching_closes_its_connection(fake_daemon, arun, bundle):
    """The daemon then cancels the step it was launching (its client went), as for nodestepctl."""
    received = threading.Event()

    def script(peer: Peer):
        peer.read()
        received.set()
        with pytest.raises(EOFError):
            peer.read()

    daemon = fake_daemon(script)

    async def main():
        async with api.Client(daemon.path) as c:
            launching = asyncio.create_task(c.run(bundle, ["x"], stdout=api.COLLECT))
            await asyncio.get_running_loop().run_in_executor(None, received.wait, 10)
            launching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await launching
            assert not c._holding

    arun(main())
