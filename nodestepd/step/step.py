"""One container step on this node, from validated request to exit event.

Data flows one way: StepSpec (validated request) -> prepared spool (StepSpool, rewritten
config.json, environment file) -> durable record (steprecord.py) -> per task, the
runtime started by the task's own monitor (monitor.py) -> watched tasks -> StepResult.
A Step owns its spool, its record and its task processes and is the one place that
releases them (_release).

Every task's first runtime command runs under a nodestepd-monitor, its parent outside
the daemon: if the daemon dies, the task runs on and the monitor writes its exit
status to the step's exit file, where a restarted daemon finds it (recovery.py).

Two lifecycles, from oci.conf's mode:
- run: the task is RunTimeRun's process; it ends when that process ends.
- create/start: RunTimeCreate (with the task's stdio, so the container gets them), a
  RunTimeQuery until `created`, RunTimeStart; the task is then the container's init,
  adopted by the daemon as subreaper and watched by pidfd (container.py), and ends
  when the init ends. One more RunTimeQuery confirms `stopped`; RunTimeDelete follows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping

from nodestepd.step import configjson
from nodestepd.step import container
from nodestepd.daemon import metrics
from nodestepd.step import env as stepenv
from nodestepd.step import record as steprecord
from nodestepd.step.configjson import BundleConfigError
from nodestepd.step.container import ContainerError, PolledContainer
from nodestepd.logs import get_logger
from nodestepd.protocol.wire import STATUS_LAUNCH_FAILED
from nodestepd.config.ociconf import OciConf
from nodestepd.config.patterns import PatternContext, expand
from nodestepd.process.monitor import Monitor, MonitoredProcess
from nodestepd.process.reaper import Reaper
from nodestepd.process.spawn import HelperResult, run_helper, signal_group_except_leader
from nodestepd.process.identity import Identity
from nodestepd.step.runtime import RuntimeNotFound, find_program
from nodestepd.step.spool import SpoolError, StepSpool, spool_layout
from nodestepd.step.record import ProcRecord, RecordStore, StepRecord
from nodestepd.process.watch import ExitWatch, NotWatchable, start_time

ENV_FILE_NAME = "environment"
CONFIG_FILE_NAME = "config.json"


class LaunchFailed(Exception):
    """The step could not start. The message is one sentence for the user; nothing is left behind."""


@dataclass(frozen=True)
class StepSpec:
    """A launch request after validation, with the caller's identity from the kernel."""

    job_id: int
    step_id: int
    ntasks: int
    identity: Identity
    bundle: str
    args: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str
    pty: bool
    attached: bool
    config_json: str | None  # the bundle's config.json as read by the caller
    config_json_error: str | None
    # Per-task launches (docs/protocol.md): this launch's task ids start at task_offset;
    # None is a whole-step launch (task ids from 0).
    task_offset: int | None = None
    local_offset: int | None = None
    node_id: int | None = None
    container_id: str | None = None

    @property
    def first_task(self) -> int:
        return self.task_offset or 0

    @property
    def task_ids(self) -> range:
        return range(self.first_task, self.first_task + self.ntasks)


@dataclass(frozen=True)
class StepSettings:
    """What a step needs from the daemon's configuration, frozen at launch."""

    oci: OciConf
    spool_dir: str
    node_name: str
    kill_wait: float
    runtime_timeout: float  # bound on each RunTime* command, and on waiting for `created`
    daemon_env: Mapping[str, str]


@dataclass(frozen=True)
class Stdio:
    """The caller's fds. The launch's first task gets stdin; the other tasks read /dev/null.

    task_outputs, when given, holds each task's own (stdout, stderr) in place of the
    shared pair (a detached step's output sent to the journal, one pipe pair per task).
    """

    stdin: int
    stdout: int
    stderr: int
    task_outputs: Mapping[int, tuple[int, int]] | None = None  # by task id

    def outputs_for(self, task_id: int) -> tuple[int, int]:
        return self.task_outputs[task_id] if self.task_outputs is not None else (self.stdout, self.stderr)


class StepState(enum.Enum):
    LAUNCHING = "launching"
    RUNNING = "running"
    TERMINATING = "terminating"
    FINISHED = "finished"


@dataclass
class Task:
    task_id: int
    dir: str  # the path, for patterns and messages
    context: PatternContext
    cwd: str = ""  # the same dir pinned through the spool's fd: where runtime commands start
    deleted: bool = False  # RunTimeDelete has run for it
    # What the task's end is the end of: run mode, the runtime's shell; create/start, the
    # container's init (or the RunTimeQuery poller when there is no pid to watch). After
    # a daemon restart, the watch recovery.py gives it.
    watch: ExitWatch | None = None
    monitor: Monitor | None = None  # this daemon's link to the task's monitor (None after a restart)
    proc: ProcRecord | None = None  # watch's process, for the record
    monitor_proc: ProcRecord | None = None

    @property
    def status_known(self) -> bool:
        return self.watch is not None and self.watch.status_known

    @property
    def status(self) -> int | None:
        return self.watch.status if self.watch else None

    @property
    def running(self) -> bool:
        return self.watch is not None and self.watch.running

    @property
    def ended(self) -> bool:
        return self.watch is not None and not self.watch.running


@dataclass(frozen=True)
class StepResult:
    """status: the first non-zero known task status, else 0; None when no task failed
    but some task's status is unknown. A task's status is None when it never started
    or its status is not known: never a made-up 0."""

    status: int | None
    task_statuses: tuple[int | None, ...]
    cancelled: bool


@dataclass
class _Prepared:
    spool: StepSpool
    tasks: list[Task]
    runtime_env: dict[str, str]
    first_commands: list[str]  # per task: RunTimeRun, or RunTimeCreate in create/start mode
    spool_record: steprecord.SpoolRecord


class Step:
    def __init__(self, spec: StepSpec, settings: StepSettings, reaper: Reaper, store: RecordStore) -> None:
        self.spec = spec
        self.settings = settings
        self.create_start = settings.oci.runtime_run is None
        self.reaper = reaper
        self.store = store
        self.name = steprecord.record_name(spec.job_id, spec.step_id, spec.first_task)
        self.state = StepState.LAUNCHING
        self.started_at = time.time()
        self.tasks: list[Task] = []
        self.result: StepResult | None = None
        self.log = get_logger(job_id=spec.job_id, step_id=spec.step_id, user=spec.identity.user)
        self._spool: StepSpool | None = None
        self._runtime_env: dict[str, str] = {}
        self._supervisor: asyncio.Task[None] | None = None  # held: the loop keeps tasks only weakly
        self._termination: asyncio.Task[None] | None = None
        self._cancel_reason: str | None = None
        self._left_running = False  # the daemon stopped and left this step's tasks alone
        self._spool_record: steprecord.SpoolRecord | None = None
        self._save_lock = asyncio.Lock()
        self._done: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self.timings: metrics.StepTimings | metrics._Off = metrics.OFF  # the server sets one under debug_timings

    @property
    def ref(self) -> str:
        return f"{self.spec.job_id}.{self.spec.step_id}"

    # ---- launch ---------------------------------------------------------------

    async def launch(self, stdio: Stdio, received_at: float) -> None:
        """Prepare the spool and start every task. Raises LaunchFailed with nothing left behind.

        received_at: time.monotonic() when the request arrived, for the launch latency in the log.
        """
        try:
            await self._launch(stdio)
        except BaseException:
            # Whoever waits for this step (wait, cancel) learns that it never ran.
            self.state = StepState.FINISHED
            self.result = StepResult(STATUS_LAUNCH_FAILED, tuple(None for _ in range(self.spec.ntasks)), False)
            self._done.set_result(self.result)
            raise
        self.state = StepState.RUNNING
        launch_ms = round((time.monotonic() - received_at) * 1000, 3)
        self.log.info("step started", ntasks=self.spec.ntasks, bundle=self.spec.bundle, launch_ms=launch_ms)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"step {self.ref}")
        if self._cancel_reason is not None:  # cancelled while it was launching
            self._begin_termination()

    async def _launch(self, stdio: Stdio) -> None:
        prepared = await asyncio.to_thread(self._prepare)
        self._spool = prepared.spool
        self._spool_record = prepared.spool_record
        self.tasks = prepared.tasks
        self._runtime_env = prepared.runtime_env
        # Recorded before anything runs: a daemon that dies from here on leaves a record
        # that says what to clean up.
        await self._save_or_undo(self._release)
        exits = await asyncio.to_thread(self.store.open_exits, self.name)
        try:
            if self.create_start:
                await self._create_and_start(prepared.first_commands, stdio, exits)
            else:
                # fork+exec blocks for a millisecond or so per task: off the loop, like the spool work.
                error = await asyncio.to_thread(self._spawn_tasks, prepared.first_commands, stdio, exits)
                if error is not None:
                    self.log.error("runtime could not be started", error=str(error))
                    await self._undo_launch()
                    raise LaunchFailed(
                        f"cannot start the runtime as {self.spec.identity.user}: {error.strerror or error}"
                    )
        finally:
            os.close(exits)  # each monitor holds its own
        self.state = StepState.RUNNING
        await self._save_or_undo(self._undo_containers if self.create_start else self._undo_launch)

    async def _save_or_undo(self, undo) -> None:
        """Write the record; a launch that cannot be recorded does not go on (undo, LaunchFailed)."""
        try:
            await self._save()
        except OSError as e:
            self.log.error("cannot write the step's record", error=str(e), state_dir=self.store.path)
            await undo()
            raise LaunchFailed(f"cannot record the step in {self.store.path}: {e.strerror or e}") from None

    def _spawn_tasks(self, commands: list[str], stdio: Stdio, exits: int) -> OSError | None:
        """Start each task's runtime (worker thread). Stops at the first failure and returns it."""
        for task, command in zip(self.tasks, commands):
            try:
                task.watch = self._spawn_with_stdio(task, command, stdio, exits)
                task.proc = _proc_record(task.watch.pid)
            except OSError as e:
                return e
            self.log.debug("task started", task_id=task.task_id, pid=task.watch.pid, command=command)
        return None

    def _spawn_with_stdio(self, task: Task, command: str, stdio: Stdio, exits: int) -> MonitoredProcess:
        """The task's first runtime command, under the task's monitor, holding its stdio
        (blocking: call in a worker thread). Returns the command's own process."""
        stdout, stderr = stdio.outputs_for(task.task_id)
        task.monitor = Monitor.spawn(
            command,
            identity=self.spec.identity,
            cwd=task.cwd,
            env=self._runtime_env,
            stdin=stdio.stdin if task.task_id == self.spec.first_task else subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            exit_fd=exits,
        )
        task.monitor_proc = _proc_record(task.monitor.pid)
        self.timings.spawned()
        return task.monitor.task

    # ---- the record -------------------------------------------------------------------

    async def _save(self) -> None:
        """Write the step's current state to its record (serialised: the last state wins)."""
        async with self._save_lock:
            record = self.snapshot()
            await asyncio.to_thread(self.store.write, record)

    def snapshot(self) -> StepRecord:
        spec, settings, oci = self.spec, self.settings, self.settings.oci
        ident = spec.identity
        return StepRecord(
            format=steprecord.FORMAT, version=steprecord.VERSION,
            job_id=spec.job_id, step_id=spec.step_id, first_task=spec.first_task, ntasks=spec.ntasks,
            task_offset=spec.task_offset, local_offset=spec.local_offset, node_id=spec.node_id,
            container_id=spec.container_id,
            user=steprecord.UserRecord(ident.user, ident.uid, ident.gid, list(ident.groups), ident.home),
            bundle=spec.bundle, args=list(spec.args), workdir=spec.workdir, attached=spec.attached,
            started_at=self.started_at, state=self.state.value,
            settings=steprecord.SettingsRecord(
                oci_conf=oci.path, runtime_run=oci.runtime_run, runtime_create=oci.runtime_create,
                runtime_start=oci.runtime_start, runtime_query=oci.runtime_query, runtime_kill=oci.runtime_kill,
                runtime_delete=oci.runtime_delete, disable_cleanup=oci.disable_cleanup,
                spool_dir=settings.spool_dir, node_name=settings.node_name, kill_wait=settings.kill_wait,
                runtime_timeout=settings.runtime_timeout, runtime_env=dict(self._runtime_env),
            ),
            tasks=[
                steprecord.TaskRecord(
                    task_id=t.task_id, dir=t.dir, context=_context_dict(t.context), monitor=t.monitor_proc,
                    process=t.proc, status=t.status if t.ended else None, status_known=t.status_known or not t.ended,
                )
                for t in self.tasks
            ],
            spool=self._spool_record, cancel_reason=self._cancel_reason, daemon_pid=os.getpid(),
        )

    def _prepare(self) -> _Prepared:
        """Blocking filesystem work (spool dirs, files): runs in a worker thread."""
        spec, settings, oci = self.spec, self.settings, self.settings.oci
        if spec.pty and self.create_start:
            raise LaunchFailed(
                f"--pty needs RunTimeRun: {oci.path} uses create/start, where the runtime would need a "
                "console socket to hand the terminal over"
            )
        bundle_config, rootfs = self._bundle_config()
        runtime_env = stepenv.runtime_environment(
            settings.daemon_env, oci.runtime_env_exclude_re,
            user=spec.identity.user, home=spec.identity.home, uid=spec.identity.uid,
        )

        def context(task_id: int, step_dir: str = "", task_dir: str = "") -> PatternContext:
            use_rewritten = bundle_config is not None
            return PatternContext(
                args=spec.args,
                bundle=task_dir if use_rewritten else spec.bundle,
                env_file=os.path.join(task_dir, ENV_FILE_NAME),
                job_id=spec.job_id,
                step_dir=step_dir,
                node_name=settings.node_name,
                pid=None,
                rootfs=rootfs,
                step_id=spec.step_id,
                task_id=task_id,
                user=spec.identity.user,
                uid=spec.identity.uid,
                workdir=spec.workdir,
            )

        try:
            layout = spool_layout(
                container_path=oci.container_path,
                spool_dir=settings.spool_dir,
                expand=lambda pattern, task_id: expand(pattern, context(task_id)),
                job_id=spec.job_id,
                step_id=spec.step_id,
                ntasks=spec.ntasks,
                task_offset=spec.task_offset,
            )
        except SpoolError as e:
            raise LaunchFailed(str(e)) from None
        tasks = [
            Task(t, layout.task_dirs[i], context(t, layout.step_dir, layout.task_dirs[i]))
            for i, t in enumerate(spec.task_ids)
        ]
        first = oci.runtime_create if self.create_start else oci.runtime_run
        assert first is not None  # ociconf guarantees one mode or the other
        first_commands = [expand(first, task.context) for task in tasks]
        try:
            find_program(first_commands[0], runtime_env, spec.identity)
        except RuntimeNotFound as e:
            raise LaunchFailed(str(e)) from None

        try:
            spool = StepSpool.create(layout, spec.identity.uid, spec.identity.gid)
        except SpoolError as e:
            raise LaunchFailed(str(e)) from None
        try:
            for task in tasks:
                task.cwd = spool.task_dir_pinned(task.task_id - spec.first_task)
                # Slurm's task variables first, then EnvExclude, as Slurm gives them to a task.
                task_env = {**spec.env, **stepenv.slurm_task_env(self._slurm_task(task))}
                step_env = stepenv.exclude_env(task_env, oci.env_exclude_re)
                self._write_task_files(spool, task, bundle_config, step_env, layout.step_dir)
            spool.hand_over()
            spool_record = steprecord.SpoolRecord(
                step_dir=layout.step_dir, task_dirs=list(layout.task_dirs),
                created=[steprecord.DirRecord(p, dev, ino) for p, dev, ino in spool.created_dirs()],
                kept=oci.disable_cleanup,
            )
        except Exception as e:
            try:
                spool.remove()
            except SpoolError as cleanup:
                self.log.error("spool dir could not be removed after a failed launch", error=str(cleanup))
            if isinstance(e, LaunchFailed):
                raise
            if isinstance(e, (BundleConfigError, ValueError)):
                raise LaunchFailed(str(e)) from None
            raise LaunchFailed(f"cannot prepare the spool dir {layout.step_dir}: {e}") from None
        return _Prepared(spool, tasks, runtime_env, first_commands, spool_record)

    def _write_task_files(
        self, spool: StepSpool, task: Task, bundle_config: dict | None, step_env: Mapping[str, str], step_dir: str
    ) -> None:
        oci, spec = self.settings.oci, self.spec
        container_env = step_env
        if bundle_config is not None:
            mount = (step_dir, expand(oci.mount_spool_dir, task.context)) if oci.mount_spool_dir else None
            rewritten = configjson.rewrite_config(
                bundle_config,
                bundle=spec.bundle,
                terminal=spec.pty,
                args=spec.args,
                step_env=step_env,
                mount_spool=mount,
                disable_hooks=oci.disable_hooks,
            )
            data = configjson.config_json_bytes(rewritten)
            spool.write_task_file(task.task_id - spec.first_task, CONFIG_FILE_NAME, data, 0o750)
            container_env = _env_dict(rewritten["process"].get("env", []))
        if oci.create_env_file != "disabled":
            data = stepenv.env_file_bytes(container_env, oci.create_env_file)
            spool.write_task_file(task.task_id - spec.first_task, ENV_FILE_NAME, data, 0o600)

    def _slurm_task(self, task: Task) -> stepenv.SlurmTask:
        spec = self.spec
        local_first = spec.local_offset if spec.local_offset is not None else spec.first_task
        return stepenv.SlurmTask(
            job_id=spec.job_id,
            step_id=spec.step_id,
            task_id=task.task_id,
            local_id=local_first + task.task_id - spec.first_task,
            node_id=spec.node_id,
            container=spec.bundle,
            container_id=spec.container_id,
        )

    def _bundle_config(self) -> tuple[dict | None, str]:
        """The bundle's config.json (None when the site ignores it) and the rootfs path (%r)."""
        spec = self.spec
        if self.settings.oci.ignore_file_config_json:
            return None, spec.bundle
        path = os.path.join(spec.bundle, CONFIG_FILE_NAME)
        if spec.config_json_error is not None:
            raise LaunchFailed(f"cannot read {path}: {spec.config_json_error}")
        if spec.config_json is None:
            raise LaunchFailed(f"cannot read {path}: the request did not include it")
        try:
            config = configjson.parse_bundle_config(spec.config_json, spec.bundle)
            return config, configjson.rootfs_path(config, spec.bundle)
        except BundleConfigError as e:
            raise LaunchFailed(str(e)) from None

    # ---- create/start ---------------------------------------------------------------

    async def _create_and_start(self, create_commands: list[str], stdio: Stdio, exits: int) -> None:
        """Bring every task's container to running; on any failure, remove them all and raise LaunchFailed."""
        outcomes = await asyncio.gather(
            *(self._create_task(task, command, stdio, exits) for task, command in zip(self.tasks, create_commands)),
            return_exceptions=True,
        )
        failures = [(task, e) for task, e in zip(self.tasks, outcomes) if isinstance(e, BaseException)]
        if not failures:
            return
        for task, error in failures:
            self.log.error("container could not be started", task_id=task.task_id, error=str(error))
        await self._undo_containers()
        task, error = failures[0]
        if isinstance(error, (ContainerError, OSError)):
            prefix = f"task {task.task_id}: " if self.spec.ntasks > 1 else ""
            detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise LaunchFailed(f"{prefix}{detail}")
        raise error

    async def _create_task(self, task: Task, command: str, stdio: Stdio, exits: int) -> None:
        """RunTimeCreate, wait for `created`, watch the init, RunTimeStart."""
        oci, timeout = self.settings.oci, self.settings.runtime_timeout
        log = self.log.bind(task_id=task.task_id)
        log.debug("running runtime command", key="RunTimeCreate", command=command)
        # The container inherits RunTimeCreate's stdio: that is how its output reaches the
        # client. So we wait for the create command to exit, never for end-of-file.
        create = await asyncio.to_thread(self._spawn_with_stdio, task, command, stdio, exits)
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
        state = await container.wait_until_created(lambda: self._helper("RunTimeQuery", oci.runtime_query, task), timeout)
        task.watch = self._watch_container(task, state, log)
        if task.watch.pid is not None:
            task.proc = _proc_record(task.watch.pid)
        start = await self._helper("RunTimeStart", oci.runtime_start, task)
        assert start is not None
        if start.status != 0:
            raise ContainerError(f"RunTimeStart failed with exit status {start.status}: {start.output or '(no output)'}")
        log.debug("container started", pid=task.watch.pid, watched="pidfd" if task.watch.pid else "RunTimeQuery")

    def _watch_container(self, task: Task, state: container.ContainerState, log) -> MonitoredProcess | PolledContainer:
        problem = "RunTimeQuery reports no pid"
        if state.pid is not None:
            assert task.monitor is not None
            try:
                # RunTimeCreate left the init behind: orphaned, it is now its monitor's child.
                return task.monitor.adopt(state.pid, self.spec.identity.uid)
            except NotWatchable as e:
                problem = str(e)
        log.warning(
            "cannot watch the container's process; polling RunTimeQuery instead (its exit status will not be known)",
            problem=problem,
        )
        return PolledContainer(lambda: self._helper("RunTimeQuery", self.settings.oci.runtime_query, task))

    async def _undo_containers(self) -> None:
        """A create/start launch failed: kill and delete every task's container, then remove everything."""
        async def undo(task: Task) -> None:
            log = self.log.bind(task_id=task.task_id)
            if task.watch is not None and task.watch.running:
                task.watch.send_signal(signal.SIGKILL)
                if not isinstance(task.watch, PolledContainer):
                    await task.watch.wait()
            # Delete even when create failed half-way: runc may have registered the container.
            await self._runtime_delete(task, log)

        await asyncio.gather(*(undo(task) for task in self.tasks))
        await self._release()

    async def _undo_launch(self) -> None:
        """A task failed to spawn: stop the ones that did, then remove everything."""
        for task in self.tasks:
            if task.watch is not None:
                task.watch.kill_group(signal.SIGKILL)
        for task in self.tasks:
            if task.watch is not None:
                await task.watch.wait()
        await self._release()

    # ---- after a daemon restart -------------------------------------------------------

    async def resume(self, record: StepRecord, tasks: list[Task], spool: StepSpool | None) -> None:
        """Take the step over again after a restart, from its record: recovery.py found each
        task's watch again and reopened the spool (None when it is gone); both become ours.

        A step that was still launching was never acknowledged: it is undone (its
        waiters get 125). One being cancelled is cancelled again. Any other is watched
        to its end like a step launched by this daemon."""
        self.started_at = record.started_at
        self._runtime_env = dict(record.settings.runtime_env)
        self._spool_record = record.spool
        self.tasks = tasks
        self._spool = spool
        recorded_state, cancel_reason = record.state, record.cancel_reason
        for i, task in enumerate(self.tasks):
            # Runtime commands start in the task dir; "/" when it is gone (any user may enter it).
            task.cwd = spool.task_dir_pinned(i) if spool is not None else "/"
        if recorded_state == "launching":
            self._cancel_reason = "the daemon restarted while the step was launching"
            self.log.warning("step was still launching when the daemon stopped; undoing the launch")
            await self._abandon_launch()
            return
        for task in self.tasks:
            if task.watch is None:
                # The container's pid was never known (or never pinned): RunTimeQuery it is.
                self.log.warning("recovered task has no process to watch; polling RunTimeQuery instead",
                                 task_id=task.task_id)
                task.watch = PolledContainer(
                    lambda task=task: self._helper("RunTimeQuery", self.settings.oci.runtime_query, task)
                )
        self.state = StepState.RUNNING
        self._supervisor = asyncio.create_task(self._supervise(), name=f"step {self.ref}")
        if recorded_state == "terminating":
            self._cancel_reason = cancel_reason or "cancelled before the daemon restarted"
            self.log.info("going on cancelling the step", reason=self._cancel_reason)
            self._begin_termination()

    async def _abandon_launch(self) -> None:
        try:
            for task in self.tasks:
                if task.watch is not None and task.running:
                    self._kill_task(task)
                    await task.watch.wait()
            await asyncio.gather(*(self._runtime_delete(task, self.log.bind(task_id=task.task_id))
                                   for task in self.tasks))
            await self._release()
        finally:
            self.state = StepState.FINISHED
            self.result = StepResult(STATUS_LAUNCH_FAILED, tuple(None for _ in self.tasks), True)
            self._done.set_result(self.result)

    # ---- running --------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            statuses = await asyncio.gather(*(self._watch_task(task) for task in self.tasks))
            if self._termination is not None:
                await self._termination
            cancelled = self._termination is not None
            self.result = StepResult(step_status(statuses), tuple(statuses), cancelled)
        except BaseException as e:  # never leave the step half-released
            if self._left_running:
                raise  # nothing to release: the tasks run on, their spool with them
            self.log.exception("step supervision failed", error=str(e))
            self.result = StepResult(
                None, tuple(t.status if t.status_known else None for t in self.tasks), self._termination is not None
            )
            raise
        finally:
            if not self._left_running:
                await self._release()
                self.state = StepState.FINISHED
                self.log.info("step finished", status=self.result.status if self.result else None)
                if not self._done.done():
                    self._done.set_result(self.result)

    async def _watch_task(self, task: Task) -> int | None:
        """The task's exit status once it ends (None: not known), after its container is deleted."""
        assert task.watch is not None
        status: int | None = await task.watch.wait()
        self.timings.exited()
        log = self.log.bind(task_id=task.task_id)
        if task.watch.status_known:
            log.info("task exited", status=status)
        else:
            log.warning("task ended; its exit status is unknown and is reported as unknown")
            status = None
        if self._termination is not None:
            return status  # the termination deletes the container
        if self.create_start:
            await self._confirm_stopped(task, log)
            await self._runtime_delete(task, log)
        elif status is None or status >= 128:
            # The runtime died by a signal (or we cannot tell): it may not have removed its container.
            await self._runtime_delete(task, log)
        return status

    async def _save_quietly(self, change: str) -> None:
        try:
            await self._save()
        except OSError as e:
            self.log.error("cannot write the step's record", error=str(e), change=change)

    async def _confirm_stopped(self, task: Task, log) -> None:
        """The one RunTimeQuery after the container's end: the runtime should agree it stopped."""
        try:
            state = await container.query(lambda: self._helper("RunTimeQuery", self.settings.oci.runtime_query, task))
        except ContainerError as e:
            log.warning("RunTimeQuery after the container ended failed", error=str(e))
            return
        if state.status != "stopped":
            log.warning("the container's process ended but RunTimeQuery reports it not stopped", state=state.status)

    async def wait(self) -> StepResult:
        return await asyncio.shield(self._done)

    def signal(self, sig: int) -> int:
        """Deliver sig to each running task.

        run mode: to the runtime (its process group, minus the shell that started it).
        create/start: to the container's init, through the pidfd we hold.
        """
        delivered = 0
        for task in self.tasks:
            if not task.running:
                continue
            assert task.watch is not None
            if self.create_start:
                if task.watch.send_signal(sig):
                    delivered += 1
                else:
                    self.log.warning("cannot signal a container whose pid is not known", task_id=task.task_id)
                continue
            if signal_group_except_leader(task.watch.pid, sig) == 0:
                # Nothing below the shell (yet, or any more): the shell is all there is to signal.
                task.watch.send_signal(sig)
            delivered += 1
        self.log.info("signal delivered", signal=signal.Signals(sig).name, tasks=delivered)
        return delivered

    async def cancel(self, reason: str) -> StepResult:
        if self._cancel_reason is None and self.state is not StepState.FINISHED:
            self._cancel_reason = reason
            self.log.info("cancelling step", reason=reason)
            if self.state is StepState.RUNNING:
                self._begin_termination()
            # Still launching: launch() begins the termination once the tasks exist.
        return await self.wait()

    def leave_running(self) -> None:
        """The daemon stops and leaves this step alone: stop watching it, end nothing, remove nothing.

        Its tasks run on under their monitors, its spool dir and its record stay; no
        RunTimeKill or RunTimeDelete runs for it. The next daemon recovers it from the
        record (recovery.py).
        """
        if self.state is StepState.FINISHED or self._supervisor is None:
            return
        self._left_running = True
        self.log.info("daemon stopping: step left running", pids=[t.watch.pid for t in self.tasks if t.watch])
        self._supervisor.cancel()

    def _begin_termination(self) -> None:
        self.state = StepState.TERMINATING
        self._termination = asyncio.create_task(self._terminate())

    async def _terminate(self) -> None:
        # Recorded first: a daemon that dies now leaves a step the next one goes on cancelling.
        await self._save_quietly("terminating")
        # Not only the running tasks: one that ended while no daemon watched it (a cancel cut
        # short by a restart) still has its container to delete.
        await asyncio.gather(*(self._terminate_task(task) for task in self.tasks
                               if task.watch is not None and not task.deleted))

    async def _terminate_task(self, task: Task) -> None:
        """RunTimeKill; wait (bounded by kill_wait); SIGKILL the group; RunTimeDelete."""
        assert task.watch is not None
        log = self.log.bind(task_id=task.task_id)
        if not task.running:
            await self._runtime_delete(task, log)
            return
        kill = await self._helper("RunTimeKill", self.settings.oci.runtime_kill, task)
        what = "the container's init" if self.create_start else "the runtime's process group"
        if task.running:
            if kill is None or kill.status != 0:
                if kill is not None:
                    log.warning(f"RunTimeKill failed; killing {what} now", status=kill.status, output=kill.output)
                self._kill_task(task)
            else:
                try:
                    await asyncio.wait_for(task.watch.wait(), self.settings.kill_wait)
                except TimeoutError:
                    log.warning(f"task still running after kill_wait; killing {what}", kill_wait=self.settings.kill_wait)
                    self._kill_task(task)
            if isinstance(task.watch, PolledContainer):
                await self._runtime_delete(task, log)  # --force is all that is left; the poller sees it go
                await task.watch.wait()
                return
            await task.watch.wait()
        await self._runtime_delete(task, log)

    def _kill_task(self, task: Task) -> None:
        assert task.watch is not None
        if isinstance(task.watch, PolledContainer):
            return  # no pid: RunTimeDelete (with --force) has to do it
        if self.create_start:
            task.watch.send_signal(signal.SIGKILL)  # the init: in its pid namespace, that ends them all
        else:
            task.watch.kill_group(signal.SIGKILL)

    async def _runtime_delete(self, task: Task, log) -> None:
        result = await self._helper("RunTimeDelete", self.settings.oci.runtime_delete, task)
        task.deleted = True
        if result is not None and result.status != 0:
            log.info("RunTimeDelete failed", status=result.status, output=result.output)

    async def _helper(self, key: str, pattern: str | None, task: Task) -> HelperResult | None:
        """Run a RunTime* command for a task, bounded by runtime_timeout; None when not configured.

        %p is the task's real pid: the runtime's shell (run mode) or the container's init
        (create/start), kept unreaped until the step is released so it cannot be recycled.
        """
        if pattern is None:
            return None
        pid = task.watch.pid if task.watch is not None else None
        command = expand(pattern, dataclasses.replace(task.context, pid=pid))
        self.log.debug("running runtime command", key=key, task_id=task.task_id, command=command)
        result = await run_helper(
            command, identity=self.spec.identity, cwd=task.cwd, env=self._runtime_env,
            timeout=self.settings.runtime_timeout,
        )
        if result.timed_out:
            self.log.error("runtime command hung and was killed", key=key, task_id=task.task_id,
                           timeout=self.settings.runtime_timeout, command=command)
        return result

    # ---- release ----------------------------------------------------------------

    async def _release(self) -> None:
        """Kill leftovers of each task's group, reap, remove the spool and the record: the one release point."""
        for task in self.tasks:
            if task.watch is not None and not task.running:
                if not self.create_start:
                    task.watch.kill_group(signal.SIGKILL)  # stragglers a runtime left in its group
                task.watch.reap()
            if task.monitor is not None:
                # The monitor reaps what it held for us and exits; the reaper collects it.
                task.monitor.release(self.reaper)
                task.monitor = None
        self.reaper.sweep()  # whatever the runtimes left orphaned to us
        if self._spool is not None:
            spool, self._spool = self._spool, None
            if self.settings.oci.disable_cleanup:
                self.log.info("DisableCleanup: keeping the spool dir", spool_dir=spool.layout.step_dir)
                spool.close()
            else:
                try:
                    await asyncio.to_thread(spool.remove)
                except SpoolError as e:
                    self.log.error("spool dir could not be removed", error=str(e))
        async with self._save_lock:  # after any write still under way
            try:
                await asyncio.to_thread(self.store.remove, self.name)
            except OSError as e:
                self.log.error("cannot remove the step's record", error=str(e), state_dir=self.store.path)


def step_status(statuses: list[int | None] | tuple[int | None, ...]) -> int | None:
    """The first non-zero known task status; else 0 if every status is known; else None (unknown)."""
    failed = next((s for s in statuses if s), None)
    if failed is not None:
        return failed
    return None if any(s is None for s in statuses) else 0


def _proc_record(pid: int) -> ProcRecord:
    started = start_time(pid)
    # The process is held unreaped by its monitor (or by us), so /proc still shows it.
    return ProcRecord(pid, started if started is not None else 0)


def _context_dict(context: PatternContext) -> dict[str, object]:
    fields = dataclasses.asdict(context)
    fields["args"] = list(context.args)
    return fields


def _env_dict(entries: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries:
        name, eq, value = entry.partition("=")
        if eq:
            env[name] = value
    return env
