#!/usr/bin/env python3
"""What restart survival adds: per task, nodestepd-monitor's launch time and memory; per step, its record.

Run as root from the repository, with nodestepd installed (pip builds the monitor):
    /opt/nodestepd/venv/bin/python bench/monitor_overhead.py [--runs 200] [--monitors 100] [--user nsdtest1]

Launch: `/bin/sh -c true` as the unprivileged user, started directly (process.spawn.spawn_shell,
how tasks start without a monitor) and under a monitor (process.monitor.Monitor.spawn),
interleaved (A B A B ...) so machine noise hits both alike. Two times each: the blocking
spawn call (returns once the shell is exec'ed), and the whole cycle as a step sees it
(spawn, exit status known, released and reaped: for the monitor, until the monitor
itself has exited and been reaped). Medians, p95 and the ratio.

Memory: --monitors monitors, each with a task that sleeps; per monitor, from
/proc/PID/smaps_rollup: RSS, PSS (shared pages divided among the processes mapping
them) and USS (its private pages), plus its page tables (VmPTE). The kernel's own
per-process cost (task_struct, a 16 KiB kernel stack) is not in these.

Records: a step's record written (temporary file, fsync, rename, fsync of the dir) as
the daemon does it, --runs times, in a new directory under --state-parent (default
/var/lib, where the default state dir lives). A launch writes it twice before its reply
(launching, running) and removes it after cleanup; nothing is written when its tasks end
(their monitors put the statuses in the exit file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from nodestepd.logs import configure_logging
from nodestepd.process.monitor import Monitor, monitor_program
from nodestepd.process.reaper import Reaper
from nodestepd.process.identity import Identity
from nodestepd.process.spawn import spawn_shell

ENV = {"PATH": "/usr/bin:/bin"}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def smaps(pid: int) -> dict[str, int]:
    """kB figures from smaps_rollup and status."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmPTE:"):
                fields["VmPTE"] = int(line.split()[1])
    fields["USS"] = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields


async def launch_direct(identity: Identity, cwd: str) -> tuple[float, float]:
    start = time.perf_counter()
    watch = spawn_shell("true", identity=identity, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_timeout=30)
    spawned = time.perf_counter()
    assert await watch.wait() == 0
    watch.kill_group(signal.SIGKILL)  # as a step releases a task
    watch.reap()
    return spawned - start, time.perf_counter() - start


async def launch_monitored(identity: Identity, cwd: str, exit_fd: int, reaper: Reaper) -> tuple[float, float]:
    start = time.perf_counter()
    monitor = Monitor.spawn("true", identity=identity, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, exit_fd=exit_fd,
                            start_timeout=30)
    spawned = time.perf_counter()
    assert await monitor.task.wait() == 0
    monitor.task.kill_group(signal.SIGKILL)
    monitor.task.reap()
    monitor.release(reaper)
    await asyncio.gather(*reaper._tasks)  # the monitor has exited and is reaped
    return spawned - start, time.perf_counter() - start


async def measure_launch(identity: Identity, cwd: str, exit_fd: int, runs: int) -> dict[str, list[float]]:
    reaper = Reaper()
    times: dict[str, list[float]] = {"direct spawn": [], "monitor spawn": [], "direct cycle": [], "monitor cycle": []}
    for i in range(runs + 10):
        direct = await launch_direct(identity, cwd)
        monitored = await launch_monitored(identity, cwd, exit_fd, reaper)
        if i < 10:
            continue  # warm-up
        times["direct spawn"].append(direct[0])
        times["direct cycle"].append(direct[1])
        times["monitor spawn"].append(monitored[0])
        times["monitor cycle"].append(monitored[1])
    return times


async def measure_memory(identity: Identity, cwd: str, exit_fd: int, count: int) -> tuple[list[dict], list[dict]]:
    reaper = Reaper()
    monitors = [Monitor.spawn("exec sleep 1000", identity=identity, cwd=cwd, env=ENV, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, exit_fd=exit_fd,
                            start_timeout=30)
                for _ in range(count)]
    try:
        return [smaps(m.pid) for m in monitors], [smaps(m.task.pid) for m in monitors]
    finally:
        for monitor in monitors:
            monitor.task.kill_group(signal.SIGKILL)
        for monitor in monitors:
            await monitor.task.wait()
            monitor.task.reap()
            monitor.release(reaper)
        await asyncio.gather(*reaper._tasks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--monitors", type=int, default=100)
    parser.add_argument("--user", default="nsdtest1")
    parser.add_argument("--state-parent", default="/var/lib", help="where to write the records (default /var/lib)")
    args = parser.parse_args()
    configure_logging(level="warning")
    if os.geteuid() != 0:
        parser.error("run as root: tasks are started as --user")
    identity = Identity.for_uid(pwd.getpwnam(args.user).pw_uid)
    base = Path(tempfile.mkdtemp(prefix="nodestepd-bench-", dir="/tmp"))
    try:
        cwd = base / "task"
        cwd.mkdir()
        os.chown(cwd, identity.uid, identity.gid)
        exit_fd = os.open(base / "exit", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        times = uvloop.run(measure_launch(identity, str(cwd), exit_fd, args.runs))
        mon_mem, task_mem = uvloop.run(measure_memory(identity, str(cwd), exit_fd, args.monitors))
        os.close(exit_fd)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    writes, removals = measure_records(args.state_parent, args.runs)

    program = monitor_program()
    with open(program, "rb") as f:
        linked = "dynamically" if b"/lib64/ld-linux" in f.read(4096) else "statically"  # PT_INTERP is up front
    print(f"nodestepd-monitor: {program} ({os.path.getsize(program)} bytes, {linked} linked)")
    print(f"{platform.node()}: {os.cpu_count()} cores, kernel {platform.release()}, "
          f"Python {platform.python_version()}, {args.runs} runs interleaved, as {args.user}")
    print()
    print("launch of `/bin/sh -c true`    median      p95")
    for key in ("direct spawn", "monitor spawn", "direct cycle", "monitor cycle"):
        values = times[key]
        print(f"  {key:<28} {statistics.median(values) * 1000:7.3f} ms {p95(values) * 1000:7.3f} ms")
    for what in ("spawn", "cycle"):
        direct, monitored = statistics.median(times[f"direct {what}"]), statistics.median(times[f"monitor {what}"])
        print(f"  monitor/direct ({what}):  {monitored / direct:.2f}x  (+{(monitored - direct) * 1000:.3f} ms per task)")
    print()
    print(f"memory per process, {args.monitors} monitors each with a sleeping task (median, kB)")
    print(f"  {'':<12} {'RSS':>6} {'PSS':>6} {'USS':>6} {'VmPTE':>6}")
    for name, samples in (("monitor", mon_mem), ("task (sleep)", task_mem)):
        row = [statistics.median(s[k] for s in samples) for k in ("Rss", "Pss", "USS", "VmPTE")]
        print(f"  {name:<12} " + " ".join(f"{v:6.0f}" for v in row))
    print()
    print(f"step record in {args.state_parent}         median      p95")
    for name, values in (("write (fsync'd)", writes), ("remove", removals)):
        print(f"  {name:<28} {statistics.median(values) * 1000:7.3f} ms {p95(values) * 1000:7.3f} ms")
    print(f"  on a launch's path (2 writes): +{2 * statistics.median(writes) * 1000:.3f} ms per step")
    return 0


def measure_records(parent: str, runs: int) -> tuple[list[float], list[float]]:
    from nodestepd.step import record as steprecord

    state = tempfile.mkdtemp(prefix="nodestepd-bench-state-", dir=parent)
    try:
        store = steprecord.RecordStore(state)
        writes, removals = [], []
        for i in range(runs):
            record = _sample_record(job_id=100 + i)
            start = time.perf_counter()
            store.write(record)
            writes.append(time.perf_counter() - start)
        for i in range(runs):
            start = time.perf_counter()
            store.remove(steprecord.record_name(1000, 100 + i, 0, 0))
            removals.append(time.perf_counter() - start)
        store.close()
        return writes, removals
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _sample_record(job_id: int):
    """A one-task run-mode record of the usual size (the runtime's environment included)."""
    from nodestepd.step import record as r

    return r.StepRecord(
        format=r.FORMAT, version=r.VERSION, job_id=job_id, step_id=0, first_task=0, ntasks=1, task_offset=None,
        local_offset=None, node_id=None, container_id=None, user=r.UserRecord("u", 1000, 1000, [1000], "/home/u"),
        bundle="/home/u/bundle", args=["/app/run", "--fast"], workdir="/home/u", attached=True, started_at=time.time(),
        state="running",
        settings=r.SettingsRecord(
            oci_conf="/etc/slurm/oci.conf", runtime_run="runc --rootless=true --root=/run/user/%U/ run %n.%u.%j.%s.%t -b %b",
            runtime_create=None, runtime_start=None, runtime_query="runc state %n.%u.%j.%s.%t",
            runtime_kill="runc kill -a %n.%u.%j.%s.%t", runtime_delete="runc delete --force %n.%u.%j.%s.%t",
            disable_cleanup=False, spool_dir="/var/spool/nodestepd", node_name="node1", kill_wait=30.0,
            runtime_timeout=60.0, runtime_env=dict(os.environ),
        ),
        tasks=[r.TaskRecord(0, "/var/spool/nodestepd/oci-job1-0/task-0", {"task_id": 0},
                            monitor=r.ProcRecord(2, 3), process=r.ProcRecord(4, 5))],
    )


if __name__ == "__main__":
    sys.exit(main())
