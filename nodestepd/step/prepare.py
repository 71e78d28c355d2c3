"""Preparing a launch: the spool dirs, each task's config.json and environment file, and the
pattern context every RunTime* command of the task is expanded with.

In two parts, both blocking and run in a worker thread: plan() lays the launch out and
checks it without creating anything; the step records that plan, then create() makes the
spool. Either part either succeeds (after create, the spool created, written and handed
to the user) or LaunchFailed says why in one sentence and nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nodestepd.config.patterns import PatternContext, expand, shell_unsafe_value
from nodestepd.config.preservefds import PreserveFdsUnsupported, with_preserve_fds
from nodestepd.logs import BoundLogger
from nodestepd.process import asuser
from nodestepd.step import configjson, mpi
from nodestepd.step import env as stepenv
from nodestepd.step.configjson import BundleConfigError
from nodestepd.step.runtime import RuntimeNotFound, find_program
from nodestepd.step.spec import LaunchFailed, LaunchInput, LaunchSettings, RuntimeCommands, StepSpec
from nodestepd.step.layout import SpoolError, SpoolLayout, spool_layout
from nodestepd.step.spool import StepSpool
from nodestepd.step.statefiles import SpareFiles
from nodestepd.step.task import Task

ENV_FILE_NAME = "environment"
CONFIG_FILE_NAME = "config.json"


def task_context(
    *, args: Sequence[str], bundle: str, rootfs: str, rewritten_config: bool, job_id: int, step_id: int,
    task_id: int, node_name: str, user: str, uid: int, workdir: str, step_dir: str, task_dir: str,
    pid: int | None = None,
) -> PatternContext:
    """The values a task's patterns are expanded with (oci.conf's %-letters).

    With a rewritten config.json in the task dir, %b is the task dir (the runtime's bundle);
    with IgnoreFileConfigJson it is the user's bundle itself. The step, check-config and
    doctor all build their contexts here.
    """
    return PatternContext(
        args=tuple(args),
        bundle=task_dir if rewritten_config else bundle,
        env_file=os.path.join(task_dir, ENV_FILE_NAME),
        job_id=job_id,
        step_dir=step_dir,
        node_name=node_name,
        pid=pid,
        rootfs=rootfs,
        step_id=step_id,
        task_id=task_id,
        user=user,
        uid=uid,
        workdir=workdir,
    )


@dataclass
class Prepared:
    spool: StepSpool
    tasks: list[Task]  # each with its dir, context and pinned cwd; nothing started yet
    first_commands: list[str]  # per task: RunTimeRun, or RunTimeCreate, expanded
    rootfs: str = ""  # %r: the bundle's root.path made absolute (the bundle itself with IgnoreFileConfigJson)
    # The environment each task's files were written with, kept for a redirect() to write them again.
    step_envs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    mpi: MpiPlan | None = None  # an MPI step's (srun --mpi=pmix/pmi2): what its containers get


@dataclass(frozen=True)
class MpiPlan:
    """What an MPI step's tasks get (step/mpi.py): its PMIx/PMI2 interface, and for PMIx
    the user's subordinate ids its runtime maps to run the ranks as the user's own uid."""

    step: mpi.MpiStep
    own_uid: mpi.SubidRanges | None


@dataclass
class Plan:
    """A launch laid out and checked, with nothing on disk yet: the step records it (its
    layout and tasks) before create() makes anything, so that a daemon killed while the
    spool is being created leaves a record that names it (docs/restart.md)."""

    layout: SpoolLayout
    tasks: list[Task]  # each with its dir and context; no cwd until create()
    first_commands: list[str]
    rootfs: str
    bundle_config: dict | None  # None: the user's bundle is the runtime's (IgnoreFileConfigJson)
    step_envs: list[dict[str, str]]
    mpi: MpiPlan | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)  # for the step's log


def plan(
    spec: StepSpec, given: LaunchInput, settings: LaunchSettings, runtime_env: Mapping[str, str]
) -> Plan:
    """Lay out the step's spool and its tasks and check them; creates nothing. Blocking (the
    runtime is looked for as the user). Raises LaunchFailed."""
    oci, commands = settings.oci, settings.step.commands
    if given.pty and commands.create_start:
        raise LaunchFailed(
            f"--pty needs RunTimeRun: {oci.path} uses create/start, where the runtime would need a "
            "console socket to hand the terminal over"
        )
    bundle_config, rootfs = _bundle_config(spec, given, settings)

    def context(task_id: int, step_dir: str = "", task_dir: str = "") -> PatternContext:
        return task_context(
            args=spec.args, bundle=spec.bundle, rootfs=rootfs, rewritten_config=bundle_config is not None,
            job_id=spec.job_id, step_id=spec.step_id, task_id=task_id, node_name=settings.step.node_name,
            user=spec.identity.user, uid=spec.identity.uid, workdir=spec.workdir, step_dir=step_dir, task_dir=task_dir,
        )

    try:
        layout = spool_layout(
            container_path=oci.container_path,
            spool_dir=settings.step.spool_dir,
            expand=lambda pattern, task_id: expand(pattern, context(task_id)),
            job_id=spec.job_id,
            step_id=spec.step_id,
            ntasks=spec.ntasks,
            uid=spec.identity.uid,
            task_offset=spec.task_offset,
        )
    except SpoolError as e:
        raise LaunchFailed(str(e)) from None
    tasks = [
        Task(t, layout.task_dirs[i], context(t, layout.step_dir, layout.task_dirs[i]))
        for i, t in enumerate(spec.task_ids)
    ]
    _refuse_shell_unsafe_values(commands, tasks, bundle_is_users=bundle_config is None)
    first = _first_pattern(commands, given)
    first_commands = [expand(first, task.context) for task in tasks]
    try:
        find_program(first_commands[0], runtime_env, spec.identity)
    except RuntimeNotFound as e:
        raise LaunchFailed(str(e)) from None
    # Slurm's task variables first, then EnvExclude, as Slurm gives them to a task.
    step_envs = [
        stepenv.exclude_env({**given.env, **stepenv.slurm_task_env(_slurm_task(spec, task))}, oci.env_exclude_re)
        for task in tasks
    ]
    mpi_plan, warnings = _mpi_plan(spec, step_envs[0], settings, bundle_config)
    return Plan(layout, tasks, first_commands, rootfs, bundle_config, step_envs, mpi_plan, warnings)


def _mpi_plan(spec: StepSpec, env: Mapping[str, str], settings: LaunchSettings,
              bundle_config: dict | None) -> tuple[MpiPlan | None, list[str]]:
    """An MPI step's plan (None for any other step) and the warnings it gives. Blocking
    (reads /etc/subuid and /etc/subgid for a PMIx step). Raises LaunchFailed."""
    identity = spec.identity
    found = mpi.detect(env, job_id=spec.job_id, step_id=spec.step_id, uid=identity.uid)
    if found is None:
        return None, []
    if bundle_config is None:
        # IgnoreFileConfigJson: the site's runtime takes no config.json from us to add to.
        return None, [f"an MPI ({found.kind}) step with IgnoreFileConfigJson: its containers get no MPI mounts "
                      "or uid mapping from nodestepd"]
    try:
        warnings = mpi.network_warnings(bundle_config, settings.mpi)
    except mpi.MpiError as e:
        raise LaunchFailed(str(e)) from None
    ranges = None
    if mpi.needs_own_uid(found, settings.mpi, identity.uid):
        if settings.step.commands.create_start:
            raise LaunchFailed(mpi.CREATE_START_OWN_UID)
        ranges = mpi.read_subid_ranges(identity.user, identity.uid)
        if ranges is None:
            raise LaunchFailed(
                f"a PMIx step must run as {identity.user}'s own uid in its containers, which takes subordinate "
                f"uids and gids of {identity.user}'s in /etc/subuid and /etc/subgid: there are none (the site "
                "adds them, or sets mpi_user_namespace = \"never\")")
    return MpiPlan(found, ranges), warnings



def create(
    planned: Plan, spec: StepSpec, given: LaunchInput, settings: LaunchSettings, log: BoundLogger,
    spares: SpareFiles | None = None,
) -> Prepared:
    """Create, fill and hand over the planned spool. Blocking. Raises LaunchFailed, leaving
    nothing. spares: directories and files made ahead, for the spool to take (StepSpool.create)."""
    layout, tasks = planned.layout, planned.tasks
    try:
        spool = StepSpool.create(layout, spec.identity.uid, spec.identity.gid, spares)
    except SpoolError as e:
        raise LaunchFailed(str(e)) from None
    try:
        for i, (task, step_env) in enumerate(zip(tasks, planned.step_envs)):
            task.cwd = spool.task_dir_pinned(i)
            _write_task_files(spool, i, task, spec, given, settings, planned.bundle_config, step_env, layout.step_dir,
                              planned.mpi)
        spool.hand_over()
        spool.created_dirs()  # read now, while nothing else can have moved them
    except Exception as e:
        try:
            spool.remove()
        except SpoolError as cleanup:
            log.error("spool dir could not be removed after a failed launch", error=str(cleanup))
        if isinstance(e, (BundleConfigError, ValueError, mpi.MpiError)):
            raise LaunchFailed(str(e)) from None
        raise LaunchFailed(f"cannot prepare the spool dir {layout.step_dir}: {e}") from None
    return Prepared(spool, tasks, planned.first_commands, planned.rootfs, planned.step_envs, planned.mpi)


# The largest config.json a redirected bundle may have: the largest a client may send.
MAX_CONFIG_JSON_BYTES = 16 << 20


def redirect_to(spec: StepSpec, given: LaunchInput, settings: LaunchSettings, prepared: Prepared,
                bundle: str) -> tuple[StepSpec, Prepared]:
    """Point a prepared launch at `bundle` (a stage_in hook's choice) as if the user had
    given it: its config.json is read by a helper running as the step's user (asuser.py),
    never by root, and the launch is prepared again from it (redirect). Blocking.
    Returns the step's new spec and launch; raises LaunchFailed."""
    spec = dataclasses.replace(spec, bundle=bundle)
    config_json = config_json_error = None
    if not settings.oci.ignore_file_config_json:
        path = os.path.join(bundle, CONFIG_FILE_NAME)
        try:
            [opened] = asuser.open_as(spec.identity, [path], [], timeout=settings.step.runtime_timeout)
        except OSError as e:
            raise LaunchFailed(f"cannot read {path} as {spec.identity.user}: {e}") from None
        if opened.fd is None:
            config_json_error = opened.error
        else:
            config_json, config_json_error = asuser.read_regular(opened, MAX_CONFIG_JSON_BYTES)
    given = dataclasses.replace(given, config_json=config_json, config_json_error=config_json_error)
    return spec, redirect(prepared, spec, given, settings)


def redirect(prepared: Prepared, spec: StepSpec, given: LaunchInput, settings: LaunchSettings) -> Prepared:
    """The prepared launch pointed at another bundle (a stage_in hook's `bundle=`): spec
    names the new bundle, given carries its config.json as read as the step's user.

    Exactly what a launch with that bundle would get: the task files written again from
    its config.json (the old ones unlinked through the task dirs' fds), %b and %r, the
    shell check of the user's values and the first commands. The spool itself, and what
    the hook put in it, stay. Blocking: call it in a worker thread. Raises LaunchFailed;
    the spool is the step's to remove then (it is the step's since create())."""
    bundle_config, rootfs = _bundle_config(spec, given, settings)
    for task in prepared.tasks:
        bundle = task.context.bundle if bundle_config is not None else spec.bundle
        task.context = dataclasses.replace(task.context, bundle=bundle, rootfs=rootfs)
    commands = settings.step.commands
    _refuse_shell_unsafe_values(commands, prepared.tasks, bundle_is_users=bundle_config is None)
    first = _first_pattern(commands, given)
    mpi_plan, _ = _mpi_plan(spec, prepared.step_envs[0], settings, bundle_config)
    first_commands = [expand(first, task.context) for task in prepared.tasks]
    spool = prepared.spool
    try:
        for i, (task, step_env) in enumerate(zip(prepared.tasks, prepared.step_envs)):
            for name in (CONFIG_FILE_NAME, ENV_FILE_NAME):
                spool.remove_task_file(i, name)
            _write_task_files(spool, i, task, spec, given, settings, bundle_config, step_env, spool.layout.step_dir,
                              mpi_plan)
    except (BundleConfigError, ValueError, mpi.MpiError) as e:
        raise LaunchFailed(str(e)) from None
    except (SpoolError, OSError) as e:
        raise LaunchFailed(f"cannot prepare the spool dir {spool.layout.step_dir} again: {e}") from None
    return Prepared(spool, prepared.tasks, first_commands, rootfs, prepared.step_envs, mpi_plan)


def _write_task_files(
    spool: StepSpool, index: int, task: Task, spec: StepSpec, given: LaunchInput, settings: LaunchSettings,
    bundle_config: dict | None, step_env: Mapping[str, str], step_dir: str, mpi_plan: MpiPlan | None = None,
) -> None:
    oci = settings.oci
    container_env = step_env
    if bundle_config is not None:
        mount = (step_dir, expand(oci.mount_spool_dir, task.context)) if oci.mount_spool_dir else None
        rewritten = configjson.rewrite_config(
            bundle_config,
            bundle=spec.bundle,
            terminal=given.pty,
            args=spec.args,
            step_env=step_env,
            mount_spool=mount,
            disable_hooks=oci.disable_hooks,
        )
        if mpi_plan is not None:
            rewritten, _ = mpi.rewrite_config(rewritten, mpi_plan.step, settings.mpi, uid=spec.identity.uid,
                                              gid=spec.identity.gid, own_uid=mpi_plan.own_uid is not None)
        spool.write_task_file(index, CONFIG_FILE_NAME, configjson.config_json_bytes(rewritten), 0o750)
        container_env = _env_dict(rewritten["process"].get("env", []))
    if oci.create_env_file != "disabled":
        data = stepenv.env_file_bytes(container_env, oci.create_env_file)
        spool.write_task_file(index, ENV_FILE_NAME, data, 0o600)


def _first_pattern(commands: RuntimeCommands, given: LaunchInput) -> str:
    """RunTimeRun or RunTimeCreate, told `--preserve-fds N` when the launch passes fds."""
    try:
        return with_preserve_fds(commands.first, given.preserve_fds,
                                 "RunTimeCreate" if commands.create_start else "RunTimeRun")
    except PreserveFdsUnsupported as e:
        raise LaunchFailed(f"{e} ({commands.oci_conf})") from None


def _refuse_shell_unsafe_values(commands: RuntimeCommands, tasks: Sequence[Task], *, bundle_is_users: bool) -> None:
    """Every RunTime* command is checked now, before anything exists: a value the user chose
    that the shell would act on must never reach /bin/sh, not even in a later RunTimeDelete."""
    patterns = {
        "RunTimeRun": commands.run, "RunTimeCreate": commands.create, "RunTimeStart": commands.start,
        "RunTimeQuery": commands.query, "RunTimeKill": commands.kill, "RunTimeDelete": commands.delete,
    }
    for key, pattern in patterns.items():
        if pattern is None:
            continue
        for task in tasks:
            problem = shell_unsafe_value(pattern, task.context, bundle_is_users=bundle_is_users)
            if problem is not None:
                raise LaunchFailed(f"{key} of {commands.oci_conf} cannot be run: {problem}")


def _slurm_task(spec: StepSpec, task: Task) -> stepenv.SlurmTask:
    local_first = spec.local_offset if spec.local_offset is not None else spec.first_task
    return stepenv.SlurmTask(
        job_id=spec.job_id,
        step_id=spec.step_id,
        task_id=task.task_id,
        local_id=local_first + task.task_id - spec.first_task,
        node_id=spec.node_id,
        container=spec.bundle,
        container_id=spec.container_id,
    )


def _bundle_config(spec: StepSpec, given: LaunchInput, settings: LaunchSettings) -> tuple[dict | None, str]:
    """The bundle's config.json (None when the site ignores it) and the rootfs path (%r)."""
    if settings.oci.ignore_file_config_json:
        return None, spec.bundle
    path = os.path.join(spec.bundle, CONFIG_FILE_NAME)
    if given.config_json_error is not None:
        raise LaunchFailed(f"cannot read {path}: {given.config_json_error}")
    if given.config_json is None:
        raise LaunchFailed(f"cannot read {path}: the request did not include it")
    try:
        config = configjson.parse_bundle_config(given.config_json, spec.bundle)
        return config, configjson.rootfs_path(config, spec.bundle)
    except BundleConfigError as e:
        raise LaunchFailed(str(e)) from None


def _env_dict(entries: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries:
        name, eq, value = entry.partition("=")
        if eq:
            env[name] = value
    return env
