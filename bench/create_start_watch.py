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

In the same loop, the references of issue 18's targets, the same container each time:
  direct   the sequence create/start mode stands for, run by the user without nodestepd
           (driver.py `sequence`: create, state, start, a pidfd wait for the init, delete);
           target: the pidfd side's exit notice at most 1.5x this one;
  run      a nodestepd with the guide's RunTimeRun config (`runc run`), next to
  run-direct  the same `runc run` started directly; target: run mode's notice <= 5 ms.
"""

from __future__ import annotations

import shutil
import statistics
import time

from .common import RUNC_RUN_CONF, Context, direct_bundle, run_driver, sample, start_daemon, timed
from .report import Row

# Runs per container duration (seconds): fewer of the long ones keeps the bench under ten minutes.
FULL = {"runs": {0.1: 5, 1.0: 5, 5.0: 3, 20.0: 2}}
QUICK = {"runs": {0.1: 1, 0.3: 1}}
NAME = "%n.%u.%j.%s.%t"
RUNC = "runc --rootless=true --root=/run/user/%U/"  # the guide's, as in tests/oci-conf-examples
S3 = "3 exit notice, create/start"
TARGET_DIRECT_RATIO = 1.5  # issue 18: create/start notice at most 1.5x the direct sequence's
TARGET_RUN_MS = 5.0  # issue 18: run mode's notice


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
        run_daemon = start_daemon(ctx.base, "s3-run", RUNC_RUN_CONF.read_text())
        daemons.append(run_daemon)
        results: dict[tuple[str, float], dict[str, list[float]]] = {}
        job = 3000

        def container(duration: float, job: int) -> list[str]:
            return ["sh", "-c", f"sleep {duration:g}; echo > /tmp/mark-{job}; exit 0"]

        def notice(side: str, duration: float, job: int, returned: int) -> None:
            mark = bundle / "rootfs" / "tmp" / f"mark-{job}"
            results.setdefault((side, duration), {"notice": [], "states": []})["notice"].append(
                (returned - mark.stat().st_mtime_ns) / 1e6)
            mark.unlink()

        for duration, runs in params["runs"].items():
            for _ in range(runs):
                for name, daemon in sides.items():
                    job += 1
                    calls = tools / f"{name}.calls"
                    seen = len(calls.read_text().splitlines()) if calls.exists() else 0
                    ran, _ = sample(user.argv(daemon.ctl + ["run", "--job-id", str(job), "--bundle", str(bundle),
                                                            "--", *container(duration, job)]), user.env)
                    returned = time.time_ns()
                    # Polling cannot know the status (the OCI state has none): nodestepctl says
                    # so and exits 255. With the pidfd, the container's own 0.
                    expected = 255 if name == "polling" else 0
                    if ran.returncode != expected:
                        raise RuntimeError(f"{name} side: nodestepctl exited {ran.returncode}: {ran.stderr!r}")
                    notice(name, duration, job, returned)
                    new = calls.read_text().splitlines()[seen:]
                    results[(name, duration)]["states"].append(sum(1 for line in new if " state " in f" {line} "))
                job += 1
                direct = direct_bundle(user, bundle, ctx.base / f"s3-direct-{job}", container(duration, job))
                ran_direct = run_driver(user, op="sequence", runc=RUNC.replace("%U", str(user.uid)),
                                        name=f"s3-direct-{job}", bundle=str(direct))
                notice("direct", duration, job, ran_direct["returned_ns"])
                job += 1
                ran, _ = sample(user.argv(run_daemon.ctl + ["run", "--job-id", str(job), "--bundle", str(bundle),
                                                            "--", *container(duration, job)]), user.env)
                returned = time.time_ns()
                if ran.returncode != 0:
                    raise RuntimeError(f"run side: nodestepctl exited {ran.returncode}: {ran.stderr!r}")
                notice("run", duration, job, returned)
                job += 1
                direct = direct_bundle(user, bundle, ctx.base / f"s3-run-direct-{job}", container(duration, job))
                run_direct = ["/bin/sh", "-c", f"{RUNC.replace('%U', str(user.uid))} run s3-run-{job} -b {direct}"]
                timed(user.argv(run_direct), user.env)
                notice("run-direct", duration, job, time.time_ns())
    finally:
        for daemon in daemons:
            daemon.stop()
    rows = []
    for duration in params["runs"]:
        pidfd, polling = results[("pidfd", duration)], results[("polling", duration)]
        notice, notice_ref = statistics.median(pidfd["notice"]), statistics.median(polling["notice"])
        states, states_ref = statistics.median(pidfd["states"]), statistics.median(polling["states"])
        direct = statistics.median(results[("direct", duration)]["notice"])
        run_mode = statistics.median(results[("run", duration)]["notice"])
        run_direct = statistics.median(results[("run-direct", duration)]["notice"])
        rows += [
            Row(S3, f"exit notice, {duration:g} s container, pidfd, median", notice, "ms",
                "polling with Slurm's backoff, median ms", notice_ref, "below polling", notice < notice_ref),
            Row(S3, f"exit notice, {duration:g} s container, pidfd / direct create-start-delete", notice / direct,
                "x", "direct create, state, start, pidfd wait, delete, median ms", direct,
                f"<= {TARGET_DIRECT_RATIO:g}", notice <= TARGET_DIRECT_RATIO * direct),
            Row(S3, f"exit notice, {duration:g} s container, run mode (RunTimeRun), median", run_mode, "ms",
                "runc run direct, median ms", run_direct, f"<= {TARGET_RUN_MS:g} ms", run_mode <= TARGET_RUN_MS),
            Row(S3, f"RunTimeQuery calls per task, {duration:g} s container, pidfd", states, "calls",
                "polling with Slurm's backoff", states_ref, "below polling", states < states_ref),
        ]
    return rows
