"""oci.conf's RunTime* commands as a step runs them: each as `/bin/sh -c COMMAND`, as the
step's user, in the task's dir (Runtime); finding the program a command starts; and what
this host's /bin/sh will not do as a site expects."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import stat
from typing import Mapping

from nodestepd.config.patterns import expand
from nodestepd.logs import BoundLogger
from nodestepd.process.identity import Identity
from nodestepd.process.monitor import Monitor, MonitoredProcess
from nodestepd.process.namespaces import Namespaces
from nodestepd.process.spawn import SHELL, HelperResult, run_helper
from nodestepd.step import container
from nodestepd.step.container import ContainerState
from nodestepd.step.spec import RuntimeCommands
from nodestepd.step.task import ProcessId, Task

# RunTimeDelete runs this often at most for one task while it hangs (each run killed at
# runtime_timeout): a runtime stuck on a lock often answers the next time.
DELETE_ATTEMPTS = 3


class Runtime:
    """Runs one step's RunTime* commands for its tasks, as the step's user, with the step's
    runtime environment, each in the task's dir and bounded by runtime_timeout.

    %p is the task's real pid: the runtime's shell (run mode) or the container's init
    (create/start), kept unreaped until the step is released so that it cannot be recycled.
    """

    def __init__(self, commands: RuntimeCommands, identity: Identity, env: Mapping[str, str], timeout: float,
                 log: BoundLogger) -> None:
        self.commands = commands
        self.identity = identity
        self.env = env
        self.timeout = timeout
        self.log = log
        # nodestep-oci's containers: the caller's user and mount namespaces, where every
        # command of the step runs (entered as the user; owned and closed by its OCI container).
        self.namespaces: Namespaces | None = None

    def spawn_first(self, task: Task, command: str, stdin: int, stdout: int, stderr: int,
                    exit_fd: int, preserved: tuple[int, ...] = (),
                    userns: tuple[int, int, int, int] | None = None) -> MonitoredProcess:
        """Start the task's first command (RunTimeRun or RunTimeCreate) under its own monitor,
        holding the task's stdio, and `preserved` at fds 3, 4, ... Blocking (a fork and two
        execs): call it in a worker thread. userns: the subordinate id ranges of the user
        namespace it runs in (an MPI step's, mpi.py), if any. Returns the command's own process; raises
        OSError when it cannot start."""
        task.monitor = Monitor.spawn(
            command, identity=self.identity, cwd=task.cwd, env=self.env,
            stdin=stdin, stdout=stdout, stderr=stderr, exit_fd=exit_fd, start_timeout=self.timeout,
            namespaces=self.namespaces, preserved=preserved, userns=userns,
        )
        task.monitor_process = ProcessId.of(task.monitor.pid)
        return task.monitor.task

    async def run(self, key: str, pattern: str | None, task: Task) -> HelperResult | None:
        """Run one RunTime* command for a task; None when the site did not configure it."""
        if pattern is None:
            return None
        command = self.expand(pattern, task)
        self.log.debug("running runtime command", key=key, task_id=task.task_id, command=command)
        result = await run_helper(command, identity=self.identity, cwd=task.cwd, env=self.env, timeout=self.timeout,
                                  namespaces=self.namespaces)
        if result.timed_out:
            self.log.error("runtime command hung and was killed", key=key, task_id=task.task_id,
                           timeout=self.timeout, command=command)
        return result

    def expand(self, pattern: str, task: Task) -> str:
        pid = task.watch.pid if task.watch is not None else None
        return expand(pattern, dataclasses.replace(task.context, pid=pid))

    async def wait_until_created(self, task: Task) -> ContainerState:
        return await container.wait_until_created(lambda: self._query(task), self.timeout)

    def poller(self, task: Task) -> container.PolledContainer:
        """The fallback watch for a container whose pid cannot be watched."""
        return container.PolledContainer(lambda: self._query(task))

    async def _query(self, task: Task) -> HelperResult:
        result = await self.run("RunTimeQuery", self.commands.query, task)
        assert result is not None  # create/start mode has RunTimeQuery (ociconf.py)
        return result

    async def start(self, task: Task) -> HelperResult:
        result = await self.run("RunTimeStart", self.commands.start, task)
        assert result is not None  # create/start mode has RunTimeStart (ociconf.py)
        return result

    async def kill(self, task: Task) -> HelperResult | None:
        return await self.run("RunTimeKill", self.commands.kill, task)

    async def delete(self, task: Task) -> None:
        """RunTimeDelete, run again when it hung (up to DELETE_ATTEMPTS runs). A container it
        never deleted is marked on the task (`ps`, `status`) and logged with the command that
        deletes it by hand.

        Only a hang counts as a failed delete: a delete that exits non-zero was answered by
        the runtime, and the published kill-style deletes (`kill -s SIGKILL %p`) exit
        non-zero whenever the task is gone already."""
        result = None
        for attempt in range(1, DELETE_ATTEMPTS + 1):
            result = await self.run("RunTimeDelete", self.commands.delete, task)
            if result is None or not result.timed_out:
                break
            if attempt < DELETE_ATTEMPTS:
                self.log.warning("RunTimeDelete hung; running it again", task_id=task.task_id, attempt=attempt,
                                 attempts=DELETE_ATTEMPTS)
        task.deleted = True
        if result is None:
            return
        if result.timed_out:
            task.not_deleted = True
            assert self.commands.delete is not None
            self.log.error(
                "container not deleted: RunTimeDelete hung every time; the runtime may still hold it. "
                "To delete it, run as root the command given",
                task_id=task.task_id, attempts=DELETE_ATTEMPTS, timeout=self.timeout,
                command=self.admin_command(self.expand(self.commands.delete, task)),
            )
        elif result.status != 0:
            self.log.info("RunTimeDelete failed", task_id=task.task_id, status=result.status, output=result.output)

    def admin_command(self, command: str) -> str:
        """command as an administrator can run it by hand: as the step's user, by the same
        shell, with the user's runtime dir (where rootless runtimes keep their state)."""
        runtime_dir = self.env.get("XDG_RUNTIME_DIR", f"/run/user/{self.identity.uid}")
        return shlex.join(["runuser", "-u", self.identity.user, "--", "env", f"XDG_RUNTIME_DIR={runtime_dir}",
                           SHELL, "-c", command])


class RuntimeNotFound(Exception):
    """The program a RunTime* command starts cannot be found; the text says which and where we looked."""


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
