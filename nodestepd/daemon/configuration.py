"""The configuration in force: the settings, oci.conf, who the operators are, and what new
steps are launched with.

Replaced whole by apply(), at start and by each reload, and only when every check passes;
steps already running keep the settings they launched with (step/spec.py StepSettings).
"""

from __future__ import annotations

import os

from nodestepd.config.ociconf import OciConf
from nodestepd.config.settings import DaemonConfig, resolve_operators
from nodestepd.daemon.authz import Policy
from nodestepd.config.trust import hook_problem, untrusted_reason
from nodestepd.logs import get_logger
from nodestepd.process.monitor import MonitorMissing, monitor_program
from nodestepd.step.env import runtime_env_base
from nodestepd.step.layout import shared_step_dir_warning
from nodestepd.step.runtime import shell_warnings
from nodestepd.step.mpi import MpiSettings
from nodestepd.step.spec import LaunchSettings, RuntimeCommands, StepSettings


class Configuration:
    config: DaemonConfig
    oci: OciConf
    policy: Policy
    launch: LaunchSettings  # what a step launched now gets

    def __init__(self, config: DaemonConfig, oci: OciConf) -> None:
        self.apply(config, oci)

    def apply(self, config: DaemonConfig, oci: OciConf) -> None:
        """Use these settings from now on. Raises OSError, changing nothing, when a directory
        cannot be made or a path is not safe for a root daemon (at start and on every reload alike)."""
        os.makedirs(config.spool_dir, mode=0o755, exist_ok=True)
        check_trusted(config, oci)
        policy = Policy(resolve_operators(config.operators))
        launch = LaunchSettings(
            step=StepSettings(
                RuntimeCommands.of(oci), kill_wait=config.kill_wait, runtime_timeout=config.runtime_timeout,
                keep_spool=oci.disable_cleanup,
                # Steps walk to their spool dir refusing every symlink; resolve the operator's
                # own links (/var/run -> /run and the like) once, here.
                spool_dir=os.path.realpath(config.spool_dir), node_name=config.node_name,
                stage_in=config.stage_in or None, stage_out=config.stage_out or None,
            ),
            oci=oci,
            runtime_env_base=runtime_env_base(os.environ, oci.runtime_env_exclude_re),
            mpi=MpiSettings(config.mpi_mounts, config.mpi_user_namespace, config.mpi_network_namespace),
        )
        self.config, self.oci, self.policy, self.launch = config, oci, policy, launch
        for warning in shell_warnings(oci.patterns()):
            get_logger().warning("oci.conf will not work as written on this host", problem=warning)
        shared = shared_step_dir_warning(oci.container_path)
        if shared is not None:
            get_logger().warning("oci.conf does not keep users' steps apart", problem=shared)


def check_trusted(config: DaemonConfig, oci: OciConf) -> None:
    """Refuse paths anyone but root could change: the daemon would act as root through them."""
    try:
        monitor = monitor_program()  # every task starts through it: no launch could work without
    except MonitorMissing as e:
        raise OSError(str(e)) from None
    for name in ("stage_in", "stage_out"):
        path = getattr(config, name)
        # Checked for owner only when we are root: a daemon run by a user trusts that user's paths.
        problem = hook_problem(path, check_owner=os.geteuid() == 0) if path else None
        if problem is not None:
            raise OSError(f"{name} {path} (run as the user at every launch) cannot be used: {problem}")
    if os.geteuid() != 0:
        return  # a daemon run by a user for itself trusts that user's paths anyway
    for what, path in (("spool_dir", config.spool_dir), ("state_dir", config.state_dir),
                       ("socket directory", os.path.dirname(config.socket)), ("oci_conf", oci.path),
                       ("nodestepd-monitor (run as root for every task)", monitor)):
        reason = untrusted_reason(path)
        if reason is not None:
            raise OSError(f"{what} {path} is not safe for a root daemon: {reason}")
