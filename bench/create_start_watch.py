"""Section 3: create/start mode, the container's init watched by pidfd next to polling RunTimeQuery.

Two daemons run the guide's runc create/start oci.conf, every command wrapped by a script
that counts it, as the unprivileged user:
  pidfd    nodestepd as it is: the container's init watched through a pidfd;
  polling  the reference: the same, but RunTimeQuery's output has no pid, so nodestepd
           falls back to what Slurm does, RunTimeQuery with backoff from 4 ms doubling to 1 s.
Runs alternate between the two. Each container runs `sleep D`, writes a mark file into its
rootfs and exits; "exit notice" is the time from that write (the file's mtime) to the
client's exit, which includes the final query, RunTimeDelete and the spool cleanup.
Reported per side and duration: `state` calls per task and the exit notice (medians).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import time

from .common import Context, start_daemon
from .report import Row

# Runs per container duration (seconds): fewer of the long ones keeps the bench under ten minutes.
FULL = {"runs": {0.1: 5, 1.0: 5, 5.0: 3, 20.0: 2}}
QUICK = {"runs": {0.1: 1, 0.3: 1}}
NAME = "%n.%u.%j.%s.%t"
RUNC = "runc --rootless=true --root=/run/user/%U/"  # the guide's, as in tests/oci-conf-examples
S3 = "3 exit notice, create/start"


def oci_conf(wrap: str, query_wrap: str) -> str:
    return (
        f'RunTimeQuery="{query_wrap} {RUNC} state {NAME}"\n'
        f'RunTimeKill="{wrap} {RUNC} kill -a {NAME}"\n'
        f'RunTimeDelete="{wrap} {RUNC} delete --force {NAME}"\n'
        f'RunTimeCreate="{wrap} {RUNC} create {NAME} -b %b"\n'
        f'RunTimeStart="{wrap} {RUNC} start {NAME}"\n'
    )


def run(ctx: Context, params: dict) -> list[Row]:
    user, bundle = ctx.user, ctx.bundle
    tools = ctx.base / "s3-tools"
    tools.mkdir()
    (tools / "count.sh").write_text('#!/bin/sh\nlog=$1; shift; echo "$*" >> "$log"; exec "$@"\n')
    (tools / "nopid.sh").write_text('#!/bin/sh\nout=$("$@") || exit $?; printf "%s\\n" "$out" | grep -v \'"pid":\'\n')
    for script in ("count.sh", "nopid.sh"):
        (tools / script).chmod(0o755)
    shutil.chown(tools, user.uid, user.gid)
    sides, daemons = {}, []
    try:
        for name, nopid in (("pidfd", False), ("polling", True)):
            wrap = f"{tools}/count.sh {tools}/{name}.calls"
            query = f"{wrap} {tools}/nopid.sh" if nopid else wrap
            daemon = start_daemon(ctx.base, f"s3-{name}", oci_conf(wrap, query))
            daemons.append(daemon)
            sides[name] = daemon
        results: dict[tuple[str, float], dict[str, list[float]]] = {}
        job = 3000
        for duration, runs in params["runs"].items():
            for _ in range(runs):
                for name, daemon in sides.items():
                    job += 1
                    calls = tools / f"{name}.calls"
                    seen = len(calls.read_text().splitlines()) if calls.exists() else 0
                    mark = bundle / "rootfs" / "tmp" / f"mark-{job}"
                    ran = subprocess.run(
                        user.argv(daemon.ctl + ["run", "--job-id", str(job), "--bundle", str(bundle), "--", "sh",
                                                "-c", f"sleep {duration:g}; echo > /tmp/mark-{job}; exit 0"]),
                        env=user.env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    )
                    returned = time.time_ns()
                    # Polling cannot know the status (the OCI state has none): nodestepctl says
                    # so and exits 255. With the pidfd, the container's own 0.
                    expected = 255 if name == "polling" else 0
                    if ran.returncode != expected:
                        raise RuntimeError(f"{name} side: nodestepctl exited {ran.returncode}: {ran.stderr!r}")
                    notice_ms = (returned - mark.stat().st_mtime_ns) / 1e6
                    mark.unlink()
                    new = calls.read_text().splitlines()[seen:]
                    entry = results.setdefault((name, duration), {"notice": [], "states": []})
                    entry["notice"].append(notice_ms)
                    entry["states"].append(sum(1 for line in new if " state " in f" {line} "))
    finally:
        for daemon in daemons:
            daemon.stop()
    rows = []
    for duration in params["runs"]:
        pidfd, polling = results[("pidfd", duration)], results[("polling", duration)]
        notice, notice_ref = statistics.median(pidfd["notice"]), statistics.median(polling["notice"])
        states, states_ref = statistics.median(pidfd["states"]), statistics.median(polling["states"])
        rows += [
            Row(S3, f"exit notice, {duration:g} s container, pidfd, median", notice, "ms",
                "polling with Slurm's backoff, median ms", notice_ref, "below polling", notice < notice_ref),
            Row(S3, f"RunTimeQuery calls per task, {duration:g} s container, pidfd", states, "calls",
                "polling with Slurm's backoff", states_ref, "below polling", states < states_ref),
        ]
    return rows
