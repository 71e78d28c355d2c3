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
import json
import os
import pwd
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from nodestepd.ctl.checks import (
    LINGER_DIR,
    SYSCTL_DIR,
    Check,
    Level,
    check_container_path,
    check_daemon_dirs,
    check_image_cache,
    check_mpi,
    check_oci_conf,
    check_runtime_dir,
    check_settings,
    check_stage_hooks,
    check_user_namespaces,
    fail,
    warn,
)
from nodestepd.ctl.engineconf import PROXY_NAME, check_engine_configs
from nodestepd.ctl.probes import (
    check_bundle,
    check_image_tools,
    check_outside_slurm,
    check_runtime_programs,
    runtime_env,
)
from nodestepd.process.identity import Identity


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
    # The user's own environment says where their engines' files are; root checking for
    # --user has only the user's home to go by.
    checks += check_engine_configs(identity, os.environ if os.geteuid() != 0 else {}, installed_proxy())
    checks += check_daemon_dirs(config)
    checks += check_image_cache(config)
    checks += check_stage_hooks(config, identity)
    if oci is not None:
        checks += check_container_path(oci)
    if oci is None:
        return checks
    env = runtime_env(oci, identity, os.environ)
    runtime_checks = check_runtime_programs(oci, identity, env, config.node_name)
    checks += runtime_checks
    checks += check_image_tools(identity, env)
    if options.bundle is None:
        checks += check_mpi(config, oci, identity, None)
        checks.append(warn("bundle", "no --bundle given: the bundle and the test outside Slurm were not checked",
                           "run doctor again with --bundle DIR."))
        return checks
    bundle = os.path.abspath(options.bundle)
    bundle_checks, info = check_bundle(oci, bundle, identity)
    checks += bundle_checks
    checks += check_mpi(config, oci, identity, info.config if info is not None else None)
    if info is None or any(c.level is Level.FAIL for c in runtime_checks) or oci.runtime_run is None and oci.runtime_create is None:
        checks.append(fail("test outside Slurm", "not run: fix the failures above first", "fix the failures above."))
        return checks
    checks += check_outside_slurm(oci, bundle, info, identity, env, config.node_name, options.args)
    return checks


def installed_proxy() -> str | None:
    """The nodestep-oci installed beside this nodestepctl (same venv), if there is one."""
    path = os.path.join(os.path.dirname(sys.executable), PROXY_NAME)
    return path if os.path.exists(path) else None


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
