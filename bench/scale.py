"""Section 4: idle cost and scale. Many steps running at once: what they cost the daemon while
they just run, and how long launching and cancelling all of them takes.

Two runtimes: a fake one (`sleep` behind an oci.conf that ignores config.json, so each step
is one process) at 1,000 steps, and real rootless runc at as many containers as the kernel
lets one user run: every runc container gets a new session keyring, and a user may own
kernel.keys.maxkeys keys (200 by default), so the 201st `runc run` fails (runc_capacity). Steps are launched detached and cancelled through the
protocol by the driver (driver.py, as the user), `concurrency` requests at a time. The
reference is the same runtime command spawned and killed directly by the user's driver,
as many at a time, without the daemon (for runc, with `runc delete --force` after the kill,
as the daemon's cancel ends with RunTimeDelete).

Idle cost is read from /proc: the daemon's resident memory, its CPU time and context
switches (every thread) over a window while the steps run, next to the same daemon with
no steps over a window of the same length, before the launch.
"""

from __future__ import annotations

import subprocess
import time

from .common import LIMITS_TOML, RUNC_RUN_CONF, Context, HeldProcesses, direct_bundle, idle_window, run_driver, \
    start_daemon
from .report import Row

# runc: as many as the kernel lets one user run (runc_capacity), at most runc_steps.
FULL = {"fake_steps": 1000, "runc_steps": 1000, "concurrency": 16, "window": 20.0}
QUICK = {"fake_steps": 20, "runc_steps": 2, "concurrency": 4, "window": 0.5}
# One process per step: the shell execs sleep. IgnoreFileConfigJson: no config.json to rewrite.
FAKE_CONF = 'IgnoreFileConfigJson=true\nRunTimeRun="%@"\n'
SLEEP = ["sleep", "86400"]
S4 = "4 idle cost and scale"
TARGET_LAUNCH_RATIO = 1.5  # issue 18: the fake runtime's launches, at most 1.5x the direct spawn
CPU_NEAR_ZERO = 0.6  # CPU seconds per minute: 1 % of one core
WAKEUPS_PER_STEP = 0.01  # per step and minute: any per-step timer (up to 100 min apart) would show more
QUIET = 1.0  # seconds after the last launch reply before the window: the replies' own work settles


def run(ctx: Context, params: dict) -> list[Row]:
    user = ctx.user
    direct = direct_bundle(user, ctx.bundle, ctx.base / "s4-direct", SLEEP)
    runc_steps = min(params["runc_steps"], runc_capacity(user.uid))
    return [
        Row(S4, "runc: containers one user can run here", runc_steps, "containers",
            "free of kernel.keys.maxkeys (one session keyring per runc container)"),
        *_part(ctx, params, "fake runtime (sleep)", "s4-fake", FAKE_CONF, ["exec", *SLEEP], params["fake_steps"],
               reference=f"exec {' '.join(SLEEP)}", after_kill=None, targets=True),
        *_part(ctx, params, "runc", "s4-runc", RUNC_RUN_CONF.read_text(), SLEEP, runc_steps,
               reference=f"{user.runc} run s4-ref-{{i}} -b {direct}",
               after_kill=f"{user.runc} delete --force s4-ref-{{i}}"),
    ]


def _part(ctx: Context, params: dict, label: str, name: str, oci_conf: str, args: list[str], count: int,
          reference: str, after_kill: str | None, targets: bool = False) -> list[Row]:
    """targets: the launch and cancel rows carry issue 18's targets (the fake runtime's thousand)."""
    user, window, concurrency = ctx.user, params["window"], params["concurrency"]
    first_job = 4000
    daemon = start_daemon(ctx.base, name, oci_conf, toml=LIMITS_TOML)
    try:
        empty = idle_window(daemon.pid, window)
        launched = run_driver(user, op="launch", socket=str(daemon.socket), bundle=str(ctx.bundle), args=args,
                              first_job=first_job, count=count, concurrency=concurrency, detach=True)
        if "runc" in name:
            _wait_for_containers(ctx, count)
        time.sleep(QUIET)
        busy = idle_window(daemon.pid, window)
        cancelled = run_driver(user, op="cancel", socket=str(daemon.socket), first_job=first_job, count=count,
                               concurrency=concurrency)
    finally:
        daemon.stop()
    if "runc" in name:
        _wait_for_keys(user.uid, count)  # the cancelled containers' keyrings, collected by the kernel
    held = HeldProcesses(user, reference, count, concurrency, after_kill)
    if "runc" in name:
        _wait_for_containers(ctx, count)
    direct_cancel = held.cancel()
    per_step_wakeups = (busy["wakeups_per_min"] - empty["wakeups_per_min"]) / count
    return [
        Row(S4, f"{label}: daemon RSS, {count} steps running", busy["rss_mib"], "MiB", "0 steps", empty["rss_mib"]),
        Row(S4, f"{label}: daemon memory per running step", (busy["rss_mib"] - empty["rss_mib"]) * 1024 / count,
            "KiB"),
        Row(S4, f"{label}: machine memory per running step (runtime and container)",
            (empty["available_mib"] - busy["available_mib"]) * 1024 / count, "KiB",
            f"{busy['available_mib']:,.0f} MiB of the machine's memory still available"),
        Row(S4, f"{label}: daemon CPU while {count} steps run", busy["cpu_s_per_min"], "s/min", "0 steps",
            empty["cpu_s_per_min"], f"near 0 (< {CPU_NEAR_ZERO:g} s/min)", busy["cpu_s_per_min"] < CPU_NEAR_ZERO),
        Row(S4, f"{label}: daemon wake-ups while {count} steps run", busy["wakeups_per_min"], "/min", "0 steps",
            empty["wakeups_per_min"], f"no per-step wake-ups (< {WAKEUPS_PER_STEP:g}/step/min)",
            per_step_wakeups < WAKEUPS_PER_STEP),
        Row(S4, f"{label}: launch {count} steps, {concurrency} at a time", launched["seconds"], "s",
            "the same spawned directly, s", held.launch_seconds,
            *((f"<= {TARGET_LAUNCH_RATIO:g}x direct", launched["seconds"] <= TARGET_LAUNCH_RATIO * held.launch_seconds)
              if targets else ())),
        Row(S4, f"{label}: cancel {count} steps, {concurrency} at a time", cancelled["seconds"], "s",
            "the same killed directly, s", direct_cancel,
            *((f"<= launching them ({launched['seconds']:.2f} s)", cancelled["seconds"] <= launched["seconds"])
              if targets else ())),
    ]


def _wait_for_containers(ctx: Context, count: int, timeout: float = 300) -> None:
    """Until runc lists `count` running containers of the user: the runc processes' start-up is over.

    Asks runc (its state dir), never the daemon, so the daemon's idle window stays untouched.
    """
    user = ctx.user
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(user.argv(user.runc.split() + ["list", "--format", "json"]), env=user.env,
                             capture_output=True, text=True, check=True).stdout
        running = out.count('"status":"running"')
        if running >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {running} of {count} runc containers running after {timeout:g} s")
        time.sleep(0.2)  # runc has no event for "all started"; its state dir is read between tries


def _keys(uid: int) -> tuple[int, int]:
    """(keys the user owns, the most it may own), from /proc/key-users."""
    with open("/proc/key-users") as f:
        for line in f:
            who, rest = line.split(":", 1)
            if int(who) == uid:
                owned, quota = rest.split()[2].split("/")  # qnkeys/maxkeys
                return int(owned), int(quota)
    with open("/proc/sys/kernel/keys/maxkeys") as f:
        return 0, int(f.read())


def runc_capacity(uid: int) -> int:
    """How many more runc containers the user can run: one session keyring each."""
    owned, quota = _keys(uid)
    return quota - owned


def _wait_for_keys(uid: int, needed: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while runc_capacity(uid) < needed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the kernel still holds the keyrings of uid {uid}'s ended containers after {timeout:g} s")
        time.sleep(0.1)  # the kernel's key garbage collector says nothing when it is done
