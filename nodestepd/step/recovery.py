"""Recovery at start: the steps a previous daemon left running, taken over from their records.

For every record in the state dir (record.py), before the daemon reports ready:
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
3. The spool dir is reopened, accepting only the very directories the launch created; one
   recorded as pending (the daemon died while creating it) is removed if it is there.
4. The step goes on from its recorded state (Step.resume): a launch never acknowledged is
   undone, a cancellation goes on, anything else is watched to its end; then the usual
   RunTimeQuery/RunTimeDelete, spool removal, and the record goes.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from nodestepd.logs import get_logger
from nodestepd.process.reaper import Reaper
from nodestepd.process.watch import ExitWatch, NotWatchable, ProcessWatch
from nodestepd.step import record
from nodestepd.step.record import RecordStore, StepRecord, TaskRecord
from nodestepd.step.layout import SpoolError
from nodestepd.step.results import ResultStore
from nodestepd.step.spool import StepSpool
from nodestepd.step.step import Step
from nodestepd.step.task import EndedProcess, Task


class RecoveredProcess:
    """A task process still there after the restart (an ExitWatch), watched through a pidfd:
    not our child (its monitor is its parent), so its status comes from the kernel
    (PIDFD_INFO_EXIT) once the monitor reaps it, else from the exit file."""

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


async def recover_steps(store: RecordStore, reaper: Reaper, results: ResultStore | None = None) -> list[Step]:
    """Every step the records name, resumed; bad records quarantined. Never raises for one step."""
    records, problems = await asyncio.to_thread(store.load_all)
    for problem in problems:
        get_logger().error("step record unreadable; quarantined", file=problem.name, reason=problem.reason)
    steps = []
    for rec in records:
        try:
            steps.append(await recover_step(rec, store, reaper, results))
        except Exception as e:  # one bad record must not keep the others from recovering
            get_logger().exception("cannot recover step; record quarantined", record=rec.name, error=str(e))
            try:
                await asyncio.to_thread(store.quarantine, rec.name + ".json")
            except OSError as q:
                get_logger().error("cannot quarantine the record", record=rec.name, error=str(q))
    if records or problems:
        get_logger().info("recovery done", steps=len(steps), quarantined=len(records) + len(problems) - len(steps))
    return steps


async def recover_step(rec: StepRecord, store: RecordStore, reaper: Reaper,
                       results: ResultStore | None = None) -> Step:
    log = get_logger(job_id=rec.job_id, step_id=rec.step_id, user=rec.user.name)
    exits = await asyncio.to_thread(store.read_exits, rec.name)
    if exits.problems:
        log.warning("the step's exit file has lines that are not records", problems=exits.problems)
    tasks = [record.task_of(t) for t in rec.tasks]
    for task, t in zip(tasks, rec.tasks):
        task.watch = _watch(rec, t, exits.statuses, store)
    log.info("recovering step", state=rec.state, previous_daemon=rec.daemon_pid,
             tasks={t.task_id: _describe(t) for t in tasks})
    spool = None
    if rec.spool is not None and rec.spool.pending:
        # Recorded before the spool was created: whatever was made of it goes (the step is
        # launching, so it is undone anyway); there are no recorded inodes to reopen it by.
        layout, _ = record.spool_layout_of(rec.spool)
        try:
            if await asyncio.to_thread(StepSpool.remove_pending, layout):
                log.info("removed the spool dir of a launch that was still creating it", spool_dir=layout.step_dir)
        except SpoolError as e:
            log.error("cannot remove the spool dir of a launch that was still creating it; it is left alone",
                      error=str(e))
    elif rec.spool is not None:
        layout, created = record.spool_layout_of(rec.spool)
        try:
            spool = await asyncio.to_thread(StepSpool.reopen, layout, created, rec.user.uid, rec.user.gid)
        except SpoolError as e:
            log.error("cannot take the spool dir back; it is left alone", error=str(e))
    return await Step.resume(rec, tasks, spool, store=store, reaper=reaper, results=results)


def _watch(rec: StepRecord, t: TaskRecord, exits: dict[int, int], store: RecordStore) -> ExitWatch | None:
    if t.status is not None:
        return EndedProcess(t.status if t.status_known else None)
    if t.process is None:
        return None  # never started, or a container whose pid was never known
    pid = t.process.pid
    try:
        watch = ProcessWatch.adopt(pid, rec.user.uid, start=t.process.start)
    except NotWatchable as e:
        status = exits.get(pid)
        if status is None:
            # `exits` was read before the pid was pinned: a task that ended in between is
            # in the file now (its monitor records a status before it reaps), and must not
            # be reported as unknown.
            status = store.read_exits(rec.name).statuses.get(pid)
        get_logger().info("task ended while the daemon was down", job_id=rec.job_id, step_id=rec.step_id,
                          task_id=t.task_id, pid=pid, status=status, found=str(e))
        return EndedProcess(status)

    def recorded() -> int | None:
        return store.read_exits(rec.name).statuses.get(pid)

    return RecoveredProcess(watch, recorded)


def _describe(task: Task) -> str:
    watch = task.watch
    if watch is None:
        return "no process known"
    if isinstance(watch, EndedProcess):
        return f"ended with {watch.status}" if watch.status_known else "ended, status unknown"
    return f"running as pid {watch.pid}"
