"""Recovery at start: the steps a previous daemon left running, taken over from their records.

For every record in the state dir (steprecord.py), before the daemon reports ready:
1. A record that cannot be read is quarantined, with its reason logged.
2. Each task is found again:
   - a status in the record: the task had ended;
   - else its process (the runtime's shell in run mode, the container's init in
     create/start) is pinned with a pidfd and accepted only if it still runs as the
     step's user and started at the recorded time, so a recycled pid is never adopted.
     It is then watched like any process that is not our child (its monitor is its
     parent): the pidfd tells when it ends, PIDFD_INFO_EXIT gives the status once the
     monitor reaps it, the exit file if not;
   - else it ended while no daemon ran: its status is in the exit file its monitor wrote,
     or it is unknown (reported as unknown, never as 0).
3. The spool dir is reopened, accepting only the very directories the launch created.
4. The step goes on from its recorded state (Step.resume): a launch never acknowledged is
   undone, a cancellation goes on, anything else is watched to its end; then the usual
   RunTimeQuery/RunTimeDelete, spool removal, and the record goes.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from .logs import get_logger
from .ociconf import OciConf
from .patterns import PatternContext
from .reaper import Reaper
from .runtime import Identity
from .spool import SpoolError, SpoolLayout, StepSpool
from .step import Step, StepSettings, StepSpec, Task
from .steprecord import RecordStore, StepRecord, TaskRecord
from .watch import ExitWatch, NotWatchable, ProcessWatch




class EndedProcess(ExitWatch):
    """A task that had ended before this daemon started: its status, or unknown (None)."""

    pid = None
    child = False

    def __init__(self, status: int | None) -> None:
        self.status_known = status is not None
        self._status = status if status is not None else 0

    async def wait(self) -> int:
        return self._status

    def poll(self) -> int:
        return self._status

    def send_signal(self, sig: int) -> bool:
        return False

    def kill_group(self, sig: int) -> None:
        pass  # its pid (and group) may belong to someone else by now

    def reap(self) -> None:
        pass


class RecoveredProcess(ExitWatch):
    """A task process still there after the restart, watched through a pidfd (not our child)."""

    child = False

    def __init__(self, watch: ProcessWatch, exit_status: Callable[[], int | None]) -> None:
        self._watch = watch
        self._exit_status = exit_status  # from the exit file: blocking, called in a thread
        self.pid = watch.pid
        self.status_known = True
        self._recorded: int | None = None  # the exit file's status, when the kernel gave none

    @property
    def status(self) -> int | None:
        return self._recorded if self._recorded is not None else self._watch.status

    @property
    def running(self) -> bool:
        return self._watch.running

    async def wait(self) -> int:
        status = await self._watch.wait()
        if self._watch.status_known:
            return status
        self._recorded = await asyncio.to_thread(self._exit_status)
        if self._recorded is None:
            self.status_known = False
            return status
        return self._recorded

    def poll(self) -> int | None:
        return self._watch.poll()

    def send_signal(self, sig: int) -> bool:
        return self._watch.send_signal(sig)

    def kill_group(self, sig: int) -> None:
        # Its monitor reaps it at once: after the end, its group id may be anyone's.
        if self._watch.poll() is None:
            self._watch.kill_group(sig)

    def reap(self) -> None:
        self._watch.reap()


async def recover_steps(store: RecordStore, reaper: Reaper) -> list[Step]:
    """Every step the records name, resumed; bad records quarantined. Never raises for one step."""
    records, problems = await asyncio.to_thread(store.load_all)
    for problem in problems:
        get_logger().error("step record unreadable; quarantined", file=problem.name, reason=problem.reason)
    steps = []
    for record in records:
        try:
            steps.append(await recover_step(record, store, reaper))
        except Exception as e:  # one bad record must not keep the others from recovering
            get_logger().exception("cannot recover step; record quarantined", record=record.name, error=str(e))
            try:
                await asyncio.to_thread(store.quarantine, record.name + ".json")
            except OSError as q:
                get_logger().error("cannot quarantine the record", record=record.name, error=str(q))
    if records or problems:
        get_logger().info("recovery done", steps=len(steps), quarantined=len(records) + len(problems) - len(steps))
    return steps


async def recover_step(record: StepRecord, store: RecordStore, reaper: Reaper) -> Step:
    step = Step(_spec(record), _settings(record), reaper, store)
    exits = await asyncio.to_thread(store.read_exits, record.name)
    if exits.problems:
        step.log.warning("the step's exit file has lines that are not records", problems=exits.problems)
    tasks = [_task(record, t, exits.statuses, store) for t in record.tasks]
    step.log.info(
        "recovering step", state=record.state, previous_daemon=record.daemon_pid,
        tasks={t.task_id: _describe(t) for t in tasks},
    )
    spool = None
    if record.spool is not None:
        layout = SpoolLayout(step_dir=record.spool.step_dir, task_dirs=tuple(record.spool.task_dirs))
        created = [(d.path, d.dev, d.ino) for d in record.spool.created]
        try:
            spool = await asyncio.to_thread(StepSpool.reopen, layout, created, record.user.uid, record.user.gid)
        except SpoolError as e:
            step.log.error("cannot take the spool dir back; it is left alone", error=str(e))
    await step.resume(record, tasks, spool)
    return step


def _spec(record: StepRecord) -> StepSpec:
    user = record.user
    return StepSpec(
        job_id=record.job_id,
        step_id=record.step_id,
        ntasks=record.ntasks,
        identity=Identity(user.name, user.uid, user.gid, tuple(user.groups), user.home),
        bundle=record.bundle,
        args=tuple(record.args),
        env={},
        workdir=record.workdir,
        pty=False,
        attached=record.attached,
        config_json=None,
        config_json_error=None,
        task_offset=record.task_offset,
        local_offset=record.local_offset,
        node_id=record.node_id,
        container_id=record.container_id,
    )


def _settings(record: StepRecord) -> StepSettings:
    s = record.settings
    oci = OciConf(
        path=s.oci_conf,
        runtime_run=s.runtime_run,
        runtime_create=s.runtime_create,
        runtime_start=s.runtime_start,
        runtime_query=s.runtime_query,
        runtime_kill=s.runtime_kill,
        runtime_delete=s.runtime_delete,
        disable_cleanup=s.disable_cleanup,
    )
    return StepSettings(
        oci=oci, spool_dir=s.spool_dir, node_name=s.node_name, kill_wait=s.kill_wait,
        runtime_timeout=s.runtime_timeout, daemon_env={},
    )


def _task(record: StepRecord, t: TaskRecord, exits: dict[int, int], store: RecordStore) -> Task:
    context = dict(t.context)
    context["args"] = tuple(context.get("args") or ())  # type: ignore[arg-type]
    task = Task(t.task_id, t.dir, PatternContext(**context), proc=t.process, monitor_proc=t.monitor)  # type: ignore[arg-type]
    task.watch = _watch(record, t, exits, store)
    return task


def _watch(record: StepRecord, t: TaskRecord, exits: dict[int, int], store: RecordStore):
    if t.status is not None:
        return EndedProcess(t.status if t.status_known else None)
    if t.process is None:
        return None  # never started, or a container whose pid was never known
    pid = t.process.pid
    try:
        watch = ProcessWatch.adopt(pid, record.user.uid, start=t.process.start)
    except NotWatchable as e:
        status = exits.get(pid)
        if status is None:
            # `exits` was read before the pid was pinned: a task that ended in between is
            # in the file now (its monitor records a status before it reaps), and must not
            # be reported as unknown.
            status = store.read_exits(record.name).statuses.get(pid)
        get_logger().info("task ended while the daemon was down", job_id=record.job_id, step_id=record.step_id,
                 task_id=t.task_id, pid=pid, status=status, found=str(e))
        return EndedProcess(status)

    def recorded() -> int | None:
        return store.read_exits(record.name).statuses.get(pid)

    return RecoveredProcess(watch, recorded)


def _describe(task: Task) -> str:
    watch = task.watch
    if watch is None:
        return "no process known"
    if isinstance(watch, EndedProcess):
        return f"ended with {watch.status}" if watch.status_known else "ended, status unknown"
    return f"running as pid {watch.pid}"
