"""The steps this daemon knows: the running ones (launching, running, terminating) and the
finished ones kept for `wait` and `ps`, looked up as their callers may see them.

Finished steps are kept as their results (step/results.py), in memory and in the state
dir alike, for a retention window: results_max_age seconds after they ended, at most
results_max_per_user per user and results_max on the node. Beyond the node's count, the
oldest result of whoever holds the most goes, so that one user's many steps never push
out the results of another user who holds fewer.

Step names are per user (docs/security.md): entries are keyed (uid, job id, step id,
first task id), so two users' steps with the same ids never meet, and a user's lookups
see only their own. A step launched task by task (srun -n 2 on one node) is several
entries, one per launch; `parts` gathers them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nodestepd.daemon.authz import Policy
from nodestepd.daemon.errors import Refused
from nodestepd.logs import get_logger
from nodestepd.step.record import record_name
from nodestepd.step.results import Finished, ResultRecord, ResultStore
from nodestepd.step.spec import StepSpec
from nodestepd.step.step import Step, StepState


@dataclass(frozen=True)
class Retention:
    """How long and how many finished results are kept (the results_* settings)."""

    max_age: float = 86400.0
    max_count: int = 1024
    max_per_user: int = 256

Key = tuple[int, int, int, int]  # uid, job id, step id, first task id


def key_of(spec: StepSpec) -> Key:
    return (spec.identity.uid, spec.job_id, spec.step_id, spec.first_task)


class Registry:
    def __init__(self, on_change: Callable[[list[Step]], None] = lambda running: None,
                 retention: Callable[[], Retention] = Retention, results: ResultStore | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """on_change: told the running steps whenever a step starts running or finishes.
        retention: the retention in force (read at each use: a reload changes it).
        results: where finished results are kept (None: in memory only); the registry
        removes those past their retention."""
        self.running: dict[Key, Step] = {}  # changed only through _insert and _delete, which keep the indexes
        self._per_user: collections.Counter[int] = collections.Counter()  # running steps per uid
        self._by_step: dict[tuple[int, int, int], dict[Key, Step]] = {}  # running launches per (uid, job, step)
        self.finished: collections.OrderedDict[Key, Finished] = collections.OrderedDict()  # oldest end first
        self._on_change = on_change
        self._retention = retention
        self._results = results
        self._clock = clock
        self._retirements: set[asyncio.Task[None]] = set()  # held: the loop keeps tasks only weakly
        self._removals: set[asyncio.Task[None]] = set()
        # Running steps whose result may have been told (an attached client's exit sent)
        # while their release goes on (Step.told): settled() waits for them.
        self._releasing: set[Step] = set()
        self.not_deleted = 0  # containers whose RunTimeDelete hung every time, in steps finished since the start

    # ---- entering and leaving ---------------------------------------------------------

    def add(self, step: Step, *, max_steps: int, max_steps_per_user: int) -> None:
        """Admit a launching step, or raise Refused. The checks and the insertion have no
        await in between: the counts are exact."""
        spec = step.spec
        self._check_no_overlap(spec)
        if len(self.running) >= max_steps:
            raise Refused("limit", f"this node runs its maximum of {max_steps} steps (max_steps); try again later")
        own = self._per_user[spec.identity.uid]
        if own >= max_steps_per_user:
            raise Refused("limit", f"{spec.identity.user} already has {own} steps on this node, the maximum "
                          f"(max_steps_per_user)")
        self._insert(key_of(spec), step)

    def _insert(self, key: Key, step: Step) -> None:
        self.running[key] = step
        self._per_user[key[0]] += 1
        self._by_step.setdefault(key[:3], {})[key] = step

    def _delete(self, key: Key) -> None:
        del self.running[key]
        self._per_user[key[0]] -= 1
        if not self._per_user[key[0]]:
            del self._per_user[key[0]]
        launches = self._by_step[key[:3]]
        del launches[key]
        if not launches:
            del self._by_step[key[:3]]

    def _launches(self, key: Key) -> Iterable[Step]:
        """The running launches of key's user, job and step."""
        return self._by_step.get(key[:3], {}).values()

    def discard(self, step: Step) -> None:
        """A launch that failed: forgotten (its waiters have their result already)."""
        key = key_of(step.spec)
        if self.running.get(key) is step:
            self._delete(key)
        self._count_not_deleted(step)

    def started(self, step: Step) -> None:
        """The step runs: told on_change, and moved to the finished ones when it ends."""
        self._on_change(list(self.running.values()))
        self._retire_when_done(step)

    def recovered(self, steps: Iterable[Step], results: Iterable[ResultRecord] = ()) -> None:
        """Steps a previous daemon left, taken over (step/recovery.py; an undone launch is
        finished already), and the results it kept, oldest end first."""
        for rec in results:
            self._remember(Finished.of(rec))
        for step in steps:
            if step.state is StepState.FINISHED:
                self._remember_step(step)
            else:
                self._insert(key_of(step.spec), step)
                self._retire_when_done(step)
        self._on_change(list(self.running.values()))

    def _retire_when_done(self, step: Step) -> None:
        step.on_told(functools.partial(self._releasing.add, step))
        retirement = asyncio.create_task(self._retire(step), name=f"retire {step.ref}")
        self._retirements.add(retirement)
        retirement.add_done_callback(self._retirements.discard)

    async def _retire(self, step: Step) -> None:
        await step.wait()
        self._releasing.discard(step)
        key = key_of(step.spec)
        if self.running.get(key) is step:
            self._delete(key)
            self._on_change(list(self.running.values()))
        self._remember_step(step)

    def _count_not_deleted(self, step: Step) -> None:
        self.not_deleted += sum(1 for task in step.tasks if task.not_deleted)

    def _remember_step(self, step: Step) -> None:
        """A finished step (each is remembered once)."""
        assert step.result is not None
        self._count_not_deleted(step)
        self._remember(Finished.of(step.outcome(step.result)))

    def _remember(self, finished: Finished) -> None:
        key = key_of(finished.spec)
        self.finished[key] = finished
        self.finished.move_to_end(key)
        retention = self._retention()
        gone = self._expired(retention)
        mine = [k for k in self.finished if k[0] == key[0]]
        for k in mine[:max(0, len(mine) - retention.max_per_user)]:
            del self.finished[k]
            gone.append(k)
        while len(self.finished) > retention.max_count:
            held = collections.Counter(k[0] for k in self.finished)
            most = max(held.values())
            victim = next(k for k in self.finished if held[k[0]] == most)  # the oldest of the biggest holders
            del self.finished[victim]
            gone.append(victim)
        self._forget(gone)

    def _expired(self, retention: Retention) -> list[Key]:
        """Drop the results older than max_age (the oldest come first); their keys."""
        oldest = self._clock() - retention.max_age
        gone = []
        while self.finished:  # not a copy of them all: this runs at every lookup and every step's end
            key, finished = next(iter(self.finished.items()))
            if finished.ended_at >= oldest:
                break
            del self.finished[key]
            gone.append(key)
        return gone

    def _forget(self, keys: list[Key]) -> None:
        """Results past their retention: their files go too, in a worker thread."""
        # A key launched again and still running is skipped: its step writes the file anew.
        names = [record_name(*key) for key in keys if key not in self.running]
        if not names or self._results is None:
            return
        removal = asyncio.create_task(self._remove(names), name="remove results")
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)

    async def _remove(self, names: list[str]) -> None:
        assert self._results is not None
        try:
            await asyncio.to_thread(self._results.remove, names)
        except OSError as e:
            get_logger().error("cannot remove results past their retention", error=str(e), results=names)

    def _check_no_overlap(self, spec: StepSpec) -> None:
        """Launches of one user's job.step may coexist on a node only with disjoint task ids
        (another user's steps are never looked at: their ids are theirs)."""
        others = [s.spec for s in self._launches(key_of(spec))]
        shared = {t for other in others for t in other.task_ids if t in spec.task_ids}
        if not shared:
            return
        if spec.task_offset is None and all(o.task_offset is None for o in others):
            raise Refused("conflict", f"step {spec.job_id}.{spec.step_id} is already running on this node")
        raise Refused("conflict", f"task {min(shared)} of step {spec.job_id}.{spec.step_id} is already running "
                      "on this node")

    # ---- lookups, as the caller may see them -------------------------------------------

    async def settled(self, policy: Policy, uid: int) -> None:
        """Wait until the steps uid may see whose exit may have been told are released.

        A step's exit event goes out before its release's filesystem work (Step.told); a
        request read after it must find the step as the exit said: finished for ps, wait
        and status, and its ids free for a launch of them (room_for, a launch's own). Each
        request waits here first, for its caller's own steps only (an operator's: anyone's):
        another user's release delays nobody. Nothing to wait for but the release's own work: the tasks are gone,
        their containers deleted and stage_out run by then.
        """
        if not self._releasing:  # the usual case: one test per request
            return
        await self._released([s for s in self._releasing if policy.may_act_on(uid, s.spec.identity.uid)])

    async def room_for(self, spec: StepSpec, *, max_steps: int, max_steps_per_user: int) -> None:
        """settled() for a launch: only the releases that would refuse it (add()), those of
        the launcher's own steps with any of its task ids, or all of the launcher's when it
        is at max_steps_per_user (anyone's when the node is at max_steps). Others are no
        business of the launch, which does not wait for them."""
        if not self._releasing:
            return
        uid = spec.identity.uid
        if len(self.running) >= max_steps:
            steps = list(self._releasing)
        elif self._per_user[uid] >= max_steps_per_user:
            steps = [s for s in self._releasing if s.spec.identity.uid == uid]
        else:
            key = key_of(spec)
            steps = [s for s in self._releasing if key_of(s.spec)[:3] == key[:3]
                     and not set(s.spec.task_ids).isdisjoint(spec.task_ids)]
        await self._released(steps)

    @staticmethod
    async def _released(steps: list[Step]) -> None:
        if steps:
            await asyncio.gather(*(s.wait() for s in steps))

    def visible(self, policy: Policy, uid: int) -> list[Step | Finished]:
        self._forget(self._expired(self._retention()))
        steps: list[Step | Finished] = [*self.running.values(), *self.finished.values()]
        return [s for s in steps if policy.may_act_on(uid, s.spec.identity.uid)]

    def parts(self, uid: int, job_id: int, step_id: int) -> list[Step | Finished]:
        """Every launch of uid's job.step this daemon knows: the running ones, and finished ones not since relaunched."""
        self._forget(self._expired(self._retention()))
        running = dict(self._by_step.get((uid, job_id, step_id), {}))
        finished = {k: s for k, s in self.finished.items() if k[:3] == (uid, job_id, step_id) and k not in running}
        return [s for _, s in sorted({**finished, **running}.items())]

    def own_parts(self, policy: Policy, uid: int, job_id: int, step_id: int,
                  user: int | None = None) -> list[Step | Finished]:
        """The caller's job.step; an operator's may be anyone's (user: whose, when several users have one)."""
        missing = Refused("not-found", f"no step {job_id}.{step_id} of yours on this node")
        if user is not None and not policy.may_act_on(uid, user):
            raise missing  # as for a step that does not exist: no probing
        if user is None and policy.is_operator(uid):
            owners = sorted({k[0]: s.spec.identity.user for k, s in self._all() if k[1:3] == (job_id, step_id)}.items())
            if len(owners) > 1:
                names = ", ".join(name for _, name in owners)
                raise Refused("ambiguous", f"step {job_id}.{step_id} is several users' on this node ({names}); "
                              "name one with --user")
            user = owners[0][0] if owners else uid
        parts = self.parts(uid if user is None else user, job_id, step_id)
        if not parts:
            raise missing
        return parts

    def own_running_parts(self, policy: Policy, uid: int, job_id: int, step_id: int,
                          user: int | None = None) -> list[Step]:
        parts = [s for s in self.own_parts(policy, uid, job_id, step_id, user)
                 if not isinstance(s, Finished) and s.state is not StepState.FINISHED]
        if not parts:
            raise Refused("not-found", f"step {job_id}.{step_id} has already finished")
        return parts

    def running_of_job(self, job_id: int) -> list[Step]:
        """Every running launch of job `job_id` on this node, whoever's (job-end: root only)."""
        return [s for k, s in self.running.items() if k[1] == job_id and s.state is not StepState.FINISHED]

    def _all(self) -> list[tuple[Key, Step | Finished]]:
        return list(self.running.items()) + list(self.finished.items())
