"""`nodestepd`: the daemon's command line and main loop (foreground, systemd style)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

import uvloop

from nodestepd import __version__
from nodestepd.systemd import journal
from nodestepd.systemd.activation import ACTIVATION_VARIABLES, ActivationError, activated_listener, socket_path
from nodestepd.config.settings import (
    DEFAULT_CONFIG_FILE,
    LOG_FORMATS,
    STEPS_ON_STOP,
    ConfigError,
    DaemonConfig,
    load_config,
)
from nodestepd.logs import configure_logging, get_logger, resolve_log_format
from nodestepd.config.ociconf import OciConf, OciConfError, load_oci_conf
from nodestepd.systemd.notify import Notifier, WatchdogSettingError, watchdog_interval
from nodestepd.daemon.server import Server
from nodestepd.daemon.service import Service

EX_CONFIG = 78  # sysexits: configuration error (systemd shows it by name)

_DEFAULTS = DaemonConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nodestepd",
        description="Run OCI container steps on this compute node as the requesting users, "
        "configured by Slurm's oci.conf. Runs in the foreground (a systemd Type=notify service, "
        "socket-activated or binding its own socket); SIGHUP reloads the settings file and oci.conf, "
        "SIGTERM stops it.",
        epilog="Settings come from the TOML file, then these options. Example:\n"
        "  nodestepd --oci-conf /etc/slurm/oci.conf --log-format json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help=f"TOML settings file (default {DEFAULT_CONFIG_FILE}, optional)")
    p.add_argument("--socket", metavar="PATH", help=f"Unix socket to serve (default {_DEFAULTS.socket})")
    p.add_argument("--oci-conf", metavar="FILE", help=f"Slurm oci.conf to use (default {_DEFAULTS.oci_conf})")
    p.add_argument("--spool-dir", metavar="DIR",
                   help=f"parent of per-step spool dirs (default: slurm.conf's SlurmdSpoolDir, else {_DEFAULTS.spool_dir})")
    p.add_argument("--state-dir", metavar="DIR", help=f"daemon state (default {_DEFAULTS.state_dir})")
    p.add_argument("--node-name", metavar="NAME",
                   help="node name for %%n (default: this host's NodeName in slurm.conf, else the short host name)")
    p.add_argument("--slurm-conf", metavar="FILE",
                   help=f"Slurm's slurm.conf, read for those two defaults when it exists (default {_DEFAULTS.slurm_conf})")
    p.add_argument("--kill-wait", metavar="SECONDS", type=float,
                   help=f"grace period between RunTimeKill and SIGKILL (default {_DEFAULTS.kill_wait:g})")
    p.add_argument("--runtime-timeout", metavar="SECONDS", type=float,
                   help="bound on each RunTime* command and on waiting for a created container "
                   f"(default {_DEFAULTS.runtime_timeout:g})")
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="console lines, JSON lines, or journald records with NODESTEPD_* fields; "
                   "auto (default): journal when stderr is journald's (JOURNAL_STREAM), else console")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--steps-on-stop", choices=STEPS_ON_STOP,
                   help="on SIGTERM, leave running steps alone for the next daemon to take over (default) or cancel them")
    p.add_argument("--debug-timings", action="store_true", default=None,
                   help="log each step's daemon-side latency: request received to runtime spawned "
                   "(\"launch timing\") and task exit to exit event sent (\"exit timing\"), in ms")
    p.add_argument("--version", action="version", version=f"nodestepd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {
        "socket": args.socket,
        "oci_conf": args.oci_conf,
        "spool_dir": args.spool_dir,
        "state_dir": args.state_dir,
        "node_name": args.node_name,
        "kill_wait": args.kill_wait,
        "runtime_timeout": args.runtime_timeout,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "steps_on_stop": args.steps_on_stop,
        "slurm_conf": args.slurm_conf,
        "debug_timings": args.debug_timings,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"nodestepd: {e}", file=sys.stderr)
        return EX_CONFIG
    log_format = resolve_log_format(config.log_format, os.environ)
    configure_logging(log_format, config.log_level)
    log = get_logger()
    try:
        oci = load_oci_conf(config.oci_conf)
    except OciConfError as e:
        for problem in e.problems:
            log.error("invalid oci.conf", problem=str(problem))
        return EX_CONFIG
    try:
        notifier = Notifier.from_environ(os.environ)
        watchdog = watchdog_interval(os.environ, os.getpid())
    except (ValueError, WatchdogSettingError) as e:
        log.error("unusable service manager setting", error=str(e))
        return EX_CONFIG
    if os.geteuid() != 0:
        log.warning("not running as root: steps can only run as this daemon's own user", uid=os.geteuid())

    def reload() -> tuple[DaemonConfig, OciConf]:
        new = load_config(args.config, overrides)
        return new, load_oci_conf(new.oci_conf)

    output_journal = journal.JournalSender(journal.socket_path(os.environ)) if log_format == "journal" else None
    try:
        return uvloop.run(_serve(config, oci, notifier, watchdog, reload, output_journal))
    finally:
        notifier.close()


async def _serve(config: DaemonConfig, oci: OciConf, notifier: Notifier, watchdog: float | None, reload,
                 output_journal) -> int:
    log = get_logger()
    server = Server(config, oci)
    server.output_journal = output_journal
    try:
        listener = _take_activated_socket()
        if listener is not None:
            path = socket_path(listener)
            log.info("serving the socket passed by the service manager", socket=path)
            if path != config.socket:
                log.warning("the passed socket is not the configured one; clients use the passed one",
                            passed=path, configured=config.socket)
        server.start(listener)
    except ActivationError as e:
        log.error("cannot use the socket passed by the service manager", error=str(e))
        return EX_CONFIG
    except (OSError, ValueError) as e:
        log.error("cannot start", error=str(e))
        return 1
    await Service(server, notifier, reload, watchdog).run()
    log.info("stopped")
    return 0


def _take_activated_socket() -> socket.socket | None:
    """The listening socket systemd passed, if any; the LISTEN_* variables are consumed
    (as sd_listen_fds(1) does), so nothing started later mistakes them for its own."""
    try:
        return activated_listener(os.environ, os.getpid())
    finally:
        for name in ACTIVATION_VARIABLES:
            os.environ.pop(name, None)


if __name__ == "__main__":
    sys.exit(main())
