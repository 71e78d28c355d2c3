"""Durable step records in --state-dir: what a restarted daemon needs to manage a step.

One JSON file per launch, `steps/UID.JOB.STEP.FIRSTTASK.json` (step names are per
user: two users' steps with the same ids never share a file), written atomically
(temporary file, fsync, rename, fsync of the directory) before the launch is
acknowledged and on every state change, and removed only after the step's cleanup.
Next to it, `UID.JOB.STEP.FIRSTTASK.exits` is the exit file the step's task monitors
append to (docs/monitor.md). The format is described in docs/restart.md.

A file that cannot be read as a record of this version (truncated, garbage, written by
another version) is moved to `quarantine/` with its reason logged: it never stops the
daemon, nor the recovery of the other steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os

import msgspec

from nodestepd.config.patterns import PatternContext
from nodestepd.process.identity import Identity
from nodestepd.process.exitfile import ExitRecords, read_exit_file
from nodestepd.step.spec import RuntimeCommands, StepSettings, StepSpec
from nodestepd.step.layout import SpoolLayout
from nodestepd.step import statefiles
from nodestepd.step.statefiles import LoadProblem
from nodestepd.step.spool import StepSpool
from nodestepd.step.task import ProcessId, Task

FORMAT = "nodestepd-step"
VERSION = 1
STEPS_DIR = "steps"
QUARANTINE_DIR = "quarantine"
SPARE_DIR = "spare"  # statefiles.SpareFiles: empty files a launch takes instead of creating one
RECORD_SUFFIX = ".json"
EXITS_SUFFIX = ".exits"
MAX_RECORD_BYTES = 16 << 20  # far above any record (a launch's environment is at most max_env_bytes)


class UserRecord(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str


class ProcRecord(msgspec.Struct, forbid_unknown_fields=True):
    """A process, named so that a recycled pid is never taken for it: pid plus start time."""

    pid: int
    start: int  # /proc/PID/stat field 22: clock ticks after boot


class TaskRecord(msgspec.Struct, forbid_unknown_fields=True):
    task_id: int
    dir: str
    context: dict[str, object]  # the task's PatternContext, for RunTime* commands after a restart
    monitor: ProcRecord | None = None
    # What the task's end is the end of: run mode, the runtime's shell; create/start, the
    # container's init (None until it is created).
    process: ProcRecord | None = None
    status: int | None = None  # once ended; with status_known False it is not the real one
    status_known: bool = True


class DirRecord(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    dev: int
    ino: int


class SpoolRecord(msgspec.Struct, forbid_unknown_fields=True):
    step_dir: str
    task_dirs: list[str]
    created: list[DirRecord]  # every directory the launch created, parents first
    kept: bool = False  # DisableCleanup
    # Recorded before the launch created anything: `created` is not known yet, and the step
    # dir, if it exists, is the launch's (recovery.py removes it).
    pending: bool = False


class SettingsRecord(msgspec.Struct, forbid_unknown_fields=True):
    """The configuration the step started with: a reload or an upgrade changes nothing for it."""

    oci_conf: str
    runtime_run: str | None
    runtime_create: str | None
    runtime_start: str | None
    runtime_query: str | None
    runtime_kill: str | None
    runtime_delete: str | None
    disable_cleanup: bool
    spool_dir: str
    node_name: str
    kill_wait: float
    runtime_timeout: float
    runtime_env: dict[str, str]
    stage_in: str | None = None
    stage_out: str | None = None


class StepRecord(msgspec.Struct, forbid_unknown_fields=True):
    format: str
    version: int
    job_id: int
    step_id: int
    first_task: int
    ntasks: int
    task_offset: int | None
    local_offset: int | None
    node_id: int | None
    container_id: str | None
    user: UserRecord
    bundle: str
    args: list[str]
    workdir: str
    attached: bool
    started_at: float
    state: str  # launching, running, terminating
    settings: SettingsRecord
    tasks: list[TaskRecord]
    spool: SpoolRecord | None = None
    cancel_reason: str | None = None
    daemon_pid: int = 0  # the daemon that wrote it (for the log after a restart)
    orig_bundle: str | None = None  # the bundle the user gave, when a stage_in pointed the step at another
    stage_out_due: bool = False  # stage_in succeeded (or there is none): stage_out runs at the release

    @property
    def name(self) -> str:
        return record_name(self.user.uid, self.job_id, self.step_id, self.first_task)

    @property
    def legacy_name(self) -> str:
        """The name nodestepd gave records before step names were per user (JOB.STEP.FIRSTTASK)."""
        return f"{self.job_id}.{self.step_id}.{self.first_task}"


STATES = ("launching", "running", "terminating")


# ---- a step and its record: the one mapping, both ways ------------------------------


def step_record(
    *, spec: StepSpec, settings: StepSettings, runtime_env: dict[str, str], tasks: list[Task],
    spool: StepSpool | None, state: str, cancel_reason: str | None, started_at: float,
    orig_bundle: str | None = None, stage_out_due: bool = False, planned_spool: SpoolLayout | None = None,
) -> StepRecord:
    """The record of a step in `state` (launching, running, terminating). planned_spool: the
    layout of a spool not created yet (spool None), recorded as pending."""
    commands, ident = settings.commands, spec.identity
    return StepRecord(
        format=FORMAT, version=VERSION,
        job_id=spec.job_id, step_id=spec.step_id, first_task=spec.first_task, ntasks=spec.ntasks,
        task_offset=spec.task_offset, local_offset=spec.local_offset, node_id=spec.node_id,
        container_id=spec.container_id,
        user=UserRecord(ident.user, ident.uid, ident.gid, list(ident.groups), ident.home),
        bundle=spec.bundle, args=list(spec.args), workdir=spec.workdir, attached=spec.attached,
        started_at=started_at, state=state,
        settings=SettingsRecord(
            oci_conf=commands.oci_conf, runtime_run=commands.run, runtime_create=commands.create,
            runtime_start=commands.start, runtime_query=commands.query, runtime_kill=commands.kill,
            runtime_delete=commands.delete, disable_cleanup=settings.keep_spool,
            spool_dir=settings.spool_dir, node_name=settings.node_name, kill_wait=settings.kill_wait,
            runtime_timeout=settings.runtime_timeout, runtime_env=runtime_env,
            stage_in=settings.stage_in, stage_out=settings.stage_out,
        ),
        tasks=[
            TaskRecord(
                task_id=t.task_id, dir=t.dir, context=_context_fields(t.context), monitor=_proc(t.monitor_process),
                process=_proc(t.process), status=t.status if t.ended else None,
                status_known=t.status_known or not t.ended,
            )
            for t in tasks
        ],
        spool=_spool_record(spool, planned_spool, settings.keep_spool),
        cancel_reason=cancel_reason, daemon_pid=os.getpid(),
        orig_bundle=orig_bundle if orig_bundle != spec.bundle else None, stage_out_due=stage_out_due,
    )


def _spool_record(spool: StepSpool | None, planned: SpoolLayout | None, kept: bool) -> SpoolRecord | None:
    if spool is not None:
        return SpoolRecord(
            step_dir=spool.layout.step_dir, task_dirs=list(spool.layout.task_dirs),
            created=[DirRecord(path, dev, ino) for path, dev, ino in spool.created_dirs()], kept=kept,
        )
    if planned is not None:
        return SpoolRecord(step_dir=planned.step_dir, task_dirs=list(planned.task_dirs), created=[], kept=kept,
                           pending=True)
    return None


def spec_of(record: StepRecord) -> StepSpec:
    user = record.user
    return StepSpec(
        job_id=record.job_id, step_id=record.step_id, ntasks=record.ntasks,
        identity=Identity(user.name, user.uid, user.gid, tuple(user.groups), user.home),
        bundle=record.bundle, args=tuple(record.args), workdir=record.workdir, attached=record.attached,
        task_offset=record.task_offset, local_offset=record.local_offset, node_id=record.node_id,
        container_id=record.container_id,
    )


def settings_of(record: StepRecord) -> StepSettings:
    s = record.settings
    commands = RuntimeCommands(s.oci_conf, s.runtime_run, s.runtime_create, s.runtime_start, s.runtime_query,
                               s.runtime_kill, s.runtime_delete)
    return StepSettings(commands, kill_wait=s.kill_wait, runtime_timeout=s.runtime_timeout,
                        keep_spool=s.disable_cleanup, spool_dir=s.spool_dir, node_name=s.node_name,
                        stage_in=s.stage_in, stage_out=s.stage_out)


def task_of(t: TaskRecord) -> Task:
    """The task without its watch: recovery.py finds that again."""
    context = dict(t.context)
    context["args"] = tuple(context.get("args") or ())  # type: ignore[arg-type]
    return Task(t.task_id, t.dir, PatternContext(**context),  # type: ignore[arg-type]
                process=_process_id(t.process), monitor_process=_process_id(t.monitor))


def spool_layout_of(spool: SpoolRecord) -> tuple[SpoolLayout, list[tuple[str, int, int]]]:
    """The layout the launch created and its directories (path, device, inode), for StepSpool.reopen."""
    return (SpoolLayout(step_dir=spool.step_dir, task_dirs=tuple(spool.task_dirs)),
            [(d.path, d.dev, d.ino) for d in spool.created])


def _context_fields(context: PatternContext) -> dict[str, object]:
    fields = dataclasses.asdict(context)
    fields["args"] = list(context.args)
    return fields


def _proc(process: ProcessId | None) -> ProcRecord | None:
    return None if process is None else ProcRecord(process.pid, process.start)


def _process_id(record: ProcRecord | None) -> ProcessId | None:
    return None if record is None else ProcessId(record.pid, record.start)

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(StepRecord)


class RecordError(Exception):
    """A state file that is not a usable step record; the text says why."""


def record_name(uid: int, job_id: int, step_id: int, first_task: int) -> str:
    return f"{uid}.{job_id}.{step_id}.{first_task}"


def encode(record: StepRecord) -> bytes:
    return _encoder.encode(record) + b"\n"


def decode(data: bytes) -> StepRecord:
    """Raises RecordError for anything but a complete record of this format and version."""
    record = statefiles.decode_versioned(data, _decoder, fmt=FORMAT, version=VERSION, kind="record",
                                         error=RecordError)
    if record.state not in STATES:
        raise RecordError(f"invalid record: unknown state {record.state!r}")
    if len(record.tasks) != record.ntasks:
        raise RecordError(f"invalid record: {len(record.tasks)} tasks for ntasks={record.ntasks}")
    return record




class RecordStore:
    """The steps/ directory of the state dir: the one writer and remover of step records.

    Every operation works relative to the directory's fd and never follows a symlink.
    All methods block (small writes with fsync): call them through asyncio.to_thread.
    """

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, STEPS_DIR)
        self._fd = statefiles.open_private_dir(self.path)
        self._quarantine = os.path.join(state_dir, QUARANTINE_DIR)
        # A launch writes its record, opens its exit file and makes its spool before its
        # tasks start: with files and directories made beforehand (make_spares, after an
        # earlier launch), none of it allocates an inode then (the spool's when it is on
        # the state dir's filesystem: prepare.create).
        self.spares = statefiles.SpareFiles(os.path.join(state_dir, SPARE_DIR), self._fd)
        self._refill: asyncio.Future[None] | None = None  # make_spares_soon's, while it runs
        self._refill_again = False

    def close(self) -> None:
        if self._fd >= 0:
            self.spares.close()
            os.close(self._fd)
            self._fd = -1

    def write(self, record: StepRecord, *, durable: bool = True) -> None:
        """Replace the record atomically, and durably unless durable=False (statefiles.write_atomically);
        on failure (OSError) nothing is left behind."""
        statefiles.write_atomically(self._fd, record.name + RECORD_SUFFIX, encode(record), durable=durable,
                                    spares=self.spares)

    def make_spares(self) -> None:
        """Make again the spare files and directories launches took (SpareFiles.top_up):
        blocking, called once a launch is acknowledged, its tasks running."""
        self.spares.top_up()

    def make_spares_soon(self) -> asyncio.Future[None]:
        """make_spares in a worker thread, shared: launches acknowledged while one runs ask
        for one more after it, not one each (with 16 launches at a time, a worker-thread hop
        per launch that mostly found nothing left to make). Call on the event loop."""
        if self._refill is not None and not self._refill.done():
            self._refill_again = True
            return self._refill
        self._refill_again = False
        self._refill = asyncio.ensure_future(asyncio.to_thread(self.make_spares))
        self._refill.add_done_callback(self._refilled)
        return self._refill

    def _refilled(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()  # top_up raises nothing: a spare that cannot be made is left to the taker
        if self._refill_again:
            self.make_spares_soon()

    def remove(self, name: str) -> None:
        """The step is cleaned up: its record and exit file go. The record (written by us
        alone, no fd left open on it) becomes a spare file rather than a freed inode
        (SpareFiles.recycle); the exit file, which a monitor may still hold, is unlinked."""
        if not self.spares.recycle(self._fd, name + RECORD_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name + RECORD_SUFFIX, dir_fd=self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name + EXITS_SUFFIX, dir_fd=self._fd)
        os.fsync(self._fd)

    def open_exits(self, name: str) -> int:
        """The step's exit file, for its task monitors to append to (a new fd, O_APPEND):
        a spare file linked at its name, or else created; one already there (a step of the
        same name whose removal was cut short) is appended to, as always."""
        taken = self.spares.take()
        if taken is not None:
            spare_dir_fd, spare, fd = taken
            try:
                try:
                    os.link(spare, name + EXITS_SUFFIX, src_dir_fd=spare_dir_fd, dst_dir_fd=self._fd,
                            follow_symlinks=False)
                finally:
                    os.unlink(spare, dir_fd=spare_dir_fd)  # once linked, the exit file's is its one name
            except FileExistsError:
                os.close(fd)
            except BaseException:
                os.close(fd)
                raise
            else:
                return fd
        return os.open(
            name + EXITS_SUFFIX, os.O_WRONLY | os.O_APPEND | os.O_CREAT | statefiles.NOFOLLOW, 0o600, dir_fd=self._fd
        )

    def read_exits(self, name: str) -> ExitRecords:
        """The statuses the step's monitors recorded (none when no task ended yet)."""
        try:
            return read_exit_file(name + EXITS_SUFFIX, dir_fd=self._fd)
        except FileNotFoundError:
            return ExitRecords({}, [])

    def load_all(self) -> tuple[list[StepRecord], list[LoadProblem]]:
        """Every record, in name order; each file that is not one is quarantined and reported."""
        records: list[StepRecord] = []
        problems: list[LoadProblem] = []
        for name in sorted(os.listdir(self._fd)):
            if statefiles.is_unfinished_write(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self._fd)
                continue
            if not name.endswith(RECORD_SUFFIX):
                continue
            try:
                record = decode(statefiles.read_file(self._fd, name, MAX_RECORD_BYTES))
                if record.name + RECORD_SUFFIX != name:
                    if record.legacy_name + RECORD_SUFFIX != name:
                        raise RecordError(f"names step {record.name}, not {name.removesuffix(RECORD_SUFFIX)}")
                    self._rename_legacy(record)
            except (RecordError, OSError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                problems.append(LoadProblem(name, f"{reason}; moved to {self.quarantine(name)}"))
                continue
            records.append(record)
        return records, problems

    def _rename_legacy(self, record: StepRecord) -> None:
        """A record an older nodestepd left under its name without the uid: renamed, with
        its exit file, to the per-user name (the content is the same version)."""
        try:
            os.stat(record.name + RECORD_SUFFIX, dir_fd=self._fd, follow_symlinks=False)
            raise RecordError(f"a record named {record.name} exists too")
        except FileNotFoundError:
            pass
        with contextlib.suppress(FileNotFoundError):
            os.rename(record.legacy_name + EXITS_SUFFIX, record.name + EXITS_SUFFIX,
                      src_dir_fd=self._fd, dst_dir_fd=self._fd)
        os.rename(record.legacy_name + RECORD_SUFFIX, record.name + RECORD_SUFFIX,
                  src_dir_fd=self._fd, dst_dir_fd=self._fd)
        os.fsync(self._fd)

    def quarantine(self, name: str) -> str:
        """Move a bad record (and its exit file) out of the way, keeping it for a human to read."""
        exits = name.removesuffix(RECORD_SUFFIX) + EXITS_SUFFIX
        return statefiles.move_to_quarantine(self._fd, self._quarantine, name, companions=[(exits, EXITS_SUFFIX)])
