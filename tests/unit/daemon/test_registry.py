"""daemon/registry.py: which steps run, which finished, and who may see which (no root)."""

from __future__ import annotations

import asyncio

import pytest

from nodestepd.daemon.authz import Policy
from nodestepd.daemon.errors import Refused
from nodestepd.daemon.registry import Registry
from nodestepd.process.identity import Identity
from nodestepd.step.spec import StepResult, StepSpec
from nodestepd.step.step import StepState

ALICE = Identity("alice", 1000, 1000, (1000,), "/home/alice")
BOB = Identity("bob", 1001, 1001, (1001,), "/home/bob")
POLICY = Policy(frozenset({0}))
LIMITS = {"max_steps": 10, "max_steps_per_user": 5}


class FakeStep:
    def __init__(self, job_id: int, step_id: int = 0, *, user: Identity = ALICE, ntasks: int = 1,
                 task_offset: int | None = None) -> None:
        self.spec = StepSpec(job_id=job_id, step_id=step_id, ntasks=ntasks, identity=user, bundle="/b",
                             args=("true",), workdir="/", attached=True, task_offset=task_offset)
        self.state = StepState.RUNNING
        self.tasks: list = []
        self._done: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()

    @property
    def ref(self) -> str:
        return self.spec.ref

    def finish(self, status: int = 0) -> None:
        self.state = StepState.FINISHED
        self._done.set_result(StepResult(status, (status,) * self.spec.ntasks, False))

    async def wait(self) -> StepResult:
        return await asyncio.shield(self._done)


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
    assert registry.running == {} and list(registry.finished.values()) == [step]
    assert told == [["1.0"], []]


async def test_a_failed_launch_is_forgotten():
    registry = Registry()
    step = FakeStep(1)
    registry.add(step, **LIMITS)
    registry.discard(step)
    assert registry.running == {} and registry.finished == {}


async def test_only_so_many_finished_steps_are_remembered():
    registry = Registry(finished_kept=2)
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
    assert registry.parts(7, 0) == [again]  # the new launch, not the finished one


async def test_per_task_launches_coexist_unless_their_tasks_overlap():
    registry = Registry()
    registry.add(FakeStep(8, task_offset=0), **LIMITS)
    registry.add(FakeStep(8, task_offset=1), **LIMITS)
    with pytest.raises(Refused, match="task 1 of step 8.0 is already running on this node"):
        registry.add(FakeStep(8, task_offset=1), **LIMITS)
    with pytest.raises(Refused, match="task 0 of step 8.0 is already running on this node"):
        registry.add(FakeStep(8, ntasks=2), **LIMITS)  # a whole-step launch over them
    assert [s.spec.first_task for s in registry.parts(8, 0)] == [0, 1]


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
    assert elses.value.detail["owner_uid"] == BOB.uid  # for the log only
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
    assert registry.own_parts(POLICY, ALICE.uid, 11, 0) == [step]  # wait still finds it


async def test_recovered_steps_run_or_are_already_finished():
    told = []
    registry = Registry(on_change=lambda running: told.append(len(running)))
    running, undone = FakeStep(12), FakeStep(13)
    undone.finish(125)
    registry.recovered([running, undone])
    assert list(registry.running.values()) == [running] and list(registry.finished.values()) == [undone]
    assert told == [1]
    running.finish()
    await retired(registry)
    assert registry.running == {} and len(registry.finished) == 2
