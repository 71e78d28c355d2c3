"""step/step.py: the Step state machine, driven with stand-ins for its mode, runtime, record
store and spool (no root, no process). What the stand-ins do is real elsewhere: the modes
with real runc in tests/e2e (test_run_runc.py, test_create_start.py, test_restart.py)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import threading
import time

import pytest

from nodestepd.config.patterns import PatternContext
from nodestepd.logs import get_logger
from nodestepd.process.identity import Identity
from nodestepd.process.spawn import HelperResult
from nodestepd.step import record
from nodestepd.step.prepare import Plan, Prepared
from nodestepd.step.results import ResultRecord
from nodestepd.step.spec import LaunchFailed, NoTimings, RuntimeCommands, Stdio, StepResult, StepSettings, StepSpec
from nodestepd.step.layout import SpoolLayout
from nodestepd.step.step import Preparation, Step, StepState
from nodestepd.step.task import EndedProcess, ProcessId, Task

ALICE = Identity("alice", 1000, 1000, (1000,), "/home/alice")


class FakeWatch:
    """A task's process: ends when the test (or a kill) says so."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status_known = True
        self._end: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.signals: list[int] = []
        self.group_signals: list[int] = []
        self.reaped = False

    @property
    def status(self) -> int | None:
        return self._end.result() if self._end.done() else None

    @property
    def running(self) -> bool:
        return not self._end.done()

    def end(self, status: int, known: bool = True) -> None:
        if not self._end.done():
            self.status_known = known
            self._end.set_result(status)

    async def wait(self) -> int:
        return await asyncio.shield(self._end)

    def poll(self) -> int | None:
        return self.status

    def send_signal(self, sig: int) -> bool:
        if not self.running:
            return False
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.end(128 + sig)
        return True

    def kill_group(self, sig: int) -> None:
        self.group_signals.append(sig)
        if sig == signal.SIGKILL:
            self.end(128 + sig)

    def reap(self) -> None:
        assert not self.running, "reaped while running"
        self.reaped = True


class FakeMode:
    name = "fake"
    kill_target = "the fake process"

    def __init__(self, fail_start: str | None = None) -> None:
        self.fail_start = fail_start
        self.calls: list[tuple] = []

    async def start(self, tasks, starting) -> None:
        self.calls.append(("start", tuple(t.task_id for t in tasks), tuple(starting.commands)))
        for task in tasks:
            task.watch = FakeWatch(2000 + task.task_id)
        if self.fail_start:
            await self.undo(tasks)
            raise LaunchFailed(self.fail_start)

    async def undo(self, tasks) -> None:
        self.calls.append(("undo", tuple(t.task_id for t in tasks)))
        for task in tasks:
            if task.watch is not None:
                task.watch.end(137)

    def unwatched(self, task):
        self.calls.append(("unwatched", task.task_id))
        return EndedProcess(None)

    def signal(self, task, sig) -> bool:
        self.calls.append(("signal", task.task_id, sig))
        return True

    def kill(self, task) -> bool:
        self.calls.append(("kill", task.task_id))
        task.watch.end(128 + signal.SIGKILL)
        return True

    async def after_exit(self, task, status) -> None:
        self.calls.append(("after_exit", task.task_id, status))

    def release(self, task) -> None:
        self.calls.append(("release", task.task_id))


class FakeRuntime:
    env = {"PATH": "/usr/bin"}

    def __init__(self, kill_status: int | None = 0, kill_ends: bool = True) -> None:
        self.kill_status = kill_status  # None: no RunTimeKill configured
        self.kill_ends = kill_ends  # RunTimeKill makes the task end (with 143)
        self.calls: list[tuple] = []

    async def kill(self, task) -> HelperResult | None:
        self.calls.append(("kill", task.task_id))
        if self.kill_status is None:
            return None
        if self.kill_status == 0 and self.kill_ends:
            task.watch.end(128 + signal.SIGTERM)
        return HelperResult(self.kill_status, "" if self.kill_status == 0 else "no such container")

    async def delete(self, task) -> None:
        self.calls.append(("delete", task.task_id))
        task.deleted = True


class FakeStore:
    path = "/state/steps"

    def __init__(self, fail_writes: set[str] = frozenset()) -> None:
        self.fail_writes = fail_writes
        self.written: list[record.StepRecord] = []
        self.durable: list[bool] = []  # per write: fsync'd or not
        self.removed: list[str] = []
        self.at_create: list[record.StepRecord] | None = None  # what was written when the spool was created
        self.spares_made = 0  # make_spares() calls

    @property
    def states(self) -> list[str]:
        return [r.state for r in self.written]

    def write(self, rec: record.StepRecord, *, durable: bool = True) -> None:
        if rec.state in self.fail_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written.append(rec)
        self.durable.append(durable)

    def remove(self, name: str) -> None:
        self.removed.append(name)

    def open_exits(self, name: str) -> int:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)

    def make_spares(self) -> None:
        self.spares_made += 1

    def make_spares_soon(self) -> asyncio.Future[None]:
        return asyncio.ensure_future(asyncio.to_thread(self.make_spares))


class FakeResults:
    """A ResultStore that notes each result with what the record store had removed by then."""

    path = "/state/results"

    def __init__(self, store: FakeStore, fail: bool = False) -> None:
        self.store, self.fail = store, fail
        self.written: list[tuple[ResultRecord, list[str]]] = []

    def write(self, rec: ResultRecord) -> None:
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written.append((rec, list(self.store.removed)))


class FakeSpool:
    def __init__(self, ntasks: int) -> None:
        self.layout = SpoolLayout("/spool/oci-job42-0", tuple(f"/spool/oci-job42-0/task-{t}" for t in range(ntasks)))
        self.removed = self.closed = False

    def created_dirs(self) -> list[tuple[str, int, int]]:
        return [(self.layout.step_dir, 1, 100), *((d, 1, 101 + i) for i, d in enumerate(self.layout.task_dirs))]

    def task_dir_pinned(self, index: int) -> str:
        return f"/proc/self/fd/{10 + index}"

    def remove(self) -> None:
        self.removed = True

    def close(self) -> None:
        self.closed = True


class FakeReaper:
    def __init__(self) -> None:
        self.sweeps = 0

    def sweep(self) -> None:
        self.sweeps += 1


def context(task_id: int) -> PatternContext:
    return PatternContext(args=("app",), bundle="/b", env_file="", job_id=42, step_dir="/spool/oci-job42-0",
                          node_name="n1", pid=None, rootfs="/b/rootfs", step_id=0, task_id=task_id, user="alice",
                          uid=1000, workdir="/")


def make_step(ntasks: int = 2, *, mode: FakeMode | None = None, runtime: FakeRuntime | None = None,
              store: FakeStore | None = None, kill_wait: float = 5.0, keep_spool: bool = False,
              results: FakeResults | None = None) -> Step:
    spec = StepSpec(job_id=42, step_id=0, ntasks=ntasks, identity=ALICE, bundle="/b", args=("app",), workdir="/",
                    attached=True)
    settings = StepSettings(RuntimeCommands("/etc/slurm/oci.conf", run="runc run %n"), kill_wait=kill_wait,
                            runtime_timeout=5.0, keep_spool=keep_spool, spool_dir="/spool", node_name="n1")
    return Step(spec, settings, runtime or FakeRuntime(), mode or FakeMode(), store=store or FakeStore(),
                reaper=FakeReaper(), timings=NoTimings(), log=get_logger(job_id=42, step_id=0), results=results)


def planned(step: Step) -> Plan:
    tasks = [Task(t, f"/spool/oci-job42-0/task-{t}", context(t)) for t in step.spec.task_ids]
    return Plan(FakeSpool(step.spec.ntasks).layout, tasks, [f"runc run task{t}" for t in step.spec.task_ids],
                rootfs="/b/rootfs", bundle_config={}, step_envs=[{} for _ in tasks])


def created(step: Step, plan: Plan) -> Prepared:
    """prepare.create's stand-in: the spool 'created' now, noting what the store had by then."""
    step.store.at_create = list(step.store.written)
    for t, task in enumerate(plan.tasks):
        task.cwd = f"/proc/self/fd/{10 + t}"
    return Prepared(FakeSpool(step.spec.ntasks), plan.tasks, plan.first_commands)


async def launched(step: Step) -> Step:
    await step.launch(Preparation(lambda: planned(step), lambda plan: created(step, plan)), Stdio(0, 1, 2),
                      time.monotonic())
    return step


def watch(step: Step, index: int) -> FakeWatch:
    w = step.tasks[index].watch
    assert isinstance(w, FakeWatch)
    return w


async def finish(step: Step, *statuses: int) -> StepResult:
    for i, status in enumerate(statuses):
        watch(step, i).end(status)
    return await asyncio.wait_for(step.wait(), 5)


# ---- launch ---------------------------------------------------------------------------------


async def test_a_launch_is_recorded_before_and_after_its_tasks_start():
    step = await launched(make_step())
    assert step.state is StepState.RUNNING
    assert step.store.states == ["launching", "running"]
    assert step.mode.calls == [("start", (0, 1), ("runc run task0", "runc run task1"))]
    assert [t.status for t in step.store.written[-1].tasks] == [None, None]
    await finish(step, 0, 0)


async def test_a_launch_makes_two_writes_one_durable_the_one_before_it_is_acknowledged():
    # The record before the spool is created is for a restarted daemon, which reads it from
    # the page cache; only the acknowledged launch (running) must survive the machine.
    step = await launched(make_step())
    assert list(zip(step.store.states, step.store.durable)) == [("launching", False), ("running", True)]
    await finish(step, 0, 0)


async def test_an_acknowledged_launch_makes_again_the_spares_it_took_and_a_failed_one_does_not():
    step = await launched(make_step())
    await asyncio.sleep(0.05)  # a worker thread's call, not awaited by the launch
    assert step.store.spares_made == 1
    await finish(step, 0, 0)
    failed = make_step(mode=FakeMode(fail_start="cannot start the runtime as alice: No such file or directory"))
    with pytest.raises(LaunchFailed):
        await launched(failed)
    await asyncio.sleep(0.05)
    assert failed.store.spares_made == 0


async def test_a_launch_is_recorded_with_its_spool_pending_before_the_spool_is_created():
    """A daemon killed while the spool is created leaves a record naming it (recovery removes it)."""
    step = await launched(make_step())
    [first] = step.store.at_create
    assert first.state == "launching" and first.spool is not None
    assert first.spool.pending and first.spool.created == []
    assert first.spool.step_dir == "/spool/oci-job42-0" and len(first.tasks) == 2
    # The acknowledged launch's record has the directories the launch created.
    last = step.store.written[-1]
    assert not last.spool.pending and [d.ino for d in last.spool.created] == [100, 101, 102]
    await finish(step, 0, 0)


async def test_a_launch_whose_spool_cannot_be_created_removes_its_pending_record():
    step = make_step()

    def fail(plan: Plan) -> Prepared:
        raise LaunchFailed("spool dir /spool/oci-job42-0 already exists")

    with pytest.raises(LaunchFailed, match="already exists"):
        await step.launch(Preparation(lambda: planned(step), fail), Stdio(0, 1, 2), time.monotonic())
    assert await step.wait() == StepResult(125, (None, None), cancelled=False)
    assert step.store.states == ["launching"] and step.store.written[0].spool.pending
    assert step.store.removed == [step.name] and step.mode.calls == []


async def test_the_step_ends_with_the_first_failing_status_after_every_task_and_releases_everything():
    step = await launched(make_step())
    spool = step.spool
    result = await finish(step, 0, 3)
    assert result == StepResult(3, (0, 3), cancelled=False)
    assert step.state is StepState.FINISHED and step.result == result
    assert ("after_exit", 0, 0) in step.mode.calls and ("after_exit", 1, 3) in step.mode.calls
    assert [watch(step, i).reaped for i in range(2)] == [True, True]
    assert ("release", 0) in step.mode.calls and ("release", 1) in step.mode.calls
    assert spool.removed and step.spool is None
    assert step.store.removed == [step.name] and step.reaper.sweeps == 1


async def test_the_result_is_kept_before_the_record_goes():
    store = FakeStore()
    step = await launched(make_step(store=store, results=FakeResults(store)))
    assert step.name == "1000.42.0.0"  # step names are per user
    await finish(step, 0, 137)
    ((rec, removed_then),) = step.results.written
    assert removed_then == [] and store.removed == [step.name]
    assert (rec.name, rec.how, rec.status, [(t.task_id, t.status) for t in rec.tasks]) == (
        step.name, "signalled", 137, [(0, 0), (1, 137)])
    assert rec.ended_at == step.ended_at and rec.started_at == step.started_at



async def test_the_result_is_told_once_final_and_the_release_goes_on_behind_it():
    """told(): the exit event's moment. The containers are deleted and the tasks reaped by
    then; the spool dir, the result file and the record go after it, and the step stays
    unfinished (wait() waits, the registry keeps its ids) until they have."""
    store = FakeStore()
    step = await launched(make_step(store=store, results=FakeResults(store)))
    spool = step.spool
    gate, removing = threading.Event(), threading.Event()

    def remove() -> None:  # in the release's worker thread
        removing.set()
        assert gate.wait(10)
        spool.removed = True

    spool.remove = remove
    for i, status in enumerate((0, 3)):
        watch(step, i).end(status)
    told = await asyncio.wait_for(step.told(), 5)
    assert told == StepResult(3, (0, 3), cancelled=False)
    assert ("after_exit", 0, 0) in step.mode.calls and ("after_exit", 1, 3) in step.mode.calls
    assert [watch(step, i).reaped for i in range(2)] == [True, True]
    await asyncio.wait_for(asyncio.to_thread(removing.wait, 10), 15)
    waiting = asyncio.ensure_future(step.wait())
    await asyncio.sleep(0.05)
    assert not waiting.done() and step.state is StepState.RUNNING
    assert not spool.removed and step.results.written == [] and store.removed == []
    # Nothing is left to cancel or leave running: the release goes on, and is waited for.
    cancelling = asyncio.ensure_future(step.cancel("too late"))
    step.leave_running()
    await asyncio.sleep(0.05)
    assert not cancelling.done() and step.state is StepState.RUNNING and not step.runtime.calls
    gate.set()
    assert await asyncio.wait_for(waiting, 5) == told
    assert await asyncio.wait_for(cancelling, 5) == told
    assert store.states == ["launching", "running"] and not step.runtime.calls  # no `terminating` record, no RunTimeDelete
    assert step.state is StepState.FINISHED
    assert spool.removed and store.removed == [step.name] and len(step.results.written) == 1


async def test_a_result_that_cannot_be_kept_is_logged_and_the_step_still_ends():
    store = FakeStore()
    step = await launched(make_step(store=store, results=FakeResults(store, fail=True)))
    assert await finish(step, 3, 0) == StepResult(3, (3, 0), cancelled=False)
    assert store.removed == [step.name]


async def test_a_failed_launch_keeps_no_result():
    store = FakeStore()
    step = make_step(store=store, mode=FakeMode(fail_start="cannot start the runtime"), results=FakeResults(store))
    with pytest.raises(LaunchFailed):
        await launched(step)
    assert step.results.written == []


async def test_an_unknown_status_is_reported_as_unknown_never_as_zero():
    step = await launched(make_step())
    watch(step, 0).end(0)
    watch(step, 1).end(0, known=False)
    result = await asyncio.wait_for(step.wait(), 5)
    assert result == StepResult(None, (0, None), cancelled=False)
    assert ("after_exit", 1, None) in step.mode.calls


async def test_disable_cleanup_keeps_the_spool_dir():
    step = await launched(make_step(keep_spool=True))
    spool = step.spool
    await finish(step, 0, 0)
    assert spool.closed and not spool.removed


async def test_a_launch_that_cannot_be_prepared_finishes_with_125_and_writes_nothing():
    step = make_step()

    def fail() -> Plan:
        raise LaunchFailed("bundle /b does not exist")

    with pytest.raises(LaunchFailed, match="bundle /b does not exist"):
        await step.launch(Preparation(fail, lambda plan: created(step, plan)), Stdio(0, 1, 2), time.monotonic())
    assert step.state is StepState.FINISHED
    assert await step.wait() == StepResult(125, (None, None), cancelled=False)
    assert step.store.written == [] and step.mode.calls == []


async def test_a_launch_whose_tasks_fail_to_start_is_undone_and_released():
    step = make_step(mode=FakeMode(fail_start="cannot start the runtime as alice: No such file or directory"))
    with pytest.raises(LaunchFailed, match="cannot start the runtime"):
        await launched(step)
    assert step.store.states == ["launching"] and step.store.removed == [step.name]
    assert [c[0] for c in step.mode.calls] == ["start", "undo", "release", "release"]
    assert (await step.wait()).status == 125


@pytest.mark.parametrize("fails, undone", [("launching", False), ("running", True)])
async def test_a_launch_that_cannot_be_recorded_does_not_go_on(fails, undone):
    step = make_step(store=FakeStore(fail_writes={fails}))
    with pytest.raises(LaunchFailed, match="cannot record the step in /state/steps: No space left on device"):
        await launched(step)
    assert step.state is StepState.FINISHED and (await step.wait()).status == 125
    assert (("undo", (0, 1)) in step.mode.calls) is undone
    assert any(c[0] == "start" for c in step.mode.calls) is undone  # nothing runs unrecorded
    assert step.store.removed == [step.name]


async def test_a_launch_cancelled_by_the_daemon_stopping_leaves_its_record_for_the_next_daemon():
    step = make_step()
    entered = asyncio.Event()

    async def start(tasks, starting) -> None:
        entered.set()
        await asyncio.Event().wait()  # the daemon stops before the tasks start

    step.mode.start = start
    launch = asyncio.ensure_future(launched(step))
    await asyncio.wait_for(entered.wait(), 5)
    assert step.store.states == ["launching"]
    launch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await launch
    assert step.state is StepState.FINISHED and (await step.wait()).status == 125
    assert step.store.removed == [] and not step.spool.removed  # the next daemon undoes it (resume)


# ---- signals and cancellation ---------------------------------------------------------------


async def test_signals_go_to_the_running_tasks_only():
    step = await launched(make_step())
    watch(step, 0).end(0)
    assert step.signal(signal.SIGUSR1) == 1
    assert ("signal", 1, signal.SIGUSR1) in step.mode.calls and ("signal", 0, signal.SIGUSR1) not in step.mode.calls
    watch(step, 1).end(0)
    await step.wait()


async def test_cancel_runs_runtimekill_waits_and_deletes():
    step = await launched(make_step())
    result = await asyncio.wait_for(step.cancel("cancel requested by uid 1000"), 5)
    assert result == StepResult(143, (143, 143), cancelled=True)
    assert step.store.states == ["launching", "running", "terminating"]
    assert sorted(step.runtime.calls) == [("delete", 0), ("delete", 1), ("kill", 0), ("kill", 1)]
    assert not any(c[0] in ("kill", "after_exit") for c in step.mode.calls)  # the termination deletes


async def test_a_failing_runtimekill_means_sigkill_at_once():
    step = await launched(make_step(runtime=FakeRuntime(kill_status=1)))
    result = await asyncio.wait_for(step.cancel("test"), 5)
    assert result.task_statuses == (137, 137) and result.cancelled
    assert ("kill", 0) in step.mode.calls and ("kill", 1) in step.mode.calls


async def test_a_task_that_outlives_kill_wait_is_killed():
    step = await launched(make_step(runtime=FakeRuntime(kill_ends=False), kill_wait=0.05))
    started = time.monotonic()
    result = await asyncio.wait_for(step.cancel("test"), 5)
    assert time.monotonic() - started >= 0.05
    assert result.task_statuses == (137, 137)


async def test_a_cancel_during_the_launch_begins_once_the_tasks_exist():
    step = make_step()
    entered, gate = asyncio.Event(), asyncio.Event()
    start = step.mode.start

    async def slow_start(tasks, starting) -> None:
        entered.set()
        await gate.wait()
        await start(tasks, starting)

    step.mode.start = slow_start
    launch = asyncio.ensure_future(launched(step))
    await asyncio.wait_for(entered.wait(), 5)
    cancel = asyncio.ensure_future(step.cancel("test"))
    await asyncio.sleep(0)  # one turn of the loop: the cancel is asked for
    assert step.state is StepState.LAUNCHING and not cancel.done()
    gate.set()
    await launch
    result = await asyncio.wait_for(cancel, 5)
    assert result.cancelled and step.store.states == ["launching", "running", "terminating"]


async def test_a_cancel_while_the_running_record_is_written_terminates_once():
    """The tasks run and the step is RUNNING, but launch() has not returned (its record's
    write is under way) when the cancel comes: the termination begins once, not once more
    at the end of the launch (found by tests/e2e/test_chaos.py: 'no transition from
    terminating to terminating')."""
    step = make_step()
    writing, release = threading.Event(), threading.Event()
    write = step.store.write

    def slow_write(rec, **kwargs) -> None:  # in the worker thread
        if rec.state == "running":
            writing.set()
            assert release.wait(5)
        write(rec, **kwargs)

    step.store.write = slow_write
    launch = asyncio.ensure_future(launched(step))
    assert await asyncio.to_thread(writing.wait, 5)
    cancel = asyncio.ensure_future(step.cancel("test"))
    await asyncio.sleep(0)  # one turn of the loop: the cancel is asked for
    assert step.state is StepState.TERMINATING
    release.set()
    await asyncio.wait_for(launch, 5)
    result = await asyncio.wait_for(cancel, 5)
    assert result.cancelled and step.store.states == ["launching", "running", "terminating"]


async def test_cancelling_a_finished_step_gives_its_result():
    step = await launched(make_step())
    result = await finish(step, 0, 0)
    assert await step.cancel("late") == result
    assert step.runtime.calls == []


async def test_a_step_left_running_is_neither_released_nor_finished():
    step = await launched(make_step())
    spool = step.spool
    supervisor = step._supervisor
    await asyncio.sleep(0)  # one turn of the loop: the supervisor is watching the tasks
    step.leave_running()
    await asyncio.gather(supervisor, return_exceptions=True)
    assert supervisor.cancelled()
    assert step.state is StepState.RUNNING and step.result is None
    assert not spool.removed and step.store.removed == [] and not watch(step, 0).reaped
    for i in range(2):
        watch(step, i).end(0)
    assert step.state is StepState.RUNNING  # nobody watches it any more: the next daemon will


async def test_states_change_only_along_the_machine():
    step = await launched(make_step())
    with pytest.raises(RuntimeError, match="no transition from running to launching"):
        step._enter(StepState.LAUNCHING)
    await finish(step, 0, 0)
    with pytest.raises(RuntimeError, match="no transition from finished to terminating"):
        step._enter(StepState.TERMINATING)


# ---- after a restart --------------------------------------------------------------------------


def recorded(state: str, *, cancel_reason: str | None = None) -> record.StepRecord:
    """A record as a previous daemon wrote it, with no RunTime* command to run (so none runs here)."""
    step_spec = StepSpec(job_id=42, step_id=0, ntasks=2, identity=ALICE, bundle="/b", args=("app",), workdir="/",
                         attached=False)
    settings = StepSettings(RuntimeCommands("/etc/slurm/oci.conf", run="runc run %n"), kill_wait=0.05,
                            runtime_timeout=5.0, keep_spool=False, spool_dir="/spool", node_name="n1")
    tasks = [Task(t, f"/spool/oci-job42-0/task-{t}", context(t), process=ProcessId(3000 + t, 77)) for t in range(2)]
    return record.step_record(spec=step_spec, settings=settings, runtime_env={"PATH": "/usr/bin"}, tasks=tasks,
                              spool=None, state=state, cancel_reason=cancel_reason, started_at=1700000000.0)


def recovered_tasks(rec: record.StepRecord, *watches) -> list[Task]:
    tasks = [record.task_of(t) for t in rec.tasks]
    for task, w in zip(tasks, watches):
        task.watch = w
    return tasks


async def test_a_recovered_running_step_is_watched_to_its_end():
    rec = recorded("running")
    store = FakeStore()
    watches = [FakeWatch(3000), FakeWatch(3001)]
    step = await Step.resume(rec, recovered_tasks(rec, *watches), None, store=store, reaper=FakeReaper())
    assert step.state is StepState.RUNNING and step.started_at == 1700000000.0
    assert step.spec.attached is False and step.runtime.env == {"PATH": "/usr/bin"}
    assert [t.cwd for t in step.tasks] == ["/", "/"]  # the spool is gone: any user may enter /
    watches[0].end(4)
    watches[1].end(0)
    assert await asyncio.wait_for(step.wait(), 5) == StepResult(4, (4, 0), cancelled=False)
    assert store.removed == [step.name]


async def test_a_recovered_task_with_no_process_gets_the_modes_own_watch():
    rec = recorded("running")
    step = await Step.resume(rec, recovered_tasks(rec, FakeWatch(3000), None), None, store=FakeStore(),
                             reaper=FakeReaper())
    assert isinstance(step.tasks[1].watch, EndedProcess) and not step.tasks[1].watch.status_known
    watch(step, 0).end(0)
    # Run mode has nothing to watch for a runtime that never started: its status is unknown.
    assert await asyncio.wait_for(step.wait(), 5) == StepResult(None, (0, None), cancelled=False)


async def test_a_recovered_cancellation_goes_on():
    rec = recorded("terminating", cancel_reason="cancel requested by uid 1000")
    watches = [FakeWatch(3000), FakeWatch(3001)]
    step = await Step.resume(rec, recovered_tasks(rec, *watches), None, store=FakeStore(), reaper=FakeReaper())
    assert step.state is StepState.TERMINATING
    # No RunTimeKill in this record: the mode's SIGKILL, to the runtime's process group.
    result = await asyncio.wait_for(step.wait(), 5)
    assert result.cancelled and [w.group_signals[:1] for w in watches] == [[signal.SIGKILL], [signal.SIGKILL]]


async def test_a_recovered_launch_is_undone_with_125():
    rec = recorded("launching")
    watches = [FakeWatch(3000), None]
    store = FakeStore()
    step = await Step.resume(rec, recovered_tasks(rec, *watches), None, store=store, reaper=FakeReaper())
    assert step.state is StepState.FINISHED
    assert await step.wait() == StepResult(125, (None, None), cancelled=True)
    assert watches[0].group_signals == [signal.SIGKILL, signal.SIGKILL]  # killed, then the release's sweep
    assert store.removed == [step.name] and store.written == []


async def test_the_record_round_trips_the_step():
    rec = recorded("running")
    again = record.decode(record.encode(rec))
    assert again == rec
    assert record.spec_of(again).identity == ALICE
    assert record.settings_of(again).commands == RuntimeCommands("/etc/slurm/oci.conf", run="runc run %n")
    assert [t.process for t in map(record.task_of, again.tasks)] == [ProcessId(3000, 77), ProcessId(3001, 77)]
