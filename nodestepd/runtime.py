"""The runtime driver: runs oci.conf's RunTime* commands as `/bin/sh -c COMMAND` as the user.

We spawn with subprocess.Popen (a C fork+exec that drops to the user's uid, gid and
groups before exec) but never let subprocess wait for the child: uvloop owns SIGCHLD and
reaps only what libuv spawned, so every process here is reaped by ProcessWatch through
its pidfd. Each command gets its own process group, led by the shell.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import re
import shlex
import signal
import stat
import subprocess
from dataclasses import dataclass
from typing import Mapping

from .watch import SPAWN_LOCK, ProcessWatch, children

SHELL = "/bin/sh"
RUNTIME_UMASK = 0o022


class RuntimeNotFound(Exception):
    """The program a RunTime* command starts cannot be found; the text says which and where we looked."""


@dataclass(frozen=True)
class Identity:
    """Who a step runs as: resolved from the kernel-reported uid, never from the request."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def for_uid(cls, uid: int) -> "Identity":
        """Blocking NSS lookups: call through asyncio.to_thread on the event loop."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise LookupError(f"uid {uid} has no passwd entry on this node") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)), pw.pw_dir)


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
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if _pgid(pid) != leader:
                continue
            signal.pidfd_send_signal(fd, sig)
            sent += 1
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)
    return sent


def find_program(command: str, env: Mapping[str, str], identity: Identity | None = None) -> str | None:
    """The program a shell command line starts first, resolved like the shell would.

    Understands leading NAME=value assignments (a PATH= among them is the one searched),
    `env [-i] [NAME=value...] PROG` (the published Charliecloud config starts that way;
    env's own PATH= then applies) and `~/` (the user's HOME). Returns the resolved path,
    or None when the command does not start with a plain program name (shell syntax,
    builtins, keywords, relative paths): then the shell itself reports any problem.
    Raises RuntimeNotFound when the program is definitely missing, or (given identity)
    exists but that user may not execute it: the daemon checks as root, the shell will
    run as the user.
    """
    try:
        words = shlex.split(command, comments=False, posix=True)
    except ValueError:
        return None
    path = env.get("PATH", os.defpath)
    i = 0
    while i < len(words) and _is_assignment(words[i]):
        if words[i].startswith("PATH="):
            path = words[i][len("PATH="):]
        i += 1
    if i < len(words) and words[i] in ("env", "/usr/bin/env", "/bin/env"):
        i += 1
        while i < len(words) and (words[i].startswith("-") or _is_assignment(words[i])):
            if words[i].startswith("PATH="):
                path = words[i][len("PATH="):]
            if words[i] in ("-u", "-C", "-S", "--unset", "--chdir"):
                return None  # options with arguments: not worth second-guessing
            i += 1
    if i >= len(words):
        return None
    program = words[i]
    if program in _SHELL_WORDS or any(c in program for c in "$`\\*?[;|&<>(){}="):
        return None
    if program == "~" or program.startswith("~/"):
        program = env.get("HOME", "") + program[1:]
    elif program.startswith("~"):
        return None  # ~user: not worth resolving
    if "/" in program:
        if not os.path.isabs(program):
            return None  # relative to the task dir at run time
        candidates = [program]
    else:
        candidates = [os.path.join(d or ".", program) for d in path.split(":")]
    denied = None
    for candidate in candidates:
        if not os.path.isfile(candidate):
            continue
        if _executable_by(candidate, identity):
            return candidate
        denied = denied or candidate
    if denied is not None:
        who = identity.user if identity else "anyone"
        raise RuntimeNotFound(f"runtime program {denied} is not executable by {who}")
    if "/" in program:
        raise RuntimeNotFound(f"runtime program {program} does not exist")
    raise RuntimeNotFound(f"runtime program {program!r} is not found in PATH={path}")


def _executable_by(path: str, identity: Identity | None) -> bool:
    """The kernel's execute check for a user (owner, then group, then other bits)."""
    st = os.stat(path)
    if identity is None:
        return bool(st.st_mode & 0o111)
    if st.st_uid == identity.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == identity.gid or st.st_gid in identity.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


# dash's builtins and the shell's reserved words: never looked up on PATH.
_SHELL_WORDS = frozenset(
    ". : [ alias bg break cd chdir command continue echo eval exec exit export false fc fg getopts hash jobs "
    "kill local printf pwd read readonly return set shift test times trap true type ulimit umask unalias unset "
    "wait ! { } case do done elif else esac fi for if in then until while".split()
)


def _is_assignment(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and name.isidentifier()


_SIG_PREFIXED_KILL = re.compile(r"\bkill\s+(-s\s+|-)SIG[A-Z0-9]+")


def shell_warnings(patterns: Mapping[str, str], shell: str = SHELL) -> list[str]:
    """Things in an oci.conf that this host's /bin/sh will not do as the site expects.

    The guide's Charliecloud, Singularity and Enroot examples use `kill -s SIGTERM %p`;
    dash's kill builtin (Debian's /bin/sh) rejects signal names with the SIG prefix, so
    the command fails and termination falls through to SIGKILL.
    """
    if os.path.basename(os.path.realpath(shell)) != "dash":
        return []
    warnings = []
    for key, pattern in patterns.items():
        match = _SIG_PREFIXED_KILL.search(pattern)
        if match:
            fixed = match.group(0).replace("SIG", "", 1)
            warnings.append(
                f"{key}: {shell} is dash here, whose kill rejects {match.group(0)!r}: "
                f"the command will fail (write {fixed!r})"
            )
    return warnings
