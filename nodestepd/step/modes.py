"""The two lifecycles oci.conf describes, one object each, chosen once per step:

- RunMode (RunTimeRun): a task is its runtime's process, started by the task's monitor
  as `/bin/sh -c RUNTIMERUN`; it ends when that process ends.
- CreateStartMode (RunTimeCreate, RunTimeStart, RunTimeQuery): RunTimeCreate runs with the
  task's stdio (so the container gets them), a RunTimeQuery until `created`, then
  RunTimeStart; the task is the container's init, which RunTimeCreate leaves to the
  task's monitor (its subreaper), watched through it; it ends when the init ends, and
  RunTimeDelete follows at once (no RunTimeQuery: the init's end is known).

A mode starts a step's tasks (undoing a start that failed half-way), signals and kills a
running task, does what its lifecycle needs after a task's end, and cleans up what a task
leaves behind. What both share (RunTimeKill, kill_wait, RunTimeDelete, releasing monitors,
spool and record) is the Step's.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol

from nodestepd.logs import BoundLogger
from nodestepd.process.monitor import MonitoredProcess
from nodestepd.process.spawn import off_loop, signal_group_except_leader
from nodestepd.process.watch import ExitWatch, NotWatchable
from nodestepd.step.container import ContainerError, ContainerState
from nodestepd.step.runtime import Runtime
from nodestepd.step.spec import LaunchFailed, Stdio, Timings
from nodestepd.step.task import EndedProcess, ProcessId, Task


@dataclass(frozen=True)
class Starting:
    """What starting a launch's tasks takes besides the tasks themselves."""

    commands: list[str]  # per task: RunTimeRun, or RunTimeCreate, expanded
    stdio: Stdio
    exit_fd: int  # the step's exit file, for every task's monitor to append to
    first_task: int  # the task that gets stdin
    timings: Timings
    # Awaited just before the tasks start (run mode: before RunTimeRun; create/start mode:
    # between RunTimeCreate and RunTimeStart): an OCI create is held there until its start
    # (daemon/ociproxy.py). Raises LaunchFailed to end the launch instead.
    gate: Callable[[], Awaitable[None]] | None = None
    # An MPI (PMIx) step's: each task's runtime runs in a user namespace over these
    # subordinate ids (subuid start, count, subgid start, count; mpi.py).
    userns: tuple[int, int, int, int] | None = None

    def spawn(self, runtime: Runtime, task: Task, command: str) -> MonitoredProcess:
        """The task's first command with its stdio (blocking: call in a worker thread)."""
        stdout, stderr = self.stdio.outputs_for(task.task_id)
        stdin = self.stdio.stdin if task.task_id == self.first_task else subprocess.DEVNULL
        process = runtime.spawn_first(task, command, stdin, stdout, stderr, self.exit_fd, self.stdio.preserved,
                                      self.userns)
        self.timings.spawned()
        return process


class Mode(Protocol):
    name: str
    kill_target: str  # what kill() hits, for the log

    async def start(self, tasks: list[Task], starting: Starting) -> None:
        """Start every task. On failure, undo what started and raise LaunchFailed."""

    async def undo(self, tasks: list[Task]) -> None:
        """Kill and wait for what a failed or abandoned launch started, delete its containers."""

    def unwatched(self, task: Task) -> ExitWatch:
        """The watch of a recovered task whose process was never known."""

    def signal(self, task: Task, sig: int) -> bool:
        """Deliver sig to a running task; False when it could not be."""

    def kill(self, task: Task) -> bool:
        """SIGKILL a running task; False when there is no process to kill (RunTimeDelete must do it)."""

    async def after_exit(self, task: Task, status: int | None) -> None:
        """What the lifecycle needs once a task ended on its own (not cancelled)."""

    def release(self, task: Task) -> None:
        """Clean up what an ended task left behind, before its process is reaped."""


def mode_for(runtime: Runtime, log: BoundLogger) -> Mode:
    return CreateStartMode(runtime, log) if runtime.commands.create_start else RunMode(runtime, log)


class RunMode:
    name = "run"
    kill_target = "the runtime's process group"

    def __init__(self, runtime: Runtime, log: BoundLogger) -> None:
        self.runtime = runtime
        self.log = log

    async def start(self, tasks: list[Task], starting: Starting) -> None:
        if starting.gate is not None:
            await starting.gate()
        # fork+exec blocks for a millisecond or so per task, or up to runtime_timeout for one
        # its user stopped before its exec: off the loop, in a thread of its own (off_loop).
        error = await off_loop(self._spawn_all, tasks, starting)
        if error is not None:
            self.log.error("runtime could not be started", error=str(error))
            await self.undo(tasks)
            raise LaunchFailed(f"cannot start the runtime as {self.runtime.identity.user}: {error.strerror or error}")

    def _spawn_all(self, tasks: list[Task], starting: Starting) -> OSError | None:
        """Start each task's runtime (worker thread). Stops at the first failure and returns it."""
        for task, command in zip(tasks, starting.commands):
            try:
                task.watch = starting.spawn(self.runtime, task, command)
                task.process = ProcessId.of(task.watch.pid)
            except OSError as e:
                return e
            self.log.debug("task started", task_id=task.task_id, pid=task.watch.pid, command=command)
        return None

    async def undo(self, tasks: list[Task]) -> None:
        for task in tasks:
            if task.watch is not None:
                task.watch.kill_group(signal.SIGKILL)
        for task in tasks:
            if task.watch is not None:
                await task.watch.wait()

    def unwatched(self, task: Task) -> ExitWatch:
        return EndedProcess(None)  # a runtime that was never started has no status to give

    def signal(self, task: Task, sig: int) -> bool:
        """To the runtime: its process group, minus the shell that started it (dash does not
        exec, so a signal that kills the shell would orphan the runtime and lose its status)."""
        assert task.watch is not None and task.watch.pid is not None
        if signal_group_except_leader(task.watch.pid, sig) == 0:
            # Nothing below the shell (yet, or any more): the shell is all there is to signal.
            task.watch.send_signal(sig)
        return True

    def kill(self, task: Task) -> bool:
        assert task.watch is not None
        task.watch.kill_group(signal.SIGKILL)
        return True

    async def after_exit(self, task: Task, status: int | None) -> None:
        if status is None or status >= 128:
            # The runtime died by a signal (or we cannot tell): it may not have removed its container.
            await self.runtime.delete(task)

    def release(self, task: Task) -> None:
        assert task.watch is not None
        task.watch.kill_group(signal.SIGKILL)  # stragglers the runtime left in its group


class CreateStartMode:
    name = "create-start"
    kill_target = "the container's init"

    def __init__(self, runtime: Runtime, log: BoundLogger) -> None:
        self.runtime = runtime
        self.log = log

    async def start(self, tasks: list[Task], starting: Starting) -> None:
        """Bring every task's container to running; on any failure, remove them all."""
        outcomes = await asyncio.gather(
            *(self._create(task, command, starting) for task, command in zip(tasks, starting.commands)),
            return_exceptions=True,
        )
        failures = [(task, e) for task, e in zip(tasks, outcomes) if isinstance(e, BaseException)]
        if not failures:
            return
        for task, error in failures:
            self.log.error("container could not be started", task_id=task.task_id, error=str(error))
        await self.undo(tasks)
        task, error = failures[0]
        if isinstance(error, (ContainerError, OSError)):
            prefix = f"task {task.task_id}: " if len(tasks) > 1 else ""
            detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise LaunchFailed(f"{prefix}{detail}")
        raise error

    async def _create(self, task: Task, command: str, starting: Starting) -> None:
        """RunTimeCreate, wait for `created`, watch the init, RunTimeStart."""
        timeout = self.runtime.timeout
        log = self.log.bind(task_id=task.task_id)
        log.debug("running runtime command", key="RunTimeCreate", command=command)
        # The container inherits RunTimeCreate's stdio: that is how its output reaches the
        # client. So we wait for the create command to exit, never for end-of-file.
        create = await off_loop(starting.spawn, self.runtime, task, command)
        try:
            try:
                status = await asyncio.wait_for(create.wait(), timeout)
            except TimeoutError:
                create.kill_group(signal.SIGKILL)
                await create.wait()
                raise ContainerError(f"RunTimeCreate did not finish within {timeout:g} s and was killed") from None
        finally:
            if not create.running:  # else we are being cancelled: its monitor reaps it once released
                create.reap()
        if status != 0:
            raise ContainerError(
                f"RunTimeCreate failed with exit status {status} (the runtime's own message went to the step's stderr)"
            )
        state = await self.runtime.wait_until_created(task)
        task.watch = self._watch_container(task, state, log)
        if task.watch.pid is not None:
            task.process = ProcessId.of(task.watch.pid)
        if starting.gate is not None:
            await starting.gate()
        start = await self.runtime.start(task)
        if start.status != 0:
            raise ContainerError(f"RunTimeStart failed with exit status {start.status}: {start.output or '(no output)'}")
        log.debug("container started", pid=task.watch.pid, watched="pidfd" if task.watch.pid else "RunTimeQuery")

    def _watch_container(self, task: Task, state: ContainerState, log: BoundLogger) -> ExitWatch:
        problem = "RunTimeQuery reports no pid"
        if state.pid is not None:
            assert task.monitor is not None
            try:
                # RunTimeCreate left the init behind: orphaned, it is now its monitor's child.
                return task.monitor.adopt(state.pid, self.runtime.identity.uid)
            except NotWatchable as e:
                problem = str(e)
        log.warning(
            "cannot watch the container's process; polling RunTimeQuery instead (its exit status will not be known)",
            problem=problem,
        )
        return self.runtime.poller(task)

    async def undo(self, tasks: list[Task]) -> None:
        async def undo(task: Task) -> None:
            if task.running and self.kill(task):
                assert task.watch is not None
                await task.watch.wait()
            # Delete even when create failed half-way: runc may have registered the container.
            await self.runtime.delete(task)

        await asyncio.gather(*(undo(task) for task in tasks))

    def unwatched(self, task: Task) -> ExitWatch:
        self.log.warning("recovered task has no process to watch; polling RunTimeQuery instead",
                         task_id=task.task_id)
        return self.runtime.poller(task)

    def signal(self, task: Task, sig: int) -> bool:
        """To the container's init, through the pidfd held on it."""
        assert task.watch is not None
        if task.watch.send_signal(sig):
            return True
        self.log.warning("cannot signal a container whose pid is not known", task_id=task.task_id)
        return False

    def kill(self, task: Task) -> bool:
        assert task.watch is not None
        if task.watch.pid is None:
            return False  # polled: RunTimeDelete (with --force) has to do it
        task.watch.send_signal(signal.SIGKILL)  # the init: in its pid namespace, that ends them all
        return True

    async def after_exit(self, task: Task, status: int | None) -> None:
        # No RunTimeQuery first: the watch ended because the init is gone (the monitor's
        # record or its pidfd said so; a polled container's own query said `stopped`), and
        # RunTimeDelete (the guide's has --force) removes the container whatever the runtime
        # thinks of it. A confirming `state` would only have cost the exit notice its time.
        await self.runtime.delete(task)

    def release(self, task: Task) -> None:
        pass  # the init's pid namespace held everything; nothing of a group to sweep
