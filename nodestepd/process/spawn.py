"""Starting processes: `spawn`, the one way anything here starts a program, and what is built on it.

`spawn` starts a program with subprocess.Popen (a vfork+exec in C, with no Python code
run in the child, which would be unsafe in a threaded program; for another user, the
exec is of nodestepd-monitor --exec-as, started as root with an empty environment, which
switches to the user's ids, only then reads the program's environment from a memfd, and
execs the program) and hands back a ProcessWatch on its pidfd. subprocess
never waits for the child: uvloop owns SIGCHLD and reaps only what libuv spawned, and
only the watch may collect a status, so every process here is reaped by its
ProcessWatch, on the event loop (wait) or blocking in a worker thread or the CLI
(wait_blocking).

Built on it: `spawn_shell` (a runtime command, `/bin/sh -c COMMAND`, as the user in a
process group of its own), `run_helper` (a short runtime command whose output we
collect), monitor.Monitor.spawn (a task under its nodestepd-monitor), asuser.open_as
(the helper that opens files as a user) and the doctor's probes.

A child that has switched to the user but not exec'ed yet can be stopped by any process
of that user (SIGSTOP needs only the same uid), and Popen waits for that exec. So a
spawn given a start_timeout kills its child when the exec has not happened by then and
raises OSError(ETIMEDOUT); and the daemon runs every spawn, and every helper it waits
for, in a thread of its own (`off_loop`), never on the event loop nor in the default
executor that other work shares (docs/security.md, "A process stopped before its exec").
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import math
import os
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from nodestepd.process.namespaces import Namespaces
from nodestepd.process.identity import Identity
from nodestepd.process.kernel import sealed_memfd, user_fd_limit
from nodestepd.process.watch import CLAIMED, Pidfd, ProcessWatch, children, spawning, thread_children

SHELL = "/bin/sh"
RUNTIME_UMASK = 0o022
# What run_helper keeps of a helper's output (stdout and stderr together): the last bytes,
# where a runtime's error message is. The rest is read and dropped as it comes.
HELPER_OUTPUT_LIMIT = 64 * 1024

T = TypeVar("T")
# nodestepd-monitor (monitor.py's monitor_program(), which the daemon checks at start-up),
# named here too: monitor.py imports this module. spawn() runs it with --exec-as.
EXEC_AS_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_libexec", "nodestepd-monitor")


async def off_loop(fn: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """fn(*args, **kwargs) in a thread of its own; awaits its result.

    For blocking work that waits on a user's process (a spawn, a helper): unlike
    asyncio.to_thread, it takes no thread of the default executor, which the daemon's
    other work shares, so processes stopped by their user cannot queue that work behind
    them. The thread is an idle one kept from an earlier call, or a new one when none is
    idle (_Workers): a call never waits for another. Each such wait has a deadline of its
    own, which bounds the thread's use. If the caller is cancelled, the thread still runs
    to its end (and cleans up after itself).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> Callable[[], None]:
        try:
            result, error = fn(*args, **kwargs), None
        except BaseException as e:
            result, error = None, e

        def deliver() -> None:
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more

        return deliver

    _WORKERS.run(run)
    return await future


_Job = Callable[[], Callable[[], None]]


class _Workers:
    """off_loop's threads. A thread started per call cost every launch a tenth of a
    millisecond or more on a loaded machine, so a thread that finished its call waits,
    blocked and costing nothing, for the next; up to `keep` of them. A call
    that finds none idle starts a new thread: no call ever queues behind another, which
    may be waiting for a process its user stopped."""

    def __init__(self, keep: int = 16) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[_Job]] = []

    def run(self, job: _Job) -> None:
        """job() does the work and returns how to deliver its result, which the thread
        calls once it is idle again: the caller's next call can have it."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is not None:
            inbox.put(job)
            return
        inbox = queue.SimpleQueue()
        inbox.put(job)
        threading.Thread(target=self._serve, args=(inbox,), name="nodestepd off_loop", daemon=True).start()

    def _serve(self, inbox: queue.SimpleQueue[_Job]) -> None:
        while True:
            deliver = inbox.get()()
            with self._lock:
                kept = len(self._idle) < self._keep
                if kept:
                    self._idle.append(inbox)
            deliver()
            if not kept:
                return


_WORKERS = _Workers()


class StartDeadline:
    """Kills the child a thread is spawning if it has not exec'ed by the deadline.

    Popen (and glibc's posix_spawn, rootspawn.py) waits for the exec with no timeout of its
    own. The child is found as the one new child of the spawning thread (the kernel makes
    the forking thread its parent, and the thread is busy spawning: it forks nothing else), and pinned by a pidfd that is checked
    to still name that child before the SIGKILL. The killed child closes Popen's error pipe
    without a word, so Popen returns; `cancel()` then says it fired.
    """

    def __init__(self, tid: int, timeout: float) -> None:
        self._tid = tid
        self._before = set(thread_children(tid))  # the thread's children from before: not ours to kill
        self._lock = threading.Lock()
        self._over = False
        self._fired = False
        _WATCHDOG.add(time.monotonic() + timeout, self)

    def fire(self) -> None:
        with self._lock:
            if self._over:
                return
            self._fired = True
            for pid in thread_children(self._tid):
                if pid in self._before or pid in CLAIMED:
                    continue
                try:
                    pidfd = Pidfd.open(pid)
                except ProcessLookupError:
                    continue
                try:
                    if pid in thread_children(self._tid):  # still our unreaped child: the pidfd names it
                        pidfd.send_signal(signal.SIGKILL)
                finally:
                    pidfd.close()

    def cancel(self) -> bool:
        """Stop the clock (the spawn is over). True when it fired."""
        with self._lock:
            self._over = True
        _WATCHDOG.forget()
        return self._fired

    @property
    def over(self) -> bool:
        return self._over


class _Watchdog:
    """One thread for every start deadline (a timer thread per spawn would cost more than
    the rest of the deadline's work): fires each StartDeadline due and not over."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, StartDeadline]] = []  # a heap
        self._count = 0
        self._thread: threading.Thread | None = None

    def add(self, when: float, deadline: StartDeadline) -> None:
        with self._cond:
            self._count += 1
            heapq.heappush(self._due, (when, self._count, deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nodestepd start deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def forget(self) -> None:
        """A deadline is over: drop it now (an idle daemon must not wake for it later)."""
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._due and self._due[0][2].over:  # cancelled (the common case): dropped
                    heapq.heappop(self._due)
                if not self._due:
                    self._cond.wait()
                    continue
                wait = self._due[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)  # or until add() or forget()
                    continue
                _, _, deadline = heapq.heappop(self._due)
            deadline.fire()


_WATCHDOG = _Watchdog()


def start_timed_out(what: str, timeout: float) -> OSError:
    """The error of a start that did not reach its exec in time (one sentence, as strerror)."""
    return OSError(errno.ETIMEDOUT,
                   f"{what} did not start within {timeout:g} s (stopped or stuck before exec); killed")


def kill_unstarted(watch: ProcessWatch, what: str, timeout: float) -> OSError:
    """Kill and reap a child whose start deadline passed (SIGKILL ends it at once, stopped
    or not): start_timed_out's error, for the caller to raise."""
    watch.send_signal(signal.SIGKILL)
    watch.wait_blocking(None)
    watch.reap()
    return start_timed_out(what, timeout)


def check_workdir(cwd: str, identity: Identity) -> None:
    """Refuse a working directory that is not the user's to use: raises PermissionError.

    The directory is entered while still root, before the switch to the user (by
    subprocess here, by the monitor for a task), so root's right to enter it says nothing
    about the user's. One the user owns (a task dir) is the user's; `/` is everyone's.
    """
    if cwd == "/":
        return
    if os.stat(cwd).st_uid != identity.uid:
        raise PermissionError(errno.EACCES, f"working directory {cwd} is not owned by {identity.user}")


def spawn(
    argv: Sequence[str],
    *,
    identity: Identity | None,
    cwd: str,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int,
    process_group: bool,
    pass_fds: Sequence[int] = (),
    umask: int | None = None,
    start_timeout: float | None = None,
    what: str = "the program",
) -> ProcessWatch:
    """Start argv and watch it by pidfd. Blocking (a vfork and an exec or two, up to start_timeout):
    on the event loop, call it through off_loop. argv[0] without a slash is looked up in
    env's PATH (with an identity, by nodestepd-monitor's execvp, as the user).

    identity: the user to run as (uid, gid and supplementary groups, all set before exec:
    every uid away from 0 clears the capabilities), or None to run as we are (the
    monitor, which switches to the user itself; the doctor run by a user). cwd: entered
    before the switch, so with an identity it must pass check_workdir (PermissionError).
    env: exactly the environment the program gets (with an identity, read by nothing
    that runs as root: see above). stdin/stdout/stderr: fds, or
    subprocess.DEVNULL. process_group: lead a process group of its own, so that all it
    starts can be signalled together (kill_group) while its zombie reserves the group id.
    pass_fds: the only fds besides 0-2 it gets (close_fds: nothing of the daemon's, other
    steps' or connections' leaks into it). umask: the child's, or None to keep ours.
    Signal dispositions are restored to the defaults (Python ignores SIGPIPE and SIGXFSZ;
    a program must not inherit that). start_timeout: seconds the child may take to reach
    its exec (None: no limit, only for a child that nobody but root can stop); then it is
    killed and the OSError is start_timed_out(what, start_timeout).

    Raises OSError when the program cannot be started (nothing is left behind).
    """
    if identity is not None:
        check_workdir(cwd, identity)
    report_r = report_w = env_fd = -1
    program = argv[0] if argv else ""
    if identity is not None:
        # Not Popen's user=, group=, extra_groups=: with them it forks, copying the
        # daemon's page tables (milliseconds for a daemon of tens of MB, on every runtime
        # command); without them it uses vfork. The switch is then the static, root-owned
        # nodestepd-monitor's (--exec-as, monitor.c), which execs argv as the user and
        # reports on report_w (close-on-exec at that exec) how far it got. It runs as root
        # with no environment at all: env (the step's, from what the user sent) goes in a
        # sealed memfd it reads only as the user, for the program.
        env_fd = sealed_memfd("nodestepd-env", environment_block(env))
        try:
            report_r, report_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            os.close(env_fd)
            raise
        argv = [EXEC_AS_PROGRAM, "--exec-as", str(report_w), str(env_fd), str(identity.uid), str(identity.gid),
                ",".join(str(g) for g in identity.groups), "--", *argv]
        pass_fds = (*pass_fds, report_w, env_fd)
        env = {}
    until = None if start_timeout is None else time.monotonic() + start_timeout  # the whole start, both execs
    try:
        watch = _spawn(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                       process_group=process_group, pass_fds=pass_fds, umask=umask, start_timeout=start_timeout,
                       what=what)
    except BaseException:
        if report_r >= 0:
            os.close(report_r)
        raise
    finally:
        for fd in (report_w, env_fd):
            if fd >= 0:
                os.close(fd)
    if report_r < 0:
        return watch
    try:
        _await_exec(watch, report_r, until, program, what, start_timeout)
    finally:
        os.close(report_r)
    return watch


def environment_block(env: Mapping[str, str]) -> bytes:
    """env as nodestepd-monitor reads it (--exec-as's ENV_FD, --env-fd): each "NAME=VALUE" ended by a NUL.

    Refused as Popen refuses them (ValueError): a name that is empty or holds "=", a NUL
    in a name or a value.
    """
    block = bytearray()
    for name, value in env.items():
        key, val = os.fsencode(name), os.fsencode(value)
        if not key or b"=" in key:
            raise ValueError(f"illegal environment variable name: {name!r}")
        if b"\0" in key or b"\0" in val:
            raise ValueError(f"embedded null byte in the environment variable {name!r}")
        block += key + b"=" + val + b"\0"
    return bytes(block)


def _await_exec(watch: ProcessWatch, report: int, until: float | None, program: str, what: str,
                start_timeout: float | None) -> None:
    """Wait for nodestepd-monitor --exec-as to exec the program as the user: end-of-file on
    report. Past `until` (the user may stop it once it is theirs) it is killed and
    start_timed_out raised; a failure it reports ("ERRNO STEP") is raised as OSError, with
    the program as the filename when the exec failed, as Popen would."""
    poller = select.poll()
    poller.register(report, select.POLLIN)
    said = b""
    while True:
        wait_ms = None if until is None else max(0, math.ceil((until - time.monotonic()) * 1000))
        if not poller.poll(wait_ms):
            assert until is not None and start_timeout is not None  # poll(None) returns only when ready
            if time.monotonic() < until:
                continue
            raise kill_unstarted(watch, what, start_timeout)  # still the switch: one process, not a group yet
        chunk = os.read(report, 64)
        if not chunk:
            break
        said += chunk
    if not said:
        return
    watch.wait_blocking(None)  # it exits (127) right after its report
    watch.reap()
    words = said.split()
    if len(words) == 2 and words[0].isdigit():
        err = int(words[0])
        if words[1] == b"exec":
            raise OSError(err, os.strerror(err), program)
        if words[1] == b"env":
            raise OSError(err, f"{os.strerror(err)} (taking in its environment as the user)")
        raise OSError(err, f"{os.strerror(err)} (switching to the user: {words[1].decode('ascii', 'replace')})")
    raise OSError(errno.EIO, f"{what} could not be started as the user: {said[:80]!r}")


def _spawn(argv: Sequence[str], *, cwd: str, env: Mapping[str, str], stdin: int, stdout: int, stderr: int,
           process_group: bool, pass_fds: Sequence[int], umask: int | None, start_timeout: float | None,
           what: str) -> ProcessWatch:
    """spawn's Popen, as root: a vfork and an exec (see spawn)."""
    with spawning() as tid:  # until the pidfd is ours, the reaper must not take the new child for an orphan
        deadline = None if start_timeout is None else StartDeadline(tid, start_timeout)
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=dict(env),
                process_group=0 if process_group else None,
                umask=-1 if umask is None else umask,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                restore_signals=True,
            )
        finally:
            killed = deadline is not None and deadline.cancel()
        try:
            watch = ProcessWatch.open(popen.pid)
        except BaseException:
            popen.kill()  # no pidfd (EMFILE...): it would run and end unwatched, so stop it here
            popen.wait()
            raise
    # The watch reaps it; a returncode keeps subprocess from ever calling waitpid on this
    # pid (its __del__ would otherwise queue it for a waitpid of its own).
    popen.returncode = 0
    if killed:  # (it may have exec'ed just before the kill: it counts as not started all the same)
        assert start_timeout is not None
        raise kill_unstarted(watch, what, start_timeout)
    return watch


def spawn_shell(
    command: str,
    *,
    identity: Identity,
    cwd: str,
    env: Mapping[str, str],
    stdin: int,
    stdout: int,
    stderr: int,
    start_timeout: float,
    namespaces: Namespaces | None = None,
) -> ProcessWatch:
    """Start `/bin/sh -c command` as the user in a new process group, with umask 022, and watch it by pidfd.

    namespaces: a user and mount namespace the shell runs in, entered by nsenter as the
    user (nodestep-oci's containers: namespaces.py).

    stdin/stdout/stderr are fds, or subprocess.DEVNULL. cwd must be a directory the user
    owns (a task spool dir), or `/` (check_workdir: PermissionError if not). Raises OSError
    when the shell cannot be started, or has not exec'ed within start_timeout seconds.
    """
    enter = namespaces.nsenter_argv() if namespaces is not None else []
    return spawn([*enter, SHELL, "-c", command], identity=identity, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                 stderr=stderr, process_group=True, umask=RUNTIME_UMASK, start_timeout=start_timeout,
                 pass_fds=namespaces.fds() if namespaces is not None else (), what="the runtime")


@dataclass(frozen=True)
class HelperResult:
    status: int
    output: str  # stdout and stderr together, trimmed
    timed_out: bool = False


async def run_helper(
    command: str,
    *,
    identity: Identity,
    cwd: str,
    env: Mapping[str, str],
    timeout: float,
    namespaces: Namespaces | None = None,
) -> HelperResult:
    """Run a short runtime command (kill, delete, query) and collect its output (in
    `namespaces`, when given: spawn_shell).

    All of it, the start included, is bounded by `timeout` and runs in a thread of its
    own (off_loop): nothing waits for a process the user can stop on the event loop, or
    holding a lock it takes. Raises OSError when the shell cannot be started, or was
    stopped before its exec (start_timed_out).
    """
    return await off_loop(_run_helper, command, identity, cwd, env, timeout, namespaces)


def _run_helper(command: str, identity: Identity, cwd: str, env: Mapping[str, str], timeout: float,
                namespaces: Namespaces | None = None) -> HelperResult:
    """run_helper's blocking part.

    The output goes to a pipe read as it comes, keeping only its last HELPER_OUTPUT_LIMIT
    bytes, so a helper writing without end costs no more memory than that. We wait for the
    process to exit (pidfd), then take what is in the pipe, never waiting for end-of-file,
    which a process it left running could delay forever (such a process then gets EPIPE).
    """
    end = time.monotonic() + timeout
    # The users' fd limit, not the daemon's raised one (Popen cannot set a limit between
    # fork and exec without running Python in the child): the shell lowers its own first.
    soft, hard = user_fd_limit()
    command = f"ulimit -S -n {soft} && ulimit -H -n {hard} || exit 125\n{command}"
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            watch = spawn_shell(command, identity=identity, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=out_w, stderr=out_w, start_timeout=timeout, namespaces=namespaces)
        finally:
            os.close(out_w)
        tail = _Tail(HELPER_OUTPUT_LIMIT)
        try:
            ended = _collect(watch, {out_r: tail}, end)
        finally:
            # Whatever is left in the helper's group (all of it, after a timeout) would
            # outlive it unowned.
            watch.kill_group(signal.SIGKILL)
            status = watch.wait_blocking(None)
            watch.reap()
        assert status is not None
        if not ended:
            return HelperResult(status, f"timed out after {timeout:g} s; killed", timed_out=True)
        return HelperResult(status, tail.text())
    finally:
        os.close(out_r)


def _collect(watch: ProcessWatch, sinks: dict[int, "_Sink"], end: float) -> bool:
    """Read the process's output pipes into their sinks until it exits (True) or the deadline (False)."""
    poller = select.poll()
    poller.register(watch.fileno(), select.POLLIN)
    for fd in sinks:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    while True:
        remaining = end - time.monotonic()
        if remaining <= 0:
            return False
        for fd, _ in poller.poll(max(1, int(remaining * 1000))):
            if fd in sinks:
                if not sinks[fd].read_from(fd):
                    poller.unregister(fd)  # end-of-file: only the exit is left to wait for
            else:
                for out, sink in sinks.items():
                    sink.read_from(out)  # what it wrote before it exited (what is still coming is not waited for)
                return True


class _Sink:
    """What is kept of a stream read from a non-blocking pipe (_Tail, _Head)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def read_from(self, fd: int) -> bool:
        """Read what is there, at most 1 MiB (non-blocking fd: a writer that never stops
        must not keep us reading past a deadline). False at end-of-file."""
        for _ in range(16):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self._keep(chunk)
        return True

    def _keep(self, chunk: bytes) -> None:
        raise NotImplementedError


class _Tail(_Sink):
    """The last `limit` bytes of a stream, and how many came before them."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.dropped = 0

    def _keep(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > self.limit:  # trim now and then, not at every read
            del self.data[:excess]
            self.dropped += excess

    def text(self) -> str:
        excess = max(0, len(self.data) - self.limit)
        dropped = self.dropped + excess
        text = self.data[excess:].decode("utf-8", "replace").strip()
        return f"[{dropped} bytes of output before this were dropped] {text}" if dropped else text


class _Head(_Sink):
    """The first `limit` bytes of a stream; the rest is read and dropped."""

    def _keep(self, chunk: bytes) -> None:
        self.data += chunk[:max(0, self.limit - len(self.data))]


@dataclass(frozen=True)
class ProgramResult:
    status: int
    stdout: bytes  # at most stdout_cap bytes, from the start
    stderr: str  # at most stderr_cap characters, from the end, trimmed
    timed_out: bool = False


async def run_program(
    argv: Sequence[str],
    *,
    identity: Identity,
    cwd: str,
    env: Mapping[str, str],
    timeout: float,
    stdout_cap: int,
    stderr_cap: int,
) -> ProgramResult:
    """Run a program (no shell) as the user in a process group of its own, bounded by
    timeout (then it and its whole group are killed), and keep the start of its stdout
    and the end of its stderr (a site's stage hook: only these capped bytes are ever read
    or held, whatever it writes).

    Like run_helper, all of it runs in a thread of its own (off_loop), the output goes to
    pipes read as it comes, and we wait for the exit (pidfd), never for end-of-file.
    Raises OSError when the program cannot be started, or has not exec'ed within timeout.
    """
    return await off_loop(_run_program, list(argv), identity, cwd, env, timeout, stdout_cap, stderr_cap)


def _run_program(argv: list[str], identity: Identity, cwd: str, env: Mapping[str, str], timeout: float,
                 stdout_cap: int, stderr_cap: int) -> ProgramResult:
    """run_program's blocking part."""
    end = time.monotonic() + timeout
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            watch = spawn(argv, identity=identity, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_w,
                          stderr=err_w, process_group=True, umask=RUNTIME_UMASK, start_timeout=timeout)
        finally:
            os.close(out_w)
            os.close(err_w)
        head, tail = _Head(stdout_cap), _Tail(stderr_cap * 4)  # characters may take up to 4 bytes
        try:
            ended = _collect(watch, {out_r: head, err_r: tail}, end)
        finally:
            watch.kill_group(signal.SIGKILL)  # what it left running in its group, or all of it after a timeout
            status = watch.wait_blocking(None)
            watch.reap()
        assert status is not None
        stderr = bytes(tail.data[-stderr_cap * 4:]).decode("utf-8", "replace").strip()[-stderr_cap:]
        return ProgramResult(status, bytes(head.data), stderr, timed_out=not ended)
    finally:
        os.close(out_r)
        os.close(err_r)


def group_members(leader: int) -> list[int]:
    """Processes of `leader`'s process group that descend from it, leader excluded.

    Walks /proc/PID/task/TID/children from the leader down. Used to deliver a signal to
    the runtime without hitting the shell that started it: dash does not exec the
    command, so a signal like SIGUSR1 sent to the whole group would kill the shell and
    orphan the runtime, and the task's exit status would be the shell's.
    """
    members: list[int] = []
    frontier = [leader]
    while frontier:
        pid = frontier.pop()
        for child in children(pid):
            if _pgid(child) == leader:
                members.append(child)
                frontier.append(child)
    return members


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def signal_group_except_leader(leader: int, sig: int) -> int:
    """Send sig to every member of the leader's group below it; returns how many got it.

    Each target is pinned with a pidfd and checked again after pinning, so a pid that
    was recycled between the walk and the kill is never signalled.
    """
    sent = 0
    for pid in group_members(leader):
        try:
            pidfd = Pidfd.open(pid)
        except ProcessLookupError:
            continue
        try:
            if _pgid(pid) == leader and pidfd.send_signal(sig):
                sent += 1
        finally:
            pidfd.close()
    return sent
