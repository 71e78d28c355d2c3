"""nodestepd-monitor and its driver (monitor.py), with real processes and a real unprivileged user.

The tests run on uvloop as the daemon does. Those that kill the daemon's side or the
monitor run in a fresh Python process that is a child subreaper, as the daemon is: the
processes orphaned there become that process's children (not PID 1's, which here does
not reap), and it checks that none is left.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import pidfd_pids, proc_state, stopping, wait_gone
from nodestepd.process import monitor as monitor_module
from nodestepd.process.monitor import (
    Monitor,
    MonitoredProcess,
    MonitorMissing,
    monitor_program,
)
from nodestepd.process.exitfile import read_exit_file
from nodestepd.process.reaper import Reaper
from nodestepd.process.identity import Identity
from nodestepd.process.watch import NotWatchable, children, proc_ids, start_time
from uvloop_fixtures import OVERRIDE_WARNING, event_loop_policy, identity, on_uvloop  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings(OVERRIDE_WARNING)

PATH_ENV = {"PATH": "/usr/bin:/bin"}


def our_children() -> set[int]:
    return set(children(os.getpid()))  # worker threads come and go: children() copes


async def readable(fd: int, timeout: float) -> None:
    """Until fd polls readable, woken by the event loop; TimeoutError after timeout."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)


async def exited(pid: int, timeout: float = 10) -> None:
    """Until pid has exited (zombie or gone), woken by its pidfd: no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await readable(fd, timeout)
    except TimeoutError:
        raise AssertionError(f"process {pid} ({proc_state(pid)}) still alive after {timeout} s") from None
    finally:
        os.close(fd)


async def read_lines_until(fd: int, count: int, timeout: float = 10) -> list[str]:
    """The first `count` lines from a pipe, woken by the loop on readability."""
    data = b""
    while data.count(b"\n") < count:
        try:
            await readable(fd, timeout)
        except TimeoutError:
            raise AssertionError(f"timed out; got {data!r}") from None
        chunk = os.read(fd, 4096)
        assert chunk, f"end of stream; got {data!r}"
        data += chunk
    return data.decode().splitlines()[:count]


def proc_status(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, v in (line.split(":", 1) for line in f)}


def memfd_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data.decode()


class Harness:
    """Spawns monitors as the daemon would, and cleans up after the test as a Step does."""

    def __init__(self, identity: Identity, cwd: Path, exit_path: Path) -> None:
        self.identity = identity
        self.cwd = cwd
        self.exit_path = exit_path
        self.exit_fd = os.open(exit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.reaper = Reaper()
        self.monitors: list[Monitor] = []
        self.out = os.memfd_create("task-output", os.MFD_CLOEXEC)

    async def spawn(self, command: str, **kwargs) -> Monitor:
        kwargs.setdefault("identity", self.identity)
        kwargs.setdefault("cwd", str(self.cwd))
        kwargs.setdefault("env", PATH_ENV)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", self.out)
        kwargs.setdefault("stderr", self.out)
        kwargs.setdefault("exit_fd", self.exit_fd)
        kwargs.setdefault("start_timeout", 30)
        monitor = await asyncio.to_thread(Monitor.spawn, command, **kwargs)
        self.monitors.append(monitor)
        return monitor

    def output(self) -> str:
        return memfd_text(self.out)

    def records(self) -> dict[int, int]:
        statuses, problems = read_exit_file(self.exit_path)
        assert problems == []
        return statuses

    async def release(self, monitor: Monitor) -> None:
        """Release, then wait for the monitor to exit and the reaper to have reaped it.

        Its exit status 0 says it had no child left (ECHILD): as a subreaper, it was the
        parent of everything below it, so nothing of the task's is left running."""
        watch = monitor._watch
        monitor.release(self.reaper)
        await asyncio.wait_for(asyncio.gather(*self.reaper._tasks), 10)
        assert watch is not None and watch.status == 0
        assert proc_state(monitor.pid) is None

    async def close(self) -> None:
        for monitor in self.monitors:
            if monitor.holding:  # ctl still open: not released yet
                for proc in list(monitor._procs.values()):
                    proc.kill_group(signal.SIGKILL)
                    proc.send_signal(signal.SIGKILL)
                    await asyncio.wait_for(proc.wait(), 10)
                await self.release(monitor)
        await asyncio.wait_for(asyncio.gather(*self.reaper._tasks), 10)
        os.close(self.exit_fd)
        os.close(self.out)


@pytest.fixture
async def harness(identity, user_dir, new_dir):
    before = our_children()
    h = Harness(identity, user_dir("task-"), new_dir("state-", 0o700) / "exit")
    try:
        yield h
    finally:
        await h.close()
    assert our_children() == before  # every monitor reaped (with status 0: nothing below it left)
    assert not any(monitor.holding for monitor in h.monitors)  # every ctl closed: all released


# ---- a task stopped before its exec (issue 19.2) -------------------------------------------


TIMED_OUT = "the runtime did not start within 0.5 s (stopped or stuck before exec); killed"


async def test_a_task_stopped_before_its_exec_fails_at_its_start_deadline(harness, stopper_program):
    """Once forked, the task switches to the user, and any process of theirs can SIGSTOP it before
    its exec; the monitor waited on its report pipe for ever, and the daemon in recv. The stopper
    (root, tracing this process) stops the monitor's child right after its fork, every time. The
    monitor kills it at the deadline and reports `error ETIMEDOUT timeout`; nothing is left."""
    with stopping(stopper_program, os.getpid(), 2) as stopped:
        started = time.monotonic()
        with pytest.raises(OSError) as raised:
            await harness.spawn("true", start_timeout=0.5)
        elapsed = time.monotonic() - started
    assert (raised.value.errno, raised.value.strerror) == (errno.ETIMEDOUT, TIMED_OUT)
    assert 0.5 <= elapsed < 2
    task = stopped.get_nowait()
    assert proc_state(task) is None  # killed and reaped by the monitor
    assert harness.records() == {}  # never started: nothing to record


async def test_a_monitor_that_cannot_report_is_killed_with_its_task_at_our_deadline(harness, stopper_program):
    """The monitor's own report is bounded on our side too (a little later than its deadline): here
    the monitor is stopped (by root) while its task is stopped before its exec. We kill both."""
    with stopping(stopper_program, os.getpid(), 2) as stopped:
        started = time.monotonic()
        spawning = asyncio.ensure_future(harness.spawn("true", start_timeout=0.5))
        task = await asyncio.to_thread(stopped.get, timeout=10)
        monitor_pid, _ = proc_ids(task)
        os.kill(monitor_pid, signal.SIGSTOP)
        with pytest.raises(OSError) as raised:
            await spawning
        elapsed = time.monotonic() - started
    assert (raised.value.errno, raised.value.strerror) == (errno.ETIMEDOUT, TIMED_OUT)
    assert 2.5 <= elapsed < 4
    wait_gone([task], timeout=10)  # killed (its zombie handed on with the monitor's death)
    assert proc_state(monitor_pid) is None  # killed and reaped


# ---- the task: who, where, with what ----------------------------------------------------


async def test_the_task_runs_as_the_user_with_nothing_of_roots(harness, identity, other_user):
    # An extra supplementary group proves the list handed in is the one set.
    who = Identity(identity.user, identity.uid, identity.gid, (identity.gid, other_user.gid), identity.home)
    old_umask = os.umask(0o077)
    try:
        monitor = await harness.spawn(
            "exec grep -E '^(PPid|Uid|Gid|Groups|Umask|SigIgn|SigBlk|CapInh|CapPrm|CapEff|CapAmb|NSpgid|NSsid):' "
            "/proc/self/status", identity=who)
    finally:
        os.umask(old_umask)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 0
    fields = {k: v.split() for k, v in (line.split(":", 1) for line in harness.output().splitlines())}
    assert fields["PPid"] == [str(monitor.pid)]  # the monitor's child, not ours
    assert fields["Uid"] == [str(identity.uid)] * 4
    assert fields["Gid"] == [str(identity.gid)] * 4
    assert sorted(int(g) for g in fields["Groups"]) == sorted({identity.gid, other_user.gid})
    for cap in ("CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap][0], 16) == 0, cap
    assert fields["Umask"] == ["0022"]
    assert int(fields["SigIgn"][0], 16) == 0  # the monitor ignores SIGTERM and more; the task must not
    assert int(fields["SigBlk"][0], 16) == 0  # nor block SIGCHLD
    # `exec grep`: grep is the shell's process, the one the monitor said it started.
    assert fields["NSpgid"] == [str(monitor.task.pid)]  # it leads its own process group
    assert fields["NSsid"] == [str(monitor.pid)]  # in the monitor's own session
    assert os.getsid(0) != monitor.pid


async def test_the_task_gets_its_cwd_env_and_stdio_and_no_other_fd(harness):
    leak_r, leak_w = os.pipe()  # inheritable fds of ours must not reach the monitor or the task
    os.set_inheritable(leak_r, True)
    os.set_inheritable(leak_w, True)
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    cwd_fd = os.open(harness.cwd, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    env = {**PATH_ENV, "ODD": "a b\tc", "EMPTY": "", "UNI": "\u00e9"}
    try:
        monitor = await harness.spawn(
            'echo $$; readlink /proc/$$/cwd; readlink /proc/$$/fd/0; ls /proc/$$/fd; echo --; '
            'tr "\\0" "\\n" < /proc/$$/environ; echo --; read x',
            cwd=f"/proc/{os.getpid()}/fd/{cwd_fd}",  # as the daemon hands in a pinned task dir
            env=env, stdin=stdin_r)
        # While the task runs: the monitor holds none of its stdio, and no directory.
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{monitor.pid}/fd/{fd}") == "/dev/null"
        monitor_fds = {os.readlink(f"/proc/{monitor.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{monitor.pid}/fd")}
        assert not any(target.startswith(("pipe:", "/memfd:")) for target in monitor_fds), monitor_fds
        assert str(harness.exit_path) in monitor_fds
        assert os.readlink(f"/proc/{monitor.pid}/cwd") == "/"
        os.close(stdin_w)  # `read x` sees end-of-file: the shell ends with status 1
        stdin_w = -1
        assert await asyncio.wait_for(monitor.task.wait(), 10) == 1
    finally:
        for fd in (leak_r, leak_w, stdin_r, stdin_w, cwd_fd):
            if fd >= 0:
                os.close(fd)
    head, environ, tail = harness.output().split("--\n")
    pid, cwd, stdin, *fds = head.splitlines()
    assert tail == ""  # `read x` said nothing
    assert int(pid) == monitor.task.pid  # `started` named the task itself
    assert cwd == str(harness.cwd)
    assert stdin.startswith("pipe:")
    assert sorted(int(fd) for fd in fds) == [0, 1, 2]
    assert sorted(environ.splitlines()) == sorted(f"{k}={v}" for k, v in env.items())  # exactly the given env


async def test_the_monitor_has_no_environment_and_the_task_takes_in_its_own_as_the_user(harness):
    """The monitor is root for the task's whole life: the step's environment (built from what the
    user sent) is neither its environment (the C library's start-up reads GLIBC_TUNABLES, MALLOC_*)
    nor in its argv (world-readable); the task's side reads it from a memfd once it is the user."""
    env = {**PATH_ENV, "GLIBC_TUNABLES": "glibc.malloc.check=3", "ONLY_IN_ENV": "a value\nof two lines"}
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    try:
        monitor = await harness.spawn("cat /proc/$$/environ; read x", env=env, stdin=stdin_r)
        with open(f"/proc/{monitor.pid}/environ", "rb") as f:
            assert f.read() == b""
        with open(f"/proc/{monitor.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert b"glibc.malloc" not in cmdline and b"of two lines" not in cmdline
        os.close(stdin_w)
        stdin_w = -1
        assert await asyncio.wait_for(monitor.task.wait(), 10) == 1
    finally:
        os.close(stdin_r)
        if stdin_w >= 0:
            os.close(stdin_w)
    assert harness.output() == "".join(f"{k}={v}\0" for k, v in env.items())  # exactly env, in order


async def test_a_large_environment_reaches_the_task_intact(harness):
    """200 KB (one value of 100 KB, 100 of 1 KB)."""
    env = {**PATH_ENV, "BIG": "x" * 100_000, **{f"V{i}": chr(ord("a") + i % 26) * 1000 for i in range(100)}}
    monitor = await harness.spawn("cat /proc/$$/environ", env=env)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 0
    assert harness.output() == "".join(f"{k}={v}\0" for k, v in env.items())


async def test_an_environment_beyond_what_exec_takes_is_refused_and_nothing_is_left(harness):
    """7 MiB (more than execve ever takes): the task's side reads none of it; E2BIG, said as such."""
    before = our_children()
    with pytest.raises(OSError) as refused:
        await harness.spawn("exit 0", env={f"V{i}": "x" * 100_000 for i in range(70)})
    assert refused.value.errno == errno.E2BIG
    assert str(refused.value) == (f"[Errno {errno.E2BIG}] {os.strerror(errno.E2BIG)} "
                                  "(taking in the task's environment as the user)")
    assert our_children() == before


def test_an_env_fd_that_is_not_a_file_is_reported(identity, new_dir):
    """--env-fd must be the daemon's memfd: a pipe is refused by the task's side ("error EINVAL env")."""
    exit_fd = os.open(new_dir("state-", 0o700) / "exit", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env_r, env_w = os.pipe()
    try:
        argv = [monitor_program(), "--ctl-fd", str(theirs.fileno()), "--exit-fd", str(exit_fd), "--uid",
                str(identity.uid), "--gid", str(identity.gid), "--groups", str(identity.gid),
                "--cwd", "/", "--env-fd", str(env_r), "--", "/bin/echo", "ran"]
        result = subprocess.run(argv, pass_fds=(theirs.fileno(), exit_fd, env_r), env={}, capture_output=True,
                                timeout=10)
        assert (result.returncode, result.stdout) == (1, b""), result
        assert ours.recv(256) == f"error {errno.EINVAL} env\n".encode()
    finally:
        for fd in (exit_fd, env_r, env_w):
            os.close(fd)
        ours.close()
        theirs.close()


# ---- exit statuses --------------------------------------------------------------------


@pytest.mark.parametrize("command, status", [
    ("exit 0", 0), ("exit 42", 42), ("exit 255", 255),
    ("kill -TERM $$", 128 + signal.SIGTERM), ("kill -KILL $$", 128 + signal.SIGKILL),
])
async def test_exit_status_reaches_ctl_and_the_exit_file(harness, command, status):
    monitor = await harness.spawn(command)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == status
    assert monitor.task.status_known
    assert monitor.task.status == status and not monitor.task.running
    # The file is written before ctl: whatever ctl said is already on disk.
    assert harness.records() == {monitor.task.pid: status}
    await harness.release(monitor)
    assert harness.records() == {monitor.task.pid: status}  # recorded once, not again when reaped


async def test_tasks_started_at_once_from_worker_threads(harness):
    monitors = await asyncio.gather(*(harness.spawn(f"exit {i}") for i in range(20)))
    statuses = await asyncio.wait_for(asyncio.gather(*(m.task.wait() for m in monitors)), 10)
    assert statuses == list(range(20))
    assert len({m.pid for m in monitors} | {m.task.pid for m in monitors}) == 40
    assert harness.records() == {m.task.pid: i for i, m in enumerate(monitors)}


async def test_an_exit_file_that_cannot_be_written_is_reported_and_ctl_still_works(harness, capsys):
    full = os.open("/dev/full", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)  # every write: ENOSPC
    try:
        monitor = await harness.spawn("exit 3", exit_fd=full)
    finally:
        os.close(full)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 3
    assert monitor.task.status_known
    logged = "".join(capsys.readouterr())
    assert "task monitor cannot write the exit file" in logged
    assert os.strerror(errno.ENOSPC) in logged


async def test_poll_reads_the_record_without_the_loop_reader(harness):
    monitor = await harness.spawn("exit 5")
    status = monitor.task.poll()  # no loop reader yet: poll() reads ctl itself, without blocking
    if status is None:
        ready, _, _ = select.select([monitor._ctl], [], [], 10)  # the record has arrived
        assert ready
        status = monitor.task.poll()
    assert status == 5


# ---- starting fails ------------------------------------------------------------------


async def test_a_shell_that_does_not_exist(harness):
    before = our_children()
    with pytest.raises(FileNotFoundError) as failure:
        await harness.spawn("true", shell="/nonexistent/sh")
    assert failure.value.errno == errno.ENOENT
    assert failure.value.strerror == os.strerror(errno.ENOENT)  # what the step shows the user
    assert failure.value.filename == "/nonexistent/sh"
    assert our_children() == before  # the monitor is reaped, nothing is left
    assert harness.records() == {}


async def test_a_shell_the_user_may_not_execute(harness, new_dir):
    program = new_dir("prog-") / "sh"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o744)  # root may run it, the user may not
    with pytest.raises(PermissionError) as failure:
        await harness.spawn("true", shell=str(program))
    assert failure.value.errno == errno.EACCES
    assert failure.value.filename == str(program)


async def test_a_working_directory_the_user_cannot_enter(harness, user_dir):
    closed = user_dir("closed-", 0o600)  # the user's own, but not searchable: root could enter it
    with pytest.raises(PermissionError) as failure:
        await harness.spawn("true", cwd=str(closed))
    assert failure.value.errno == errno.EACCES
    assert failure.value.filename == str(closed)


async def test_a_working_directory_not_owned_by_the_user(harness, new_dir):
    before = our_children()
    with pytest.raises(PermissionError, match="is not owned by"):
        await harness.spawn("true", cwd=str(new_dir("roots-", 0o755)))
    assert our_children() == before  # refused before anything was started


def test_fds_the_monitor_inherits_do_not_reach_the_task(identity, user_dir, new_dir):
    """The daemon passes only ctl and the exit file; anything else the monitor is handed
    by mistake must still stop at the task's exec."""
    exit_fd = os.open(new_dir("state-", 0o700) / "exit", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stray_r, stray_w = os.pipe()
    out = os.memfd_create("task-output", os.MFD_CLOEXEC)
    try:
        argv = [monitor_program(), "--ctl-fd", str(theirs.fileno()), "--exit-fd", str(exit_fd), "--uid",
                str(identity.uid), "--gid", str(identity.gid), "--groups", str(identity.gid),
                "--cwd", str(user_dir("task-")), "--", "/bin/sh", "-c", "ls /proc/$$/fd"]
        monitor = subprocess.Popen(argv, pass_fds=(theirs.fileno(), exit_fd, stray_r, stray_w), stdout=out,
                                   stdin=subprocess.DEVNULL)
        theirs.close()
        assert ours.recv(256).startswith(b"started ")
        assert ours.recv(256).startswith(b"exit ")
        ours.close()  # released: the monitor reaps the task and exits
        assert monitor.wait(10) == 0
    finally:
        for fd in (exit_fd, stray_r, stray_w):
            os.close(fd)
        ours.close()
        theirs.close()
    assert sorted(int(fd) for fd in memfd_text(out).split()) == [0, 1, 2]
    os.close(out)


async def test_the_monitor_program_is_installed_and_its_absence_is_explained(harness, monkeypatch, tmp_path):
    path = monitor_program()
    st = os.stat(path)
    assert path == os.path.join(os.path.dirname(monitor_module.__file__), "_libexec", "nodestepd-monitor")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    monkeypatch.setattr(monitor_module, "LIBEXEC_DIR", str(tmp_path))
    with pytest.raises(MonitorMissing, match="nodestepd-monitor is missing or not executable.*gcc, libc6-dev"):
        await harness.spawn("true")


async def test_bad_arguments_are_refused(identity, new_dir):
    """The program checks what the daemon hands it: one that is not SOCK_SEQPACKET, or an
    exit file not opened for appending, would lose or tear records."""
    exit_path = new_dir("state-", 0o700) / "exit"
    plain = os.open(exit_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)  # no O_APPEND
    appending = os.open(exit_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stream_ours, stream_theirs = socket.socketpair()
    try:
        def run(ctl, exit_fd):
            argv = [monitor_program(), "--ctl-fd", str(ctl.fileno()), "--exit-fd", str(exit_fd), "--uid",
                    str(identity.uid), "--gid", str(identity.gid), "--groups", "", "--cwd", "/", "--", "/bin/true"]
            return subprocess.run(argv, pass_fds=(ctl.fileno(), exit_fd), capture_output=True, text=True)

        result = run(theirs, plain)
        assert result.returncode == 2 and "not open for appending" in result.stderr
        assert ours.recv(256) == f"error {errno.EINVAL} setup\n".encode()
        result = run(stream_theirs, appending)
        assert result.returncode == 2 and "not a SOCK_SEQPACKET socket" in result.stderr
        assert os.path.getsize(exit_path) == 0
    finally:
        for s in (ours, theirs, stream_ours, stream_theirs):
            s.close()
        os.close(plain)
        os.close(appending)


# ---- zombies held until release -------------------------------------------------------


async def test_the_task_stays_a_zombie_until_release(harness):
    watched = pidfd_pids()
    monitor = await harness.spawn("exit 7")
    task = monitor.task
    started = start_time(task.pid)
    assert await asyncio.wait_for(task.wait(), 10) == 7
    # Held: the pid and the process group it leads cannot be reused while the daemon
    # still runs RunTimeDelete with %p and sends its final SIGKILL to the group.
    assert proc_state(task.pid) == "Z"
    assert start_time(task.pid) == started
    os.killpg(task.pid, 0)  # the group still exists
    task.kill_group(signal.SIGKILL)  # safe, and harmless
    assert task.send_signal(signal.SIGTERM) is False  # it has exited
    assert proc_state(monitor.pid) in ("R", "S")  # the monitor waits for us
    await harness.release(monitor)  # it reaps the zombie, then exits: nothing left
    assert proc_state(task.pid) is None
    assert start_time(task.pid) is None
    task.reap()
    task.reap()  # idempotent
    assert task.status == 7
    assert pidfd_pids() == watched  # nothing watched any more: the task released, the monitor reaped


async def test_signals_reach_the_task_through_its_pidfd(harness):
    monitor = await harness.spawn("exec sleep 1000")
    assert monitor.task.send_signal(signal.SIGUSR1) is True
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 128 + signal.SIGUSR1


async def test_kill_group_reaches_what_the_task_left_in_its_group(harness):
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        monitor = await harness.spawn("sleep 1000 & echo $!; exit 3", stdout=w)
        (leftover,) = map(int, await read_lines_until(r, 1))
    finally:
        os.close(r)
        os.close(w)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 3
    assert os.getpgid(leftover) == monitor.task.pid  # in the dead leader's group, now the monitor's child
    monitor.task.kill_group(signal.SIGKILL)
    await exited(leftover)
    await harness.release(monitor)
    assert harness.records() == {monitor.task.pid: 3, leftover: 128 + signal.SIGKILL}


async def test_release_while_the_task_runs_leaves_it_to_the_monitor(harness):
    """The daemon letting go (stopping, leaving the step running): the monitor records the
    end anyway, and the kernel still tells the pidfd holder the status."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        monitor = await harness.spawn("read x; exit 4", stdin=r)
        task = monitor.task
        monitor.release(harness.reaper)
        assert proc_state(task.pid) in ("R", "S") and task.running
        os.write(w, b"go\n")
        assert await asyncio.wait_for(task.wait(), 10) == 4
        assert task.status_known  # PIDFD_INFO_EXIT, once the monitor has reaped it
    finally:
        os.close(r)
        os.close(w)
    await asyncio.wait_for(asyncio.gather(*harness.reaper._tasks), 10)
    assert harness.records() == {task.pid: 4}
    task.reap()


async def test_the_monitor_ignores_termination_signals(harness):
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        monitor = await harness.spawn("read x; exit 8", stdin=r)
        fields = proc_status(monitor.pid)
        ignored = int(fields["SigIgn"][0], 16)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
            assert ignored & (1 << (sig - 1)), sig
        assert int(fields["SigBlk"][0], 16) & (1 << (signal.SIGCHLD - 1))  # read through a signalfd
        assert os.getsid(monitor.pid) == monitor.pid  # its own session: no terminal's hang-up reaches it
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            os.kill(monitor.pid, sig)
        os.write(w, b"go\n")
        # The record proves it is alive and working after the signals.
        assert await asyncio.wait_for(monitor.task.wait(), 10) == 8
        assert proc_state(monitor.pid) in ("R", "S")
    finally:
        os.close(r)
        os.close(w)


# ---- orphans: a container's init left behind ----------------------------------------------


async def test_an_orphan_becomes_the_monitors_and_can_be_adopted(harness, identity, other_user):
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        # Like RunTimeCreate: the shell leaves a process behind and exits.
        monitor = await harness.spawn("sleep 1000 & echo $!; exit 0", stdout=w)
        (init,) = map(int, await read_lines_until(r, 1))
    finally:
        os.close(r)
        os.close(w)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 0
    with pytest.raises(NotWatchable, match=f"runs as uid {identity.uid}, not {other_user.uid}"):
        monitor.adopt(init, other_user.uid)
    with pytest.raises(NotWatchable, match="is not a child of the task monitor"):
        monitor.adopt(os.getpid(), 0)
    adopted = monitor.adopt(init, identity.uid)
    assert isinstance(adopted, MonitoredProcess) and adopted.running
    assert monitor.adopt(init, identity.uid) is adopted
    assert adopted.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(adopted.wait(), 10) == 128 + signal.SIGTERM
    assert proc_state(init) == "Z"  # held like the task
    await harness.release(monitor)
    assert harness.records() == {monitor.task.pid: 0, init: 128 + signal.SIGTERM}
    adopted.reap()


async def test_adopting_an_orphan_that_already_ended_takes_its_record(harness, identity):
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        monitor = await harness.spawn("sleep 1000 & echo $!; exit 0", stdout=w)
        (init,) = map(int, await read_lines_until(r, 1))
    finally:
        os.close(r)
        os.close(w)
    await exited(monitor.task.pid)  # not task.wait(): no loop reader, so we see when records come
    os.kill(init, signal.SIGKILL)  # the container ended before the daemon got to it
    while init not in monitor._records:
        ready, _, _ = select.select([monitor._ctl], [], [], 10)
        assert ready, "no record for the init"
        monitor._drain()
    assert proc_state(init) is None  # an orphan nobody holds: reaped as soon as it ended
    adopted = monitor.adopt(init, identity.uid)
    assert adopted.status == 128 + signal.SIGKILL and not adopted.running  # the record counted
    assert await adopted.wait() == 128 + signal.SIGKILL
    assert await monitor.task.wait() == 0


async def test_a_zombie_left_by_the_task_is_recorded_when_it_reaches_the_monitor(harness, identity):
    """The task's own zombie child (never reaped: the task exec'ed sleep) is handed to the
    monitor, already dead, when the task dies.

    The child ends only once the test closes its stdin, after the shell has exec'ed: dash
    may reap a finished background job before an exec, and then there is no zombie."""
    r, w = os.pipe2(os.O_CLOEXEC)
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
    try:
        # dash gives background jobs /dev/null as stdin: the gate goes in as fd 3.
        monitor = await harness.spawn(
            "exec 3<&0; (read x <&3; exit 5) & echo $!; exec sh -c 'echo exec; exec sleep 1000'",
            stdin=gate_r, stdout=w)
        lines = await read_lines_until(r, 2)
        assert lines[1] == "exec"
        zombie = int(lines[0])
    finally:
        for fd in (r, w, gate_r):
            os.close(fd)
    os.close(gate_w)  # the child's read ends: it exits, and nobody reaps it
    await exited(zombie)
    assert proc_state(zombie) == "Z"
    monitor.task.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 128 + signal.SIGKILL
    while zombie not in monitor._records:  # handed to the monitor, recorded and reaped (nobody holds it)
        ready, _, _ = select.select([monitor._ctl], [], [], 10)
        assert ready, "no record for the zombie"
        monitor._drain()
    adopted = monitor.adopt(zombie, identity.uid)  # known by its record
    assert await asyncio.wait_for(adopted.wait(), 10) == 5
    await harness.release(monitor)
    assert harness.records() == {monitor.task.pid: 128 + signal.SIGKILL, zombie: 5}


async def test_many_orphans_each_recorded_once_even_when_ctl_fills_up(harness, identity):
    """600 orphans end at once while nobody reads ctl: more records than the socket holds
    (about 280 here). The monitor must neither block nor lose one: all arrive once we read."""
    count = 600
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        # dash gives background jobs /dev/null as stdin: the pipe goes in as fd 3.
        monitor = await harness.spawn(
            f"exec 3<&0; i=0; while [ $i -lt {count} ]; do (read x <&3; exit 3) & echo $!; i=$((i+1)); done",
            stdin=r)
        os.close(r)
        r = -1
        await exited(monitor.task.pid)  # not task.wait(): that would start reading ctl
        orphans = [int(pid) for pid in harness.output().split()]
        assert len(orphans) == count
        os.close(w)  # every orphan's read ends: they all exit now, children of the monitor
        w = -1
        for pid in orphans:
            await exited(pid)
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
    while len(monitor._records) < count + 1:
        ready, _, _ = select.select([monitor._ctl], [], [], 10)
        assert ready, f"records stopped coming after {len(monitor._records)}"
        monitor._drain()
    assert monitor._records == {monitor.task.pid: 0, **{pid: 3 for pid in orphans}}
    # An orphan's record is sent once the monitor has reaped it: all of them are gone; the task is held.
    assert children(monitor.pid) == [monitor.task.pid]
    assert await monitor.task.wait() == 0
    await harness.release(monitor)
    assert harness.records() == {monitor.task.pid: 0, **{pid: 3 for pid in orphans}}
    assert len(harness.exit_path.read_text().splitlines()) == count + 1  # each once


async def test_orphans_by_the_thousand_are_reaped_as_they_end(harness):
    """Issue 19.6: the monitor held every orphan as a zombie until release (5,000 orphans, 5,000
    zombies of a root process, with pid_max 32,768). Now only the task (and the processes the
    daemon holds) stay: the monitor's children, sampled while 5,000 orphans come and go, stay few;
    every orphan is still recorded once, and the task's own status is right."""
    count = 5000
    monitor = await harness.spawn(f"i=0; while [ $i -lt {count} ]; do ( (exit 3) & ); i=$((i+1)); done; exit 7")
    peak = 0
    while proc_state(monitor.task.pid) not in ("Z", None):
        peak = max(peak, len(children(monitor.pid)))
        await asyncio.sleep(0.005)
    assert await asyncio.wait_for(monitor.task.wait(), 60) == 7
    while len(monitor._records) < count + 1:  # the records of the last orphans are coming
        ready, _, _ = select.select([monitor._ctl], [], [], 10)
        assert ready, f"records stopped coming after {len(monitor._records)}"
        monitor._drain()
    peak = max(peak, len(children(monitor.pid)))
    print(f"{count} orphans: the monitor's children peaked at {peak}")
    assert peak < 100  # before: every orphan stayed, 5,001 at the end
    assert children(monitor.pid) == [monitor.task.pid]
    records = dict(monitor._records)
    assert records.pop(monitor.task.pid) == 7
    assert len(records) == count and set(records.values()) == {3}
    await harness.release(monitor)


def test_the_exit_file_is_capped_but_keeps_the_tasks_record(identity, user_dir, new_dir):
    """Issue 19.7: once the daemon is gone nobody reads ctl, and a task making orphans made the exit
    file grow without bound. Past --exit-file-max (1 MiB by default) only the records a restarted
    daemon reads (the task's, those held) are written; ctl still gets every record, and one warning."""
    exit_path = new_dir("state-", 0o700) / "exit"
    exit_fd = os.open(exit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        argv = [monitor_program(), "--ctl-fd", str(theirs.fileno()), "--exit-fd", str(exit_fd), "--uid",
                str(identity.uid), "--gid", str(identity.gid), "--groups", str(identity.gid),
                "--cwd", str(user_dir("task-")), "--exit-file-max", "100", "--",
                "/bin/sh", "-c", "i=0; while [ $i -lt 50 ]; do ( (exit 3) & ); i=$((i+1)); done; exit 7"]
        monitor = subprocess.Popen(argv, pass_fds=(theirs.fileno(), exit_fd), stdin=subprocess.DEVNULL)
        theirs.close()
        messages = []
        while len([m for m in messages if m.startswith(b"exit ")]) < 51:  # the task's and the orphans
            ours.settimeout(30)
            message = ours.recv(256)
            assert message, f"the monitor closed ctl after {messages}"
            messages.append(message)
        ours.close()  # released: the monitor reaps the task and exits
        assert monitor.wait(10) == 0
    finally:
        os.close(exit_fd)
        ours.close()
        theirs.close()
    task = int(messages[0].split()[1])
    assert messages.count(f"warning exit-file {errno.EFBIG}\n".encode()) == 1
    assert len([m for m in messages if m.startswith(b"exit ")]) == 51  # ctl gets every record
    data = exit_path.read_bytes()
    statuses, problems = read_exit_file(exit_path)
    assert problems == []
    assert len(data) <= 100 + len(f"{task} 7\n")
    assert statuses.pop(task) == 7  # written past the cap: a restarted daemon needs it
    assert 0 < len(statuses) < 50 and set(statuses.values()) == {3}


# ---- the daemon dies, the monitor dies ---------------------------------------------------

# Run in a fresh Python process that becomes a child subreaper, as the daemon (or systemd)
# is: what gets orphaned becomes its child, and it checks that nothing is left.
PRELUDE = textwrap.dedent("""
    import asyncio, json, os, signal, subprocess, sys
    import uvloop
    from nodestepd.process.exitfile import read_exit_file
    from nodestepd.process.monitor import Monitor
    from nodestepd.process.kernel import become_subreaper
    from nodestepd.process.reaper import Reaper
    from nodestepd.process.identity import Identity
    from nodestepd.process.watch import children, proc_ids

    args = json.loads(sys.argv[1])
    identity = Identity.for_uid(args["uid"])

    def exit_file():
        return os.open(args["exit"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)

    def spawn(command, **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        kwargs.setdefault("start_timeout", 30)
        return Monitor.spawn(command, identity=identity, cwd=args["cwd"], env={"PATH": "/usr/bin:/bin"},
                             exit_fd=exit_file(), **kwargs)

    def state(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return None

    async def exited(pid):
        fd = os.pidfd_open(pid)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, 10)
        finally:
            loop.remove_reader(fd)
            os.close(fd)
""") + inspect.getsource(pidfd_pids)


@pytest.fixture
def run_script(user, user_dir, new_dir):
    """run_script(body) -> the JSON the script prints last; `args` holds uid, cwd and exit (a path)."""
    def run(body: str) -> dict:
        args = {"uid": user.uid, "cwd": str(user_dir("task-")), "exit": str(new_dir("state-", 0o700) / "exit")}
        result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body), json.dumps(args)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])
    return run


def test_the_task_outlives_the_daemon_and_its_status_is_written_down(run_script):
    out = run_script("""
        become_subreaper()  # the daemon's own parent (systemd, or here the test)
        stdin_r, stdin_w = os.pipe()
        report_r, report_w = os.pipe()
        daemon = os.fork()
        if daemon == 0:  # the daemon: starts the task under its monitor, then is killed
            try:
                os.close(stdin_w)
                monitor = spawn("read x; exit 9", stdin=stdin_r)
                os.write(report_w, f"{monitor.pid} {monitor.task.pid}".encode())
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.close(stdin_r)
        os.close(report_w)
        monitor, task = map(int, os.read(report_r, 100).split())
        _, daemon_status = os.waitpid(daemon, 0)
        after_death = {"monitor": state(monitor) in ("R", "S"), "monitor_parent": proc_ids(monitor)[0],
                       "task": state(task) in ("R", "S"),
                       "records": read_exit_file(args["exit"]).statuses}
        os.write(stdin_w, b"go\\n")  # the task ends while no daemon is there
        _, monitor_status = os.waitpid(monitor, 0)  # the monitor exits once it has recorded it
        print(json.dumps({"me": os.getpid(), "task_pid": task, "daemon_signal": os.WTERMSIG(daemon_status),
                          "after_death": after_death, "monitor_status": os.waitstatus_to_exitcode(monitor_status),
                          "records": read_exit_file(args["exit"]), "task_after": state(task),
                          "left": children(os.getpid())}))
    """)
    assert out["daemon_signal"] == signal.SIGKILL
    # Both alive: the monitor is ours now (we are the subreaper above the dead daemon).
    assert out["after_death"] == {"monitor": True, "monitor_parent": out["me"], "task": True, "records": {}}
    assert out["monitor_status"] == 0
    assert out["records"] == [{str(out["task_pid"]): 9}, []]
    assert out["task_after"] is None  # reaped by the monitor
    assert out["left"] == []


def test_a_zombie_held_for_a_dead_daemon_is_reaped(run_script):
    """The task ended and was recorded while the daemon lived; then the daemon died before
    releasing it: the monitor reaps the zombie and exits."""
    out = run_script("""
        become_subreaper()
        report_r, report_w = os.pipe()
        daemon = os.fork()
        if daemon == 0:
            try:
                async def main():
                    monitor = spawn("exit 6")
                    status = await monitor.task.wait()
                    os.write(report_w, f"{monitor.pid} {monitor.task.pid} {status} {state(monitor.task.pid)}".encode())
                uvloop.run(main())
            finally:
                os.kill(os.getpid(), signal.SIGKILL)
        os.close(report_w)
        monitor, task, status, task_state = os.read(report_r, 100).decode().split()
        os.waitpid(daemon, 0)
        _, monitor_status = os.waitpid(int(monitor), 0)
        print(json.dumps({"task": int(task), "status": int(status), "task_state": task_state,
                          "monitor_status": os.waitstatus_to_exitcode(monitor_status),
                          "records": read_exit_file(args["exit"]).statuses, "task_after": state(int(task)),
                          "left": children(os.getpid())}))
    """)
    assert (out["status"], out["task_state"]) == (6, "Z")
    assert out["monitor_status"] == 0
    assert out["records"] == {str(out["task"]): 6}  # recorded once, not again when reaped
    assert out["task_after"] is None
    assert out["left"] == []


def test_a_monitor_killed_hands_its_processes_to_the_daemon(run_script):
    """SIGKILL for the monitor: the daemon (a subreaper) inherits its children and learns
    their statuses itself, through the pidfds; nothing waits forever."""
    out = run_script("""
        async def main():
            become_subreaper()
            reaper = Reaper()
            running = await asyncio.to_thread(spawn, "exec sleep 1000")
            r, w = os.pipe2(os.O_CLOEXEC)
            ended = await asyncio.to_thread(spawn, "sleep 1000 & echo $!; exit 6", stdout=w)
            os.close(w)
            init = int(os.read(r, 100))
            await ended.task.wait()
            adopted = ended.adopt(init, identity.uid)  # a container's init, adopted from the monitor
            waits = [asyncio.ensure_future(p.wait()) for p in (running.task, adopted)]
            for monitor in (running, ended):
                os.kill(monitor.pid, signal.SIGKILL)
                await exited(monitor.pid)  # by then its children are handed on
            parents = [proc_ids(p.pid)[0] for p in (running.task, adopted)]
            signalled = [p.send_signal(signal.SIGTERM) for p in (running.task, adopted)]
            statuses = await asyncio.wait_for(asyncio.gather(*waits), 10)
            known = [p.status_known for p in (running.task, adopted)]
            for p in (running.task, ended.task, adopted):
                p.reap()
            for monitor in (running, ended):
                monitor.release(reaper)
            reaper.sweep()  # the ended task's zombie came to us too: the daemon sweeps at each step's release
            print(json.dumps({"me": os.getpid(), "parents": parents, "signalled": signalled, "statuses": statuses,
                              "known": known, "ended": ended.task.status, "watched": pidfd_pids(),
                              "left": children(os.getpid())}))
        uvloop.run(main())
    """)
    assert out["parents"] == [out["me"]] * 2  # ours now
    assert out["signalled"] == [True, True]
    assert out["statuses"] == [128 + signal.SIGTERM] * 2
    assert out["known"] == [True, True]
    assert out["ended"] == 6
    assert out["watched"] == []  # the dead monitors were reaped when their loss was noticed, not handed to the reaper
    assert out["left"] == []


UNKNOWING_DAEMON = """
    async def main():
        monitor = spawn("exec sleep 1000")
        waiting = asyncio.ensure_future(monitor.task.wait())
        os.kill(monitor.pid, signal.SIGKILL)
        monitor.task.send_signal(signal.SIGKILL)
        status = await asyncio.wait_for(waiting, 10)
        print(json.dumps({"task": monitor.task.pid, "status": status, "known": monitor.task.status_known}))
        monitor.task.reap()
    uvloop.run(main())
"""


def test_a_status_nobody_can_know_is_reported_as_unknown(run_script):
    """Here the daemon is not a subreaper: its monitor's children go to the process above
    (the script), which reaps nothing until the daemon is done. So the daemon cannot learn
    the task's status, and must say so instead of claiming 0."""
    out = run_script(f"""
        become_subreaper()  # the init above the daemon, reaping late
        daemon = subprocess.run([sys.executable, "-c", {PRELUDE + textwrap.dedent(UNKNOWING_DAEMON)!r}, sys.argv[1]],
                                capture_output=True, text=True, timeout=60)
        out = json.loads(daemon.stdout.strip().splitlines()[-1]) if daemon.returncode == 0 else {{"error": daemon.stderr}}
        for pid in children(os.getpid()):  # the monitor's orphans: ours to reap, now
            os.waitpid(pid, 0)
        out["left"] = children(os.getpid())
        print(json.dumps(out))
    """)
    assert "error" not in out, out.get("error")
    assert (out["status"], out["known"]) == (0, False)
    assert out["left"] == []


# ---- start_time -------------------------------------------------------------------------


def boot_ticks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def test_start_time_tells_a_recycled_pid_from_the_process_recorded():
    first = subprocess.Popen(["sleep", "1000"])
    pid, recorded = first.pid, start_time(first.pid)
    assert recorded is not None and start_time(pid) == recorded  # stable while it lives
    assert recorded <= boot_ticks()
    first.kill()
    first.wait()
    assert start_time(pid) is None  # gone
    # Start times count clock ticks: a process recycling the pid within the same tick would
    # look the same (it would take pid_max forks in 10 ms). Let one tick pass.
    while boot_ticks() <= recorded + 1:
        time.sleep(0.005)
    # Hand the same pid to a new process: the kernel gives out ns_last_pid + 1 next
    # (another process forking at that moment may take it: try again).
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        second = subprocess.Popen(["sleep", "1000"])
        try:
            if second.pid == pid:
                assert start_time(pid) not in (None, recorded)
                assert start_time(pid) > recorded
                return
        finally:
            second.kill()
            second.wait()
    pytest.fail(f"pid {pid} could not be handed out again")


def test_start_time_of_a_name_with_parentheses_and_spaces(new_dir):
    program = new_dir("prog-") / "a) b (c"
    os.symlink("/bin/sleep", program)
    proc = subprocess.Popen([str(program), "1000"])
    try:
        assert start_time(proc.pid) == int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        assert start_time(proc.pid) >= start_time(os.getpid())
    finally:
        proc.kill()
        proc.wait()


async def test_preserved_fds_reach_the_task_at_3_and_up_in_order_and_the_monitor_lets_go(harness):
    """run --preserve-fds: the fds given land at 3, 4, 5 in the given order, whatever their
    numbers were (here high ones, and one that is also another's target), without
    close-on-exec; nothing else gets through; the monitor keeps no copy."""
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
    high = [os.dup(r) for r, _ in pipes]
    moved = [os.dup2(fd, 100 + i, inheritable=False) for i, fd in enumerate(high)]
    try:
        for i, (_, w) in enumerate(pipes):
            os.write(w, f"pipe{i}\n".encode())
            os.close(w)
        monitor = await harness.spawn(
            "ls /proc/$$/fd; echo --; read a <&3; read b <&4; read c <&5; echo $a $b $c",
            preserved=(moved[2], moved[0], moved[1]))
        assert await asyncio.wait_for(monitor.task.wait(), 10) == 0
        monitor_fds = {os.readlink(f"/proc/{monitor.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{monitor.pid}/fd")}
        assert not any(target.startswith("pipe:") for target in monitor_fds), monitor_fds
        await harness.release(monitor)
    finally:
        for fd in (*moved, *high, *(r for r, _ in pipes)):
            os.close(fd)
    fds, said = harness.output().split("--\n")
    assert sorted(int(fd) for fd in fds.split()) == [0, 1, 2, 3, 4, 5]
    assert said == "pipe2 pipe0 pipe1\n"


@pytest.mark.parametrize("extra, problem", [
    (["--pass-fd", "2"], b"fds must be numbers above 2"),
    (["--pass-fd", "999"], b"--pass-fd: not an open fd"),
    (["--env-fd", "999"], b"--env-fd: not an open fd"),
])
def test_bad_pass_and_env_fds_are_refused(identity, new_dir, extra, problem):
    exit_fd = os.open(new_dir("state-", 0o700) / "exit", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        argv = [monitor_program(), "--ctl-fd", str(theirs.fileno()), "--exit-fd", str(exit_fd), "--uid",
                str(identity.uid), "--gid", str(identity.gid), "--groups", str(identity.gid),
                "--cwd", "/", *extra, "--", "/bin/true"]
        result = subprocess.run(argv, pass_fds=(theirs.fileno(), exit_fd), capture_output=True, timeout=10)
        assert result.returncode == 2 and problem in result.stderr, result.stderr
        assert ours.recv(256) == b"error 22 setup\n"
    finally:
        os.close(exit_fd)
        ours.close()
        theirs.close()


async def test_userns_runs_the_task_as_root_of_a_namespace_over_the_users_own_ids(harness):
    """--userns (a PMIx MPI step's runtime): the user is 0 in the task's new user namespace,
    their subordinate ids 1..N; outside, the task is still the user."""
    from nodestepd.step.mpi import read_subid_ranges

    ranges = read_subid_ranges(harness.identity.user, harness.identity.uid)
    if ranges is None:
        pytest.skip(f"{harness.identity.user} has no subordinate ids in /etc/subuid and /etc/subgid")
    monitor = await harness.spawn("id -u; cat /proc/self/uid_map /proc/self/gid_map; read x <&0",
                                  userns=tuple(ranges))
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 1  # `read` at end of file
    lines = [line.split() for line in harness.output().splitlines()]
    uid, gid = harness.identity.uid, harness.identity.gid
    assert lines == [["0"], ["0", str(uid), "1"], ["1", str(ranges.uid_start), str(ranges.uid_count)],
                     ["0", str(gid), "1"], ["1", str(ranges.gid_start), str(ranges.gid_count)]]
    await harness.release(monitor)
