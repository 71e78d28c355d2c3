"""What a step is made of, as frozen values: who and what it runs, the commands it runs
them with, what only its launch needs, and how it ended.

A step's data flows one way: a validated request becomes a StepSpec and a LaunchInput
(daemon/admission.py); preparing it with the LaunchSettings in force gives its spool and
tasks (prepare.py); the mode starts them with the RuntimeCommands and StepSettings the
step keeps for life (recorded in its record, so that a reload or a daemon upgrade changes
nothing for a running step); it ends with a StepResult.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

from nodestepd.config.ociconf import OciConf
from nodestepd.process.identity import Identity
from nodestepd.protocol.wire import STATUS_LAUNCH_FAILED
from nodestepd.step.env import runtime_env_for
from nodestepd.step.mpi import MpiSettings


class LaunchFailed(Exception):
    """The step could not start. The message is one sentence for the user; nothing is left behind."""


@dataclass(frozen=True)
class StepSpec:
    """Which step this is, whose, and what it runs: everything about it that outlives its launch."""

    job_id: int
    step_id: int
    ntasks: int
    identity: Identity  # from the caller's kernel-reported uid (or an operator's --user), never from the message
    bundle: str
    args: tuple[str, ...]
    workdir: str  # the caller's --chdir: %Z
    attached: bool
    # Per-task launches (docs/protocol.md): this launch's task ids start at task_offset;
    # None is a whole-step launch (task ids from 0).
    task_offset: int | None = None
    local_offset: int | None = None
    node_id: int | None = None
    container_id: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.job_id}.{self.step_id}"

    @property
    def first_task(self) -> int:
        return self.task_offset or 0

    @property
    def task_ids(self) -> range:
        return range(self.first_task, self.first_task + self.ntasks)


@dataclass(frozen=True)
class LaunchInput:
    """What only the launch needs from the request: used to prepare the spool, then dropped."""

    env: Mapping[str, str]  # the caller's environment for the container
    pty: bool
    config_json: str | None  # the bundle's config.json as read with the caller's (or the step user's) rights
    config_json_error: str | None  # why it could not be read
    preserve_fds: int = 0  # fds after stdio each container gets at 3.. (the runtime told --preserve-fds)


@dataclass(frozen=True)
class RuntimeCommands:
    """The oci.conf RunTime* patterns a step was started with: one frozen value, recorded,
    recovered and run. Exactly one mode fits (ociconf.py validates it): RunTimeRun, or
    RunTimeCreate + RunTimeStart + RunTimeQuery."""

    oci_conf: str  # where they came from, for the log
    run: str | None = None
    create: str | None = None
    start: str | None = None
    query: str | None = None
    kill: str | None = None
    delete: str | None = None

    @classmethod
    def of(cls, oci: OciConf) -> RuntimeCommands:
        return cls(oci.path, oci.runtime_run, oci.runtime_create, oci.runtime_start, oci.runtime_query,
                   oci.runtime_kill, oci.runtime_delete)

    @property
    def create_start(self) -> bool:
        return self.run is None

    @property
    def first(self) -> str:
        """The command that starts a task, under the task's monitor: RunTimeRun, or RunTimeCreate."""
        first = self.create if self.create_start else self.run
        assert first is not None  # one mode or the other, validated when oci.conf was loaded
        return first


@dataclass(frozen=True)
class StepSettings:
    """What a step keeps of the daemon's configuration for its whole life (and in its record)."""

    commands: RuntimeCommands
    kill_wait: float  # seconds between RunTimeKill and SIGKILL
    runtime_timeout: float  # bound on each RunTime* command, and on waiting for `created`
    keep_spool: bool  # DisableCleanup
    spool_dir: str  # resolved once: steps walk to it refusing every symlink
    node_name: str  # %n
    # The site's stage hooks (stage.py): absolute paths of programs run as the user, or None.
    stage_in: str | None = None
    stage_out: str | None = None


@dataclass(frozen=True)
class LaunchSettings:
    """What a launch takes from the configuration in force; built once per configuration
    (at start and at each reload), not per launch."""

    step: StepSettings
    oci: OciConf  # ContainerPath, MountSpoolDir, the environment rules, config.json handling
    runtime_env_base: Mapping[str, str]  # the daemon's environment as every runtime gets it (env.py)
    mpi: MpiSettings = MpiSettings()  # what MPI steps' containers get (mpi.py)

    def runtime_env(self, identity: Identity) -> dict[str, str]:
        """The environment a step's RunTime* commands get: the base, as the step's user."""
        return runtime_env_for(self.runtime_env_base, user=identity.user, home=identity.home, uid=identity.uid)


@dataclass(frozen=True)
class Stdio:
    """The caller's fds. The launch's first task gets stdin; the other tasks read /dev/null.

    task_outputs, when given, holds each task's own (stdout, stderr) in place of the
    shared pair (a detached step's output sent to the journal, one pipe pair per task).
    preserved: the caller's further fds, which every task's process gets at 3, 4, ...
    """

    stdin: int
    stdout: int
    stderr: int
    task_outputs: Mapping[int, tuple[int, int]] | None = None  # by task id
    preserved: tuple[int, ...] = ()  # fds every task gets at 3, 4, ... (run --preserve-fds)

    def outputs_for(self, task_id: int) -> tuple[int, int]:
        return self.task_outputs[task_id] if self.task_outputs is not None else (self.stdout, self.stderr)


@dataclass(frozen=True)
class StepResult:
    """status: the first non-zero known task status, else 0; None when no task failed
    but some task's status is unknown. A task's status is None when it never started
    or its status is not known: never a made-up 0."""

    status: int | None
    task_statuses: tuple[int | None, ...]
    cancelled: bool

    @classmethod
    def of(cls, statuses: tuple[int | None, ...], cancelled: bool) -> StepResult:
        return cls(step_status(statuses), statuses, cancelled)

    @classmethod
    def launch_failed(cls, ntasks: int, cancelled: bool = False) -> StepResult:
        return cls(STATUS_LAUNCH_FAILED, (None,) * ntasks, cancelled)


def step_status(statuses: tuple[int | None, ...] | list[int | None]) -> int | None:
    """The first non-zero known task status; else 0 if every status is known; else None (unknown)."""
    failed = next((s for s in statuses if s), None)
    if failed is not None:
        return failed
    return None if any(s is None for s in statuses) else 0


class Timings(Protocol):
    """Where a step marks its latency moments (daemon/metrics.py, under debug_timings)."""

    def spawned(self) -> None: ...  # may be called from a worker thread

    def exited(self) -> None: ...


class NoTimings:
    """debug_timings off: every mark is a no-op."""

    def spawned(self) -> None:
        pass

    def exited(self) -> None:
        pass
