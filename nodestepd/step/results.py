"""Finished steps' results in --state-dir: what `wait` and `ps` give for a step that ended,
kept for a retention window across any number of daemon restarts.

One small JSON file per finished launch, `results/UID.JOB.STEP.FIRSTTASK.json`, written
atomically (temporary file, fsync, rename, fsync of the directory) in a worker thread
before the step's record is removed: a daemon killed in between leaves the record, and
the next daemon finishes the step again from it, so a result is never lost. How long
results are kept is the registry's business (daemon/registry.py); this module writes,
reads and removes them. A file that is not a result of this version is quarantined, as
step records are. The format is described in docs/restart.md.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import msgspec

from nodestepd.process.identity import Identity
from nodestepd.protocol.wire import STATUS_LAUNCH_FAILED
from nodestepd.step import statefiles
from nodestepd.step.statefiles import LoadProblem
from nodestepd.step.record import QUARANTINE_DIR, UserRecord, record_name
from nodestepd.step.spec import StepResult, StepSpec

FORMAT = "nodestepd-result"
VERSION = 1
RESULTS_DIR = "results"
SUFFIX = ".json"
HOWS = ("exited", "signalled", "cancelled", "launch-failed", "unknown")


class TaskOutcome(msgspec.Struct, forbid_unknown_fields=True):
    task_id: int
    pid: int | None  # as `ps` showed it
    status: int | None  # None: never started, or its status is unknown
    not_deleted: bool = False  # its RunTimeDelete hung every time: the runtime may still hold the container


class ResultRecord(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    version: int
    job_id: int
    step_id: int
    first_task: int
    ntasks: int
    task_offset: int | None
    user: UserRecord
    bundle: str
    args: list[str]
    attached: bool
    started_at: float
    ended_at: float
    how: str  # one of HOWS
    status: int | None
    cancelled: bool
    tasks: list[TaskOutcome]
    stage_out_error: str | None = None  # how the site's stage_out failed
    container_id: str | None = None  # the launch's (an OCI container's engine id): found by it once ended

    @property
    def name(self) -> str:
        return record_name(self.user.uid, self.job_id, self.step_id, self.first_task)


def how_it_ended(result: StepResult) -> str:
    """exited, signalled (128+N), cancelled, launch-failed (no task ever ran), or unknown."""
    if result.status == STATUS_LAUNCH_FAILED and all(s is None for s in result.task_statuses):
        return "launch-failed"
    if result.cancelled:
        return "cancelled"
    if result.status is None:
        return "unknown"
    return "signalled" if result.status > 128 else "exited"


def result_record(spec: StepSpec, pids: list[int | None], result: StepResult, *, started_at: float,
                  ended_at: float, not_deleted: list[bool] | None = None,
                  stage_out_error: str | None = None) -> ResultRecord:
    ident = spec.identity
    return ResultRecord(
        format=FORMAT, version=VERSION, job_id=spec.job_id, step_id=spec.step_id, first_task=spec.first_task,
        ntasks=spec.ntasks, task_offset=spec.task_offset,
        user=UserRecord(ident.user, ident.uid, ident.gid, list(ident.groups), ident.home),
        bundle=spec.bundle, args=list(spec.args), attached=spec.attached, started_at=started_at,
        ended_at=ended_at, how=how_it_ended(result), status=result.status, cancelled=result.cancelled,
        tasks=[TaskOutcome(t, pid, status, gone)
               for t, pid, status, gone in zip(spec.task_ids, pids, result.task_statuses,
                                               not_deleted or [False] * len(pids))],
        stage_out_error=stage_out_error, container_id=spec.container_id,
    )


@dataclass(frozen=True)
class Finished:
    """A finished launch as `wait` and `ps` see it: built from its result record, the same
    before a restart and after it."""

    spec: StepSpec
    started_at: float
    ended_at: float
    how: str
    result: StepResult
    pids: tuple[int | None, ...]
    not_deleted: tuple[bool, ...]
    stage_out_error: str | None = None

    finished = True

    @classmethod
    def of(cls, rec: ResultRecord) -> Finished:
        user = rec.user
        spec = StepSpec(
            job_id=rec.job_id, step_id=rec.step_id, ntasks=rec.ntasks,
            identity=Identity(user.name, user.uid, user.gid, tuple(user.groups), user.home),
            bundle=rec.bundle, args=tuple(rec.args), workdir="/", attached=rec.attached,
            task_offset=rec.task_offset, container_id=rec.container_id,
        )
        statuses = tuple(t.status for t in rec.tasks)
        return cls(spec, rec.started_at, rec.ended_at, rec.how, StepResult(rec.status, statuses, rec.cancelled),
                   tuple(t.pid for t in rec.tasks), tuple(t.not_deleted for t in rec.tasks), rec.stage_out_error)

    @property
    def ref(self) -> str:
        return self.spec.ref

    @property
    def name(self) -> str:
        return record_name(self.spec.identity.uid, self.spec.job_id, self.spec.step_id, self.spec.first_task)

    async def wait(self) -> StepResult:
        return self.result


class ResultError(Exception):
    """A file in results/ that is not a usable result; the text says why."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ResultRecord)


def encode(rec: ResultRecord) -> bytes:
    return _encoder.encode(rec) + b"\n"


def decode(data: bytes) -> ResultRecord:
    """Raises ResultError for anything but a complete result of this format and version."""
    rec = statefiles.decode_versioned(data, _decoder, fmt=FORMAT, version=VERSION, kind="result", error=ResultError)
    if rec.how not in HOWS:
        raise ResultError(f"invalid result: unknown end {rec.how!r}")
    if len(rec.tasks) != rec.ntasks:
        raise ResultError(f"invalid result: {len(rec.tasks)} tasks for ntasks={rec.ntasks}")
    return rec




class ResultStore:
    """The results/ directory of the state dir: every operation relative to its fd, never
    following a symlink. All methods block (small writes with fsync): call them through
    asyncio.to_thread."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, RESULTS_DIR)
        self._fd = statefiles.open_private_dir(self.path)
        self._quarantine = os.path.join(state_dir, QUARANTINE_DIR)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(self, rec: ResultRecord) -> None:
        """Keep the result, atomically and durably; on failure (a full disk) nothing is left."""
        statefiles.write_atomically(self._fd, rec.name + SUFFIX, encode(rec))

    def remove(self, names: list[str]) -> None:
        """Results past their retention: gone (one fsync of the directory for all of them)."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name + SUFFIX, dir_fd=self._fd)
        os.fsync(self._fd)

    def load_all(self) -> tuple[list[ResultRecord], list[LoadProblem]]:
        """Every result, oldest end first; each file that is not one is quarantined and reported."""
        results: list[ResultRecord] = []
        problems: list[LoadProblem] = []
        for name in sorted(os.listdir(self._fd)):
            if statefiles.is_unfinished_write(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self._fd)  # a write cut short: that result was never kept
                continue
            try:
                if not name.endswith(SUFFIX):
                    raise ResultError("not a result file")
                rec = decode(statefiles.read_file(self._fd, name))
                if rec.name + SUFFIX != name:
                    raise ResultError(f"names step {rec.name}, not {name.removesuffix(SUFFIX)}")
            except (ResultError, OSError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                moved = statefiles.move_to_quarantine(self._fd, self._quarantine, name, prefix="result.")
                problems.append(LoadProblem(name, f"{reason}; moved to {moved}"))
                continue
            results.append(rec)
        results.sort(key=lambda r: r.ended_at)
        return results, problems
