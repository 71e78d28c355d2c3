"""The doctor's checks that run things as the user, exactly as the daemon would run them:
each runtime program's `--version`, the bundle read with the user's rights, and the
guide's "test outside Slurm" (the configured RunTime* commands in order, on the bundle).
Nothing the user controls ever runs as root."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nodestepd.config.ociconf import OciConf
from nodestepd.config.patterns import PatternContext, expand
from nodestepd.ctl.checks import Check, fail, ok, warn
from nodestepd.process.identity import Identity
from nodestepd.process.spawn import SHELL, spawn
from nodestepd.step import configjson
from nodestepd.step import env as stepenv
from nodestepd.step.prepare import CONFIG_FILE_NAME, ENV_FILE_NAME, task_context
from nodestepd.step.runtime import RuntimeNotFound, find_program

PROBE_TIMEOUT = 30.0  # seconds for `--version`
SEQUENCE_TIMEOUT = 60.0  # seconds for each command of the test sequence
# The test's container is named like a step's (%n.%u.%j.%s.%t): a job id neither Slurm
# (MaxJobId stays far below) nor the daemon (from 100000000 up) hands out, and the
# doctor's own pid as step id, so two doctors at once do not meet either.
DOCTOR_JOB_ID = 4294967000
MAX_OUTPUT = 1024 * 1024
RUN_ARGS = ("true",)
CREATE_START_ARGS = ("sleep", "60")  # runs long enough to be started, queried and killed


@dataclass(frozen=True)
class Outcome:
    status: int  # exit status, 128+N for signal N, or -1 when it could not be started
    output: str  # stdout and stderr, trimmed


def run_as(identity: Identity, argv: Sequence[str], *, env: Mapping[str, str], cwd: str, timeout: float) -> Outcome:
    """Run argv as the user (switching only when we are root) in its own process group."""
    as_user = None
    if os.geteuid() == 0:
        if identity.uid == 0:
            raise ValueError("doctor never runs runtime commands as root")
        as_user = identity
    # A file, not a pipe: a runtime's container may keep the output open after the runtime exits.
    with tempfile.TemporaryFile() as out:
        try:
            watch = spawn(list(argv), identity=as_user, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=out.fileno(), stderr=out.fileno(), process_group=True)
        except OSError as e:
            return Outcome(-1, f"cannot start {argv[0]}: {e.strerror or e}")
        status = watch.wait_blocking(timeout)
        if status is None:
            watch.kill_group(signal.SIGKILL)
            watch.wait_blocking(None)
            watch.reap()
            return Outcome(-1, f"timed out after {timeout:g} s; killed")
        watch.reap()
        out.seek(0)
        text = out.read(MAX_OUTPUT).decode("utf-8", "replace").strip()
    return Outcome(status, text)


def run_shell_as(identity: Identity, command: str, *, env: Mapping[str, str], cwd: str, timeout: float) -> Outcome:
    return run_as(identity, [SHELL, "-c", command], env=env, cwd=cwd, timeout=timeout)


def sample_context(identity: Identity, node_name: str, *, bundle: str, rootfs: str, task_dir: str,
                   args: Sequence[str], rewritten_config: bool) -> PatternContext:
    """A task's pattern context (step/prepare.py task_context) for the doctor's own job id."""
    return task_context(
        args=args, bundle=bundle, rootfs=rootfs, rewritten_config=rewritten_config, job_id=DOCTOR_JOB_ID,
        step_id=os.getpid(), task_id=0, node_name=node_name, user=identity.user, uid=identity.uid,
        workdir=identity.home or "/", step_dir=os.path.dirname(task_dir), task_dir=task_dir,
    )


def runtime_env(oci: OciConf, identity: Identity, base: Mapping[str, str]) -> dict[str, str]:
    return stepenv.runtime_environment(
        base, oci.runtime_env_exclude_re, user=identity.user, home=identity.home, uid=identity.uid
    )


def check_runtime_programs(oci: OciConf, identity: Identity, env: Mapping[str, str], node_name: str) -> list[Check]:
    """Every program a RunTime* command starts: found on the runtime's PATH, and `--version` runs as the user."""
    ctx = sample_context(identity, node_name, bundle="/nonexistent", rootfs="/nonexistent/rootfs", rewritten_config=False,
                         task_dir="/nonexistent/task-0", args=RUN_ARGS)
    checks: list[Check] = []
    programs: dict[str, list[str]] = {}  # program -> the keys that start it
    missing: dict[str, list[str]] = {}  # why -> the keys
    for key, pattern in oci.patterns().items():
        if not key.startswith("RunTime"):
            continue
        try:
            program = find_program(expand(pattern, ctx), env, identity)
        except RuntimeNotFound as e:
            missing.setdefault(str(e), []).append(key)
            continue
        if program is not None:  # None: a shell builtin or shell syntax, which the shell itself runs
            programs.setdefault(program, []).append(key)
    for why, keys in missing.items():
        checks.append(fail(f"runtime of {', '.join(keys)}", why, f"install it, or give its full path in {keys[0]}."))
    for program, keys in programs.items():
        name = f"runtime {program}"
        result = run_as(identity, [program, "--version"], env=env, cwd="/", timeout=PROBE_TIMEOUT)
        first = result.output.splitlines()[0] if result.output else "(no output)"
        if result.status != 0:
            checks.append(fail(name, f"`{program} --version` as {identity.user} failed (status {result.status}): {first}",
                               f"make {program} work for {identity.user} outside nodestepd first."))
        else:
            checks.append(ok(name, f"{first} (for {', '.join(keys)})"))
    return checks


# The image tools `nodestepctl run --image` runs as the user: skopeo copies an image into
# the cache, umoci unpacks it into a bundle. umoci before 0.5 cannot unpack zstd layers.
IMAGE_TOOLS = ("skopeo", "umoci")
UMOCI_ZSTD = (0, 5)


def check_image_tools(identity: Identity, env: Mapping[str, str]) -> list[Check]:
    """skopeo and umoci: found on the runtime's PATH, and `--version` runs as the user."""
    checks = []
    for tool in IMAGE_TOOLS:
        name = f"image tool {tool}"
        program = shutil.which(tool, path=env.get("PATH", os.defpath))
        if program is None:
            checks.append(warn(name, f"{tool} is not found in PATH={env.get('PATH', os.defpath)}: "
                                     "`nodestepctl run --image` cannot work", f"apt-get install {tool}."))
            continue
        result = run_as(identity, [program, "--version"], env=env, cwd="/", timeout=PROBE_TIMEOUT)
        first = result.output.splitlines()[0] if result.output else "(no output)"
        if result.status != 0:
            checks.append(fail(name, f"`{program} --version` as {identity.user} failed (status {result.status}): {first}",
                               f"make {program} work for {identity.user} first."))
            continue
        version = tool_version(first)
        if tool == "umoci" and version is not None and version < UMOCI_ZSTD:
            checks.append(warn(name, f"{first}: umoci before 0.5 cannot unpack zstd-compressed layers, so images "
                                     "that use them cannot be run", "install umoci 0.5 or later for such images."))
        elif version is None:
            checks.append(warn(name, f"{first}: not a version doctor understands", f"check that {program} is {tool}."))
        else:
            checks.append(ok(name, f"{first} ({program})"))
    return checks


def tool_version(line: str) -> tuple[int, ...] | None:
    """(major, minor) from a `NAME version X.Y.Z...` line, or None."""
    match = re.search(r"\bversion v?(\d+)\.(\d+)", line)
    return (int(match[1]), int(match[2])) if match else None


@dataclass(frozen=True)
class BundleInfo:
    config: dict | None  # None when the site ignores config.json
    rootfs: str


def check_bundle(oci: OciConf, bundle: str, identity: Identity) -> tuple[list[Check], BundleInfo | None]:
    """The bundle as the user sees it: config.json (read as the user) parses, and its rootfs exists."""
    name = "bundle"
    fix_bundle = f"make {bundle} an OCI bundle {identity.user} can read (config.json and rootfs; `runc spec --rootless`)."
    if not os.path.isabs(bundle):
        bundle = os.path.abspath(bundle)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if oci.ignore_file_config_json:
        test = run_as(identity, ["test", "-d", bundle], env=env, cwd="/", timeout=PROBE_TIMEOUT)
        if test.status != 0:
            return [fail(name, f"{bundle} is not a directory {identity.user} can reach", fix_bundle)], None
        return [ok(name, f"{bundle} (IgnoreFileConfigJson: config.json is not read; %r is the bundle)")], BundleInfo(None, bundle)
    path = os.path.join(bundle, CONFIG_FILE_NAME)
    read = run_as(identity, ["cat", "--", path], env=env, cwd="/", timeout=PROBE_TIMEOUT)
    if read.status != 0:
        return [fail(name, f"{identity.user} cannot read {path}: {read.output}", fix_bundle)], None
    try:
        config = configjson.parse_bundle_config(read.output, bundle)
        rootfs = configjson.rootfs_path(config, bundle)
    except configjson.BundleConfigError as e:
        return [fail(name, str(e), f"fix {path} (`runc spec --rootless` writes a valid one).")], None
    test = run_as(identity, ["test", "-d", rootfs], env=env, cwd="/", timeout=PROBE_TIMEOUT)
    if test.status != 0:
        return [fail(name, f"the rootfs {rootfs} (root.path of {path}) is not a directory {identity.user} can reach",
                     "unpack the image there, or point root.path at it.")], None
    return [ok(name, f"{path} parses; rootfs {rootfs} exists")], BundleInfo(config, rootfs)


def check_outside_slurm(
    oci: OciConf, bundle: str, info: BundleInfo, identity: Identity, env: Mapping[str, str], node_name: str,
    args: Sequence[str] | None = None,
) -> list[Check]:
    """The guide's "test outside Slurm": the configured commands, in order, as the user, on the bundle.

    Run mode: RunTimeRun, then RunTimeDelete. Create/start mode: RunTimeCreate,
    RunTimeStart, RunTimeQuery, RunTimeKill, RunTimeDelete. Reports the first command that
    fails with the runtime's own message; RunTimeDelete runs at the end whatever happened.
    """
    name = "test outside Slurm"
    run_mode = oci.runtime_run is not None
    args = tuple(args) if args else (RUN_ARGS if run_mode else CREATE_START_ARGS)
    # Root-owned 0700 while we write into it, then handed to the user.
    work = tempfile.mkdtemp(prefix="nodestepd-doctor-")
    try:
        task_dir = os.path.join(work, "task-0")
        os.mkdir(task_dir, 0o700)
        if info.config is not None:
            rewritten = configjson.rewrite_config(
                info.config, bundle=os.path.abspath(bundle), terminal=False, args=args, step_env={},
                mount_spool=None, disable_hooks=oci.disable_hooks,
            )
            config_path = os.path.join(task_dir, CONFIG_FILE_NAME)
            fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
            with os.fdopen(fd, "wb") as f:
                f.write(configjson.config_json_bytes(rewritten))
        if oci.create_env_file != "disabled":
            fd = os.open(os.path.join(task_dir, ENV_FILE_NAME), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(stepenv.env_file_bytes({}, oci.create_env_file))
        _hand_over(work, identity)
        ctx = sample_context(identity, node_name, bundle=bundle, rewritten_config=info.config is not None,
                             rootfs=info.rootfs, task_dir=task_dir, args=args)
        sequence = [("RunTimeRun", oci.runtime_run)] if run_mode else [
            ("RunTimeCreate", oci.runtime_create), ("RunTimeStart", oci.runtime_start),
            ("RunTimeQuery", oci.runtime_query), ("RunTimeKill", oci.runtime_kill),
        ]
        done: list[str] = []
        failed: Check | None = None
        kill_warning: Check | None = None
        for key, pattern in sequence:
            if pattern is None:
                continue
            if "%p" in pattern and key in ("RunTimeKill", "RunTimeQuery"):
                # %p is the container's first process; without one to name, skip rather than guess a pid.
                continue
            command = expand(pattern, ctx)
            result = run_shell_as(identity, command, env=env, cwd=task_dir, timeout=SEQUENCE_TIMEOUT)
            if result.status != 0 and key == "RunTimeKill":
                # Steps still work: nodestepd then SIGKILLs the container's init at once. But
                # a cancelled container gets no chance to stop gracefully.
                kill_warning = warn(
                    name, f"RunTimeKill failed (status {result.status}): {command}\n"
                    f"runtime said: {result.output or '(nothing)'}\n"
                    "nodestepd then kills the container's init with SIGKILL at once: no graceful stop",
                    "make that command work as the user (runc's `kill -a` needs the cgroup freezer; "
                    "plain `kill` does not).")
                continue
            if result.status != 0:
                failed = fail(name, f"{key} failed (status {result.status}): {command}\n"
                              f"runtime said: {result.output or '(nothing)'}",
                              f"run that command as {identity.user} by hand and fix what the runtime reports.")
                break
            done.append(key)
        delete = oci.runtime_delete
        if delete is not None and "%p" not in delete:
            result = run_shell_as(identity, expand(delete, ctx), env=env, cwd=task_dir, timeout=SEQUENCE_TIMEOUT)
            if result.status == 0:
                done.append("RunTimeDelete")
            # In run mode the runtime has usually removed the container itself already, so a
            # failing delete says nothing (the daemon, too, only logs it).
            elif failed is None and not run_mode:
                failed = fail(name, f"RunTimeDelete failed (status {result.status}): {expand(delete, ctx)}\n"
                              f"runtime said: {result.output or '(nothing)'}",
                              f"run that command as {identity.user} by hand and fix what the runtime reports.")
        if failed is not None:
            return [failed]
        passed = ok(name, f"{', '.join(done)} succeeded as {identity.user} with {' '.join(args)!r} in {bundle}")
        return [passed] if kill_warning is None else [passed, kill_warning]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _hand_over(work: str, identity: Identity) -> None:
    if os.geteuid() != 0:
        return
    for root, dirs, files in os.walk(work):
        for entry in (root, *(os.path.join(root, n) for n in files)):
            os.chown(entry, identity.uid, identity.gid, follow_symlinks=False)
