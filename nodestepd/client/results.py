"""What the daemon answers, as typed, frozen dataclasses.

Built from the reply's JSON by name: fields a newer daemon adds are ignored, and a
missing optional field takes its default, so that the client keeps working across
versions of one protocol. docs/protocol.md lists the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

from nodestepd.client.errors import ProtocolError

T = TypeVar("T")


def _build(cls: type[T], data: Any, **converted: object) -> T:
    if not isinstance(data, dict):
        raise ProtocolError(f"malformed reply from nodestepd: expected an object for {cls.__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # every T here is a dataclass
    values = {name: value for name, value in data.items() if name in known}
    values.update(converted)
    try:
        return cls(**values)
    except TypeError as e:  # a required field missing
        raise ProtocolError(f"malformed reply from nodestepd: {cls.__name__}: {e}") from None


@dataclass(frozen=True)
class TaskExit:
    """How one task ended: its runtime's exit code, 128+N when killed by signal N; None
    when it is not known (it ended while no daemon watched it, or never started)."""

    task_id: int
    status: int | None


@dataclass(frozen=True)
class StepExit:
    """How a step (a launch: its tasks) ended.

    status: the first non-zero task status in task order, else 0; None when no task failed
    but some task's status is not known (never a made-up 0). stdout and stderr: the output
    collected with stdout=COLLECT / stderr=COLLECT, else None."""

    job_id: int
    step_id: int
    status: int | None
    tasks: tuple[TaskExit, ...] = ()
    cancelled: bool = False
    stage_out_error: str | None = None  # how the site's stage_out failed; the status is the tasks' all the same
    stdout: bytes | None = None
    stderr: bytes | None = None

    @property
    def ok(self) -> bool:
        """Every task exited 0."""
        return self.status == 0

    @property
    def ref(self) -> str:
        return f"{self.job_id}.{self.step_id}"

    @classmethod
    def from_reply(cls, reply: dict[str, Any], stdout: bytes | None = None, stderr: bytes | None = None) -> StepExit:
        tasks = reply.get("tasks", [])
        if not isinstance(tasks, list):
            raise ProtocolError("malformed reply from nodestepd: tasks is not a list")
        return _build(cls, reply, tasks=tuple(_build(TaskExit, t) for t in tasks), stdout=stdout, stderr=stderr)


@dataclass(frozen=True)
class TaskInfo:
    """One task of a step in `ps`: its pid (None before it runs), its status once it
    ended, and whether RunTimeDelete hung every time it ran for it (not_deleted)."""

    task_id: int
    pid: int | None
    status: int | None
    not_deleted: bool = False


@dataclass(frozen=True)
class StepInfo:
    """One launch in `ps`. state: importing, launching, running, terminating or finished."""

    job_id: int
    step_id: int
    user: str
    uid: int
    state: str
    attached: bool
    bundle: str
    args: tuple[str, ...]
    started_at: float  # Unix time
    tasks: tuple[TaskInfo, ...]
    status: int | None = None
    stage_out_failed: bool = False

    @property
    def ref(self) -> str:
        return f"{self.job_id}.{self.step_id}"

    @classmethod
    def from_reply(cls, data: dict[str, Any]) -> StepInfo:
        if not isinstance(data, dict) or not isinstance(data.get("tasks", []), list):
            raise ProtocolError("malformed reply from nodestepd: a step of `steps` is not an object with tasks")
        return _build(cls, data, tasks=tuple(_build(TaskInfo, t) for t in data.get("tasks", [])),
                      args=tuple(data.get("args") or ()))


@dataclass(frozen=True)
class DaemonStatus:
    """The `status` reply: the daemon's version, configuration and counters."""

    version: str = ""
    uptime: float = 0.0  # seconds
    node_name: str = ""
    config_file: str | None = None
    oci_conf: str = ""
    oci_mode: str = ""  # run or create-start
    socket: str = ""
    spool_dir: str = ""
    state_dir: str = ""
    steps_running: int = 0
    steps_finished: int = 0
    journal_queued: int = 0
    journal_dropped: int = 0
    containers_not_deleted: int = 0
    image_cache_dir: str = ""
    images_imported: int = 0

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> DaemonStatus:
        return _build(cls, reply)
