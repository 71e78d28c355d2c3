"""Section 7: `podman run --rm IMAGE true` with runc as podman's runtime, next to the same
command with nodestep-oci (issue 16) in front of a nodestepd running runc (the guide's
run-mode oci.conf), interleaved (A B A B ...) in one podman so that machine noise hits both
alike.

podman runs rootless as the user, configured as docs/user-guide.md says (host network,
k8s-file logs, cgroupfs), with its configuration, storage and temporary files in a
directory of /run/user/UID that is removed at the end; the image is a busybox rootfs
imported offline. Without nodestep-oci in this venv only the runc figure is measured;
without podman, nothing.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BIN, REPO, RUNC_RUN_CONF, Context, p95, start_daemon, timed
from .report import Row

FULL = {"runs": 20}
QUICK = {"runs": 2}
S7 = "7 podman through nodestep-oci"
IMAGE = "localhost/bench-bb"
PODMAN = "/usr/bin/podman"
PROXY = BIN / "nodestep-oci"
TIMEOUT = 120


def run(ctx: Context, params: dict) -> list[Row]:
    if not os.path.exists(PODMAN):
        print(f"# {S7}: skipped, {PODMAN} is not installed", file=sys.stderr)
        return []
    user = ctx.user
    daemon = start_daemon(ctx.base, "s7", RUNC_RUN_CONF.read_text()) if PROXY.exists() else None
    run_dir = Path(f"/run/user/{user.uid}")
    before = set(os.listdir(run_dir))
    base = Path(tempfile.mkdtemp(prefix="bench-podman-", dir=run_dir))
    try:
        env = _podman_setup(ctx, base, daemon)
        podman = [PODMAN]
        tar = ctx.base / "s7-rootfs.tar"
        subprocess.run(["tar", "--owner=0", "--group=0", "-C", str(ctx.bundle / "rootfs"), "-cf", str(tar), "."],
                       check=True, timeout=TIMEOUT)
        tar.chmod(0o644)
        _check(user.argv(podman + ["import", "--quiet", str(tar), IMAGE]), env)
        runtimes = ["runc"] + (["nodestep"] if daemon else [])

        def argv(runtime: str) -> list[str]:
            return user.argv(["timeout", str(TIMEOUT), *podman, "run", "--rm", "--runtime", runtime, IMAGE, "true"])

        for runtime in runtimes:  # warm up: the page cache, the overlay, podman's first-run work
            timed(argv(runtime), env)
        times: dict[str, list[float]] = {rt: [] for rt in runtimes}
        for _ in range(params["runs"]):
            for runtime in runtimes:
                times[runtime].append(timed(argv(runtime), env) * 1000)
    finally:
        _podman_cleanup(ctx, base)
        # What podman makes in $XDG_RUNTIME_DIR besides its configured dirs (runc's default
        # root, libpod's and containers' dirs): removed when nothing is left in them.
        for name in {"runc", "libpod", "containers"} - before:
            subprocess.run(["find", str(run_dir / name), "-depth", "-type", "d", "-empty", "-delete"],
                           capture_output=True, timeout=TIMEOUT)
        if daemon is not None:
            daemon.stop()
    runc = statistics.median(times["runc"])
    rows = [Row(S7, "podman run --rm `true`, runc, median", runc, "ms"),
            Row(S7, "podman run --rm `true`, runc, p95", p95(times["runc"]), "ms")]
    if "nodestep" in times:
        proxied = statistics.median(times["nodestep"])
        rows += [
            Row(S7, "podman run --rm `true`, nodestep-oci, median", proxied, "ms", "runc, median ms", runc),
            Row(S7, "podman run --rm `true`, nodestep-oci, p95", p95(times["nodestep"]), "ms", "runc, p95 ms",
                p95(times["runc"])),
            Row(S7, "ratio of medians, nodestep-oci / runc", proxied / runc, "x"),
        ]
    else:
        print(f"# {S7}: {PROXY} does not exist; only podman with runc was measured", file=sys.stderr)
    return rows


def _podman_setup(ctx: Context, base: Path, daemon) -> dict[str, str]:
    """containers.conf (runc, and nodestep-oci through a wrapper naming the daemon's socket)
    and storage.conf under base; podman's environment."""
    user = ctx.user
    runtimes = 'runc = ["/usr/sbin/runc", "/usr/bin/runc"]\n'
    if daemon is not None:
        wrapper = ctx.base / "s7-nodestep-oci"
        wrapper.write_text(f"#!/bin/sh\nNODESTEPD_SOCKET={shlex.quote(str(daemon.socket))}\nexport NODESTEPD_SOCKET\n"
                           f"exec {_proxy_program(user)} \"$@\"\n")
        wrapper.chmod(0o755)
        runtimes += f'nodestep = ["{wrapper}"]\n'
    config = base / "config" / "containers"
    config.mkdir(parents=True)
    (config / "containers.conf").write_text(f"""\
[containers]
netns = "host"
log_driver = "k8s-file"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{base}/tmp"
runtime_supports_json = ["runc", "nodestep"]
runtime_supports_nocgroups = ["runc", "nodestep"]
[engine.runtimes]
{runtimes}""")
    (config / "storage.conf").write_text(f'[storage]\ndriver = "overlay"\nrunroot = "{base}/runroot"\n'
                                         f'graphroot = "{base}/graphroot"\n')
    for path in (base, base / "config", config, config / "containers.conf", config / "storage.conf"):
        shutil.chown(path, user.uid, user.gid)
    base.chmod(0o700)
    # storage.conf is honoured for a rootless user only from $XDG_CONFIG_HOME (not CONTAINERS_STORAGE_CONF).
    return {**user.env, "XDG_CONFIG_HOME": str(base / "config"), "XDG_DATA_HOME": str(base / "data"),
            "CONTAINERS_CONF": str(config / "containers.conf")}


def _proxy_program(user) -> str:
    """The venv's nodestep-oci, unless the user's processes cannot run its interpreter (a venv
    made from root's own Python under a root-only home); then the package through the
    system's Python (it needs nothing but the standard library)."""
    probe = subprocess.run(user.argv(["sh", "-c", f"exec {shlex.quote(str(PROXY))} --version"]), env=user.env,
                           capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL, cwd="/")
    if probe.returncode == 0:
        return shlex.quote(str(PROXY))
    return f"/usr/bin/env PYTHONPATH={shlex.quote(str(REPO))} /usr/bin/python3 -m nodestepd.oci.cli"


def _podman_cleanup(ctx: Context, base: Path) -> None:
    """Remove what podman left: its containers, its pause process (by the pid it wrote), its files."""
    env = {**ctx.user.env, "XDG_CONFIG_HOME": str(base / "config"), "XDG_DATA_HOME": str(base / "data"),
           "CONTAINERS_CONF": str(base / "config" / "containers" / "containers.conf")}
    if (base / "config").exists():
        subprocess.run(ctx.user.argv([PODMAN, "rm", "--all", "--force", "--time", "0"]), env=env,
                       capture_output=True, timeout=TIMEOUT)
    # conmon and its `podman container cleanup` may outlive `run --rm` by a moment (they name
    # base on their command lines): given 30 s, then killed; then the pause process.
    deadline = time.monotonic() + 30
    while _naming(ctx.user.uid, str(base)) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = _naming(ctx.user.uid, str(base))
    try:
        pids.append(int((base / "tmp" / "pause.pid").read_text()))
    except (FileNotFoundError, ValueError):
        pass
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid == ctx.user.uid:
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
    subprocess.run(["rm", "-rf", "--one-file-system", str(base)], timeout=TIMEOUT)


def _naming(uid: int, text: str) -> list[int]:
    """uid's processes whose command line contains text."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid == uid:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pids


def _check(argv: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(argv, env=env, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
