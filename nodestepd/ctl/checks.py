"""The doctor's checks that only read the node: the kernel's user-namespace settings, the
daemon's settings and oci.conf (read as the daemon reads them), the user's runtime dir,
the daemon's directories. Each is a small function returning Check results: ok / warn /
fail, what was found, and the fix in one sentence."""

from __future__ import annotations

import enum
import os
import pwd
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nodestepd.config.ociconf import OciConf, OciConfError, load_oci_conf
from nodestepd.config.settings import ConfigError, DaemonConfig, load_config
from nodestepd.config.trust import hook_problem, untrusted_dir_reason
from nodestepd.process.identity import Identity
from nodestepd.step.runtime import shell_warnings

SYSCTL_DIR = "/proc/sys"
LINGER_DIR = "/var/lib/systemd/linger"


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


def check_container_path(oci: OciConf) -> list[Check]:
    """ContainerPath's fixed part (up to its first %-letter): a launch refuses any existing
    parent of a step dir that someone other than root could change (issue 19.1)."""
    if not oci.container_path:
        return []
    name = "ContainerPath"
    parts = [p for p in oci.container_path.split("/") if p]
    fixed: list[str] = []
    for part in parts:
        if "%" in part:
            break
        fixed.append(part)
    # Without letters the path itself holds the step dirs, so even a sticky dir will not do.
    whole = len(fixed) == len(parts)
    chain = ["/"] + ["/" + "/".join(fixed[:i]) for i in range(1, len(fixed) + 1)]
    fix = "make it root's and not writable by group or others, or point ContainerPath at a directory that is."
    for i, directory in enumerate(chain):
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            break  # created at launch, root's
        except OSError as e:
            return [warn(name, f"{directory} cannot be examined: {e.strerror}", "run doctor as root.")]
        if stat.S_ISLNK(st.st_mode):
            return [fail(name, f"{directory} is a symbolic link, which every launch refuses to follow", fix)]
        reason = untrusted_dir_reason(directory, st.st_uid, st.st_mode, last=whole and i == len(chain) - 1)
        if reason is not None:
            return [fail(name, f"{reason}: every launch under ContainerPath {oci.container_path} would be refused, "
                               "since another user could swap the step dirs there", fix)]
    return [ok(name, f"the existing directories of {oci.container_path} are root's and not writable by others")]


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


# The image cache (`nodestepctl run --image`): where it goes unless the settings say, and
# the free space below which doctor warns (an HPC image is easily a few GiB unpacked).
IMAGE_CACHE_MIN_FREE = 2 << 30


def check_image_cache(config: DaemonConfig) -> list[Check]:
    """The image cache dir: root's and not writable by others, like the daemon's own dirs, with room for images."""
    path = config.image_cache_dir
    label = "image cache"
    owner = _check_daemon_dir(label, path)
    if owner.level is not Level.OK:
        return [owner]
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    try:
        fs = os.statvfs(existing)
    except OSError as e:
        return [owner, warn(label, f"the free space under {existing} cannot be read: {e.strerror}", "run doctor as root.")]
    return [owner, image_cache_space(path, fs.f_bavail * fs.f_frsize)]


def image_cache_space(path: str, free: int) -> Check:
    gib = free / (1 << 30)
    if free < IMAGE_CACHE_MIN_FREE:
        return warn("image cache", f"{gib:.1f} GiB free on the file system of {path}: images may not fit",
                    "free some space there, or set image_cache_dir to a larger file system.")
    return ok("image cache", f"{gib:.1f} GiB free on the file system of {path}")


def check_stage_hooks(config: DaemonConfig, identity: Identity) -> list[Check]:
    """stage_in and stage_out: executable, by the user too, and root's alone (the daemon refuses them otherwise)."""
    checks = []
    for setting in ("stage_in", "stage_out"):
        path = getattr(config, setting)
        name = setting
        if not path:
            checks.append(ok(name, "not set"))
            continue
        problem = hook_problem(path)
        if problem is not None:
            checks.append(fail(name, f"{path} cannot be used: {problem}; the daemon refuses to start with it",
                               "install it as a root-owned executable (chown root, chmod 0755) in a directory only "
                               "root may write."))
        elif not _executable_by(os.stat(path), identity):
            checks.append(fail(name, f"{path} is not executable by {identity.user}: every launch of theirs would fail",
                               f"chmod o+x {path} (or make it executable by a group {identity.user} is in)."))
        else:
            checks.append(ok(name, f"{path} is root's, executable, and runs as {identity.user} at every launch"))
    return checks


def _executable_by(st: os.stat_result, identity: Identity) -> bool:
    """The kernel's execute check for a user (owner, then group, then other bits)."""
    if st.st_uid == identity.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == identity.gid or st.st_gid in identity.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


# What srun gives an MPI task, which the container must get unchanged (step/mpi.py).
MPI_ENV_SAMPLE = {
    "PMIX_NAMESPACE": "slurm.pmix.1.0", "PMIX_RANK": "0", "PMIX_SERVER_URI4": "pmix-server.1;tcp4://127.0.0.1:1",
    "PMIX_SERVER_TMPDIR": "/var/spool/slurmd/pmix.1.0/", "PMI_FD": "3", "PMI_RANK": "0", "PMI_SIZE": "1",
    "PMI_JOBID": "1.0", "SLURM_JOBID": "1", "SLURM_STEP_ID": "0", "SLURM_NODELIST": "node1",
}


def check_mpi(config: DaemonConfig, oci: OciConf, identity: Identity, bundle_config: dict | None,
              subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> list[Check]:
    """What would cut `srun --mpi=pmix|pmi2 nodestepctl run` off (docs/admin-guide.md#mpi):
    EnvExclude dropping srun's PMIx/PMI2 variables, a runtime that cannot be passed the PMI2
    fd, PMIx ranks left as uid 0 (mpi_user_namespace = never) or without the subordinate ids
    that make them the user's own uid, and a bundle with its own network namespace."""
    from nodestepd.config.preservefds import PreserveFdsUnsupported, with_preserve_fds
    from nodestepd.step import mpi

    name = "MPI"
    checks: list[Check] = []
    if oci.env_exclude_re is not None:
        cut = sorted(n for n, v in MPI_ENV_SAMPLE.items() if oci.env_exclude_re.match(f"{n}={v}"))
        if cut:
            checks.append(warn(name, f"EnvExclude of {oci.path} drops what srun gives MPI tasks: {', '.join(cut)}",
                               "leave PMIX_*, PMI_* and SLURM_* out of EnvExclude."))
    first = oci.runtime_run if oci.runtime_run is not None else oci.runtime_create
    if first is not None:
        try:
            with_preserve_fds(first, 1)
        except PreserveFdsUnsupported as e:
            checks.append(warn(name, f"srun --mpi=pmi2 cannot work: {e}",
                               "use runc or crun for MPI steps (their run/create pass the PMI2 fd into the container)."))
    if config.mpi_user_namespace == "never":
        uid = ((bundle_config or {}).get("process") or {}).get("user", {}).get("uid", 0)
        if uid == 0:
            checks.append(warn(name, "mpi_user_namespace = \"never\": PMIx ranks run as uid 0 in the container, and "
                                     "Slurm's PMIx server rejects every one (Open MPI: \"Unreachable\")",
                               "set mpi_user_namespace = \"auto\" (the default)."))
    elif oci.runtime_run is None:
        checks.append(warn(name, f"srun --mpi=pmix steps are refused: {mpi.CREATE_START_OWN_UID}",
                           "use RunTimeRun (run mode) in oci.conf."))
    elif identity.uid != 0 and mpi.read_subid_ranges(identity.user, identity.uid, subuid, subgid) is None:
        checks.append(warn(name, f"{identity.user} has no subordinate uids and gids in {subuid} and {subgid}: "
                                 "srun --mpi=pmix steps are refused (their ranks must run as the user's own uid)",
                           f"give {identity.user} a range in both (usermod --add-subuids/--add-subgids)."))
    if bundle_config is not None and mpi.has_own_network_namespace(bundle_config):
        level = fail if config.mpi_network_namespace == "refuse" else warn
        checks.append(level(name, "the bundle has its own network namespace: MPI steps "
                                  + ("are refused" if config.mpi_network_namespace == "refuse" else
                                     "cannot reach Slurm's PMIx server on the host's loopback"),
                            "remove the \"network\" namespace from the bundle's linux.namespaces."))
    if not checks:
        checks.append(ok(name, "srun --mpi=pmix and --mpi=pmi2 steps get what they need"))
    return checks
