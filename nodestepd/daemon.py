"""`nodestepd`: the daemon's command line and main loop (foreground, systemd style)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys

import uvloop

from . import __version__
from .config import DEFAULT_CONFIG_FILE, ConfigError, DaemonConfig, load_config
from .logs import configure_logging, get_logger
from .ociconf import OciConf, OciConfError, load_oci_conf
from .server import Server

EX_CONFIG = 78  # sysexits: configuration error (systemd shows it by name)

_DEFAULTS = DaemonConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nodestepd",
        description="Run OCI container steps on this compute node as the requesting users, "
        "configured by Slurm's oci.conf. Runs in the foreground; stop it with SIGTERM.",
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
    p.add_argument("--log-format", choices=["console", "json"], help="log line format (default console)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
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
        "log_format": args.log_format,
        "log_level": args.log_level,
        "slurm_conf": args.slurm_conf,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"nodestepd: {e}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(config.log_format, config.log_level)
    log = get_logger()
    try:
        oci = load_oci_conf(config.oci_conf)
    except OciConfError as e:
        for problem in e.problems:
            log.error("invalid oci.conf", problem=str(problem))
        return EX_CONFIG
    if os.geteuid() != 0:
        log.warning("not running as root: steps can only run as this daemon's own user", uid=os.geteuid())
    return uvloop.run(_serve(config, oci))


async def _serve(config: DaemonConfig, oci: OciConf) -> int:
    server = Server(config, oci)
    try:
        server.start()
    except (OSError, ValueError) as e:
        get_logger().error("cannot start", error=str(e))
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_shutdown)
    _sd_notify("READY=1")
    try:
        await server.serve()
    finally:
        _sd_notify("STOPPING=1")
        await server.shutdown()
    get_logger().info("stopped")
    return 0


def _sd_notify(message: str) -> None:
    """Tell the service manager (or a test) how we are doing; a no-op without NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError as e:
        # The manager went away or never listened: nothing to tell, and no reason to stop.
        get_logger().warning("cannot notify the service manager", notify_socket=address, error=str(e))


if __name__ == "__main__":
    sys.exit(main())
