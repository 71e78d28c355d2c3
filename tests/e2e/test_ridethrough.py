"""Attached clients ride through a daemon restart (issue 14, finding 14.4), with real runc
and the real CLI: the containers keep the clients' stdio, each `nodestepctl run` re-attaches
to its step on the next daemon and exits with the step's real status; signals sent to a
client meanwhile reach the step once it has re-attached. Job ids 14400-14499 belong to
this file.

The containers wait for a "go" file the test creates in the bundle's rootfs, so the test,
not a sleep, decides that they end after the restart.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time

import pytest

from conftest import REPO, runc_containers, spool_entries
from test_server_protocol import _send_and_receive, as_user
from nodestepd.protocol.messages import ErrorReply, ExitReply, StartedReply

MODES = {
    "run": (REPO / "tests" / "oci-conf-examples" / "runc-run.conf").read_text(),
    "create-start": (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text(),
}
LINES = 200  # lines each container writes after the restart: none may be lost


@pytest.fixture(params=sorted(MODES))
def conf(request) -> str:
    return MODES[request.param]


@pytest.fixture
def gates(bundle):
    """gates(name) -> (the path that opens the gate, the container script's wait for it)."""
    made = []

    def make(name: str):
        path = bundle / "rootfs" / "tmp" / f"go-{name}"
        path.unlink(missing_ok=True)
        made.append(path)
        return path, f"while [ ! -e /tmp/go-{name} ]; do sleep 0.1; done"

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def records(daemon) -> dict[str, dict]:
    steps = daemon.state_dir / "steps"
    return {p.name: json.loads(p.read_bytes()) for p in steps.glob("*.json")} if steps.exists() else {}


def wait_recorded_running(daemon, jobs: list[int], timeout: float = 60) -> None:
    """Until each step's record says running (written right before the `started` reply):
    a launch the daemon had not recorded as running when it died is undone by the next one."""
    deadline = time.monotonic() + timeout
    while not set(jobs) <= {r["job_id"] for r in records(daemon).values() if r["state"] == "running"}:
        assert time.monotonic() < deadline, f"steps not recorded running within {timeout} s"
        time.sleep(0.02)


def read_until(fd: int, wanted: bytes, timeout: float = 60) -> bytes:
    """Read a pipe until `wanted` has appeared; returns everything read (select, no sleep)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {wanted!r} within {timeout} s; got {seen!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"the stream ended before {wanted!r}; got {seen!r}"
        seen += chunk
    return seen


def kill_daemon(daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def assert_nothing_left(daemon, user) -> None:
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    assert list((daemon.state_dir / "steps").iterdir()) == []


def test_20_attached_clients_ride_through_a_killed_daemon(start_daemon, conf, user, bundle, gates):
    """Each client exits with its own container's status, none with 255, all output there."""
    daemon = start_daemon(conf)
    jobs = list(range(14400, 14420))
    opens, clients = {}, {}
    for job in jobs:
        opens[job], wait = gates(str(job))
        script = (f"echo ready; {wait}; i=0; while [ $i -lt {LINES} ]; do echo {job}:$i; i=$((i+1)); done; "
                  f"exit {job % 100 + 1}")
        clients[job] = daemon.ctl_popen(user, "run", "--job-id", str(job), "--bundle", str(bundle), "--",
                                        "sh", "-c", script)
    seen = {job: read_until(clients[job].stdout.fileno(), b"ready\n") for job in jobs}
    wait_recorded_running(daemon, jobs)
    kill_daemon(daemon)
    second = start_daemon(after=daemon)
    for job in jobs:
        opens[job].touch()
    statuses = {}
    for job in jobs:
        out, err = clients[job].communicate(timeout=120)
        statuses[job] = clients[job].returncode
        lines = (seen[job] + out).decode().split()
        assert lines == ["ready"] + [f"{job}:{i}" for i in range(LINES)], (job, err)
    assert statuses == {job: job % 100 + 1 for job in jobs}
    assert second.log().count("client re-attached") == len(jobs)
    assert_nothing_left(second, user)


def test_an_attached_client_rides_through_a_stop_that_leaves_steps_running(start_daemon, user, bundle, gates):
    """SIGTERM with steps_on_stop = "leave" (systemctl restart): the daemon closes the
    client's connection on its way out, the next one gives it the step back."""
    daemon = start_daemon(MODES["create-start"], "--steps-on-stop", "leave")
    go, wait = gates("14425")
    client = daemon.ctl_popen(user, "run", "--job-id", "14425", "--bundle", str(bundle), "--",
                              "sh", "-c", f"echo ready; {wait}; echo done; exit 25")
    read_until(client.stdout.fileno(), b"ready\n")
    wait_recorded_running(daemon, [14425])  # else the stop cuts the launch short, and the next daemon undoes it
    assert daemon.terminate() == 0
    read_until(client.stderr.fileno(), b"reconnecting")
    second = start_daemon(after=daemon)
    read_until(client.stderr.fileno(), b"re-attached to step 14425.0")
    go.touch()
    out, _ = client.communicate(timeout=60)
    assert (client.returncode, out) == (25, b"done\n")
    assert_nothing_left(second, user)


def test_a_signal_sent_while_the_daemon_is_down_is_delivered_after_the_restart(start_daemon, conf, user, bundle):
    daemon = start_daemon(conf)
    client = daemon.ctl_popen(user, "run", "--job-id", "14430", "--bundle", str(bundle), "--",
                              "sh", "-c", "trap 'exit 42' USR1; echo ready; while :; do sleep 0.1; done")
    read_until(client.stdout.fileno(), b"ready\n")
    wait_recorded_running(daemon, [14430])
    kill_daemon(daemon)
    read_until(client.stderr.fileno(), b"reconnecting")
    client.send_signal(signal.SIGUSR1)
    # The client says it holds the signal: it has it, with no daemon to pass it to.
    read_until(client.stderr.fileno(), b"USR1 held until nodestepd is back")
    second = start_daemon(after=daemon)
    client.communicate(timeout=60)
    assert client.returncode == 42
    assert "signal delivered" in second.log()
    assert_nothing_left(second, user)


def test_a_daemon_that_does_not_come_back_gives_255_after_the_bound(start_daemon, user, bundle, gates):
    """Then the next daemon, finding no client for the recovered attached step within its
    grace period, cancels it."""
    daemon = start_daemon(MODES["run"])
    _, wait = gates("14440")
    client = daemon.ctl_popen(user, "run", "--job-id", "14440", "--reattach-timeout", "3", "--bundle", str(bundle),
                              "--", "sh", "-c", f"echo ready; {wait}")
    read_until(client.stdout.fileno(), b"ready\n")
    wait_recorded_running(daemon, [14440])
    kill_daemon(daemon)
    lost = time.monotonic()
    # Its exit, not the end of its pipes: the container holds them.
    assert client.wait(timeout=60) == 255
    waited = time.monotonic() - lost
    assert 3 <= waited < 13, waited
    err = read_until(client.stderr.fileno(), b"tells its status once nodestepd is back")
    assert b"nodestepd did not come back within 3 s; step 14440.0 may still be running" in err
    second = start_daemon(MODES["run"], "--reattach-grace", "1", after=daemon)
    result = second.ctl(user, "wait", "14440.0")
    assert result.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL), result.stderr
    assert "no client re-attached within the grace period; cancelling the step" in second.log()
    assert_nothing_left(second, user)


def test_a_client_that_dies_after_re_attaching_still_cancels_its_step(start_daemon, user, bundle, gates):
    """As srun: a step does not outlive the client holding its stdio, re-attached or not."""
    daemon = start_daemon(MODES["run"])
    _, wait = gates("14450")
    client = daemon.ctl_popen(user, "run", "--job-id", "14450", "--bundle", str(bundle), "--",
                              "sh", "-c", f"echo ready; {wait}")
    read_until(client.stdout.fileno(), b"ready\n")
    wait_recorded_running(daemon, [14450])
    kill_daemon(daemon)
    second = start_daemon(after=daemon)
    read_until(client.stderr.fileno(), b"re-attached to step 14450.0")
    client.kill()
    client.wait()
    result = second.ctl(user, "wait", "14450.0")
    assert result.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL), result.stderr
    assert "attached client went away" in second.log()
    assert_nothing_left(second, user)


def test_a_daemon_stopped_with_steps_on_stop_cancel_gives_the_client_the_cancellation(start_daemon, user, bundle):
    daemon = start_daemon(MODES["run"], "--steps-on-stop", "cancel")
    client = daemon.ctl_popen(user, "run", "--job-id", "14460", "--reattach-timeout", "30", "--bundle", str(bundle),
                              "--", "sh", "-c", "echo ready; exec sleep 1000")
    read_until(client.stdout.fileno(), b"ready\n")
    wait_recorded_running(daemon, [14460])
    daemon.proc.send_signal(signal.SIGTERM)
    _, err = client.communicate(timeout=30)
    assert client.returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL), err
    assert b"reconnecting" not in err
    assert daemon.proc.wait(timeout=30) == 0


def test_attach_is_answered_only_for_the_owner_and_only_once(start_daemon, user, other_user, bundle, gates):
    """Authorised like `wait`: someone else's step is reported as missing. A running step
    that has its client (launched here, or re-attached) cannot be attached again."""
    daemon = start_daemon(MODES["run"])
    go, wait = gates("14470")
    client = daemon.ctl_popen(user, "run", "--job-id", "14470", "--bundle", str(bundle), "--",
                              "sh", "-c", f"echo ready; {wait}; exit 7")
    read_until(client.stdout.fileno(), b"ready\n")
    attach = {"v": 1, "op": "attach", "job_id": 14470, "step_id": 0, "first_task": 0}
    (theirs,) = as_user(other_user, _send_and_receive, str(daemon.socket), attach, [])
    assert isinstance(theirs, ErrorReply) and theirs.code == "not-found", theirs
    (again,) = as_user(user, _send_and_receive, str(daemon.socket), attach, [])
    assert isinstance(again, ErrorReply) and again.code == "conflict", again
    (wrong_task,) = as_user(user, _send_and_receive, str(daemon.socket), {**attach, "first_task": 1}, [])
    assert isinstance(wrong_task, ErrorReply) and wrong_task.code == "not-found", wrong_task
    go.touch()
    client.communicate(timeout=60)
    assert client.returncode == 7
    # A finished step: `started`, then its exit at once (for a client whose daemon died
    # after the step ended but before the exit reached it).
    started, ended = as_user(user, _send_and_receive, str(daemon.socket), attach, [], 2)
    assert isinstance(started, StartedReply) and started.job_id == 14470, started
    assert isinstance(ended, ExitReply) and ended.status == 7, ended
