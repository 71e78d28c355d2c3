"""ProcessWatch with real child processes, on uvloop as in the daemon."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import select
import signal
import subprocess
import time

import pytest

from conftest import proc_state
import uvloop

from nodestepd.process.monitor import MonitoredProcess
from nodestepd.process.watch import (
    CLAIMED,
    ExitWatch,
    NotWatchable,
    Pidfd,
    ProcessWatch,
    exit_status,
    exit_status_from_wait_status,
)
from uvloop_fixtures import OVERRIDE_WARNING, on_uvloop  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings(OVERRIDE_WARNING)


class TimerCountingLoop(uvloop.Loop):
    """uvloop's loop, counting the timers anyone schedules on it."""

    def __init__(self) -> None:
        super().__init__()
        self.timers_scheduled = 0

    def call_later(self, *args, **kwargs):
        self.timers_scheduled += 1
        return super().call_later(*args, **kwargs)

    def call_at(self, *args, **kwargs):
        self.timers_scheduled += 1
        return super().call_at(*args, **kwargs)


class TimerCountingPolicy(uvloop.EventLoopPolicy):
    def _loop_factory(self) -> TimerCountingLoop:
        return TimerCountingLoop()


@pytest.fixture(scope="module")
def event_loop_policy():
    return TimerCountingPolicy()


@pytest.fixture
async def spawn():
    """spawn(argv, **popen_kwargs) -> ProcessWatch of a child leading its own process group."""
    watches: list[ProcessWatch] = []

    def start(argv: list[str], **kwargs) -> ProcessWatch:
        popen = subprocess.Popen(argv, process_group=0, close_fds=True, **kwargs)
        watch = ProcessWatch.open(popen.pid)
        popen.returncode = 0  # ProcessWatch reaps it, as spawn.spawn arranges
        watches.append(watch)
        return watch

    yield start
    for watch in watches:
        if watch._pidfd is not None:  # not reaped by the test: kill what is left of its group, as Step does
            watch.kill_group(signal.SIGKILL)
            await asyncio.wait_for(watch.wait(), 10)
            watch.reap()


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def wait_exited_without_reaping(pid: int) -> None:
    """Block until our child has exited, leaving it a zombie (the kernel tells us: no polling)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def read_line(fd: int, timeout: float = 10) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"no line within {timeout} s; got {data!r}"
        chunk = os.read(fd, 1)
        assert chunk, f"end of stream; got {data!r}"
        data += chunk
    return data


def assert_exits(pid: int, timeout: float = 10) -> None:
    """Wait (on a pidfd, no polling) until a process that is not our child has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone and reaped
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} ({proc_state(pid)}) still alive after {timeout} s"
    finally:
        os.close(fd)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# ---- exit status --------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 3, 125, 255])
async def test_exit_code(spawn, code):
    watch = spawn(["sh", "-c", f"exit {code}"])
    assert watch.running and watch.status is None
    assert await watch.wait() == code
    assert watch.status == code
    assert not watch.running


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGUSR1])
async def test_death_by_signal_is_128_plus_n(spawn, sig):
    watch = spawn(["sh", "-c", f"kill -{sig.name[3:]} $$; sleep 5"])
    assert await watch.wait() == 128 + sig


def test_exit_status_of_a_core_dump_is_128_plus_n():
    dumped = os.waitid_result((1234, 0, signal.SIGCHLD, signal.SIGSEGV, os.CLD_DUMPED))
    killed = os.waitid_result((1234, 0, signal.SIGCHLD, signal.SIGINT, os.CLD_KILLED))
    exited = os.waitid_result((1234, 0, signal.SIGCHLD, 42, os.CLD_EXITED))
    assert (exit_status(dumped), exit_status(killed), exit_status(exited)) == (128 + 11, 128 + 2, 42)


async def test_status_is_read_without_reaping(spawn):
    watch = spawn(["sh", "-c", "exit 4"])
    assert await watch.wait() == 4
    # Still a zombie: its pid (and process group) cannot be reused yet.
    assert proc_state(watch.pid) == "Z"
    info = os.waitid(os.P_PID, watch.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    assert info is not None and (info.si_pid, info.si_status) == (watch.pid, 4)
    watch.reap()
    assert proc_state(watch.pid) is None
    with pytest.raises(ChildProcessError):
        os.waitid(os.P_PID, watch.pid, os.WEXITED | os.WNOHANG)
    assert watch.status == 4  # still known after reaping


async def test_reap_releases_the_pidfd_and_is_idempotent(spawn):
    before = open_fds()
    watch = spawn(["true"])
    assert len(open_fds() - before) == 1  # the pidfd
    await watch.wait()
    watch.reap()
    watch.reap()
    assert open_fds() == before
    watch.kill_group(signal.SIGKILL)  # no-op once released
    assert watch.send_signal(signal.SIGTERM) is False


async def test_wait_on_a_process_that_exited_before_anyone_waited(spawn):
    watch = spawn(["sh", "-c", "exit 6"])
    wait_exited_without_reaping(watch.pid)
    assert watch.status is None  # nobody looked yet
    assert await asyncio.wait_for(watch.wait(), 5) == 6
    assert await watch.wait() == 6  # and again


async def test_watch_opened_on_an_already_exited_child():
    popen = subprocess.Popen(["sh", "-c", "exit 9"], process_group=0)
    popen.returncode = 0
    wait_exited_without_reaping(popen.pid)
    watch = ProcessWatch.open(popen.pid)
    assert await asyncio.wait_for(watch.wait(), 5) == 9
    watch.reap()
    assert proc_state(popen.pid) is None


async def test_concurrent_and_cancelled_waits_all_see_the_status(spawn):
    watch = spawn(["sleep", "1000"])
    cancelled = asyncio.ensure_future(watch.wait())
    waiters = [asyncio.ensure_future(watch.wait()) for _ in range(3)]
    await asyncio.sleep(0)  # let them start waiting
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert watch.send_signal(signal.SIGKILL) is True
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [137, 137, 137]
    assert await watch.wait() == 137


# ---- signals ----------------------------------------------------------------------


async def test_send_signal_reaches_the_process_and_not_after_exit(spawn, pipe):
    r, w = pipe
    watch = spawn(["sh", "-c", 'trap "exit 7" USR1; sleep 1000 & echo ready; wait'], stdout=w)
    os.close(w)
    assert read_line(r) == b"ready\n"
    assert watch.send_signal(signal.SIGUSR1) is True
    assert await asyncio.wait_for(watch.wait(), 10) == 7
    assert watch.send_signal(signal.SIGUSR1) is False
    assert watch.send_signal(signal.SIGKILL) is False
    assert proc_state(watch.pid) == "Z"  # the signals did not touch it


async def test_send_signal_to_an_exited_process_not_yet_waited_for_returns_false(spawn):
    watch = spawn(["true"])
    wait_exited_without_reaping(watch.pid)
    assert watch.send_signal(signal.SIGTERM) is False


async def test_reap_without_wait_collects_the_zombie(spawn):
    watch = spawn(["sh", "-c", "exit 3"])
    pid = watch.pid
    wait_exited_without_reaping(pid)
    try:
        watch.reap()
        assert proc_state(pid) is None
        assert watch.status == 3
    finally:
        if proc_state(pid) == "Z":
            os.waitpid(pid, 0)  # do not leave it to the rest of the session


async def test_kill_group_reaches_a_grandchild(spawn, pipe):
    r, w = pipe
    watch = spawn(["sh", "-c", "sleep 1000 & echo $!; wait"], stdout=w)
    os.close(w)
    grandchild = int(read_line(r))
    assert os.getpgid(grandchild) == watch.pid != os.getpgid(0)
    watch.kill_group(signal.SIGTERM)
    assert await asyncio.wait_for(watch.wait(), 10) == 128 + signal.SIGTERM
    assert_exits(grandchild)


async def test_kill_group_after_the_leader_exited_reaches_its_leftovers(spawn, pipe):
    """The unreaped leader keeps its group alive for the final SIGKILL (as Step._release does)."""
    r, w = pipe
    watch = spawn(["sh", "-c", "sleep 1000 & echo $!"], stdout=w)
    os.close(w)
    grandchild = int(read_line(r))
    assert await asyncio.wait_for(watch.wait(), 10) == 0
    assert proc_state(watch.pid) == "Z"
    assert proc_state(grandchild) in ("S", "R")  # still running in the leader's group
    assert os.getpgid(grandchild) == watch.pid
    watch.kill_group(signal.SIGKILL)
    assert_exits(grandchild)
    watch.reap()


async def test_kill_group_when_the_group_is_gone_is_quiet(spawn):
    watch = spawn(["true"])
    await watch.wait()
    watch.kill_group(signal.SIGKILL)  # only the zombie leader is left: no error
    watch.reap()
    watch.kill_group(signal.SIGKILL)


# ---- no polling -------------------------------------------------------------------------


async def test_waiting_costs_no_wakeups():
    """Half a second of waiting for a child is one blocking wait in the loop: no timers, no polling.

    A 50 ms poller makes ~10 voluntary context switches here; the pidfd wait makes one to a few
    (libuv's io_uring bookkeeping adds some).
    """
    loop = asyncio.get_running_loop()
    assert isinstance(loop, TimerCountingLoop)
    warm_up = subprocess.Popen(["true"], process_group=0)  # the loop's first child costs a few more
    warm_up.returncode = 0
    watch = ProcessWatch.open(warm_up.pid)
    await watch.wait()
    watch.reap()

    popen = subprocess.Popen(["sleep", "0.5"], process_group=0)
    popen.returncode = 0
    watch = ProcessWatch.open(popen.pid)
    timers = loop.timers_scheduled
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_THREAD)
    status = await watch.wait()
    after = resource.getrusage(resource.RUSAGE_THREAD)
    elapsed = time.monotonic() - start
    watch.reap()
    assert status == 0
    assert loop.timers_scheduled == timers, "timers were scheduled while waiting"
    assert elapsed >= 0.4  # it really waited for the child
    switches = after.ru_nvcsw - before.ru_nvcsw
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert switches <= 6, f"{switches} wake-ups while waiting {elapsed:.2f} s"
    assert cpu < 0.05, f"{cpu:.3f} s of CPU while waiting"


# ---- processes we did not spawn (container inits named by a runtime) ----------------------

@pytest.fixture
def grandchild(pipe):
    """grandchild(code, reap_delay) -> (pid, parent Popen): a process whose parent is not us.

    The parent prints the grandchild's pid, waits for a line on our pipe, then reaps it
    after reap_delay seconds (as a runtime's monitor would), then exits itself."""
    started: list[subprocess.Popen] = []
    r, w = pipe

    def start(code: int, reap_delay: float = 0.0) -> tuple[int, subprocess.Popen]:
        script = (
            "import os, sys, time\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            f"    os.read({r}, 1)\n"
            f"    os._exit({code})\n"
            "print(pid, flush=True)\n"
            "time.sleep(" + repr(reap_delay) + ")\n"  # let the exit sit unreaped a while
            "os.waitpid(pid, 0)\n"
        )
        parent = subprocess.Popen(["python3", "-c", script], stdout=subprocess.PIPE, pass_fds=(r,))
        started.append(parent)
        return int(parent.stdout.readline()), parent

    yield start
    for parent in started:
        parent.kill()
        parent.wait()
        parent.stdout.close()


async def test_adopted_non_child_gives_its_exit_status_through_the_pidfd(grandchild, pipe):
    pid, parent = grandchild(6)
    watch = ProcessWatch.adopt(pid, os.getuid())
    assert not watch.child and watch.running
    os.write(pipe[1], b"x")  # let it exit
    assert await asyncio.wait_for(watch.wait(), 10) == 6
    assert watch.status_known
    watch.reap()  # releases the pidfd; its own parent reaps it
    await asyncio.to_thread(parent.wait)


async def test_adopted_non_child_exit_status_once_its_parent_reaps_it_late(grandchild, pipe):
    pid, parent = grandchild(9, reap_delay=0.3)  # the kernel knows the status only after the reap
    watch = ProcessWatch.adopt(pid, os.getuid())
    os.write(pipe[1], b"x")
    assert await asyncio.wait_for(watch.wait(), 10) == 9
    watch.reap()
    await asyncio.to_thread(parent.wait)


async def test_adopt_refuses_a_process_of_another_uid(grandchild):
    pid, _ = grandchild(0)
    with pytest.raises(NotWatchable, match=f"pid {pid} runs as uid 0, not 4242"):
        ProcessWatch.adopt(pid, 4242)


async def test_adopt_refuses_a_pid_that_is_gone(spawn):
    watch = spawn(["true"])
    await watch.wait()
    pid = watch.pid
    watch.reap()
    with pytest.raises(NotWatchable):
        ProcessWatch.adopt(pid, os.getuid())


async def test_adopting_our_own_child_reads_and_reaps_it_like_open(pipe):
    r, w = pipe
    popen = subprocess.Popen(["sh", "-c", "read x; exit 4"], stdin=r, process_group=0)
    popen.returncode = 0
    watch = ProcessWatch.adopt(popen.pid, os.getuid())
    assert watch.child and popen.pid in CLAIMED
    os.write(w, b"go\n")
    assert await asyncio.wait_for(watch.wait(), 10) == 4
    assert proc_state(popen.pid) == "Z"  # kept unreaped until reap(), like open()
    watch.reap()
    assert proc_state(popen.pid) is None and popen.pid not in CLAIMED


def test_exit_status_from_wait_status():
    assert exit_status_from_wait_status(3 << 8) == 3
    assert exit_status_from_wait_status(signal.SIGKILL) == 137
    assert exit_status_from_wait_status(signal.SIGSEGV | 0x80) == 128 + signal.SIGSEGV  # with a core dump


# ---- Pidfd --------------------------------------------------------------------------------


async def test_pidfd_readable_signals_dup_and_close(pipe):
    r, w = pipe
    popen = subprocess.Popen(["sh", "-c", "read x; exit 3"], stdin=r, process_group=0)
    popen.returncode = 0  # reaped below, by hand
    before = open_fds()
    pidfd = Pidfd.open(popen.pid)
    copy = pidfd.dup()
    assert len(open_fds() - before) == 2 and copy.fd != pidfd.fd and copy.pid == pidfd.pid == popen.pid
    assert not pidfd.readable() and not copy.readable()  # running
    started = time.monotonic()
    assert not pidfd.readable(0.2)  # blocks for the whole timeout while it runs
    assert time.monotonic() - started >= 0.2
    os.write(w, b"go\n")
    assert pidfd.readable(10) and copy.readable()  # exited: both say so
    assert proc_state(popen.pid) == "Z"
    assert pidfd.send_signal(signal.SIGTERM) is True  # a zombie takes a signal, and nothing comes of it
    assert pidfd.waitid(os.WEXITED | os.WNOHANG | os.WNOWAIT).si_status == 3
    assert pidfd.exit_info() is None  # not reaped yet: the kernel has no exit info for it
    info = pidfd.waitid(os.WEXITED | os.WNOHANG)  # reaped
    assert (info.si_pid, info.si_status) == (popen.pid, 3)
    assert copy.exit_info() == 3  # once reaped, any holder of a pidfd learns the status
    assert pidfd.send_signal(signal.SIGTERM) is False  # gone
    pidfd.signal_group(signal.SIGKILL)  # an empty group: quiet
    pidfd.close()
    pidfd.close()
    assert pidfd.fd == -1
    assert len(open_fds() - before) == 1  # the copy is its own
    copy.close()
    assert open_fds() == before


def test_pidfd_open_of_a_pid_that_is_gone():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(ProcessLookupError):
        Pidfd.open(pid)


def test_a_pidfd_dropped_without_close_is_closed():
    popen = subprocess.Popen(["true"])
    try:
        pidfd = Pidfd.open(popen.pid)
        fd = pidfd.fd
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        del pidfd
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF
    finally:
        popen.wait()


# ---- wait_blocking: off the event loop, with a deadline --------------------------------------


def test_wait_blocking_reports_a_process_that_outlives_the_deadline():
    popen = subprocess.Popen(["sleep", "1000"], process_group=0)
    popen.returncode = 0
    watch = ProcessWatch.open(popen.pid)
    started = time.monotonic()
    assert watch.wait_blocking(0.3) is None  # still running at the deadline
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 5, elapsed
    assert watch.running and watch.status is None
    assert proc_state(watch.pid) in ("S", "R")
    assert watch.send_signal(signal.SIGKILL)
    assert watch.wait_blocking(10) == 128 + signal.SIGKILL
    assert proc_state(watch.pid) == "Z"  # read without reaping, as wait() does
    watch.reap()
    assert proc_state(watch.pid) is None


def test_wait_blocking_returns_at_the_exit_not_at_the_deadline(pipe):
    r, w = pipe
    popen = subprocess.Popen(["sh", "-c", "read x; exit 5"], stdin=r, process_group=0)
    popen.returncode = 0
    watch = ProcessWatch.open(popen.pid)
    os.write(w, b"go\n")
    started = time.monotonic()
    assert watch.wait_blocking(60) == 5
    assert time.monotonic() - started < 10
    assert watch.wait_blocking(60) == 5  # known: at once
    assert watch.wait_blocking(None) == 5
    watch.reap()


def test_wait_blocking_without_a_deadline():
    popen = subprocess.Popen(["sh", "-c", "sleep 0.2; exit 4"], process_group=0)
    popen.returncode = 0
    watch = ProcessWatch.open(popen.pid)
    started = time.monotonic()
    assert watch.wait_blocking(None) == 4
    assert time.monotonic() - started >= 0.2
    watch.reap()


async def test_wait_blocking_refuses_a_non_child(grandchild, pipe):
    pid, parent = grandchild(0)
    watch = ProcessWatch.adopt(pid, os.getuid())
    with pytest.raises(RuntimeError, match=f"pid {pid} is not our child"):
        watch.wait_blocking(0)
    os.write(pipe[1], b"x")
    assert await asyncio.wait_for(watch.wait(), 10) == 0
    watch.reap()
    await asyncio.to_thread(parent.wait)


# ---- ExitWatch --------------------------------------------------------------------------


def exit_watch_classes() -> list[type]:
    import nodestepd.step.step  # noqa: F401 (the step's own watches, so that they are checked too)

    found, todo = [], list(ExitWatch.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_exit_watch_implements_every_member_itself():
    """ExitWatch is a Protocol: a class that names it as its base but leaves out a member
    would inherit the protocol's empty body and answer None. No class may rely on that."""
    members = [name for name in vars(ExitWatch) if not name.startswith("_")]
    assert sorted(members) == ["kill_group", "poll", "reap", "running", "send_signal", "status", "wait"]
    classes = exit_watch_classes()
    assert {ProcessWatch, MonitoredProcess} <= set(classes)
    missing = [f"{cls.__qualname__}.{name}" for cls in classes for name in members
               if getattr(cls, name) is getattr(ExitWatch, name)]
    assert missing == []


async def test_process_watch_status_and_running_are_its_own(spawn):
    watch = spawn(["sh", "-c", "exit 2"])
    assert (watch.status, watch.running) == (None, True)
    await watch.wait()
    assert (watch.status, watch.running) == (2, False)
