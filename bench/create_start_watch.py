#!/usr/bin/env python3
"""Create/start mode: watching the container's init by pidfd next to polling RunTimeQuery.

Run as root from the repository after scripts/setup.sh:
    /opt/nodestepd/venv/bin/python bench/create_start_watch.py [--runs 5] [--durations 1,5]

Two daemons run the guide's runc create/start oci.conf, every command wrapped by a script
that counts it, as the unprivileged user nsdtest1:
  pidfd    nodestepd as it is: the container's init watched through a pidfd;
  polling  the reference: the same, but RunTimeQuery's output has no pid, so nodestepd
           falls back to what Slurm does, RunTimeQuery with backoff from 4 ms doubling to 1 s.
Runs alternate between the two. Each container runs `sleep D`, writes a mark file into its
rootfs and exits; "exit notice" is the time from that write (the file's mtime) to the
client's exit, which includes the final query, RunTimeDelete and the spool cleanup.
Reported per side and duration: `state` calls per task and the exit notice (medians, max).
"""

from __future__ import annotations

import argparse
import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
USER = "nsdtest1"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNC = "runc --rootless=true --root=/run/user/%U/"
NAME = "%n.%u.%j.%s.%t"


def oci_conf(wrap: str, query_wrap: str) -> str:
    return (
        f'RunTimeQuery="{query_wrap} {RUNC} state {NAME}"\n'
        f'RunTimeKill="{wrap} {RUNC} kill -a {NAME}"\n'
        f'RunTimeDelete="{wrap} {RUNC} delete --force {NAME}"\n'
        f'RunTimeCreate="{wrap} {RUNC} create {NAME} -b %b"\n'
        f'RunTimeStart="{wrap} {RUNC} start {NAME}"\n'
    )


def start_daemon(base: Path, name: str, conf: str) -> tuple[subprocess.Popen, Path]:
    (base / f"{name}.conf").write_text(conf)
    notify_path = base / f"{name}.notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    sock = base / f"{name}.sock"
    with open(base / f"{name}.log", "wb") as log:
        daemon = subprocess.Popen(
            [str(BIN / "nodestepd"), "--socket", str(sock), "--oci-conf", str(base / f"{name}.conf"),
             "--spool-dir", str(base / f"{name}-spool"), "--state-dir", str(base / f"{name}-state"),
             "--node-name", "bench", "--log-format", "json"],
            env={"PATH": PATH, "NOTIFY_SOCKET": str(notify_path)}, stdout=log, stderr=subprocess.STDOUT,
        )
    assert notify.recv(64) == b"READY=1", (base / f"{name}.log").read_text()
    notify.close()
    return daemon, sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per side and duration (default 5)")
    parser.add_argument("--durations", default="1,5", help="container run times in seconds (default 1,5)")
    args = parser.parse_args()
    durations = [float(d) for d in args.durations.split(",")]
    pw = pwd.getpwnam(USER)
    env = {"PATH": PATH, "HOME": pw.pw_dir, "USER": USER, "LOGNAME": USER}
    as_user = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
    base = Path(tempfile.mkdtemp(prefix="nodestepd-bench-", dir="/tmp"))
    base.chmod(0o755)
    daemons: list[subprocess.Popen] = []
    try:
        bundle = base / "bundle"
        subprocess.run(["sh", str(REPO / "scripts" / "make-bundle.sh"), USER, str(bundle)], check=True)
        tools = base / "tools"
        tools.mkdir()
        (tools / "count.sh").write_text('#!/bin/sh\nlog=$1; shift; echo "$*" >> "$log"; exec "$@"\n')
        (tools / "nopid.sh").write_text(
            '#!/bin/sh\nout=$("$@") || exit $?; printf "%s\\n" "$out" | grep -v \'"pid":\'\n')
        for script in ("count.sh", "nopid.sh"):
            (tools / script).chmod(0o755)
        shutil.chown(tools, pw.pw_uid, pw.pw_gid)
        sides = {}
        for name, nopid in (("pidfd", False), ("polling", True)):
            wrap = f"{tools}/count.sh {tools}/{name}.calls"
            query = f"{wrap} {tools}/nopid.sh" if nopid else wrap
            daemon, sock = start_daemon(base, name, oci_conf(wrap, query))
            daemons.append(daemon)
            sides[name] = sock
        results: dict[tuple[str, float], dict[str, list[float]]] = {}
        job = 20_000
        for duration in durations:
            for run in range(args.runs):
                for name, sock in sides.items():
                    job += 1
                    calls = tools / f"{name}.calls"
                    seen = len(calls.read_text().splitlines()) if calls.exists() else 0
                    mark = bundle / "rootfs" / "tmp" / f"mark-{job}"
                    subprocess.run(
                        as_user + [str(BIN / "nodestepctl"), "--socket", str(sock), "run", "--job-id", str(job),
                                   "--bundle", str(bundle), "--", "sh", "-c",
                                   f"sleep {duration:g}; echo > /tmp/mark-{job}; exit 0"],
                        env=env, check=True, stdin=subprocess.DEVNULL,
                    )
                    returned = time.time_ns()
                    notice_ms = (returned - mark.stat().st_mtime_ns) / 1e6
                    new = calls.read_text().splitlines()[seen:]
                    states = sum(1 for line in new if " state " in f" {line} ")
                    entry = results.setdefault((name, duration), {"notice": [], "states": []})
                    entry["notice"].append(notice_ms)
                    entry["states"].append(states)
        print(f"# create/start watching, {args.runs} runs per row, {time.strftime('%Y-%m-%d')}, "
              f"{os.cpu_count()} cores, kernel {platform.release()}")
        print(f"{'side':10} {'container':>10} {'state calls/task':>17} {'exit notice ms':>15} {'max ms':>8}")
        for (name, duration), entry in results.items():
            print(f"{name:10} {duration:9g}s {statistics.median(entry['states']):17g} "
                  f"{statistics.median(entry['notice']):15.1f} {max(entry['notice']):8.1f}")
        for duration in durations:
            a = statistics.median(results[("pidfd", duration)]["notice"])
            b = statistics.median(results[("polling", duration)]["notice"])
            print(f"{duration:g} s containers: polling notices the exit {b / a:.1f}x later than pidfd (medians)")
        return 0
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
