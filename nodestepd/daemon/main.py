"""`nodestepd`: the daemon's command line; it builds the daemon's parts and runs them
(foreground, systemd style).

Start-up, in order: the settings and oci.conf are loaded and checked (an invalid one
exits 78, EX_CONFIG); the socket systemd passed is taken; the daemon's directories are
made and every root path is checked (configuration.py); the process is secured (fd
limit, no_new_privs) and becomes a child subreaper; the socket is bound unless passed;
then the Service runs the Server: recovery, READY=1, serving, shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import sys
import time

import uvloop

from nodestepd import __version__
from nodestepd.config.ociconf import OciConf, OciConfError, load_oci_conf
from nodestepd.config.settings import (
    DEFAULT_CONFIG_FILE,
    LOG_FORMATS,
    STEPS_ON_STOP,
    ConfigError,
    DaemonConfig,
    load_config,
)
from nodestepd.config.trust import untrusted_reason
from nodestepd.daemon.accounts import Accounts
from nodestepd.daemon.admission import Admission
from nodestepd.daemon.closer import FdCloser
from nodestepd.daemon.ociproxy import OciProxy
from nodestepd.daemon.configuration import Configuration
from nodestepd.daemon.jobids import JobIdAllocator
from nodestepd.daemon.listener import BoundListener, Listener, PassedListener
from nodestepd.daemon.reattach import Reattachments
from nodestepd.daemon.registry import Registry, Retention
from nodestepd.daemon.server import Server
from nodestepd.daemon.service import Service
from nodestepd.daemon.session import DaemonState
from nodestepd.image.cache import ImageCache
from nodestepd.logs import configure_logging, get_logger, resolve_log_format
from nodestepd.process import kernel
from nodestepd.process.reaper import Reaper
from nodestepd.step.record import RecordStore
from nodestepd.step.results import ResultStore
from nodestepd.systemd.activation import ActivationError
from nodestepd.systemd.journalqueue import JournalQueue
from nodestepd.systemd.notify import Notifier, WatchdogSettingError, watchdog_interval

EX_CONFIG = 78  # sysexits: configuration error (systemd shows it by name)
# At exit, how long the journal records still queued may take to go (no one else waits then).
JOURNAL_FLUSH_TIMEOUT = 2.0
# fds the daemon needs besides one per connection: steps' pidfds, spool dir fds, logs.
FD_HEADROOM = 4096

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
    p.add_argument("--reattach-grace", metavar="SECONDS", type=float,
                   help="cancel a recovered attached step whose client has not attached again within this "
                   f"many seconds of the restart (default {_DEFAULTS.reattach_grace:g})")
    p.add_argument("--image-cache-dir", metavar="DIR",
                   help=f"the per-user cache of imported container images, on local disk (default {_DEFAULTS.image_cache_dir})")
    p.add_argument("--debug-timings", action="store_true", default=None,
                   help="log each step's daemon-side latency: request received to runtime spawned "
                   "(\"launch timing\") and task exit to exit event sent (\"exit timing\"), in ms")
    p.add_argument("--version", action="version", version=f"nodestepd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    # A daemon that hangs or crashes says where, on stderr (the journal): every thread's
    # stack on SIGABRT (what systemd's watchdog sends), SIGSEGV, SIGBUS, SIGFPE, SIGILL.
    faulthandler.enable()
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
        "reattach_grace": args.reattach_grace,
        "slurm_conf": args.slurm_conf,
        "debug_timings": args.debug_timings,
        "image_cache_dir": args.image_cache_dir,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"nodestepd: {e}", file=sys.stderr)
        return EX_CONFIG
    log_format = resolve_log_format(config.log_format, os.environ)
    journal_queue = configure_logging(log_format, config.log_level)
    try:
        return _main(args, config, overrides, journal_queue)
    finally:
        if journal_queue is not None:
            journal_queue.flush(JOURNAL_FLUSH_TIMEOUT)


def _main(args: argparse.Namespace, config: DaemonConfig, overrides: dict,
          journal_queue: JournalQueue | None) -> int:
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

    try:
        return uvloop.run(_serve(config, oci, notifier, watchdog, reload, journal_queue))
    finally:
        notifier.close()


async def _serve(config: DaemonConfig, oci: OciConf, notifier: Notifier, watchdog: float | None, load,
                 journal_queue: JournalQueue | None) -> int:
    log = get_logger()
    if journal_queue is not None:
        journal_queue.start()  # records that waited for the loop, and drop warnings, from here on
    try:
        configuration, listener, store, results, job_ids, reaper = _start(config, oci)
    except ActivationError as e:
        log.error("cannot use the socket passed by the service manager", error=str(e))
        return EX_CONFIG
    except (OSError, ValueError) as e:
        log.error("cannot start", error=str(e))
        return 1
    service = Service(notifier, watchdog, load, configuration, listener.path)

    def retention() -> Retention:
        c = configuration.config
        return Retention(c.results_max_age, c.results_max, c.results_max_per_user)

    registry = Registry(on_change=service.steps_changed, retention=retention, results=results)
    closer = FdCloser()
    accounts = Accounts()
    accounts.load()
    # The image_* settings are read here: they change at restart.
    images = ImageCache(config.image_cache_dir, imports_max=config.image_imports_max,
                        timeout=config.image_import_timeout, untrusted_reason=untrusted_reason,
                        max_bytes=config.image_cache_max_bytes)
    await asyncio.to_thread(images.clean_stale)  # what imports cut short by a crash left
    state = DaemonState(
        configuration=configuration, registry=registry, admission=Admission(configuration, job_ids, closer),
        store=store, results=results, reaper=reaper, reload=service.reload, socket_path=listener.path,
        started_at=time.time(), closer=closer, accounts=accounts,
        reattachments=Reattachments(lambda: configuration.config.reattach_grace), output_journal=journal_queue,
        images=images, oci=OciProxy(registry),
    )
    await service.run(Server(state, listener))
    log.info("stopped")
    return 0


def _start(config: DaemonConfig,
           oci: OciConf) -> tuple[Configuration, Listener, RecordStore, ResultStore, JobIdAllocator, Reaper]:
    log = get_logger()
    # First: the LISTEN_* variables are consumed, so nothing started later mistakes them for its own.
    passed = PassedListener.take(os.environ, os.getpid())
    if passed is not None:
        log.info("serving the socket passed by the service manager", socket=passed.path)
        if passed.path != config.socket:
            log.warning("the passed socket is not the configured one; clients use the passed one",
                        passed=passed.path, configured=config.socket)
    os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
    os.makedirs(os.path.dirname(config.socket), mode=0o755, exist_ok=True)
    # Before anything uses a path: it refuses untrusted ones.
    configuration = Configuration(config, oci)
    _secure_process(configuration)
    job_ids = JobIdAllocator(config.state_dir)
    store = RecordStore(config.state_dir)
    results = ResultStore(config.state_dir)
    # Whatever gets orphaned below us (task monitors released, children of a monitor that
    # died) becomes our child, for us to reap (process/reaper.py).
    kernel.become_subreaper()
    listener: Listener = passed if passed is not None else BoundListener(config.socket)
    log.info("listening", socket=listener.path, oci_conf=oci.path, mode=oci.mode, version=__version__,
             activated=listener.passed)
    return configuration, listener, store, results, job_ids, Reaper()


def _secure_process(configuration: Configuration) -> None:
    """Security checks and settings before serving anyone (docs/security.md)."""
    c = configuration.config
    soft, hard = kernel.raise_fd_limit(c.max_connections + FD_HEADROOM)
    if soft < c.max_connections + 64:
        get_logger().warning("RLIMIT_NOFILE is too low for max_connections", soft=soft, hard=hard,
                             max_connections=c.max_connections)
    if c.no_new_privs:
        kernel.set_no_new_privs()
    get_logger().info("security settings", operators=sorted(configuration.policy.operators),
                      no_new_privs=kernel.no_new_privs(), nofile_limit=soft)


if __name__ == "__main__":
    sys.exit(main())
