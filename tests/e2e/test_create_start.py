"""Create/start mode with real runc: the container's init is watched by pidfd, not polled.

The oci.conf is the guide's runc create/start example; some tests wrap one of its
commands in a small script (counting calls, hiding the pid, faking a state) next to the
real runc.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import read_line_from, runc_containers, spool_entries
from nodestepd.process.watch import children

RUNC = "runc --rootless=true --root=/run/user/%U/"
NAME = "%n.%u.%j.%s.%t"
LAUNCH_FAILED = 125


def oci_conf(**override: str) -> str:
    commands = {
        "RunTimeQuery": f"{RUNC} state {NAME}",
        "RunTimeKill": f"{RUNC} kill -a {NAME}",
        "RunTimeDelete": f"{RUNC} delete --force {NAME}",
        "RunTimeCreate": f"{RUNC} create {NAME} -b %b",
        "RunTimeStart": f"{RUNC} start {NAME}",
    }
    commands.update({f"RunTime{key}": value for key, value in override.items()})
    return "".join(f'{key}="{value}"\n' for key, value in commands.items())


SCRIPTS = {
    # count.sh LOG CMD...: note the call, then become the real command.
    "count.sh": 'log=$1; shift; echo "$*" >> "$log"; exec "$@"\n',
    # nopid.sh RUNC-ARGS...: runc's state without its pid (a runtime that does not report one).
    "nopid.sh": 'out=$(runc "$@") || exit $?; printf "%s\\n" "$out" | grep -v \'"pid":\'\n',
    # state.sh STATUS: a query that always reports STATUS.
    "state.sh": 'printf \'{"ociVersion": "1.0.2", "id": "x", "status": "%s", "pid": 0, "bundle": "/"}\\n\' "$1"\n',
}


@pytest.fixture
def tools(user_dir) -> Path:
    """A directory of the user's holding the wrapper scripts and their logs."""
    path = user_dir("tools-")
    for name, body in SCRIPTS.items():
        (path / name).write_text("#!/bin/sh\n" + body)
        (path / name).chmod(0o755)
    return path


def counted(tools: Path) -> dict[str, str]:
    """Every command of the guide's config, through count.sh."""
    log = tools / "calls"
    plain = oci_conf()
    out = {}
    for line in plain.splitlines():
        key, value = line.split("=", 1)
        out[key.removeprefix("RunTime")] = f"{tools}/count.sh {log} " + value.strip('"')
    return out


def calls(tools: Path) -> list[str]:
    """The runc subcommands count.sh saw, in order."""
    words = [line.split() for line in (tools / "calls").read_text().splitlines()]
    return [next(w for w in line if w in ("create", "start", "state", "kill", "delete")) for line in words]


def daemon_children(daemon) -> list[int]:
    return children(daemon.proc.pid)


def nothing_left(daemon, user) -> None:
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    assert daemon_children(daemon) == []  # the container inits were reaped, nothing orphaned lingers


def test_state_is_queried_before_start_only_not_while_running_nor_after_exit(start_daemon, user, bundle, tools):
    daemon = start_daemon(oci_conf(**counted(tools)))
    result = daemon.ctl(user, "run", "--job-id", "4000", "--bundle", str(bundle), "--", "sh", "-c", "echo hi; sleep 5; exit 3")
    assert (result.returncode, result.stdout) == (3, b"hi\n"), result.stderr
    # Slurm's backoff would have run `state` about a dozen times for these 5 s. None after
    # the exit either (issue 18): the monitor has said the init ended, and a confirming
    # `state` before RunTimeDelete only delayed the exit notice.
    assert calls(tools) == ["create", "state", "start", "delete"]
    nothing_left(daemon, user)


def test_exit_is_noticed_within_100_ms(start_daemon, user, bundle):
    daemon = start_daemon(oci_conf())
    mark = bundle / "rootfs" / "tmp" / "exit-mark"
    mark.unlink(missing_ok=True)
    client = daemon.ctl_popen(user, "run", "--job-id", "4001", "--bundle", str(bundle), "--",
                              "sh", "-c", "sleep 1; echo > /tmp/exit-mark; exit 0")
    ended = threading.Event()
    returned: list[int] = []

    def reap() -> None:
        client.wait()
        returned.append(time.time_ns())
        ended.set()

    threading.Thread(target=reap, daemon=True).start()
    assert ended.wait(60)
    assert client.returncode == 0, client.stderr.read()
    delay = (returned[0] - mark.stat().st_mtime_ns) / 1e9  # the container's last act to the client's exit
    print(f"exit noticed {delay * 1000:.1f} ms after the container's last write")
    assert 0 <= delay < 0.100, f"exit noticed {delay * 1000:.1f} ms after the container ended"
    nothing_left(daemon, user)


def test_signal_goes_to_the_container_init_through_the_pidfd(start_daemon, user, bundle):
    daemon = start_daemon(oci_conf())
    client = daemon.ctl_popen(user, "run", "--job-id", "4002", "--bundle", str(bundle), "--",
                              "sh", "-c", 'trap "exit 12" HUP; echo ready; while :; do sleep 1; done')
    read_line_from(client.stdout, b"ready")
    assert daemon.ctl(user, "signal", "4002.0", "HUP").returncode == 0
    client.communicate(timeout=30)
    assert client.returncode == 12
    # SIGKILL from outside the container: the init dies, 128+9 as in run mode.
    client = daemon.ctl_popen(user, "run", "--job-id", "4003", "--bundle", str(bundle), "--",
                              "sh", "-c", "echo ready; exec sleep 1000")
    read_line_from(client.stdout, b"ready")
    assert daemon.ctl(user, "signal", "4003.0", "KILL").returncode == 0
    client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGKILL
    nothing_left(daemon, user)


def test_cancel_with_a_working_runtime_kill_lets_the_container_end_itself(start_daemon, user, bundle):
    # `runc kill` without -a needs no cgroup freezer: SIGTERM reaches the init, which traps it.
    daemon = start_daemon(oci_conf(Kill=f"{RUNC} kill {NAME}"))
    client = daemon.ctl_popen(user, "run", "--job-id", "4004", "--bundle", str(bundle), "--",
                              "sh", "-c", 'trap "echo bye; exit 42" TERM; echo ready; while :; do sleep 1; done')
    read_line_from(client.stdout, b"ready")
    started = time.monotonic()
    cancelled = daemon.ctl(user, "cancel", "4004.0")
    assert cancelled.returncode == 0, cancelled.stderr
    out, _ = client.communicate(timeout=30)
    assert client.returncode == 42 and b"bye" in out
    assert time.monotonic() - started < 5  # well within kill_wait (30 s): no timer was waited out
    assert "RunTimeKill failed" not in daemon.log()
    nothing_left(daemon, user)


def test_a_container_ignoring_runtime_kill_is_killed_after_kill_wait(start_daemon, user, bundle):
    daemon = start_daemon(oci_conf(Kill=f"{RUNC} kill {NAME}"), "--kill-wait", "1")
    client = daemon.ctl_popen(user, "run", "--job-id", "4005", "--bundle", str(bundle), "--",
                              "sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 1; done')
    read_line_from(client.stdout, b"ready")
    started = time.monotonic()
    assert daemon.ctl(user, "cancel", "4005.0").returncode == 0
    assert 1 <= time.monotonic() - started < 10
    client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGKILL
    assert "task still running after kill_wait; killing the container's init" in daemon.log()
    nothing_left(daemon, user)


def test_a_failing_create_is_a_clear_launch_error_with_nothing_left(start_daemon, user, bundle, workdir):
    daemon = start_daemon(oci_conf())
    broken = workdir / "bundle-without-rootfs"
    broken.mkdir()
    config = json.loads((bundle / "config.json").read_text())
    config["root"]["path"] = "no-such-rootfs"
    (broken / "config.json").write_text(json.dumps(config))
    os.chown(broken, user.uid, user.gid)
    result = daemon.ctl(user, "run", "--job-id", "4006", "--bundle", str(broken), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    err = result.stderr.decode()
    assert "no-such-rootfs" in err  # runc's own message, on the caller's stderr
    assert err.splitlines()[-1] == (
        "nodestepctl: RunTimeCreate failed with exit status 1 (the runtime's own message went to the step's stderr)"
    )
    nothing_left(daemon, user)
    assert json.loads(daemon.ctl(user, "ps", "--json").stdout) == []


@pytest.mark.parametrize("status, message", [
    ("creating", "the container was still 'creating' after 1 s"),
    ("running", "RunTimeQuery reports the container 'running', expected 'created'"),
])
def test_a_container_that_does_not_reach_created_is_deleted(start_daemon, user, bundle, tools, status, message):
    daemon = start_daemon(oci_conf(Query=f"{tools}/state.sh {status}"), "--runtime-timeout", "1")
    result = daemon.ctl(user, "run", "--job-id", "4007", "--bundle", str(bundle), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    # (A progress line may come first: the launch takes about a second.)
    assert result.stderr.decode().splitlines()[-1] == f"nodestepctl: {message}"
    nothing_left(daemon, user)  # real runc created it; RunTimeDelete removed it


def test_a_hanging_runtime_command_is_bounded_and_reported(start_daemon, user, bundle):
    daemon = start_daemon(oci_conf(Start="sleep 1000"), "--runtime-timeout", "1")
    started = time.monotonic()
    result = daemon.ctl(user, "run", "--job-id", "4008", "--bundle", str(bundle), "--", "true")
    assert time.monotonic() - started < 10
    assert result.returncode == LAUNCH_FAILED
    assert result.stderr.decode().splitlines()[-1] == (
        "nodestepctl: RunTimeStart failed with exit status 137: timed out after 1 s; killed"
    )
    assert "runtime command hung and was killed" in daemon.log()
    nothing_left(daemon, user)


def test_without_a_pid_it_falls_back_to_polling_and_says_so(start_daemon, user, bundle, tools):
    commands = counted(tools)
    commands["Query"] = f"{tools}/count.sh {tools}/calls {tools}/nopid.sh --rootless=true --root=/run/user/%U/ state {NAME}"
    daemon = start_daemon(oci_conf(**commands))
    result = daemon.ctl(user, "run", "--job-id", "4009", "--bundle", str(bundle), "--", "sh", "-c", "sleep 0.5; exit 3")
    # The state has no exit status: Slurm reports 0; we report it as unknown, never a made-up 0.
    assert result.returncode == 255, result.stderr
    assert b"exit status of task(s) 0 is not known" in result.stderr
    log = daemon.log()
    assert log.count("cannot watch the container's process; polling RunTimeQuery instead") == 1
    assert "problem='RunTimeQuery reports no pid'" in log
    assert "its exit status is unknown and is reported as unknown" in log
    wait = daemon.ctl(user, "wait", "4009.0")
    assert wait.returncode == 255 and b"is not known" in wait.stderr
    seen = calls(tools)
    assert seen[:3] == ["create", "state", "start"] and seen[-1] == "delete"
    assert seen.count("state") > 3  # polled while it ran
    nothing_left(daemon, user)


def test_a_runc_killed_in_run_mode_leaves_no_zombie_behind(start_daemon, user, bundle):
    """The container init orphaned by a dead runc is its task monitor's (a subreaper) to reap."""
    daemon = start_daemon()  # run mode
    client = daemon.ctl_popen(user, "run", "--job-id", "4010", "--bundle", str(bundle), "--",
                              "sh", "-c", "echo ready; exec sleep 1000")
    read_line_from(client.stdout, b"ready")
    state = subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "state",
                                         f"testnode.{user.name}.4010.0.0"]),
                           capture_output=True, env=user.env, check=True)
    init = json.loads(state.stdout)["pid"]
    init_fd = os.pidfd_open(init)
    (monitor,) = daemon_children(daemon)
    (shell,) = [int(k) for k in open(f"/proc/{monitor}/task/{monitor}/children").read().split()]
    (runc,) = [int(k) for k in open(f"/proc/{shell}/task/{shell}/children").read().split()]
    os.kill(runc, signal.SIGKILL)
    client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGKILL
    assert select.select([init_fd], [], [], 30)[0]  # RunTimeDelete killed the orphaned init
    os.close(init_fd)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{init}") and time.monotonic() < deadline:
        time.sleep(0.01)  # the monitor reaps it once released; no event reaches the test
    assert not os.path.exists(f"/proc/{init}"), "the orphaned init was left a zombie"
    nothing_left(daemon, user)


def test_a_slow_runtime_shows_progress_while_the_launch_waits(start_daemon, user, bundle):
    # A RunTimeStart that takes 2 s (a site's stage-in would look the same to the client).
    daemon = start_daemon(oci_conf(Start=f"sleep 2; {RUNC} start {NAME}"))
    result = daemon.ctl(user, "run", "--job-id", "4011", "--bundle", str(bundle), "--", "echo", "done")
    assert (result.returncode, result.stdout) == (0, b"done\n"), result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 2 and lines[0].startswith("nodestepctl: still launching after 1 s"), lines
    assert lines[1].startswith("nodestepctl: step 4011.0 started after 2."), lines
    nothing_left(daemon, user)
