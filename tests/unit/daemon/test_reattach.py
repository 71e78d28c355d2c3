"""daemon/reattach.py: recovered attached steps wait for their clients, then are cancelled (no root)."""

from __future__ import annotations

import asyncio

import pytest

from nodestepd.daemon.reattach import Reattachments
from nodestepd.logs import get_logger
from nodestepd.process.identity import Identity
from nodestepd.step.spec import StepResult, StepSpec
from nodestepd.step.step import StepState

ALICE = Identity("alice", 1000, 1000, (1000,), "/home/alice")


class FakeStep:
    def __init__(self, job_id: int, *, attached: bool = True, state: StepState = StepState.RUNNING) -> None:
        self.spec = StepSpec(job_id=job_id, step_id=0, ntasks=1, identity=ALICE, bundle="/b", args=("true",),
                             workdir="/", attached=attached)
        self.ref = self.spec.ref
        self.state = state
        self.log = get_logger(job_id=job_id)
        self.cancelled = asyncio.Event()
        self.reason: str | None = None
        self._done: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()

    async def wait(self) -> StepResult:
        return await asyncio.shield(self._done)

    async def cancel(self, reason: str) -> StepResult:
        self.reason = reason
        self.cancelled.set()
        self.end(StepResult(137, (137,), True))
        return await self.wait()

    def end(self, result: StepResult) -> None:
        if not self._done.done():
            self.state = StepState.FINISHED
            self._done.set_result(result)


async def not_cancelled(step: FakeStep) -> None:
    """No cancellation within six grace periods of 0.05 s (an absence can only be waited for)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(step.cancelled.wait(), 0.3)


async def test_a_recovered_attached_step_no_client_claims_is_cancelled_after_the_grace():
    waiting = Reattachments(lambda: 0.05)
    step = FakeStep(1)
    waiting.expect([step])
    await asyncio.wait_for(step.cancelled.wait(), 5)
    assert step.reason == "no client re-attached within 0.05 s of the daemon's restart"
    assert not waiting.claim(step)  # too late: nothing left to claim


async def test_a_claimed_step_is_not_cancelled_and_is_claimed_once():
    waiting = Reattachments(lambda: 0.05)
    step = FakeStep(2)
    waiting.expect([step])
    assert waiting.claim(step)
    assert not waiting.claim(step)  # a second client gets a conflict
    await not_cancelled(step)
    step.end(StepResult(0, (0,), False))


async def test_only_running_attached_steps_wait_for_a_client():
    waiting = Reattachments(lambda: 0.05)
    detached, finished = FakeStep(3, attached=False), FakeStep(4, state=StepState.FINISHED)
    terminating = FakeStep(5, state=StepState.TERMINATING)
    waiting.expect([detached, finished, terminating])
    assert not waiting.claim(detached) and not waiting.claim(finished)
    assert waiting.claim(terminating)  # its client still gets the cancellation's status


async def test_a_step_that_ends_on_its_own_stops_waiting():
    waiting = Reattachments(lambda: 0.05)
    step = FakeStep(6)
    waiting.expect([step])
    step.end(StepResult(3, (3,), False))
    await not_cancelled(step)
    assert not waiting.claim(step)  # a client that comes now gets the result, unclaimed


async def test_a_stopping_daemon_cancels_no_step():
    waiting = Reattachments(lambda: 0.05)
    step = FakeStep(7)
    waiting.expect([step])
    waiting.close()
    await not_cancelled(step)
    assert not waiting.claim(step)
    step.end(StepResult(0, (0,), False))
