#!/usr/bin/env python3
"""Launch overhead of `nodestepctl run` next to the same runc command run directly.

Run as root from the repository after scripts/setup.sh:
    /opt/nodestepd/venv/bin/python bench/launch_overhead.py [--runs 30]

Both sides run the trivial container `true` from the same rootless busybox bundle as the
unprivileged user nsdtest1, interleaved (A B A B ...) so machine noise hits both alike.
Reported: median and p95 wall time of each side, their ratio, the daemon-side launch
latency (request received -> every runtime process spawned, from the daemon's log), and
the client's own start-up (`nodestepctl --version`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def as_user(uid: int, gid: int, argv: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    import pwd

    pw = pwd.getpwnam(USER)
    uid, gid = pw.pw_uid, pw.pw_gid
    env = {"PATH": PATH, "HOME": pw.pw_dir, "USER": USER, "LOGNAME": USER, "XDG_RUNTIME_DIR": f"/run/user/{uid}"}
    base = Path(tempfile.mkdtemp(prefix="nodestepd-bench-", dir="/tmp"))
    base.chmod(0o755)
    daemon = None
    try:
        bundle = base / "bundle"
        subprocess.run(["sh", str(REPO / "scripts" / "make-bundle.sh"), USER, str(bundle)], check=True)
        # The direct side: the bundle as nodestepd would rewrite it (absolute rootfs, args `true`).
        direct = base / "direct"
        direct.mkdir()
        config = json.loads((bundle / "config.json").read_text())
        config["root"]["path"] = str(bundle / "rootfs")
        config["process"]["args"] = ["true"]
        (direct / "config.json").write_text(json.dumps(config))
        shutil.chown(direct, uid, gid)
        shutil.chown(direct / "config.json", uid, gid)

        notify_path = base / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(30)
        sock = base / "sock"
        log_path = base / "daemon.log"
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [str(BIN / "nodestepd"), "--socket", str(sock), "--oci-conf", str(REPO / "tests/oci-conf-examples/runc-run.conf"),
                 "--spool-dir", str(base / "spool"), "--state-dir", str(base / "state"), "--node-name", "bench",
                 "--log-format", "json"],
                env={"PATH": PATH, "NOTIFY_SOCKET": str(notify_path)}, stdout=log, stderr=subprocess.STDOUT,
            )
        assert notify.recv(64) == b"READY=1"

        ctl = [str(BIN / "nodestepctl"), "--socket", str(sock)]
        runc = f"runc --rootless=true --root=/run/user/{uid}/ run bench-direct -b {direct}"
        timed(as_user(uid, gid, ctl + ["run", "--bundle", str(bundle), "--", "true"]), env)  # warm caches
        timed(as_user(uid, gid, ["/bin/sh", "-c", runc]), env)
        via, ref, startup = [], [], []
        for i in range(args.runs):
            ref.append(timed(as_user(uid, gid, ["/bin/sh", "-c", runc]), env))
            via.append(timed(as_user(uid, gid, ctl + ["run", "--job-id", str(10_000 + i), "--bundle", str(bundle), "--", "true"]), env))
            startup.append(timed(as_user(uid, gid, ctl + ["--version"]), env))
        launch_ms = [
            rec["launch_ms"] for rec in map(json.loads, log_path.read_text().splitlines())
            if rec.get("event") == "step started"
        ][1:]
        rows = [
            ("runc run, direct (reference)", statistics.median(ref) * 1000, p95(ref) * 1000),
            ("nodestepctl run", statistics.median(via) * 1000, p95(via) * 1000),
            ("  of which nodestepctl start-up", statistics.median(startup) * 1000, p95(startup) * 1000),
            ("  of which daemon launch (request -> spawned)", statistics.median(launch_ms), p95(launch_ms)),
        ]
        print(f"# launch overhead, {args.runs} runs each, {time.strftime('%Y-%m-%d')}, "
              f"{os.cpu_count()} cores, kernel {platform.release()}")
        print(f"{'':48} {'median ms':>10} {'p95 ms':>10}")
        for name, med, high in rows:
            print(f"{name:48} {med:10.1f} {high:10.1f}")
        print(f"ratio of medians nodestepctl/direct: {statistics.median(via) / statistics.median(ref):.2f}")
        return 0
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
