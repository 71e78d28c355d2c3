"""Recovered attached steps, waiting for their clients to attach again.

An attached `nodestepctl run` whose daemon dies keeps its step's stdio (the containers hold
its fds) and reconnects to the next daemon with an `attach` request (session.py). Until it
does, the recovered step has no client. As srun does, a step does not outlive the client
that holds its stdio: a recovered attached step that no client has claimed within the
grace period (`reattach_grace`, counted from the recovery) is cancelled. A client claims a
step once; a running step launched by this daemon is its launching session's and cannot
be claimed at all (docs/restart.md#clients).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from nodestepd.step.step import Step, StepState


class Reattachments:
    def __init__(self, grace: Callable[[], float]) -> None:
        """grace: the configuration's reattach_grace in seconds, read when a wait begins."""
        self._grace = grace
        self._waiting: dict[Step, asyncio.Task[None]] = {}  # held: the loop keeps tasks only weakly

    def expect(self, steps: Iterable[Step]) -> None:
        """Recovered steps: each running attached one waits for its client, for the grace period."""
        grace = self._grace()
        for step in steps:
            if step.spec.attached and step.state is not StepState.FINISHED:
                self._waiting[step] = asyncio.create_task(self._cancel_unclaimed(step, grace),
                                                          name=f"reattach {step.ref}")

    def claim(self, step: Step) -> bool:
        """The step's client is back: True once per recovered attached step still waiting for it."""
        waiting = self._waiting.pop(step, None)
        if waiting is None:
            return False
        waiting.cancel()
        return True

    def close(self) -> None:
        """The daemon stops: no more cancellations (steps left running wait for the next daemon's clients)."""
        for waiting in self._waiting.values():
            waiting.cancel()
        self._waiting.clear()

    async def _cancel_unclaimed(self, step: Step, grace: float) -> None:
        try:
            await asyncio.wait_for(step.wait(), grace)
        except TimeoutError:
            if self._waiting.pop(step, None) is not None:
                step.log.info("no client re-attached within the grace period; cancelling the step",
                              reattach_grace=grace)
                await step.cancel(f"no client re-attached within {grace:g} s of the daemon's restart")
        else:
            # Ended on its own: a client that comes now still gets its status (a finished
            # step is attached to without a claim), so nothing waits any more.
            self._waiting.pop(step, None)
