"""One container step on this node: the state machine from launch to exit event.

   [IMPORTING] --> LAUNCHING --launch()--> RUNNING --cancel()--> TERMINATING
        |              |                      |                      |
        +--------------+------ (failed) ------+---- (tasks ended) ---+--> FINISHED

A step that runs a container image starts IMPORTING: its image is fetched and unpacked
(nodestepd/image/) before anything of the step exists; that phase only gives the step its
bundle, and a cancel then stops the import.

A Step owns its spool, its record and its task processes: `_release` is the one place
that lets them go, `_finish` the one place that finishes the step (its result set, its
waiters woken), `_enter` the one transition function. What differs between oci.conf's
two lifecycles is its Mode (modes.py), chosen once.

Every task's first runtime command runs under a nodestepd-monitor, its parent outside
the daemon (docs/monitor.md): if the daemon dies, the task runs on and the monitor
writes its exit status to the step's exit file. The record (record.py), written before
anything runs and at each state change, is what a restarted daemon takes the step over
from (recovery.py, Step.resume).
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from nodestepd.logs import BoundLogger, get_logger
from nodestepd.process.reaper import Reaper
from nodestepd.step import record, stage
from nodestepd.step.modes import Mode, Starting, mode_for
from nodestepd.step.prepare import CONFIG_FILE_NAME, Plan, Prepared
from nodestepd.step.record import RecordStore, StepRecord
from nodestepd.step.results import ResultRecord, ResultStore, result_record
from nodestepd.step.runtime import Runtime
from nodestepd.step.spec import LaunchFailed, NoTimings, Stdio, StepResult, StepSettings, StepSpec, Timings
from nodestepd.step.layout import SpoolError, SpoolLayout
from nodestepd.step.spool import StepSpool
from nodestepd.step.task import Task
from nodestepd.step.termination import terminate


# Points a prepared launch at another bundle, as the step's user would give it: the new
# spec and launch (prepare.redirect_to). Blocking.
Redirect = Callable[[Prepared, str], "tuple[StepSpec, Prepared]"]


# Loop iterations a release yields after telling its result, before its worker thread (_release).
_TELL_ITERATIONS = 4


class StepState(enum.Enum):
    IMPORTING = "importing"
    LAUNCHING = "launching"
    RUNNING = "running"
    TERMINATING = "terminating"
    FINISHED = "finished"


_NEXT = {
    StepState.IMPORTING: {StepState.LAUNCHING, StepState.FINISHED},
    StepState.LAUNCHING: {StepState.RUNNING, StepState.FINISHED},
    StepState.RUNNING: {StepState.TERMINATING, StepState.FINISHED},
    StepState.TERMINATING: {StepState.FINISHED},
    StepState.FINISHED: set(),
}


def new_step(spec: StepSpec, settings: StepSettings, runtime_env: dict[str, str], *, store: RecordStore,
             reaper: Reaper, results: ResultStore | None, timings: Timings | None = None,
             importing: bool = False) -> Step:
    """A step with its runtime and the mode its commands call for (importing: it starts by importing its image)."""
    log = get_logger(job_id=spec.job_id, step_id=spec.step_id, user=spec.identity.user)
    runtime = Runtime(settings.commands, spec.identity, runtime_env, settings.runtime_timeout, log)
    step = Step(spec, settings, runtime, mode_for(runtime, log), store=store, reaper=reaper, results=results,
                timings=timings or NoTimings(), log=log)
    if importing:
        step.state = StepState.IMPORTING
    return step


@dataclass(frozen=True)
class Preparation:
    """How a launch is prepared, in blocking parts each run in a worker thread: plan
    (prepare.plan: nothing made yet) and create (prepare.create: the spool); redirect
    (prepare.redirect_to) points it at another bundle, for a stage_in that asks for one."""

    plan: Callable[[], Plan]
    create: Callable[[Plan], Prepared]
    redirect: Redirect | None = None


# An image step's import phase: once the image is there, the step's final spec (its bundle,
# its command) and its preparation.
ImportPhase = Callable[[], Awaitable[tuple[StepSpec, Preparation]]]


class Step:
    def __init__(self, spec: StepSpec, settings: StepSettings, runtime: Runtime, mode: Mode, *,
                 store: RecordStore, reaper: Reaper, timings: Timings, log: BoundLogger,
                 results: ResultStore | None = None) -> None:
        """results: where the step's result is kept once it ends (None: in memory only)."""
        self.spec = spec
        self.settings = settings
        self.runtime = runtime
        self.mode = mode
        self.store = store
        self.reaper = reaper
        self.results = results
        self.timings = timings
        self.log = log
        self.name = record.record_name(spec.identity.uid, spec.job_id, spec.step_id, spec.first_task)
        self.state = StepState.LAUNCHING
        self.started_at = time.time()
        self.tasks: list[Task] = []
        self.spool: StepSpool | None = None
        self._planned_spool: SpoolLayout | None = None  # the spool's layout, recorded before it is created
        self.result: StepResult | None = None
        self.ended_at: float | None = None
        # Kept durably once the launch was acknowledged (or the step recovered): a launch
        # that fails is refused, and forgotten like any refusal.
        self._keeps_result = False
        self._supervisor: asyncio.Task[None] | None = None  # held: the loop keeps tasks only weakly
        self._termination: asyncio.Task[None] | None = None
        self._importing: asyncio.Future | None = None  # the import phase, while it runs
        self._cancel_reason: str | None = None
        self._left_running = False  # the daemon stopped and left this step's tasks alone
        self._save_lock = asyncio.Lock()
        self.orig_bundle = spec.bundle  # spec.bundle changes when a stage_in points the step at another bundle
        self._stage_out_due = False  # stage_in succeeded (or there is none): stage_out runs at the release
        self.stage_out_error: str | None = None  # how stage_out failed, kept with the result
        self._done: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        # The result once it is final and may be told (the tasks reaped, the containers
        # deleted, stage_out run), before the release's filesystem work: what an attached
        # client's exit event waits for (told, _release).
        self._told: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        # Awaited just before the tasks start (modes.Starting.gate): an OCI container's
        # hold until its start (daemon/ociproxy.py). None: no hold.
        self.hold: Callable[[], Awaitable[None]] | None = None

    @property
    def ref(self) -> str:
        return self.spec.ref

    def _enter(self, state: StepState) -> None:
        """The one transition function: every state change goes through here."""
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"step {self.ref}: no transition from {self.state.value} to {state.value}")
        self.state = state

    # ---- launch ---------------------------------------------------------------------

    async def launch(self, preparation: Preparation, stdio: Stdio, received_at: float,
                     image: ImportPhase | None = None) -> None:
        """Prepare the spool and start every task; then the step runs on its own.

        preparation: this launch's plan, create and redirect (Preparation); the plan is
        recorded before create makes anything. Raises LaunchFailed with nothing left
        behind, the step then finished with status 125 for whoever waits for it.
        received_at: time.monotonic() when the request arrived, for the launch latency in
        the log. image: an image step's import phase (the step was made with
        importing=True); the preparation it gives is used instead.
        """
        try:
            if image is not None:
                preparation = await self._import(image)
            await self._launch(preparation, stdio)
        except asyncio.CancelledError:
            # The daemon is stopping in the middle of the launch. Nothing is released: the
            # record says "launching", and the next daemon undoes what was started (resume).
            self._finish(StepResult.launch_failed(self.spec.ntasks))
            raise
        except BaseException:
            await self._end(StepResult.launch_failed(self.spec.ntasks, cancelled=self.state is StepState.IMPORTING
                                                     and self._cancel_reason is not None))
            raise
        launch_ms = round((time.monotonic() - received_at) * 1000, 3)
        self.log.info("step started", ntasks=self.spec.ntasks, bundle=self.spec.bundle, launch_ms=launch_ms)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"step {self.ref}")
        if self._cancel_reason is not None and self._termination is None:
            # Cancelled while it was launching. (A cancel that came once the step was
            # RUNNING, while its record was written, has begun the termination itself.)
            self._begin_termination()

    async def _import(self, image: ImportPhase) -> Preparation:
        """The import phase: the step's spec becomes the imported image's; cancel() stops it."""
        self._importing = asyncio.ensure_future(image())
        try:
            self.spec, preparation = await self._importing
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._cancel_reason is not None and not (current is not None and current.cancelling()):
                raise LaunchFailed(f"the step was cancelled while importing its image ({self._cancel_reason})") \
                    from None
            raise
        finally:
            self._importing = None
        self.orig_bundle = self.spec.bundle  # the image's bundle is the one the step was given
        self._enter(StepState.LAUNCHING)
        return preparation

    async def _launch(self, preparation: Preparation, stdio: Stdio) -> None:
        try:
            prepared, exits, warnings = await asyncio.to_thread(self._prepare, preparation)
        except OSError as e:
            raise self._unrecorded(e) from None
        for warning in warnings:
            self.log.warning("MPI step set up against advice", problem=warning)
        try:
            if self.settings.stage_in is not None:
                prepared = await self._stage_in(prepared, preparation.redirect)
            self._stage_out_due = True
            if self.settings.stage_in is not None:
                await self._save_or_fail(durable=False)  # with the bundle it may have chosen, and stage_out due
            own_uid = prepared.mpi.own_uid if prepared.mpi is not None else None
            await self.mode.start(self.tasks, Starting(prepared.first_commands, stdio, exits, self.spec.first_task,
                                                       self.timings, self.hold,
                                                       userns=None if own_uid is None else tuple(own_uid)))
        finally:
            os.close(exits)  # each monitor holds its own
        self._enter(StepState.RUNNING)
        try:
            # The one durable write of a launch, before it is acknowledged.
            await self._save_or_fail()
        except LaunchFailed:
            await self.mode.undo(self.tasks)
            raise
        self._keeps_result = True
        # The spares this launch took (record.py) are made again while its tasks run, in a
        # worker thread (one for the launches acknowledged meanwhile): the acknowledgement
        # does not wait for them.
        self.store.make_spares_soon()  # the store holds the refill while it runs

    def _prepare(self, preparation: Preparation) -> tuple[Prepared, int, tuple[str, ...]]:
        """Plan the launch, record the plan, create the spool, open the exit file: blocking,
        in one worker thread (one hop off the loop, not five). Returns the launch, the exit
        file's fd and the plan's warnings (to log on the loop); raises LaunchFailed, or
        OSError when the record cannot be written.

        Recorded before anything is created: a daemon that dies from here on leaves a record
        that says what to clean up, the spool dir as "pending" (recovery removes it by its
        name, under parents only root can write: StepSpool.remove_pending) until the write
        before the acknowledgement (_launch) records its directories' inodes and the tasks.
        A second write once the spool exists would add only those inodes, for a launch that
        is undone after a restart anyway, at the cost of a file created and renamed on every
        launch. The write skips fsync: a daemon that dies reads it back from the page cache,
        which is all restart survival needs (a crash of the machine ends every task with it;
        what it may leak is a spool dir of a launch never acknowledged). The write before
        the acknowledgement is durable.
        """
        planned = preparation.plan()
        self.tasks, self._planned_spool = planned.tasks, planned.layout
        self.store.write(self._record(), durable=False)
        prepared = preparation.create(planned)
        self.spool, self.tasks, self._planned_spool = prepared.spool, prepared.tasks, None
        return prepared, self.store.open_exits(self.name), tuple(planned.warnings)

    async def _stage_in(self, prepared: Prepared, redirect: Redirect | None) -> Prepared:
        """Run the site's stage_in as the user; raises LaunchFailed when it fails (or asks
        for a bundle that cannot be used). Returns the launch as it now stands."""
        path = self.settings.stage_in
        assert path is not None and self.spool is not None
        env = self._hook_env("in", prepared.rootfs)
        self.log.debug("running stage_in", hook=path)
        try:
            result = await stage.run_hook(path, env, identity=self.spec.identity, cwd=self.spool.step_dir_pinned(),
                                          timeout=self.settings.runtime_timeout)
        except OSError as e:
            raise LaunchFailed(f"cannot run stage_in {path} as {self.spec.identity.user}: {e.strerror or e}") from None
        problem = stage.failure("stage_in", path, result, self.settings.runtime_timeout)
        if problem is not None:
            self.log.error("stage_in failed", hook=path, status=result.status, timed_out=result.timed_out,
                           stderr=result.stderr)
            raise LaunchFailed(problem)
        try:
            bundle = stage.requested_bundle(result.stdout)
        except stage.StageOutputError as e:
            raise LaunchFailed(f"stage_in {path} asked for another bundle: {e}") from None
        if bundle is None or bundle == self.spec.bundle:
            return prepared
        if redirect is None:
            raise LaunchFailed(f"stage_in {path} asked for another bundle, which this launch cannot take")
        self.log.info("stage_in points the step at another bundle", bundle=bundle, orig_bundle=self.spec.bundle)
        spec, prepared = await asyncio.to_thread(redirect, prepared, bundle)
        self.spec = spec
        return prepared

    async def _stage_out(self, result: StepResult) -> None:
        """Run the site's stage_out as the user; a failure is logged and kept with the result."""
        path = self.settings.stage_out
        assert path is not None
        rootfs = self.tasks[0].context.rootfs if self.tasks else self.spec.bundle
        status = "unknown" if result.status is None else str(result.status)
        env = self._hook_env("out", rootfs, status=status)
        cwd = "/"
        if self.spool is not None:
            try:
                cwd = self.spool.step_dir_pinned()
            except SpoolError:
                pass
        self.log.debug("running stage_out", hook=path)
        try:
            ran = await stage.run_hook(path, env, identity=self.spec.identity, cwd=cwd,
                                       timeout=self.settings.runtime_timeout)
            problem = stage.failure("stage_out", path, ran, self.settings.runtime_timeout)
        except OSError as e:
            problem = f"cannot run stage_out {path} as {self.spec.identity.user}: {e.strerror or e}"
        if problem is not None:
            self.stage_out_error = problem
            self.log.error("stage_out failed", hook=path, problem=problem)

    def _hook_env(self, which: str, rootfs: str, status: str | None = None) -> dict[str, str]:
        spool_dir = self.spool.layout.step_dir if self.spool is not None else ""
        config_json = "" if self.tasks and self.tasks[0].context.bundle == self.spec.bundle \
            else f"{self.spec.bundle}/{CONFIG_FILE_NAME}"
        return stage.hook_env(self.runtime.env, stage=which, spec=self.spec, orig_bundle=self.orig_bundle,
                              rootfs=rootfs, spool_dir=spool_dir, config_json=config_json, status=status)

    async def _save_or_fail(self, *, durable: bool = True) -> None:
        """Write the record; a launch that cannot be recorded does not go on."""
        try:
            await self._save(durable=durable)
        except OSError as e:
            raise self._unrecorded(e) from None

    def _unrecorded(self, e: OSError) -> LaunchFailed:
        self.log.error("cannot write the step's record", error=str(e), state_dir=self.store.path)
        return LaunchFailed(f"cannot record the step in {self.store.path}: {e.strerror or e}")

    # ---- after a daemon restart -----------------------------------------------------

    @classmethod
    async def resume(cls, rec: StepRecord, tasks: list[Task], spool: StepSpool | None, *, store: RecordStore,
                     reaper: Reaper, results: ResultStore | None = None) -> Step:
        """The step a record names, taken over again after a restart. recovery.py found each
        task's watch again (None: no process was ever known) and reopened the spool (None
        when it is gone); both become the step's.

        A step that was still launching was never acknowledged: it is undone (its waiters
        get 125). One being cancelled is cancelled again. Any other is watched to its end
        like a step launched by this daemon."""
        step = new_step(record.spec_of(rec), record.settings_of(rec), dict(rec.settings.runtime_env),
                        store=store, reaper=reaper, results=results)
        step.started_at = rec.started_at
        step.orig_bundle = rec.orig_bundle or rec.bundle
        step._stage_out_due = rec.stage_out_due
        step._keeps_result = True  # `wait` may have been told of it before the restart
        step.tasks, step.spool = tasks, spool
        for i, task in enumerate(tasks):
            # Runtime commands start in the task dir; "/" when it is gone (any user may enter it).
            task.cwd = spool.task_dir_pinned(i) if spool is not None else "/"
        if rec.state == "launching":
            step._cancel_reason = "the daemon restarted while the step was launching"
            step.log.warning("step was still launching when the daemon stopped; undoing the launch")
            try:
                await step._abandon()
            finally:
                await step._end(StepResult.launch_failed(len(tasks), cancelled=True))
            return step
        for task in tasks:
            if task.watch is None:
                task.watch = step.mode.unwatched(task)
        step._enter(StepState.RUNNING)
        step._supervisor = asyncio.create_task(step._supervise(), name=f"step {step.ref}")
        if rec.state == "terminating":
            step._cancel_reason = rec.cancel_reason or "cancelled before the daemon restarted"
            step.log.info("going on cancelling the step", reason=step._cancel_reason)
            step._begin_termination()
        return step

    async def _abandon(self) -> None:
        """Undo a launch a previous daemon never acknowledged: kill what is known to run, and
        RunTimeDelete every task (the runtime may know containers whose processes never were)."""
        for task in self.tasks:
            if task.running and self.mode.kill(task):
                assert task.watch is not None
                await task.watch.wait()
        await asyncio.gather(*(self.runtime.delete(task) for task in self.tasks))

    # ---- running --------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            statuses = tuple(await asyncio.gather(*(self._watch_task(task) for task in self.tasks)))
            if self._termination is not None:
                await self._termination
            result = StepResult.of(statuses, cancelled=self._termination is not None)
        except asyncio.CancelledError:
            if not self._left_running:  # else nothing to release: the tasks run on, spool and record too
                await self._end(self._unknown_result())
            raise
        except Exception as e:  # never leave the step half-released
            self.log.exception("step supervision failed", error=str(e))
            result = self._unknown_result()
        await self._end(result)

    def _unknown_result(self) -> StepResult:
        statuses = tuple(t.status if t.status_known else None for t in self.tasks)
        return StepResult(None, statuses, self._termination is not None)

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
        if self._termination is None:  # else the termination deletes the container
            await self.mode.after_exit(task, status)
        return status

    async def wait(self) -> StepResult:
        """The result once the step is fully released (its result kept, its record removed)."""
        return await asyncio.shield(self._done)

    def told(self) -> asyncio.Future[StepResult]:
        """The result as soon as it is final: the tasks reaped, their containers deleted,
        stage_out run; the spool dir, the result file and the record may still be on their
        way (_release). Only the attached client's exit event waits for this; everything
        else waits for the release (wait()), and so does any request of a client that may
        have the exit (Registry.settled). A future to await or asyncio.wait on, never to
        cancel or set."""
        return self._told

    def on_told(self, callback: Callable[[], None]) -> None:
        """Call callback once the result may be told (at once if it may)."""
        self._told.add_done_callback(lambda _: callback())

    def on_finished(self, callback: Callable[[], None]) -> None:
        """Call callback once the step has finished (at once if it has)."""
        self._done.add_done_callback(lambda _: callback())

    def signal(self, sig: int) -> int:
        """Deliver sig to each running task (the mode says how); returns how many got it."""
        delivered = sum(1 for task in self.tasks if task.running and self.mode.signal(task, sig))
        self.log.info("signal delivered", signal=signal.Signals(sig).name, tasks=delivered)
        return delivered

    async def cancel(self, reason: str) -> StepResult:
        # Once the result is told, nothing is left to cancel (the tasks have ended, their
        # containers are deleted): a termination would run RunTimeDelete again, and its
        # record write could follow the release's removal of the record. Its release is waited for.
        if self._cancel_reason is None and self.state is not StepState.FINISHED and not self._told.done():
            self._cancel_reason = reason
            self.log.info("cancelling step", reason=reason)
            if self.state is StepState.RUNNING:
                self._begin_termination()
            elif self._importing is not None:
                self._importing.cancel()  # its helper is killed, its files removed
            # Still launching: launch() begins the termination once the tasks exist.
        return await self.wait()

    def leave_running(self) -> None:
        """The daemon stops and leaves this step alone: stop watching it, end nothing, remove nothing.

        Its tasks run on under their monitors, its spool dir and its record stay; no
        RunTimeKill or RunTimeDelete runs for it. The next daemon recovers it from the
        record (recovery.py).
        """
        if self.state is StepState.FINISHED or self._supervisor is None or self._told.done():
            return  # a told step's release goes on: the daemon's shutdown waits for it
        self._left_running = True
        self.log.info("daemon stopping: step left running", pids=[t.watch.pid for t in self.tasks if t.watch])
        self._supervisor.cancel()

    # ---- termination ----------------------------------------------------------------

    def _begin_termination(self) -> None:
        self._enter(StepState.TERMINATING)
        self._termination = asyncio.create_task(self._terminate(), name=f"cancel {self.ref}")

    async def _terminate(self) -> None:
        # Recorded first: a daemon that dies now leaves a step the next one goes on cancelling.
        try:
            await self._save()
        except OSError as e:
            self.log.error("cannot write the step's record", error=str(e), change="terminating")
        # Not only the running tasks: one that ended while no daemon watched it (a cancel cut
        # short by a restart) still has its container to delete.
        await asyncio.gather(*(terminate(task, self.runtime, self.mode, self.settings.kill_wait, self.log)
                               for task in self.tasks if task.watch is not None and not task.deleted))

    # ---- the record -----------------------------------------------------------------

    async def _save(self, *, durable: bool = True) -> None:
        """Write the step's current state to its record (serialised: the last state wins)."""
        async with self._save_lock:
            await asyncio.to_thread(self.store.write, self._record(), durable=durable)

    def _record(self) -> StepRecord:
        return record.step_record(
            spec=self.spec, settings=self.settings, runtime_env=dict(self.runtime.env), tasks=self.tasks,
            spool=self.spool, planned_spool=self._planned_spool, state=self.state.value,
            cancel_reason=self._cancel_reason, started_at=self.started_at, orig_bundle=self.orig_bundle,
            stage_out_due=self._stage_out_due,
        )

    # ---- the end --------------------------------------------------------------------

    async def _end(self, result: StepResult) -> None:
        """Release everything, then finish."""
        self.ended_at = time.time()
        try:
            await self._release(result)
        finally:
            self._finish(result)

    def _finish(self, result: StepResult) -> None:
        """The one place a step finishes: its result set, its waiters woken."""
        self._enter(StepState.FINISHED)
        self.result = result
        if self.ended_at is None:
            self.ended_at = time.time()
        self._tell(result)  # a release that failed half-way, or none (a launch stopped by the daemon's end)
        self._done.set_result(result)
        self.log.info("step finished", status=result.status)

    def _tell(self, result: StepResult) -> None:
        if not self._told.done():
            self._told.set_result(result)

    def outcome(self, result: StepResult) -> ResultRecord:
        """The step's result as it is kept (step/results.py) and shown by `wait` and `ps`."""
        return result_record(self.spec, [t.watch.pid if t.watch else None for t in self.tasks], result,
                             started_at=self.started_at, ended_at=self.ended_at or time.time(),
                             not_deleted=[t.not_deleted for t in self.tasks], stage_out_error=self.stage_out_error)

    async def _release(self, result: StepResult) -> None:
        """Reap the tasks, let their monitors go, remove the spool, keep the result and remove
        the record: the one release point.

        The result is told (told()) once it is final, before the filesystem work of the
        release, which is most of its time: the spool dir's removal, the durable result
        write and the record's removal, in a worker thread. The step stays where it was
        until then (running in the registry, its ids reserved, its record in the state
        dir), and the registry makes a request of the step's user that comes meanwhile
        wait for the end of the release (Registry.settled): a client that has its step's
        exit finds it finished in ps, wait and status, and may launch the same ids again
        at once; the state dir alone may lag by the release. A daemon that dies in between
        leaves the record, from which the next one finishes the step again, with the
        status the task's monitor wrote to its exit file (docs/restart.md)."""
        for task in self.tasks:
            if task.watch is not None and not task.running:
                self.mode.release(task)
                task.watch.reap()
            if task.monitor is not None:
                # The monitor reaps what it held for us and exits; the reaper collects it.
                task.monitor.release(self.reaper)
                task.monitor = None
        if self._stage_out_due and self.settings.stage_out is not None:
            # The containers are deleted by now (after_exit, the termination, or the undone
            # launch); the spool is still there for the hook to take what it needs.
            try:
                await self._stage_out(result)
            except Exception as e:  # never leave the step half-released
                self.log.exception("stage_out could not be run", error=str(e))
                self.stage_out_error = f"stage_out {self.settings.stage_out} could not be run: {e}"
        spool, self.spool = self.spool, None
        if spool is not None and self.settings.keep_spool:
            self.log.info("DisableCleanup: keeping the spool dir", spool_dir=spool.layout.step_dir)
            spool.close()
            spool = None
        self._tell(result)
        # The attached client's exit event is a few loop iterations away (the told future's
        # callbacks, asyncio.wait's, the session's task): let it go out before the worker
        # thread starts, which would take the GIL from the loop on its every system call.
        for _ in range(_TELL_ITERATIONS):
            await asyncio.sleep(0)
        outcome = self.outcome(result) if self._keeps_result and self.results is not None else None
        async with self._save_lock:  # after any write still under way
            for message, detail in await asyncio.to_thread(self._remove_keep_and_forget, spool, outcome):
                self.log.error(message, **detail)
        self.reaper.sweep()  # whatever the runtimes left orphaned to us

    def _remove_keep_and_forget(self, spool: StepSpool | None,
                                outcome: ResultRecord | None) -> list[tuple[str, dict[str, str]]]:
        """Remove the spool, write the result (durably), then remove the record: blocking,
        in one worker thread (one hop off the loop, not two: the step's ids stay reserved
        until all of it is done). Returns what went wrong, for the log."""
        problems: list[tuple[str, dict[str, str]]] = []
        if spool is not None:
            try:
                spool.remove()
            except SpoolError as e:
                problems.append(("spool dir could not be removed", {"error": str(e)}))
        if outcome is not None:
            assert self.results is not None
            # Before the record goes: a daemon killed in between finishes the step again from it.
            try:
                self.results.write(outcome)
            except OSError as e:
                problems.append(("cannot keep the step's result; it is kept in memory only",
                                 {"error": str(e), "state_dir": self.results.path}))
        try:
            self.store.remove(self.name)
        except OSError as e:
            problems.append(("cannot remove the step's record", {"error": str(e), "state_dir": self.store.path}))
        return problems
