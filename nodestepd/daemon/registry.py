"""The steps this daemon knows: the running ones (launching, running, terminating) and the
finished ones kept for `wait` and `ps`, looked up as their callers may see them.

A step launched task by task (srun -n 2 on one node) is several entries, one per launch,
keyed (job id, step id, first task id); `parts` gathers them.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterable

from nodestepd.daemon.authz import Policy
from nodestepd.daemon.errors import Refused
from nodestepd.step.spec import StepSpec
from nodestepd.step.step import Step, StepState

FINISHED_KEPT = 1024  # finished steps remembered for `wait` and `ps`

Key = tuple[int, int, int]


def key_of(spec: StepSpec) -> Key:
    return (spec.job_id, spec.step_id, spec.first_task)


class Registry:
    def __init__(self, on_change: Callable[[list[Step]], None] = lambda running: None,
                 finished_kept: int = FINISHED_KEPT) -> None:
        """on_change: told the running steps whenever a step starts running or finishes."""
        self.running: dict[Key, Step] = {}
        self.finished: collections.OrderedDict[Key, Step] = collections.OrderedDict()
        self._on_change = on_change
        self._finished_kept = finished_kept
        self._retirements: set[asyncio.Task[None]] = set()  # held: the loop keeps tasks only weakly
        self.not_deleted = 0  # containers whose RunTimeDelete hung every time, in steps finished since the start

    # ---- entering and leaving ---------------------------------------------------------

    def add(self, step: Step, *, max_steps: int, max_steps_per_user: int) -> None:
        """Admit a launching step, or raise Refused. The checks and the insertion have no
        await in between: the counts are exact."""
        spec = step.spec
        self._check_no_overlap(spec)
        if len(self.running) >= max_steps:
            raise Refused("limit", f"this node runs its maximum of {max_steps} steps (max_steps); try again later")
        own = sum(1 for s in self.running.values() if s.spec.identity.uid == spec.identity.uid)
        if own >= max_steps_per_user:
            raise Refused("limit", f"{spec.identity.user} already has {own} steps on this node, the maximum "
                          f"(max_steps_per_user)")
        self.running[key_of(spec)] = step

    def discard(self, step: Step) -> None:
        """A launch that failed: forgotten (its waiters have their result already)."""
        key = key_of(step.spec)
        if self.running.get(key) is step:
            del self.running[key]
        self._count_not_deleted(step)

    def started(self, step: Step) -> None:
        """The step runs: told on_change, and moved to the finished ones when it ends."""
        self._on_change(list(self.running.values()))
        self._retire_when_done(step)

    def recovered(self, steps: Iterable[Step]) -> None:
        """Steps a previous daemon left, taken over (step/recovery.py); an undone launch is finished already."""
        for step in steps:
            if step.state is StepState.FINISHED:
                self._remember(step)
            else:
                self.running[key_of(step.spec)] = step
                self._retire_when_done(step)
        self._on_change(list(self.running.values()))

    def _retire_when_done(self, step: Step) -> None:
        retirement = asyncio.create_task(self._retire(step), name=f"retire {step.ref}")
        self._retirements.add(retirement)
        retirement.add_done_callback(self._retirements.discard)

    async def _retire(self, step: Step) -> None:
        await step.wait()
        key = key_of(step.spec)
        if self.running.get(key) is step:
            del self.running[key]
            self._on_change(list(self.running.values()))
        self._remember(step)

    def _count_not_deleted(self, step: Step) -> None:
        self.not_deleted += sum(1 for task in step.tasks if task.not_deleted)

    def _remember(self, step: Step) -> None:
        """A finished step (each is remembered once)."""
        self._count_not_deleted(step)
        key = key_of(step.spec)
        self.finished[key] = step
        self.finished.move_to_end(key)
        while len(self.finished) > self._finished_kept:
            self.finished.popitem(last=False)

    def _check_no_overlap(self, spec: StepSpec) -> None:
        """Launches of one job.step may coexist on a node only with disjoint task ids."""
        others = [s.spec for key, s in self.running.items() if key[:2] == (spec.job_id, spec.step_id)]
        shared = {t for other in others for t in other.task_ids if t in spec.task_ids}
        if not shared:
            return
        if spec.task_offset is None and all(o.task_offset is None for o in others):
            raise Refused("conflict", f"step {spec.job_id}.{spec.step_id} is already running on this node")
        raise Refused("conflict", f"task {min(shared)} of step {spec.job_id}.{spec.step_id} is already running "
                      "on this node")

    # ---- lookups, as the caller may see them -------------------------------------------

    def visible(self, policy: Policy, uid: int) -> list[Step]:
        steps = list(self.running.values()) + list(self.finished.values())
        return [s for s in steps if policy.may_act_on(uid, s.spec.identity.uid)]

    def parts(self, job_id: int, step_id: int) -> list[Step]:
        """Every launch of job.step this daemon knows: the running ones, and finished ones not since relaunched."""
        running = {k: s for k, s in self.running.items() if k[:2] == (job_id, step_id)}
        finished = {k: s for k, s in self.finished.items() if k[:2] == (job_id, step_id) and k not in running}
        return [s for _, s in sorted({**finished, **running}.items())]

    def own_parts(self, policy: Policy, uid: int, job_id: int, step_id: int) -> list[Step]:
        parts = self.parts(job_id, step_id)
        if not parts:
            raise Refused("not-found", f"no step {job_id}.{step_id} of yours on this node")
        mine = [s for s in parts if policy.may_act_on(uid, s.spec.identity.uid)]
        if not mine:
            # Someone else's step is reported exactly like a missing one: no probing.
            raise Refused("not-found", f"no step {job_id}.{step_id} of yours on this node",
                          owner_uid=parts[0].spec.identity.uid,
                          reason="not the caller's step and the caller is no operator")
        return mine

    def own_running_parts(self, policy: Policy, uid: int, job_id: int, step_id: int) -> list[Step]:
        parts = [s for s in self.own_parts(policy, uid, job_id, step_id) if s.state is not StepState.FINISHED]
        if not parts:
            raise Refused("not-found", f"step {job_id}.{step_id} has already finished")
        return parts
