"""nodestepd as a service: readiness, status, watchdog, reload and stop, told to systemd.

The conversation (sd_notify(3)), in order: READY=1 once the socket is served; STATUS=
with a one-line summary whenever the running steps change; WATCHDOG=1 every half
WATCHDOG_USEC from the event loop itself (a stuck loop stops pinging and systemd
restarts us); RELOADING=1 and READY=1 around a reload (SIGHUP or `nodestepctl
reload`); STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from typing import Callable, Iterable

from nodestepd.config.ociconf import OciConf, OciConfError
from nodestepd.config.settings import ConfigError, DaemonConfig
from nodestepd.daemon.configuration import Configuration
from nodestepd.daemon.server import Server
from nodestepd.logs import get_logger
from nodestepd.step.step import Step
from nodestepd.systemd.notify import Notifier, monotonic_usec, status_line

# Settings a running daemon cannot change: the socket is bound, the job id file is
# open, the loggers are built. A reload keeps the old value and says so.
# Process-wide at start: the socket, the state, logging, the no-new-privs bit (it cannot be
# unset) and the file descriptor limit that max_connections sized.
# The image cache is built once at start with its dir and its bounds.
RESTART_ONLY = ("socket", "state_dir", "log_format", "log_level", "no_new_privs", "max_connections",
                "image_cache_dir", "image_imports_max", "image_import_timeout", "image_cache_max_bytes")
SHOWN_STEPS = 4  # steps named in STATUS=; the rest are counted


def steps_summary(steps: Iterable[Step], socket: str) -> str:
    """STATUS= text: what runs, e.g. '2 steps running: 42.0 (alice), 43.1 (bob)'."""
    steps = list(steps)
    if not steps:
        return status_line(f"idle, serving {socket}")
    named = ", ".join(f"{s.ref} ({s.spec.identity.user})" for s in steps[:SHOWN_STEPS])
    more = f", +{len(steps) - SHOWN_STEPS} more" if len(steps) > SHOWN_STEPS else ""
    noun = "step" if len(steps) == 1 else "steps"
    return status_line(f"{len(steps)} {noun} running: {named}{more}")


def stopping_summary(running: int, steps_on_stop: str) -> str:
    if running == 0:
        return "stopping; no steps running"
    noun = "step" if running == 1 else "steps"
    if steps_on_stop == "cancel":
        return f"stopping; cancelling {running} running {noun}"
    return f"stopping; leaving {running} running {noun} alone"


class Service:
    def __init__(
        self,
        notifier: Notifier,
        watchdog_interval: float | None,
        load: Callable[[], tuple[DaemonConfig, OciConf]],
        configuration: Configuration,
        socket_path: str,
    ) -> None:
        """load: reads the settings file and oci.conf again (blocking; run in a thread)."""
        self.notifier = notifier
        self.configuration = configuration
        self.socket_path = socket_path
        self._load = load
        self._watchdog_interval = watchdog_interval
        self._watchdog: asyncio.TimerHandle | None = None
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[list[str]]] = set()
        self._running: list[Step] = []  # as the registry last told us
        self._ready = False
        self.log = get_logger()

    async def run(self, server: Server) -> None:
        """Serve until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        # Steps a previous daemon left are ours again before anyone is told we are ready.
        await server.recover()
        # Clients that connected earlier wait in the listen backlog: served as soon as serve() runs.
        self.notifier.notify("READY=1")
        self._ready = True
        self._update_status()
        if self._watchdog_interval is not None:
            self.log.info("watchdog enabled", interval_s=self._watchdog_interval)
            self._ping_watchdog()
        try:
            await server.serve()
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            steps_on_stop = self.configuration.config.steps_on_stop
            self.notifier.notify("STOPPING=1", "STATUS=" + stopping_summary(len(self._running), steps_on_stop))
            await server.shutdown()

    # ---- status and watchdog ---------------------------------------------------------

    def steps_changed(self, running: list[Step]) -> None:
        """The registry's on_change: STATUS= names the running steps (once we are ready)."""
        self._running = running
        if self._ready:
            self._update_status()

    def _update_status(self) -> None:
        self.notifier.notify("STATUS=" + steps_summary(self._running, self.socket_path))

    def _ping_watchdog(self) -> None:
        # Re-armed by the loop itself: if the loop is stuck, the pings stop.
        assert self._watchdog_interval is not None
        self.notifier.notify("WATCHDOG=1")
        self._watchdog = asyncio.get_running_loop().call_later(self._watchdog_interval, self._ping_watchdog)

    # ---- reload ---------------------------------------------------------------------

    def _on_sighup(self) -> None:
        task = asyncio.create_task(self.reload())
        self._reloads.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> list[str]:
        """Re-read the settings file and oci.conf; [] when in use, else every problem (old config kept).
        From SIGHUP, and from a `reload` request (daemon/session.py)."""
        async with self._reload_lock:
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
            self.log.info("reloading configuration")
            problems = await self._reload()
            self.notifier.notify("READY=1")
            if problems:
                for problem in problems:
                    self.log.error("reload rejected, the old configuration stays in use", problem=problem)
                self.notifier.notify("STATUS=" + status_line(
                    f"reload failed ({problems[0]}); old configuration in use; "
                    + steps_summary(self._running, self.socket_path)
                ))
                return problems
            self._update_status()
            return []

    async def _reload(self) -> list[str]:
        try:
            config, oci = await asyncio.to_thread(self._load)
        except ConfigError as e:
            return [str(e)]
        except OciConfError as e:
            return [str(p) for p in e.problems]
        old = self.configuration.config
        for name in RESTART_ONLY:
            if getattr(config, name) != getattr(old, name):
                self.log.warning("setting changed but only takes effect at restart", setting=name,
                                 running=getattr(old, name), file=getattr(config, name))
        config = dataclasses.replace(config, **{name: getattr(old, name) for name in RESTART_ONLY})
        try:
            self.configuration.apply(config, oci)
        except OSError as e:
            return [str(e) if e.strerror is None else f"spool_dir {config.spool_dir}: {e.strerror}"]
        self.log.info("configuration reloaded", oci_conf=oci.path, mode=oci.mode, config_file=config.config_file,
                      spool_dir=config.spool_dir, kill_wait=config.kill_wait, steps_on_stop=config.steps_on_stop)
        return []
