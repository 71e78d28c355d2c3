"""The daemon's side of nodestepd-monitor, the per-task parent that outlives the daemon.

Each task's first runtime command (RunTimeRun, or RunTimeCreate) is started by a small
root-owned C program of its own (monitor.c, installed next to this module), not by the
daemon: the task is the monitor's child, and so is whatever gets orphaned below it (a
create/start container's init), because the monitor is a child subreaper. The monitor
writes every child's exit status to the task's exit file, then tells us on ctl, so a
status is never lost while the daemon is down. docs/monitor.md has the protocol.

Here:
- `Monitor.spawn` starts a monitor (through spawn.spawn, blocking: call it in a worker
  thread) and returns once the task runs, or raises OSError as spawn_shell does.
- `MonitoredProcess` is a process the monitor reports on (the task, or one `adopt`ed):
  an ExitWatch, like ProcessWatch (wait, poll, status, send_signal, kill_group, reap).
  Its exit status comes from the monitor's `exit` record, read on the event loop.
- `Monitor.release` lets go: the monitor reaps its zombies and exits when its last
  child has; the daemon's Reaper reaps the monitor itself.
- If the monitor dies unexpectedly, each process still waiting is watched through its
  own pidfd (ProcessWatch: our child by then, as the daemon is a subreaper, or the
  kernel's PIDFD_INFO_EXIT); a status nobody can know is reported as unknown.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
from typing import TYPE_CHECKING, Mapping, Sequence

from nodestepd.logs import get_logger
from nodestepd.process.identity import Identity
from nodestepd.process.kernel import sealed_memfd, user_fd_limit
from nodestepd.process.rootspawn import spawn_as_root
from nodestepd.process.spawn import SHELL, check_workdir, environment_block, start_timed_out
from nodestepd.process.watch import CLAIMED, ExitWatch, NotWatchable, Pidfd, ProcessWatch, children, proc_ids

if TYPE_CHECKING:
    from nodestepd.process.namespaces import Namespaces
    from nodestepd.process.reaper import Reaper

PROGRAM_NAME = "nodestepd-monitor"
LIBEXEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_libexec")
_MESSAGE_SIZE = 256  # every message the monitor sends is one short line
# How much longer than the task's start deadline we wait for the monitor to report: its
# own deadline fires first; ours only for a monitor that cannot report (stopped by root).
_REPORT_MARGIN = 2.0


def _log():
    """The logger, looked up when used: one bound at import would miss configure_logging()."""
    return get_logger()


class MonitorMissing(RuntimeError):
    """nodestepd-monitor is not installed next to the package (a build without a C compiler)."""


def monitor_program() -> str:
    """The installed nodestepd-monitor. Raises MonitorMissing when it is not there."""
    path = os.path.join(LIBEXEC_DIR, PROGRAM_NAME)
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise MonitorMissing(
            f"{path} is missing or not executable: reinstall nodestepd where a C compiler is available "
            "(Debian: gcc, libc6-dev)"
        )
    return path


class Monitor:
    """One running nodestepd-monitor, its ctl socket and the processes it reports on.

    Created in a worker thread by spawn(); used on the event loop from then on.
    """

    def __init__(self, watch: ProcessWatch, ctl: socket.socket, task: Pidfd) -> None:
        self.pid = watch.pid
        self._watch: ProcessWatch | None = watch  # the monitor itself, our child; None once handed on or reaped
        self._ctl: socket.socket | None = ctl  # None once released, or the monitor closed it
        self._reading = False
        self._released = False
        self._lost: asyncio.Task[None] | None = None  # the monitor died: resolving what still waits
        self._records: dict[int, int] = {}  # every `exit` record so far, pid -> status
        self._held: set[int] = set()  # adopted pids whose zombies the monitor said it keeps (`held`)
        self._procs: dict[int, MonitoredProcess] = {}
        self.task = self._track(task)

    # ---- starting -------------------------------------------------------------------

    @classmethod
    def spawn(
        cls,
        command: str,
        *,
        identity: Identity,
        cwd: str,
        env: Mapping[str, str],
        stdin: int,
        stdout: int,
        stderr: int,
        exit_fd: int,
        start_timeout: float,
        shell: str = SHELL,
        namespaces: "Namespaces | None" = None,
        preserved: Sequence[int] = (),
        userns: tuple[int, int, int, int] | None = None,
    ) -> "Monitor":
        """Start `shell -c command` as the user under a new monitor; return once it runs.

        Blocking (a fork and two execs): call it in a worker thread. The same rules as
        spawn.spawn_shell: cwd must pass spawn.check_workdir (PermissionError if not), and
        the monitor enters it as root (the daemon hands in a pinned path, /proc/PID/fd/N);
        the task gets stdin/stdout/stderr (fds, or subprocess.DEVNULL), exactly env (in a
        memfd read once the task is the user: nothing running as root reads it), its own
        process group, umask 022, the user's uid, gid and groups, the users' RLIMIT_NOFILE
        (kernel.user_fd_limit) and no other fd but `preserved`, at 3, 4, ... in that
        order (the monitor itself closes them once the task runs). userns: (subuid start,
        count, subgid start, count): the task runs in a user and mount namespace of its own
        where the user is root and those subordinate ids are 1..count (the caller checked
        they are the user's). When it cannot
        start, raises OSError with the errno of the step that failed (FileNotFoundError
        for a missing shell, PermissionError for a directory the user cannot enter), and
        nothing is left behind.

        exit_fd: the task's exit file, opened O_WRONLY|O_APPEND by the caller, who keeps
        its own fd. The monitor appends `PID STATUS` lines to it for as long as it lives.

        start_timeout: seconds the task may take to reach its exec once forked (the user
        can stop it in between: it is the user's from the switch on). The monitor then
        kills it and reports `error ETIMEDOUT timeout`, raised as start_timed_out(...).
        Our own wait for the monitor's report is bounded too (a little longer): past it,
        the monitor and what it forked are killed and the same error is raised.

        namespaces: a user and a mount namespace the task enters as the user before its
        exec (nodestep-oci's containers: namespaces.py); EPERM ("setns") if it may not.
        """
        check_workdir(cwd, identity)
        program = monitor_program()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env_fd = -1
        try:
            # The task's environment (the step's, from what the user sent) goes in a sealed
            # memfd the task's side reads once it is the user: the monitor, root for the
            # task's whole life, runs with none (the C library reads GLIBC_TUNABLES, MALLOC_*
            # at its start-up).
            env_fd = sealed_memfd("nodestepd-env", environment_block(env))
            entered: tuple[int, ...] = namespaces.fds() if namespaces is not None else ()

            def argv_for(fds: list[int]) -> list[str]:
                """The monitor's argv, naming the fds by the numbers it gets them at (rootspawn)."""
                ctl, exit_, env_, *rest = fds
                passed, ns = rest[:len(preserved)], rest[len(preserved):]
                return [
                    program, "--ctl-fd", str(ctl), "--exit-fd", str(exit_), "--env-fd", str(env_),
                    "--uid", str(identity.uid), "--gid", str(identity.gid),
                    "--groups", ",".join(str(g) for g in identity.groups), "--cwd", cwd,
                    "--start-timeout-ms", str(max(1, round(start_timeout * 1000))),
                    "--nofile", "%d:%d" % user_fd_limit(),
                    *(word for fd in passed for word in ("--pass-fd", str(fd))),
                    *(("--userns", ",".join(str(n) for n in userns)) if userns is not None else ()),
                    *(("--userns-fd", str(ns[0]), "--mntns-fd", str(ns[1])) if ns else ()),
                    "--", shell, "-c", command,
                ]

            # As root: the monitor switches to the user for the task. No process group from
            # us: it leaves our session and group itself (setsid). Our umask: it creates no
            # file, and sets the task's. Through rootspawn, which lets go of the GIL while
            # the monitor is made (one per task launched: the event loop runs on meanwhile);
            # its working directory is `/` (it pins none; the task's is entered by the monitor).
            watch = spawn_as_root(
                program,
                argv_for,
                env={},  # the task's comes through env_fd
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                fds=(theirs.fileno(), exit_fd, env_fd, *preserved, *entered),
                start_timeout=start_timeout,  # root's child: only root could stop it, but bounded all the same
                what="the task monitor",
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the monitor holds its end alone: its exit is our end-of-file
            if env_fd >= 0:
                os.close(env_fd)
        try:
            # Until the task is exec'ed or has failed: the monitor's own deadline comes first.
            ours.settimeout(start_timeout + _REPORT_MARGIN)
            try:
                reply = ours.recv(_MESSAGE_SIZE)
            except TimeoutError:
                _kill_children(watch.pid)  # the task it forked, stopped or stuck: it must not become an orphan of ours
                raise start_timed_out("the runtime", start_timeout) from None
            except OSError:
                reply = b""
            words = reply.split()
            if len(words) == 2 and words[0] == b"started" and words[1].isdigit():
                task_pid = int(words[1])
                # The monitor keeps the task unreaped until we release it: the pid is the task's.
                task = Pidfd.open(task_pid)
                ours.setblocking(False)
                return cls(watch, ours, task)
        except BaseException:
            ours.close()
            _kill_and_reap(watch)
            raise
        ours.close()  # released: a monitor that reported nothing usable exits with its children reaped
        status = _kill_and_reap(watch, kill=not (words[:1] == [b"error"]))
        if len(words) >= 2 and words[0] == b"error" and words[1].isdigit():
            err = int(words[1])
            step = words[2].decode("ascii", "replace") if len(words) > 2 else "exec"
            if step == "timeout":
                raise start_timed_out("the runtime", start_timeout)
            if step == "userns":
                raise OSError(err, f"cannot make the task's user namespace: {os.strerror(err)}")
            if step == "env":
                raise OSError(err, f"{os.strerror(err)} (taking in the task's environment as the user)")
            filename = shell if step == "exec" else cwd if step == "chdir" else None
            raise OSError(err, os.strerror(err), filename)
        raise OSError(errno.EIO, f"nodestepd-monitor ended without starting the task (status {status}, said {reply!r})")

    # ---- watching -----------------------------------------------------------------------

    @property
    def holding(self) -> bool:
        """True while the monitor keeps its exited children as zombies (ctl open, not released)."""
        return self._ctl is not None

    def adopt(self, pid: int, uid: int) -> "MonitoredProcess":
        """Report on another child of the monitor: a container's init that RunTimeCreate left
        behind. The pid is pinned by a pidfd, then /proc must show the monitor as its parent
        and `uid` as its real uid; the monitor is then asked to hold its zombie (`hold PID`).
        The monitor reaps an orphan nobody holds as soon as it exits, so one that ended
        before this is known only by its record: that counts (a reaped pid with no record
        yet raises). Raises NotWatchable. Call on the event loop.
        """
        if not self.holding:
            raise NotWatchable(f"pid {pid} cannot be watched through the task monitor: it has let go")
        self._drain()
        if pid in self._procs:  # adopted before (or the task itself): one watcher per process
            return self._procs[pid]
        try:
            pidfd = Pidfd.open(pid)
        except ProcessLookupError:
            if pid in self._records:  # ended and reaped: its record is all there is, and all we need
                proc = MonitoredProcess(self, None, pid)
                proc._set_status(self._records[pid])
                self._procs[pid] = proc
                return proc
            raise NotWatchable(f"pid {pid} cannot be watched: it has already exited and been reaped") from None
        except OSError as e:
            raise NotWatchable(f"pid {pid} cannot be watched: {e.strerror or e}") from None
        try:
            try:
                ppid, real_uid = proc_ids(pid)
            except (FileNotFoundError, ProcessLookupError):
                raise NotWatchable(f"pid {pid} has already exited and been reaped") from None
            if ppid != self.pid:
                raise NotWatchable(f"pid {pid} is not a child of the task monitor {self.pid} (its parent is {ppid})")
            if real_uid != uid:
                raise NotWatchable(f"pid {pid} runs as uid {real_uid}, not {uid}: not the container's process")
        except BaseException:
            pidfd.close()
            raise
        proc = self._track(pidfd)
        if proc.running:
            self._send(f"hold {pid}\n".encode())
        return proc

    def _send(self, message: bytes) -> None:
        """A message to the monitor; never blocks (it reads ctl in its every loop)."""
        if self._ctl is None:
            return
        try:
            self._ctl.send(message, socket.MSG_DONTWAIT)
        except OSError as e:  # EAGAIN (a monitor not reading), EPIPE (gone): the hold is not confirmed
            _log().warning("cannot send to the task monitor", monitor_pid=self.pid, error=e.strerror or str(e))

    def holds(self, pid: int) -> bool:
        """Whether the monitor keeps pid's zombie (so its pid and group stay reserved): the task's,
        and an adopted process's once the monitor has said `held`, until release."""
        return self.holding and (pid == self.task.pid or pid in self._held)

    def _track(self, pidfd: Pidfd) -> "MonitoredProcess":
        proc = MonitoredProcess(self, pidfd)
        self._procs[proc.pid] = proc
        if proc.pid in self._records:
            proc._set_status(self._records[proc.pid])
        return proc

    def _start_reading(self) -> None:
        """Read ctl on the event loop from now on (idempotent)."""
        if self._reading or self._ctl is None:
            return
        asyncio.get_running_loop().add_reader(self._ctl.fileno(), self._drain)
        self._reading = True
        self._drain()

    def _drain(self) -> None:
        """Read every message waiting on ctl. Never blocks."""
        while self._ctl is not None:
            try:
                message = self._ctl.recv(_MESSAGE_SIZE)
            except BlockingIOError:
                return
            except OSError:  # ECONNRESET: as good as end-of-file
                message = b""
            if not message:
                self._on_monitor_gone()
                return
            self._dispatch(message)

    def _dispatch(self, message: bytes) -> None:
        words = message.split()
        if len(words) == 3 and words[0] == b"exit" and words[1].isdigit() and words[2].isdigit():
            pid, status = int(words[1]), int(words[2])
            if pid in self._records:
                _log().warning("task monitor recorded a process twice", monitor_pid=self.pid, pid=pid)
                return
            self._records[pid] = status
            proc = self._procs.get(pid)
            if proc is not None:
                proc._set_status(status)
        elif len(words) == 2 and words[0] == b"held" and words[1].isdigit():
            self._held.add(int(words[1]))
        elif len(words) == 3 and words[0] == b"warning" and words[1] == b"exit-file" and words[2] == b"%d" % errno.EFBIG:
            _log().warning("task monitor's exit file is full: only the task's and its held processes' records "
                           "are written from now on", monitor_pid=self.pid)
        elif len(words) == 3 and words[0] == b"warning" and words[1] == b"exit-file" and words[2].isdigit():
            err = int(words[2])
            _log().error("task monitor cannot write the exit file: a status will be lost if the daemon restarts",
                      monitor_pid=self.pid, error=os.strerror(err))
        else:
            _log().warning("unexpected message from the task monitor", monitor_pid=self.pid, message=message[:80])

    def _close_ctl(self) -> None:
        if self._ctl is None:
            return
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._ctl.fileno())
            self._reading = False
        self._ctl.close()
        self._ctl = None

    def _on_monitor_gone(self) -> None:
        """End-of-file on ctl that we did not cause: the monitor died (killed, or a bug)."""
        self._close_ctl()
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_task(self._after_loss(), name=f"monitor {self.pid} lost")

    async def _after_loss(self) -> None:
        assert self._watch is not None
        # Its pidfd turns readable only after the kernel has handed its children on (to
        # us, as subreaper): from then on their parent is final.
        status = await self._watch.wait()
        self._watch.reap()
        self._watch = None
        waiting = [proc.pid for proc in self._procs.values() if proc.running]
        _log().error("task monitor died; watching its processes by pidfd", monitor_pid=self.pid, status=status,
                  pids=waiting)
        for proc in list(self._procs.values()):
            proc._fall_back()

    # ---- letting go -----------------------------------------------------------------------

    def release(self, reaper: "Reaper") -> None:
        """Let go of the task. Call on the event loop, after the final signals to its groups.

        The monitor then reaps its zombies (their pids may be reused from now on) and exits
        once its last child has; `reaper` reaps the monitor. A process still running is left
        to the monitor and watched through its pidfd (its status from PIDFD_INFO_EXIT).
        """
        if self._released:
            return
        self._released = True
        if self._ctl is not None:
            self._drain()  # records already sent still count
            self._close_ctl()
        if self._lost is not None:
            return  # it died: _after_loss reaps it and hands its processes over once it has exited
        for proc in list(self._procs.values()):
            proc._fall_back()
        if self._watch is not None:
            reaper.reap_later(self._watch, "task monitor")
            self._watch = None

    def _forget(self, proc: "MonitoredProcess") -> None:
        if self._procs.get(proc.pid) is proc:
            del self._procs[proc.pid]


class MonitoredProcess(ExitWatch):
    """An ExitWatch on a process the monitor reports on, fed by its `exit` records.

    Created in any thread; waited on in the event loop's. The pid is pinned by a pidfd; its
    process group stays reserved while the monitor holds the zombie (until release).
    """

    def __init__(self, monitor: Monitor, pidfd: Pidfd | None, pid: int | None = None) -> None:
        # pidfd None: a process already reaped, known by its record (Monitor.adopt)
        self.pid: int = pidfd.pid if pidfd is not None else pid  # type: ignore[assignment]
        self.monitor = monitor
        self._pidfd: Pidfd | None = pidfd  # None once reaped
        self._status: int | None = None
        self.status_known = True  # False only when neither the monitor nor the kernel told us
        self._exited: asyncio.Future[int] | None = None
        # Once the monitor can no longer tell us (released, or died): watched by pidfd instead.
        self._fallback: ProcessWatch | None = None
        self._fallback_task: asyncio.Task[None] | None = None

    @property
    def status(self) -> int | None:
        return self._status

    @property
    def running(self) -> bool:
        return self._status is None

    async def wait(self) -> int:
        if self._status is None and self._fallback is None:
            self.monitor._start_reading()
        if self._status is not None:
            return self._status
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._exited)

    def poll(self) -> int | None:
        """The exit status if it is known yet, else None. Never blocks."""
        if self._status is None:
            if self._fallback is not None:
                self._fallback.poll()
            else:
                self.monitor._drain()
        return self._status

    def _set_status(self, status: int, known: bool = True) -> None:
        if self._status is not None:
            return
        self._status = status
        self.status_known = known
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(status)

    def _fall_back(self) -> None:
        """Watch the pidfd directly: the monitor will not report this process any more."""
        if self._status is not None or self._pidfd is None or self._fallback is not None:
            return
        try:
            ppid, _ = proc_ids(self.pid)
        except (FileNotFoundError, ProcessLookupError):
            ppid = -1  # reaped already: only the kernel's exit info is left
        # Our child now (we are the subreaper its monitor's death handed it to), unless the
        # reaper's sweep got to it first: then it is the sweep's to reap, and the kernel
        # gives us its status (PIDFD_INFO_EXIT) once reaped.
        child = ppid == os.getpid() and self.pid not in CLAIMED
        self._fallback = ProcessWatch(self._pidfd.dup(), child=child)
        self._fallback_task = asyncio.get_running_loop().create_task(
            self._await_fallback(self._fallback), name=f"monitored {self.pid}")

    async def _await_fallback(self, watch: ProcessWatch) -> None:
        status = await watch.wait()
        if not watch.status_known:
            _log().error("a monitored process ended after its monitor was gone; its exit status is unknown",
                      pid=self.pid, monitor_pid=self.monitor.pid)
        self._set_status(status, watch.status_known)

    def send_signal(self, sig: int) -> bool:
        """Signal the process itself, through its pidfd. False once it has exited."""
        if self._pidfd is None or self._status is not None or self._pidfd.readable():
            return False
        return self._pidfd.send_signal(sig)

    def kill_group(self, sig: int) -> None:
        """Signal the process group this process leads (its pid).

        Safe while the zombie is held (by the monitor until release, or by us as its
        parent after the monitor died): the group id cannot be reused. Once nobody holds
        it, only while the process still runs.
        """
        if self._pidfd is None:
            return
        held = self._fallback.child if self._fallback is not None else self.monitor.holds(self.pid)
        if not held and self._pidfd.readable():
            return
        self._pidfd.signal_group(sig)

    def reap(self) -> None:
        """Release the pidfd (idempotent). The zombie itself is the monitor's, reaped after
        release; after the monitor died, a zombie that became ours is reaped here."""
        if self._pidfd is None:
            return
        if self._fallback is not None:
            self._fallback.reap()  # a child of ours must have exited, as with ProcessWatch
            if self._fallback_task is not None and not self._fallback_task.done():
                self._fallback_task.cancel()
        self._pidfd.close()
        self._pidfd = None
        self.monitor._forget(self)


def _kill_children(monitor_pid: int) -> None:
    """SIGKILL the monitor's children (each pinned by a pidfd, then checked to still be its
    child), before the monitor itself is killed: they would be handed to us, stopped."""
    for pid in children(monitor_pid):
        try:
            pidfd = Pidfd.open(pid)
        except ProcessLookupError:
            continue
        try:
            if proc_ids(pid)[0] == monitor_pid:
                pidfd.send_signal(signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
        finally:
            pidfd.close()


def _kill_and_reap(watch: ProcessWatch, kill: bool = True) -> int:
    """A monitor that failed to start its task: (kill,) wait for and reap it. Blocking."""
    if kill:
        watch.send_signal(signal.SIGKILL)
    status = watch.wait_blocking(None)
    assert status is not None  # no deadline: it has exited
    watch.reap()
    return status
