"""Starting processes: `spawn`, the one way anything here starts a program, and what is built on it.

`spawn` starts a program with subprocess.Popen (a fork+exec in C that switches to the
user's ids in the child before exec, with no Python code run in the child, which would
be unsafe in a threaded program) and hands back a ProcessWatch on its pidfd. subprocess
never waits for the child: uvloop owns SIGCHLD and reaps only what libuv spawned, and
only the watch may collect a status, so every process here is reaped by its
ProcessWatch, on the event loop (wait) or blocking in a worker thread or the CLI
(wait_blocking).

Built on it: `spawn_shell` (a runtime command, `/bin/sh -c COMMAND`, as the user in a
process group of its own), `run_helper` (a short runtime command whose output we
collect), monitor.Monitor.spawn (a task under its nodestepd-monitor), asuser.open_as
(the helper that opens files as a user) and the doctor's probes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nodestepd.process.identity import Identity
from nodestepd.process.watch import SPAWN_LOCK, Pidfd, ProcessWatch, children

SHELL = "/bin/sh"
RUNTIME_UMASK = 0o022


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
) -> ProcessWatch:
    """Start argv and watch it by pidfd. Blocking (a fork and an exec): on the event loop,
    call it in a worker thread. argv[0] without a slash is looked up in env's PATH.

    identity: the user to run as (uid, gid and supplementary groups, all set before exec:
    every uid away from 0 clears the capabilities), or None to run as we are (the
    monitor, which switches to the user itself; the doctor run by a user). cwd: entered
    before the switch, so with an identity it must pass check_workdir (PermissionError).
    env: exactly the environment the program gets. stdin/stdout/stderr: fds, or
    subprocess.DEVNULL. process_group: lead a process group of its own, so that all it
    starts can be signalled together (kill_group) while its zombie reserves the group id.
    pass_fds: the only fds besides 0-2 it gets (close_fds: nothing of the daemon's, other
    steps' or connections' leaks into it). umask: the child's, or None to keep ours.
    Signal dispositions are restored to the defaults (Python ignores SIGPIPE and SIGXFSZ;
    a program must not inherit that).

    Raises OSError when the program cannot be started (nothing is left behind).
    """
    if identity is not None:
        check_workdir(cwd, identity)
    ids = {} if identity is None else {
        "user": identity.uid, "group": identity.gid, "extra_groups": list(identity.groups)}
    with SPAWN_LOCK:  # until the pidfd is ours, the reaper must not take the new child for an orphan
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
            **ids,
        )
        try:
            watch = ProcessWatch.open(popen.pid)
        except BaseException:
            popen.kill()  # no pidfd (EMFILE...): it would run and end unwatched, so stop it here
            popen.wait()
            raise
    # The watch reaps it; a returncode keeps subprocess from ever calling waitpid on this
    # pid (its __del__ would otherwise queue it for a waitpid of its own).
    popen.returncode = 0
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
) -> ProcessWatch:
    """Start `/bin/sh -c command` as the user in a new process group, with umask 022, and watch it by pidfd.

    stdin/stdout/stderr are fds, or subprocess.DEVNULL. cwd must be a directory the user
    owns (a task spool dir), or `/` (check_workdir: PermissionError if not). Raises OSError
    when the shell cannot be started.
    """
    return spawn([SHELL, "-c", command], identity=identity, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                 stderr=stderr, process_group=True, umask=RUNTIME_UMASK)


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
) -> HelperResult:
    """Run a short runtime command (kill, delete, query) and collect its output.

    The output goes to a memfd, not a pipe: we wait for the process to exit (pidfd),
    never for end-of-file, which a container holding the pipe would delay forever.
    """
    out = os.memfd_create("nodestepd-helper", os.MFD_CLOEXEC)
    try:
        watch = spawn_shell(
            command, identity=identity, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
        timed_out = False
        try:
            await asyncio.wait_for(watch.wait(), timeout)
        except TimeoutError:
            timed_out = True
        finally:
            # Whatever is left in the helper's group (all of it, after a timeout) would
            # outlive it unowned.
            watch.kill_group(signal.SIGKILL)
        status = await watch.wait()
        watch.reap()
        if timed_out:
            return HelperResult(status, f"timed out after {timeout:g} s; killed", timed_out=True)
        os.lseek(out, 0, os.SEEK_SET)
        data = os.read(out, 64 * 1024)
        return HelperResult(status, data.decode("utf-8", "replace").strip())
    finally:
        os.close(out)


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
    and the end of its stderr (a site's stage hook: only these capped bytes are ever read).

    Like run_helper, the output goes to memfds and we wait for the exit (pidfd), never
    for end-of-file. Raises OSError when the program cannot be started.
    """
    out = os.memfd_create("nodestepd-program-out", os.MFD_CLOEXEC)
    err = os.memfd_create("nodestepd-program-err", os.MFD_CLOEXEC)
    try:
        watch = await asyncio.to_thread(  # a fork and an exec: off the loop
            spawn, argv, identity=identity, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            process_group=True, umask=RUNTIME_UMASK)
        timed_out = False
        try:
            await asyncio.wait_for(watch.wait(), timeout)
        except TimeoutError:
            timed_out = True
        finally:
            watch.kill_group(signal.SIGKILL)  # what it left running in its group, or all of it after a timeout
        status = await watch.wait()
        watch.reap()
        stdout = os.pread(out, stdout_cap, 0)
        size = os.fstat(err).st_size
        tail = os.pread(err, stderr_cap * 4, max(0, size - stderr_cap * 4))
        stderr = tail.decode("utf-8", "replace").strip()[-stderr_cap:]
        return ProgramResult(status, stdout, stderr, timed_out)
    finally:
        os.close(out)
        os.close(err)


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
