"""`nodestepctl doctor`: find what will keep containers from running on this node.

Each check is a small function returning Check results (ok / warn / fail, what was
found, and the fix in one sentence). No daemon is needed: the settings come from the
daemon's TOML file and oci.conf, read the way the daemon reads them.

Who runs it: an ordinary user checks for themselves. root must name the user with
--user and every runtime command, `--version` probe and bundle read then runs as that
user (uid, gid, groups), exactly as the daemon would run it: nothing the user controls
ever runs as root.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nodestepd.step import configjson
from nodestepd.step import env as stepenv
from nodestepd.config.settings import ConfigError, DaemonConfig, load_config
from nodestepd.config.ociconf import OciConf, OciConfError, load_oci_conf
from nodestepd.config.patterns import PatternContext, expand
from nodestepd.process.spawn import SHELL, spawn
from nodestepd.process.identity import Identity
from nodestepd.step.runtime import RuntimeNotFound, find_program, shell_warnings

SYSCTL_DIR = "/proc/sys"
LINGER_DIR = "/var/lib/systemd/linger"
PROBE_TIMEOUT = 30.0  # seconds for `--version`
SEQUENCE_TIMEOUT = 60.0  # seconds for each command of the test sequence
# The test's container is named like a step's (%n.%u.%j.%s.%t): a job id neither Slurm
# (MaxJobId stays far below) nor the daemon (from 100000000 up) hands out, and the
# doctor's own pid as step id, so two doctors at once do not meet either.
DOCTOR_JOB_ID = 4294967000
MAX_OUTPUT = 1024 * 1024
RUN_ARGS = ("true",)
CREATE_START_ARGS = ("sleep", "60")  # runs long enough to be started, queried and killed


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    message: str  # what was found
    fix: str | None = None  # one sentence; None when there is nothing to do

    def line(self) -> str:
        message = self.message.replace("\n", "\n      ")
        text = f"{self.level.value:<4}  {self.name}: {message}"
        return text if self.fix is None else f"{text}\n      fix: {self.fix}"


def ok(name: str, message: str) -> Check:
    return Check(name, Level.OK, message)


def warn(name: str, message: str, fix: str) -> Check:
    return Check(name, Level.WARN, message, fix)


def fail(name: str, message: str, fix: str) -> Check:
    return Check(name, Level.FAIL, message, fix)


# ---- running things as the user ---------------------------------------------------------


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


# ---- the checks --------------------------------------------------------------------------

# (sysctl, the value containers need, why): the kernel settings the Slurm containers guide
# lists, and the namespace limit itself. A setting this kernel does not have is fine.
USERNS_SYSCTLS = (
    ("kernel.unprivileged_userns_clone", "1", "unprivileged user namespaces are switched off"),
    ("kernel.apparmor_restrict_unprivileged_userns", "0", "AppArmor restricts unprivileged user namespaces"),
    ("kernel.apparmor_restrict_unprivileged_unconfined", "0", "AppArmor restricts unconfined unprivileged processes"),
)


def check_user_namespaces(sysctl_dir: str = SYSCTL_DIR) -> list[Check]:
    name = "user namespaces"
    checks: list[Check] = []

    def read(key: str) -> str | None:
        try:
            with open(os.path.join(sysctl_dir, *key.split(".")), encoding="ascii") as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    limit = read("user.max_user_namespaces")
    if limit is not None and limit == "0":
        checks.append(fail(name, "user.max_user_namespaces is 0: nobody may create a user namespace",
                           "sysctl -w user.max_user_namespaces=15000 (and set it in /etc/sysctl.d)."))
    elif limit is not None:
        checks.append(ok(name, f"user.max_user_namespaces = {limit}"))
    for key, wanted, why in USERNS_SYSCTLS:
        value = read(key)
        if value is None:
            continue
        if value != wanted:
            checks.append(fail(name, f"{key} = {value}: {why}", f"sysctl -w {key}={wanted} (and set it in /etc/sysctl.d)."))
        else:
            checks.append(ok(name, f"{key} = {value}"))
    if not checks:
        checks.append(ok(name, "no sysctl restricts them on this kernel"))
    return checks


def check_settings(config_file: str | None, overrides: Mapping[str, object]) -> tuple[Check, DaemonConfig | None]:
    name = "daemon settings"
    try:
        config = load_config(config_file, overrides)
    except ConfigError as e:
        return fail(name, str(e), "correct the setting in the TOML file (see nodestepd(8))."), None
    where = config.config_file or "built-in defaults (no TOML file)"
    return ok(name, f"{where}; node name {config.node_name}"), config


def check_oci_conf(path: str) -> tuple[list[Check], OciConf | None]:
    name = "oci.conf"
    try:
        oci = load_oci_conf(path)
    except OciConfError as e:
        problems = "; ".join(str(p) for p in e.problems)
        return [fail(name, f"{path} is invalid: {problems}", f"run `nodestepctl check-config {path}` and fix each line.")], None
    mode = "run mode (RunTimeRun)" if oci.mode == "run" else "create/start mode (RunTimeCreate, RunTimeStart)"
    checks = [ok(name, f"{path} loads: {mode}")]
    for problem in shell_warnings(oci.patterns()):
        checks.append(warn(name, problem, "rewrite the command as the warning says."))
    return checks, oci


def sample_context(identity: Identity, node_name: str, *, bundle: str, rootfs: str, task_dir: str,
                   args: Sequence[str]) -> PatternContext:
    return PatternContext(
        args=tuple(args), bundle=bundle, env_file=os.path.join(task_dir, "environment"), job_id=DOCTOR_JOB_ID,
        step_dir=os.path.dirname(task_dir), node_name=node_name, pid=None, rootfs=rootfs, step_id=os.getpid(), task_id=0,
        user=identity.user, uid=identity.uid, workdir=identity.home or "/",
    )


def runtime_env(oci: OciConf, identity: Identity, base: Mapping[str, str]) -> dict[str, str]:
    return stepenv.runtime_environment(
        base, oci.runtime_env_exclude_re, user=identity.user, home=identity.home, uid=identity.uid
    )


def check_runtime_programs(oci: OciConf, identity: Identity, env: Mapping[str, str], node_name: str) -> list[Check]:
    """Every program a RunTime* command starts: found on the runtime's PATH, and `--version` runs as the user."""
    ctx = sample_context(identity, node_name, bundle="/nonexistent", rootfs="/nonexistent/rootfs",
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


def check_runtime_dir(identity: Identity, linger_dir: str = LINGER_DIR) -> list[Check]:
    name = "runtime dir"
    path = f"/run/user/{identity.uid}"
    checks: list[Check] = []
    fix = f"create it (install -d -m 0700 -o {identity.user} {path}) or enable lingering (loginctl enable-linger {identity.user})."
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        checks.append(fail(name, f"{path} does not exist (XDG_RUNTIME_DIR of the runtimes; runc keeps its state there)", fix))
    except PermissionError:
        checks.append(fail(name, f"{path} cannot be examined", fix))
    else:
        if not stat.S_ISDIR(st.st_mode):
            checks.append(fail(name, f"{path} is not a directory", fix))
        elif st.st_uid != identity.uid:
            owner = _user_name(st.st_uid)
            checks.append(fail(name, f"{path} is owned by {owner}, not {identity.user}",
                               f"chown {identity.user} {path}."))
        elif st.st_mode & 0o022:
            checks.append(fail(name, f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o})",
                               f"chmod 0700 {path}."))
        else:
            checks.append(ok(name, f"{path} exists, owned by {identity.user}"))
    if os.path.exists(os.path.join(linger_dir, identity.user)):
        checks.append(ok("lingering", f"on for {identity.user}: systemd keeps {path} between logins"))
    else:
        checks.append(warn("lingering", f"off for {identity.user}: systemd removes {path} when their last session ends",
                           f"loginctl enable-linger {identity.user}."))
    return checks


def check_daemon_dirs(config: DaemonConfig) -> list[Check]:
    """The spool and state dirs: the daemon (root) writes there, nobody else may."""
    checks = []
    for label, path in (("spool dir", config.spool_dir), ("state dir", config.state_dir)):
        checks.append(_check_daemon_dir(label, path))
    return checks


def _check_daemon_dir(label: str, path: str) -> Check:
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    # The daemon resolves the operator's own links (/var/run -> /run) once at start: judge the real path.
    existing = os.path.realpath(existing)
    for directory in _self_and_ancestors(existing):
        st = os.lstat(directory)
        writable_by_others = st.st_mode & 0o022 and not (st.st_mode & stat.S_ISVTX and directory != existing)
        if st.st_uid != 0 or writable_by_others:
            who = _user_name(st.st_uid)
            return fail(label, f"{directory} (owner {who}, mode {stat.S_IMODE(st.st_mode):04o}) can be changed by "
                        f"someone other than root, so {path} is not safe for the daemon",
                        f"chown root {directory} and chmod go-w {directory}.")
    if not os.path.lexists(path):
        return ok(label, f"{path} does not exist yet; the daemon creates it under {existing} at start")
    if os.geteuid() == 0 and os.statvfs(path).f_flag & os.ST_RDONLY:
        return fail(label, f"{path} is on a read-only file system", f"put {label} on a writable file system.")
    return ok(label, f"{path} is root's and not writable by others")


def _self_and_ancestors(path: str) -> Iterable[str]:
    path = os.path.abspath(path)
    while True:
        yield path
        if path == "/":
            return
        path = os.path.dirname(path)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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
    path = os.path.join(bundle, "config.json")
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
            config_path = os.path.join(task_dir, "config.json")
            fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
            with os.fdopen(fd, "wb") as f:
                f.write(configjson.config_json_bytes(rewritten))
        if oci.create_env_file != "disabled":
            fd = os.open(os.path.join(task_dir, "environment"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(stepenv.env_file_bytes({}, oci.create_env_file))
        _hand_over(work, identity)
        ctx = sample_context(identity, node_name, bundle=task_dir if info.config is not None else bundle,
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


# ---- the whole run -----------------------------------------------------------------------


@dataclass(frozen=True)
class DoctorOptions:
    user: str | None
    bundle: str | None
    config_file: str | None
    oci_conf: str | None
    args: tuple[str, ...] = ()
    sysctl_dir: str = SYSCTL_DIR
    linger_dir: str = LINGER_DIR


class DoctorUsageError(Exception):
    pass


def target_identity(user: str | None) -> Identity:
    """Whom to check for: root must name a user; anyone else is checked for themselves."""
    me = os.geteuid()
    if user is None:
        if me == 0:
            raise DoctorUsageError("as root, name the user to check for with --user NAME "
                                   "(doctor runs the runtimes as that user, never as root)")
        return Identity.for_uid(me)
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise DoctorUsageError(f"no user {user!r} on this node") from None
    if pw.pw_uid == 0:
        raise DoctorUsageError("doctor does not run runtimes as root; name the unprivileged user who runs steps")
    if me != 0 and pw.pw_uid != me:
        raise DoctorUsageError("only root can check for another user (it switches to them); run doctor as yourself")
    return Identity.for_uid(pw.pw_uid)


def run_doctor(options: DoctorOptions) -> list[Check]:
    identity = target_identity(options.user)
    checks = list(check_user_namespaces(options.sysctl_dir))
    overrides = {"oci_conf": options.oci_conf}
    settings, config = check_settings(options.config_file, overrides)
    checks.append(settings)
    if config is None:
        return checks
    oci_checks, oci = check_oci_conf(config.oci_conf)
    checks += oci_checks
    checks += check_runtime_dir(identity, options.linger_dir)
    checks += check_daemon_dirs(config)
    if oci is None:
        return checks
    env = runtime_env(oci, identity, os.environ)
    runtime_checks = check_runtime_programs(oci, identity, env, config.node_name)
    checks += runtime_checks
    if options.bundle is None:
        checks.append(warn("bundle", "no --bundle given: the bundle and the test outside Slurm were not checked",
                           "run doctor again with --bundle DIR."))
        return checks
    bundle = os.path.abspath(options.bundle)
    bundle_checks, info = check_bundle(oci, bundle, identity)
    checks += bundle_checks
    if info is None or any(c.level is Level.FAIL for c in runtime_checks) or oci.runtime_run is None and oci.runtime_create is None:
        checks.append(fail("test outside Slurm", "not run: fix the failures above first", "fix the failures above."))
        return checks
    checks += check_outside_slurm(oci, bundle, info, identity, env, config.node_name, options.args)
    return checks


def print_report(checks: Sequence[Check], *, as_json: bool = False) -> int:
    """Print the checks; 0 when nothing failed, else 1."""
    if as_json:
        print(json.dumps([{**dataclasses.asdict(c), "level": c.level.value} for c in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
        failed = sum(c.level is Level.FAIL for c in checks)
        warned = sum(c.level is Level.WARN for c in checks)
        print(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return 1 if any(c.level is Level.FAIL for c in checks) else 0
