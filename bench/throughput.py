"""Section 5: throughput of short steps, back to back and in parallel, fake runtime and real runc.

Each step runs `true` and is waited for (attached, the driver speaks the protocol from one
process as the user, so no client start-up is counted). References, in the same run and
from the same driver: the fork+exec rate of `/bin/sh -c true` as the user (the ceiling: the
daemon starts every runtime that way), and for runc the same `runc run` spawned directly.
"""

from __future__ import annotations

from .common import RUNC_RUN_CONF, Context, direct_bundle, run_driver, start_daemon
from .report import Row
from .scale import FAKE_CONF

FULL = {"fake_steps": 300, "runc_steps": 40, "parallel": 4}
QUICK = {"fake_steps": 5, "runc_steps": 2, "parallel": 2}
S5 = "5 throughput"
TARGET_SHARE = 0.5  # issue 18: fake-runtime steps back to back, at least half the ceiling's rate


def run(ctx: Context, params: dict) -> list[Row]:
    user, parallel = ctx.user, params["parallel"]
    direct = direct_bundle(user, ctx.bundle, ctx.base / "s5-direct", ["true"])
    runtimes = [
        ("fake runtime", "s5-fake", FAKE_CONF, params["fake_steps"], "/bin/sh -c true fork+exec (ceiling)", "true"),
        ("runc", "s5-runc", RUNC_RUN_CONF.read_text(), params["runc_steps"], "runc run direct",
         f"{user.runc} run s5-ref-{{i}} -b {direct}"),
    ]
    rows = []
    job = 5000
    for label, name, oci_conf, count, ref_label, ref_command in runtimes:
        daemon = start_daemon(ctx.base, name, oci_conf)
        try:
            for how, concurrency in (("back to back", 1), (f"{parallel} in parallel", parallel)):
                steps = run_driver(user, op="launch", socket=str(daemon.socket), bundle=str(ctx.bundle),
                                   args=["true"], first_job=job, count=count, concurrency=concurrency, detach=False)
                job += count
                ref = run_driver(user, op="spawn", command=ref_command, count=count, concurrency=concurrency)
                rate, ref_rate = count / steps["seconds"], count / ref["seconds"]
                target = label == "fake runtime" and concurrency == 1
                rows.append(Row(S5, f"{label}, {how}", rate, "steps/s", f"{ref_label}, per s", ref_rate,
                                f">= {TARGET_SHARE:.0%} of the ceiling" if target else "",
                                rate >= TARGET_SHARE * ref_rate if target else None))
        finally:
            daemon.stop()
    return rows
