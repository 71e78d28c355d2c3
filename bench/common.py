"""What every benchmark section shares: the machine, the user, bundles, daemons, timing, statistics."""

from __future__ import annotations

import json
import os
import platform
import pwd
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the nodestepd and nodestepctl of the Python running the bench
DRIVER = Path(__file__).resolve().parent / "driver.py"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNC_RUN_CONF = REPO / "tests" / "oci-conf-examples" / "runc-run.conf"
# Steps enough for section 4's thousand, and connections enough to launch and cancel them
# concurrently; the defaults (1024 steps, 128 per user) stay as they are.
LIMITS_TOML = """\
max_steps = 4096
max_steps_per_user = 4096
max_connections = 4096
max_connections_per_user = 4096
"""


@dataclass(frozen=True)
class BenchUser:
    """The unprivileged user every step, runtime and reference runs as."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def named(cls, name: str) -> "BenchUser":
        pw = pwd.getpwnam(name)
        return cls(name, pw.pw_uid, pw.pw_gid, pw.pw_dir)

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": PATH, "HOME": self.home, "USER": self.name, "LOGNAME": self.name,
                "XDG_RUNTIME_DIR": f"/run/user/{self.uid}", "LANG": "C.UTF-8"}

    @property
    def runc(self) -> str:
        """runc as the guide's oci.conf runs it for this user."""
        return f"runc --rootless=true --root=/run/user/{self.uid}/"

    def argv(self, argv: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]


def machine() -> dict[str, object]:
    """What every figure is measured on."""
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    runc = subprocess.run(["runc", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "cores": os.cpu_count(), "kernel": platform.release(), "cpu": model,
        "memory_gib": round(mem_kib / 2**20, 1), "python": platform.python_version(), "runc": runc,
        "date": time.strftime("%Y-%m-%d"), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def p95(values: list[float]) -> float:
    """The 95th percentile (the largest value below 20 samples' worth)."""
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[-1]


# runc 1.1's nsexec first copies its own binary into a memfd and seals it. Under load, on
# this kernel, the seal sometimes fails before any container exists ("could not ensure we
# are a cloned binary: Device or resource busy", seen once in a few thousand runc starts
# with other work on both cores). A sample that failed so is taken again, at most RETAKES
# times, and counted: the report's settings say how many were (`retaken`).
RUNC_CLONE_BUSY = "could not ensure we are a cloned binary: Device or resource busy"
RETAKES = 3
retaken = 0


def sample(argv: list[str], env: dict[str, str], **kwargs: object) -> tuple[subprocess.CompletedProcess, float]:
    """subprocess.run(argv) with stdin from /dev/null and stderr captured, taken again while
    it fails with runc's transient RUNC_CLONE_BUSY: the last take and its wall time (s)."""
    global retaken
    for attempt in range(RETAKES + 1):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
        elapsed = time.perf_counter() - start
        if done.returncode == 0 or attempt == RETAKES or RUNC_CLONE_BUSY not in _text(done.stderr):
            return done, elapsed
        retaken += 1
        print(f"# a sample is taken again: {RUNC_CLONE_BUSY!r} ({argv[-1]})", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def timed(argv: list[str], env: dict[str, str], check: bool = True) -> float:
    """Wall time of argv, in seconds (of its last take, see sample)."""
    done, elapsed = sample(argv, env, stdout=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {_text(done.stderr)}")
    return elapsed


def make_bundle(user: BenchUser, path: Path) -> Path:
    subprocess.run(["sh", str(REPO / "scripts" / "make-bundle.sh"), user.name, str(path)], check=True)
    return path


def direct_bundle(user: BenchUser, bundle: Path, path: Path, args: list[str]) -> Path:
    """The bundle as nodestepd rewrites it (absolute rootfs, the step's args), for runc run directly."""
    path.mkdir()
    config = json.loads((bundle / "config.json").read_text())
    config["root"]["path"] = str(bundle / "rootfs")
    config["process"]["args"] = args
    (path / "config.json").write_text(json.dumps(config))
    for p in (path, path / "config.json"):
        shutil.chown(p, user.uid, user.gid)
    return path


@dataclass
class Daemon:
    proc: subprocess.Popen
    socket: Path
    log_path: Path
    ctl: list[str] = field(default_factory=list)  # nodestepctl on this daemon's socket

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self, event: str) -> list[dict]:
        """The daemon's JSON log lines of one event."""
        records = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                records.append(record)
        return records

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)


def start_daemon(base: Path, name: str, oci_conf: str, *extra: str, toml: str | None = None) -> Daemon:
    """A nodestepd on its own socket, spool and state dirs under base; returns once it said READY=1.

    It cancels its steps when stopped, so an interrupted bench leaves no containers behind.
    """
    (base / f"{name}.conf").write_text(oci_conf)
    argv = [str(BIN / "nodestepd"), "--socket", str(base / f"{name}.sock"), "--oci-conf", str(base / f"{name}.conf"),
            "--spool-dir", str(base / f"{name}-spool"), "--state-dir", str(base / f"{name}-state"),
            "--node-name", name, "--log-format", "json", "--steps-on-stop", "cancel", *extra]
    if toml is not None:
        (base / f"{name}.toml").write_text(toml)
        argv += ["--config", str(base / f"{name}.toml")]
    notify_path = base / f"{name}.notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        with open(base / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, env={"PATH": PATH, "NOTIFY_SOCKET": str(notify_path), "LANG": "C.UTF-8"},
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        daemon = Daemon(proc, base / f"{name}.sock", base / f"{name}.log",
                        [str(BIN / "nodestepctl"), "--socket", str(base / f"{name}.sock")])
        # Whichever comes first: READY=1, or the daemon's exit (its pidfd; then say why at once).
        poller = select.poll()
        poller.register(notify, select.POLLIN)
        pidfd = os.pidfd_open(proc.pid)
        poller.register(pidfd, select.POLLIN)
        try:
            events = dict(poller.poll(60_000))
        finally:
            os.close(pidfd)
        if notify.fileno() not in events:
            daemon.stop()
            raise RuntimeError(f"nodestepd {name} did not become ready:\n{daemon.log_path.read_text()}")
        message = notify.recv(4096)
    if message != b"READY=1":
        raise RuntimeError(f"nodestepd {name} said {message!r}")
    return daemon


def run_driver(user: BenchUser, **params: object) -> dict:
    """One driver operation as the user (driver.py); its JSON result."""
    done = subprocess.run(user.argv([sys.executable, str(DRIVER), json.dumps(params)]), env=user.env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd="/")
    if done.returncode != 0:
        raise RuntimeError(f"driver {params['op']} failed ({done.returncode}):\n{done.stderr}")
    result = json.loads(done.stdout)
    if result.get("failed"):
        raise RuntimeError(f"driver {params['op']}: {result['failed']} of {params.get('count')} failed: "
                           f"{result['errors']}")
    return result


class HeldProcesses:
    """N processes spawned directly by the driver as the user, held until cancel(): a reference for scale."""

    def __init__(self, user: BenchUser, command: str, count: int, concurrency: int, after_kill: str | None) -> None:
        params = {"op": "spawn", "command": command, "count": count, "concurrency": concurrency, "hold": True,
                  "after_kill": after_kill}
        self.proc = subprocess.Popen(user.argv([sys.executable, str(DRIVER), json.dumps(params)]), env=user.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
        assert self.proc.stdout is not None
        self.launch_seconds = json.loads(self.proc.stdout.readline())["seconds"]

    def cancel(self) -> float:
        """Kill them all (and run after_kill for each); seconds it took."""
        out, _ = self.proc.communicate("go\n", timeout=600)
        return json.loads(out)["seconds"]


def sample_process(pid: int) -> dict[str, float]:
    """The daemon's resident memory, CPU time and context switches (all threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
        except FileNotFoundError:
            continue  # a worker thread that just ended
    return {"cpu_s": cpu, "rss_mib": rss_kib / 1024, "switches": switches,
            "threads": len(os.listdir(f"/proc/{pid}/task"))}


def idle_window(pid: int, seconds: float) -> dict[str, float]:
    """CPU seconds per minute and wake-ups per minute of pid over a window of `seconds`, and its RSS.

    The window is a measurement, not a wait for something: nothing is supposed to happen.
    CPU time comes in clock ticks (10 ms at USER_HZ 100), so short windows read 0 or 0.01 s.
    """
    before = sample_process(pid)
    time.sleep(seconds)
    after = sample_process(pid)
    per_minute = 60 / seconds
    return {"cpu_s_per_min": (after["cpu_s"] - before["cpu_s"]) * per_minute,
            "wakeups_per_min": (after["switches"] - before["switches"]) * per_minute,
            "rss_mib": after["rss_mib"], "threads": after["threads"], "window_s": seconds,
            "available_mib": _mem_available_mib()}


def _mem_available_mib() -> float:
    """The machine's MemAvailable: what the steps' runtimes and containers take, seen from outside."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


@dataclass(frozen=True)
class Context:
    """What a section gets: the user, a scratch dir every user can traverse, the user's bundle."""

    user: BenchUser
    base: Path
    bundle: Path
    quick: bool  # the smoke test's tiny counts: proves the bench works, measures nothing
