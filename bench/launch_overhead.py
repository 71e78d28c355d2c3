"""Sections 1 and 2: launch overhead of `nodestepctl run` next to the same runc command run
directly, and the daemon's own latency from the timestamps it takes (`--debug-timings`).

Both sides run the trivial container `true` from the same rootless busybox bundle as the
unprivileged user, interleaved (A B A B ...) so that machine noise hits both alike. Also
interleaved: nodestepctl's run path alone (the same command against a socket nobody
listens on, so it parses, reads config.json and fails at connect) and the Python
interpreter's own start-up floor (`python -I -S -c pass`), which any Python client pays.
"""

from __future__ import annotations

import statistics
import sys

from .common import RUNC_RUN_CONF, Context, direct_bundle, p95, start_daemon, timed
from .report import Row

FULL = {"runs": 40}
QUICK = {"runs": 3}
TARGET_RATIO = 1.10
TARGET_DAEMON_MS = 1.0  # issue 18: daemon launch and exit medians
S1 = "1 launch overhead"
S2 = "2 daemon-side latency"


def run(ctx: Context, params: dict) -> list[Row]:
    user, bundle = ctx.user, ctx.bundle
    direct = direct_bundle(user, bundle, ctx.base / "s1-direct", ["true"])
    daemon = start_daemon(ctx.base, "s1", RUNC_RUN_CONF.read_text(), "--debug-timings")
    try:
        def ctl_run(job: int) -> list[str]:
            return daemon.ctl + ["run", "--job-id", str(job), "--bundle", str(bundle), "--", "true"]

        client_alone = [*daemon.ctl[:1], "--socket", str(ctx.base / "nobody.sock"), "run", "--bundle", str(bundle),
                        "--", "true"]
        runc = ["/bin/sh", "-c", f"{user.runc} run s1-direct -b {direct}"]
        floor = [sys.executable, "-I", "-S", "-c", "pass"]
        env = user.env
        for argv in (runc, ctl_run(999)):  # warm the page cache and runc's first-run costs
            timed(user.argv(argv), env)
        times: dict[str, list[float]] = {"runc": [], "ctl": [], "alone": [], "floor": []}
        for i in range(params["runs"]):
            times["runc"].append(timed(user.argv(runc), env))
            times["ctl"].append(timed(user.argv(ctl_run(1000 + i)), env))
            times["alone"].append(timed(user.argv(client_alone), env, check=False))
            times["floor"].append(timed(user.argv(floor), env))
    finally:
        daemon.stop()
    launch = [r["request_to_spawn_ms"] for r in daemon.records("launch timing")][1:]  # [0] is the warm-up
    started = [r["request_to_started_ms"] for r in daemon.records("launch timing")][1:]
    exits = [r["exit_to_event_ms"] for r in daemon.records("exit timing")][1:]
    ms = {k: [t * 1000 for t in v] for k, v in times.items()}
    ratio = statistics.median(ms["ctl"]) / statistics.median(ms["runc"])
    runc_median = statistics.median(ms["runc"])
    runc_ref = "runc run direct, median ms"
    return [
        Row(S1, "nodestepctl run `true`, median", statistics.median(ms["ctl"]), "ms", "runc run direct, median ms",
            runc_median),
        Row(S1, "nodestepctl run `true`, p95", p95(ms["ctl"]), "ms", "runc run direct, p95 ms", p95(ms["runc"])),
        Row(S1, "ratio of medians, nodestepctl / direct", ratio, "x", "target", TARGET_RATIO,
            f"<= {TARGET_RATIO:.2f}", ratio <= TARGET_RATIO),
        Row(S1, "nodestepctl alone (run path, no daemon), median", statistics.median(ms["alone"]), "ms",
            "python -I -S -c pass, median ms", statistics.median(ms["floor"])),
        Row(S2, "request received -> runtime spawned, median", statistics.median(launch), "ms", runc_ref,
            runc_median, f"<= {TARGET_DAEMON_MS:g} ms", statistics.median(launch) <= TARGET_DAEMON_MS),
        Row(S2, "request received -> runtime spawned, p95", p95(launch), "ms", runc_ref, runc_median),
        Row(S2, "request received -> `started` sent, median", statistics.median(started), "ms", runc_ref,
            runc_median),
        Row(S2, "task exit -> exit event sent, median", statistics.median(exits), "ms", runc_ref, runc_median,
            f"<= {TARGET_DAEMON_MS:g} ms", statistics.median(exits) <= TARGET_DAEMON_MS),
        Row(S2, "task exit -> exit event sent, p95", p95(exits), "ms", runc_ref, runc_median),
    ]
