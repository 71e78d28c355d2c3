"""Starting processes as a user: shell commands (`/bin/sh -c COMMAND`) in their own process group.

We spawn with subprocess.Popen (a C fork+exec that drops to the user's uid, gid and
groups before exec) but never let subprocess wait for the child: uvloop owns SIGCHLD and
reaps only what libuv spawned, so every process here is reaped by ProcessWatch through
its pidfd. Each command gets its own process group, led by the shell.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Mapping

from .identity import Identity
from nodestepd.process.watch import SPAWN_LOCK, Pidfd, ProcessWatch, children

SHELL = "/bin/sh"
RUNTIME_UMASK = 0o022


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
    """Start `/bin/sh -c command` as the user in a new process group and watch it by pidfd.

    stdin/stdout/stderr are fds, or subprocess.DEVNULL.

    cwd must be a directory the user owns (a task spool dir): subprocess enters it before
    it switches to the user's ids, so without that rule the user could be handed a
    working directory it could not open itself. Raises PermissionError if it is not, and
    OSError when the shell cannot be started.
    """
    st = os.stat(cwd)
    if st.st_uid != identity.uid:
        raise PermissionError(errno.EACCES, f"working directory {cwd} is not owned by {identity.user}")
    with SPAWN_LOCK:  # until the pidfd is ours, the reaper must not take the new child for an orphan
        popen = subprocess.Popen(
            [SHELL, "-c", command],
            executable=SHELL,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            cwd=cwd,
            env=dict(env),
            user=identity.uid,
            group=identity.gid,
            extra_groups=list(identity.groups),
            process_group=0,
            umask=RUNTIME_UMASK,
            close_fds=True,
            restore_signals=True,
        )
        watch = ProcessWatch.open(popen.pid)
    # ProcessWatch reaps it; a returncode keeps subprocess from ever calling waitpid on
    # this pid (its __del__ would otherwise queue it for a waitpid of its own).
    popen.returncode = 0
    return watch


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


