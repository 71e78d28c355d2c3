"""daemon/registry.py: which steps run, which finished, who may see which, and how long
finished results are kept (no root)."""

from __future__ import annotations

import asyncio
import time

import pytest

from nodestepd.daemon.authz import Policy
from nodestepd.daemon.errors import Refused
from nodestepd.daemon.registry import Registry, Retention
from nodestepd.process.identity import Identity
from nodestepd.step.results import Finished, ResultRecord, ResultStore, result_record
from nodestepd.step.spec import StepResult, StepSpec
from nodestepd.step.step import StepState

ALICE = Identity("alice", 1000, 1000, (1000,), "/home/alice")
BOB = Identity("bob", 1001, 1001, (1001,), "/home/bob")
POLICY = Policy(frozenset({0}))
LIMITS = {"max_steps": 10, "max_steps_per_user": 5}


class FakeStep:
    def __init__(self, job_id: int, step_id: int = 0, *, user: Identity = ALICE, ntasks: int = 1,
                 task_offset: int | None = None, ended_at: float | None = None) -> None:
        self.spec = StepSpec(job_id=job_id, step_id=step_id, ntasks=ntasks, identity=user, bundle="/b",
                             args=("true",), workdir="/", attached=True, task_offset=task_offset)
        self.state = StepState.RUNNING
        self.tasks: list = []
        self.result: StepResult | None = None
        self.ended_at = time.time() if ended_at is None else ended_at
        self._done: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._told: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()

    @property
    def ref(self) -> str:
        return self.spec.ref

    def tell(self, status: int = 0) -> None:
        """The result is final and told (an attached client's exit sent); the release goes on."""
        self._told.set_result(StepResult(status, (status,) * self.spec.ntasks, False))

    def finish(self, status: int = 0) -> None:
        if not self._told.done():
            self.tell(status)
        self.state = StepState.FINISHED
        self.result = StepResult(status, (status,) * self.spec.ntasks, False)
        self._done.set_result(self.result)

    def on_told(self, callback) -> None:
        self._told.add_done_callback(lambda _: callback())

    def outcome(self, result: StepResult) -> ResultRecord:
        return result_record(self.spec, [4000 + t for t in self.spec.task_ids], result, started_at=self.ended_at - 1,
                             ended_at=self.ended_at)

    async def wait(self) -> StepResult:
        return await asyncio.shield(self._done)


def refs(steps) -> list[tuple[str, str]]:
    return [(s.spec.identity.user, s.ref) for s in steps]


async def retired(registry: Registry) -> None:
    """Until every step that ended has moved to the finished ones (the registry's own tasks)."""
    await asyncio.wait_for(asyncio.gather(*list(registry._retirements)), 5)


async def test_a_step_runs_then_is_kept_among_the_finished():
    told = []
    registry = Registry(on_change=lambda running: told.append([s.ref for s in running]))
    step = FakeStep(1)
    registry.add(step, **LIMITS)
    assert told == []  # a launching step is not announced
    registry.started(step)
    assert told == [["1.0"]]
    step.finish(3)
    await retired(registry)
    (finished,) = registry.finished.values()
    assert isinstance(finished, Finished) and (finished.ref, finished.result.status, finished.pids) == ("1.0", 3, (4000,))
    assert told == [["1.0"], []]


async def test_a_failed_launch_is_forgotten():
    registry = Registry()
    step = FakeStep(1)
    registry.add(step, **LIMITS)
    registry.discard(step)
    assert registry.running == {} and registry.finished == {}


async def test_only_so_many_finished_steps_are_remembered():
    registry = Registry(retention=lambda: Retention(max_count=2, max_per_user=2))
    steps = [FakeStep(job) for job in (1, 2, 3)]
    for step in steps:
        registry.add(step, **LIMITS)
        registry.started(step)
        step.finish()
        await retired(registry)
    assert [s.ref for s in registry.finished.values()] == ["2.0", "3.0"]


async def test_a_step_that_runs_may_not_start_again_but_one_that_finished_may():
    registry = Registry()
    first = FakeStep(7)
    registry.add(first, **LIMITS)
    with pytest.raises(Refused, match="step 7.0 is already running on this node") as e:
        registry.add(FakeStep(7), **LIMITS)
    assert e.value.code == "conflict"
    registry.started(first)
    first.finish()
    await retired(registry)
    again = FakeStep(7)
    registry.add(again, **LIMITS)
    assert registry.parts(ALICE.uid, 7, 0) == [again]  # the new launch, not the finished one




async def test_per_task_launches_coexist_unless_their_tasks_overlap():
    registry = Registry()
    registry.add(FakeStep(8, task_offset=0), **LIMITS)
    registry.add(FakeStep(8, task_offset=1), **LIMITS)
    with pytest.raises(Refused, match="task 1 of step 8.0 is already running on this node"):
        registry.add(FakeStep(8, task_offset=1), **LIMITS)
    with pytest.raises(Refused, match="task 0 of step 8.0 is already running on this node"):
        registry.add(FakeStep(8, ntasks=2), **LIMITS)  # a whole-step launch over them
    assert [s.spec.first_task for s in registry.parts(ALICE.uid, 8, 0)] == [0, 1]


async def test_step_limits_node_wide_and_per_user():
    registry = Registry()
    for job in range(2):
        registry.add(FakeStep(job), max_steps=3, max_steps_per_user=2)
    with pytest.raises(Refused, match="alice already has 2 steps on this node, the maximum") as e:
        registry.add(FakeStep(5), max_steps=3, max_steps_per_user=2)
    assert e.value.code == "limit"
    registry.add(FakeStep(6, user=BOB), max_steps=3, max_steps_per_user=2)
    with pytest.raises(Refused, match="this node runs its maximum of 3 steps"):
        registry.add(FakeStep(7, user=BOB), max_steps=3, max_steps_per_user=2)


async def test_someone_elses_step_looks_exactly_like_a_missing_one():
    registry = Registry()
    registry.add(FakeStep(9, user=BOB), **LIMITS)
    with pytest.raises(Refused) as missing:
        registry.own_parts(POLICY, ALICE.uid, 10, 0)
    with pytest.raises(Refused) as elses:
        registry.own_parts(POLICY, ALICE.uid, 9, 0)
    assert (elses.value.code, str(elses.value)) == ("not-found", "no step 9.0 of yours on this node")
    assert (missing.value.code, str(missing.value)) == ("not-found", "no step 10.0 of yours on this node")
    assert registry.own_parts(POLICY, 0, 9, 0)  # root is an operator
    assert registry.visible(POLICY, ALICE.uid) == [] and len(registry.visible(POLICY, BOB.uid)) == 1


async def test_signal_and_cancel_need_a_running_part():
    registry = Registry()
    step = FakeStep(11)
    registry.add(step, **LIMITS)
    registry.started(step)
    assert registry.own_running_parts(POLICY, ALICE.uid, 11, 0) == [step]
    step.finish()
    await retired(registry)
    with pytest.raises(Refused, match="step 11.0 has already finished"):
        registry.own_running_parts(POLICY, ALICE.uid, 11, 0)
    assert refs(registry.own_parts(POLICY, ALICE.uid, 11, 0)) == [("alice", "11.0")]  # wait still finds it


async def test_recovered_steps_run_or_are_already_finished():
    told = []
    registry = Registry(on_change=lambda running: told.append(len(running)))
    running, undone = FakeStep(12), FakeStep(13)
    undone.finish(125)
    registry.recovered([running, undone])
    assert list(registry.running.values()) == [running] and refs(registry.finished.values()) == [("alice", "13.0")]
    assert told == [1]
    running.finish()
    await retired(registry)
    assert registry.running == {} and len(registry.finished) == 2


# ---- step names are per user (issue 14.2) ------------------------------------------------------


async def test_two_users_steps_with_the_same_ids_never_meet():
    registry = Registry()
    alices = FakeStep(760001)
    registry.add(alices, **LIMITS)
    bobs = FakeStep(760001, user=BOB)
    registry.add(bobs, **LIMITS)  # no "already running": the ids are Bob's own
    assert refs(registry.own_parts(POLICY, BOB.uid, 760001, 0)) == [("bob", "760001.0")]
    registry.started(bobs)
    bobs.finish(4)
    await retired(registry)
    registry.started(alices)
    # Bob launching 760001.0 again does not touch Alice's; Alice's end leaves Bob's result alone.
    again = FakeStep(760001, user=BOB)
    registry.add(again, **LIMITS)
    alices.finish(3)
    await retired(registry)
    assert [s.result.status for s in registry.own_parts(POLICY, ALICE.uid, 760001, 0)] == [3]
    assert registry.own_parts(POLICY, BOB.uid, 760001, 0) == [again]


async def test_an_operator_names_the_user_when_several_have_the_step():
    registry = Registry()
    for user in (ALICE, BOB):
        registry.add(FakeStep(5, user=user), **LIMITS)
    with pytest.raises(Refused) as e:
        registry.own_parts(POLICY, 0, 5, 0)
    assert (e.value.code, str(e.value)) == (
        "ambiguous", "step 5.0 is several users' on this node (alice, bob); name one with --user")
    assert refs(registry.own_parts(POLICY, 0, 5, 0, user=BOB.uid)) == [("bob", "5.0")]
    registry.add(FakeStep(6, user=BOB), **LIMITS)
    assert refs(registry.own_parts(POLICY, 0, 6, 0)) == [("bob", "6.0")]  # only one: no need to name it
    # Anyone else naming another user learns nothing.
    with pytest.raises(Refused, match="no step 5.0 of yours on this node") as e:
        registry.own_parts(POLICY, ALICE.uid, 5, 0, user=BOB.uid)
    assert e.value.code == "not-found"


# ---- retention of finished results (issue 14.3) --------------------------------------------


async def finish_all(registry: Registry, steps: list[FakeStep]) -> None:
    for step in steps:
        registry.add(step, **LIMITS)
        registry.started(step)
        step.finish()
        await retired(registry)


async def test_results_are_kept_per_user_and_a_user_never_pushes_out_one_who_holds_fewer(tmp_path):
    results = ResultStore(str(tmp_path))
    registry = Registry(retention=lambda: Retention(max_count=4, max_per_user=3), results=results)
    steps = [FakeStep(1, user=BOB)] + [FakeStep(job) for job in range(10, 15)]
    for step in steps:  # each result written as the step would, before it is remembered
        results.write(step.outcome(StepResult(0, (0,), False)))
    await finish_all(registry, steps)
    await asyncio.wait_for(asyncio.gather(*list(registry._removals)), 5)
    # Alice: only her last 3; Bob keeps his one, although Alice finished 5 after it.
    assert refs(registry.finished.values()) == [("bob", "1.0"), ("alice", "12.0"), ("alice", "13.0"),
                                                ("alice", "14.0")]
    assert sorted(r.name for r in results.load_all()[0]) == ["1000.12.0.0", "1000.13.0.0", "1000.14.0.0",
                                                             "1001.1.0.0"]


async def test_results_older_than_max_age_are_forgotten(tmp_path):
    now = [2000.0]
    registry = Registry(retention=lambda: Retention(max_age=600), clock=lambda: now[0])
    await finish_all(registry, [FakeStep(1, ended_at=1000.0), FakeStep(2, ended_at=1900.0)])
    assert refs(registry.visible(POLICY, ALICE.uid)) == [("alice", "2.0")]
    now[0] = 2600.0
    assert registry.visible(POLICY, ALICE.uid) == []
    with pytest.raises(Refused, match="no step 2.0 of yours"):
        registry.own_parts(POLICY, ALICE.uid, 2, 0)


async def test_kept_results_come_back_as_they_were():
    registry = Registry()
    step = FakeStep(21, ntasks=2)
    registry.recovered([], [step.outcome(StepResult(9, (None, 9), True))])
    (finished,) = registry.own_parts(POLICY, ALICE.uid, 21, 0)
    assert await finished.wait() == StepResult(9, (None, 9), True)
    assert (finished.how, finished.pids, finished.started_at) == ("cancelled", (4000, 4001), step.ended_at - 1)


# ---- a step whose exit was told while its release goes on -------------------------------------


async def test_a_request_waits_for_the_release_of_its_callers_told_steps_only():
    """Step.told: the exit goes out before the release's filesystem work. The owner's next
    request (settled) waits for the release, so that it finds the step finished and its ids
    free; another user's does not wait; an operator's does (it may see every step)."""
    registry = Registry()
    alices, bobs = FakeStep(1), FakeStep(2, user=BOB)
    for step in (alices, bobs):
        registry.add(step, **LIMITS)
        registry.started(step)
    await asyncio.wait_for(registry.settled(POLICY, ALICE.uid), 5)  # nothing told: nothing to wait for
    alices.tell(3)
    await asyncio.sleep(0)  # the told callback
    await asyncio.wait_for(registry.settled(POLICY, BOB.uid), 5)  # not Bob's to wait for
    for caller in (ALICE.uid, 0):
        waiting = asyncio.ensure_future(registry.settled(POLICY, caller))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        waiting.cancel()
    waiting = asyncio.ensure_future(registry.settled(POLICY, ALICE.uid))
    alices.finish(3)
    await asyncio.wait_for(waiting, 5)
    bobs.finish(0)
    await retired(registry)
    # Released: finished in the registry, the ids free for a launch of them.
    assert registry.running == {}
    assert registry.own_parts(POLICY, ALICE.uid, 1, 0)[0].result.status == 3
    registry.add(FakeStep(1), **LIMITS)
    await asyncio.wait_for(registry.settled(POLICY, ALICE.uid), 5)


async def test_a_launch_waits_only_for_the_releases_in_its_way():
    """room_for: a launch waits for the release of a told step of the launcher's with any of
    its task ids, or of any of its told steps when it is at its cap; for nothing else."""
    registry = Registry()
    same, other_ids, bobs = FakeStep(1), FakeStep(2), FakeStep(1, user=BOB)
    for step in (same, other_ids, bobs):
        registry.add(step, **LIMITS)
        registry.started(step)
        step.tell(0)
    await asyncio.sleep(0)  # the told callbacks
    # Another job, under the caps: nothing to wait for.
    await asyncio.wait_for(registry.room_for(FakeStep(3).spec, **LIMITS), 5)
    # The same ids: until that one step is released (Bob's 1.0 is no business of Alice's).
    waiting = asyncio.ensure_future(registry.room_for(FakeStep(1).spec, **LIMITS))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    same.finish(0)
    await asyncio.wait_for(waiting, 5)
    # At the per-user cap: until any of Alice's told steps is released.
    waiting = asyncio.ensure_future(registry.room_for(FakeStep(4).spec, max_steps=10, max_steps_per_user=1))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    other_ids.finish(0)
    await asyncio.wait_for(waiting, 5)
    bobs.finish(0)
    await retired(registry)
