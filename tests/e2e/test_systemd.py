"""nodestepd under this machine's real systemd, end to end: the shipped units in systemd/,
socket activation by systemd itself, the journal, steps surviving `systemctl restart`,
and the watchdog.

One private systemd (systemd_machine.py) is booted per module; the units are installed
in its /run/systemd/system as README's "Install on a compute node" says, with one drop-in
that changes only paths (this venv's programs, a private oci.conf, spool and state dir).
Each test starts with the socket listening and the service stopped. Only the installed
programs are used, as an administrator and the users would: nodestepctl (as the test
user), systemctl, journalctl, runc. Job ids 8000-8999 belong to this file.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, RUNC_RUN_CONF, User, wait_gone
from systemd_machine import Machine, poll_until

BIN = Path(sys.executable).parent
NODESTEPD = BIN / "nodestepd"
NODESTEPCTL = BIN / "nodestepctl"
UNITS = REPO / "systemd"
SOCKET = "/run/nodestepd/nodestepd.sock"  # nodestepd.socket's ListenStream=, unchanged
SERVICE = "nodestepd.service"
NODE_NAME = "e2enode"


@dataclass
class Node:
    """The machine with nodestepd installed, and the test user's view of it."""

    machine: Machine
    user: User
    bundle: Path
    base: Path  # oci.conf, spool/, state/, out/ (the steps' --output files): the host's, shared

    @property
    def spool(self) -> Path:
        return self.base / "spool"

    @property
    def out(self) -> Path:
        return self.base / "out"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """nodestepctl as the test user, inside the machine."""
        return self.machine.run(self.user.command([str(NODESTEPCTL), "--socket", SOCKET, *args]), env=self.user.env,
                                timeout=timeout)

    def launch_detached(self, job: int, command: list[str], output: Path | None = None) -> None:
        extra = ["--output", str(output)] if output else []
        result = self.ctl("run", "--detach", "--job-id", str(job), *extra, "--bundle", str(self.bundle), "--",
                          *command)
        assert (result.returncode, result.stdout) == (0, f"{job}.0\n"), result.stderr

    def service(self, *properties: str) -> dict[str, str]:
        return self.machine.show(SERVICE, *properties)

    def containers(self) -> list[str]:
        """The containers runc knows in the user's root (oci.conf's --root=/run/user/%U/)."""
        result = self.machine.run(self.user.command(["runc", "--root", f"/run/user/{self.user.uid}/", "list", "-q"]),
                                  env=self.user.env, check=True)
        return result.stdout.split()

    def container_name(self, job: int) -> str:
        return f"{NODE_NAME}.{self.user.name}.{job}.0.0"

    def service_processes(self) -> list[int]:
        """The pids (as the machine sees them) in nodestepd.service's cgroup."""
        cgroup = self.service("ControlGroup")["ControlGroup"]
        unified = "/sys/fs/cgroup/unified" if self.machine.path("/sys/fs/cgroup/unified").is_dir() else "/sys/fs/cgroup"
        return [int(p) for p in self.machine.run(["cat", f"{unified}{cgroup}/cgroup.procs"], check=True).stdout.split()]

    def assert_nothing_left(self) -> None:
        assert self.containers() == []
        assert sorted(os.listdir(self.spool)) == []
        # The monitors and tasks ran in the service's cgroup (KillMode=process): only the daemon remains.
        assert self.service_processes() == [int(self.service("MainPID")["MainPID"])]


@pytest.fixture(scope="module")
def installed(workdir, user, bundle):
    """A booted machine with nodestepd.socket enabled and started, as README installs it."""
    base = Path(tempfile.mkdtemp(prefix="systemd-", dir=workdir))
    base.chmod(0o755)
    (base / "oci.conf").write_text(RUNC_RUN_CONF)
    # Its own settings file, so that the host's /etc/nodestepd (seen through the overlay) is not read.
    (base / "nodestepd.toml").write_text("# the built-in defaults\n")
    (base / "out").mkdir()
    os.chown(base / "out", user.uid, user.gid)
    machine = Machine(base / "machine", share=workdir)
    machine.base.mkdir()
    try:
        # runc's --root for the user: a user's runtime dir, which logind would make on a real node.
        machine.boot({f"user/{user.uid}": (None, 0o700, user.uid, user.gid)})
        assert machine.path(str(NODESTEPD)).exists(), f"{NODESTEPD} must be visible inside the machine (not under /tmp)"
        units = machine.path("/run/systemd/system")
        for name in ("nodestepd.socket", "nodestepd.service"):
            (units / name).write_text((UNITS / name).read_text())
        dropin = units / "nodestepd.service.d"
        dropin.mkdir()
        # Paths only: this venv's programs, and this test's files instead of the node's
        # /etc/nodestepd, /etc/slurm/oci.conf, /var/spool/nodestepd and /var/lib/nodestepd.
        (dropin / "e2e-paths.conf").write_text(
            "[Service]\n"
            "ExecStart=\n"
            f"ExecStart={NODESTEPD} --config {base}/nodestepd.toml --oci-conf {base}/oci.conf "
            f"--spool-dir {base}/spool --state-dir {base}/state --node-name {NODE_NAME}\n"
            "ExecReload=\n"
            f"ExecReload={NODESTEPCTL} --socket {SOCKET} reload\n"
        )
        machine.systemctl("daemon-reload")
        machine.systemctl("enable", "--runtime", "--now", "nodestepd.socket")
        yield Node(machine, user, bundle, base)
    finally:
        machine.shutdown()


@pytest.fixture
def node(installed):
    """The machine as a node that just booted: socket listening, service stopped."""
    m = installed.machine
    m.systemctl("stop", SERVICE)
    m.systemctl("reset-failed", SERVICE, check=False)  # not failed: nothing to reset
    assert m.systemctl("is-active", "nodestepd.socket").stdout == "active\n"
    assert installed.service("ActiveState", "MainPID") == {"ActiveState": "inactive", "MainPID": "0"}
    return installed


@pytest.fixture
def gate(bundle):
    """gate(job, status) -> (a container command that prints "ready", waits for the test to
    open its gate, prints "done" and exits with `status`; the function that opens the gate).
    The test, not a sleep, decides when each step ends. Every gate is opened at the end."""
    made = []

    def make(job: int, status: int):
        path = bundle / "rootfs" / "tmp" / f"go-e2e-{job}"
        path.unlink(missing_ok=True)
        made.append(path)
        script = f"echo ready; while [ ! -e /tmp/go-e2e-{job} ]; do sleep 0.05; done; echo done; exit {status}"
        return ["sh", "-c", script], path.touch

    yield make
    for path in made:
        path.touch()


def processes_of(name: str) -> list[int]:
    """The host's pids whose command line names `name` (the container: its monitor, the
    runtime's shell and runc run all carry it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if name.encode() in f.read():
                        pids.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return pids


@contextmanager
def start_held(machine: Machine, unit: str, fifo: Path):
    """Hold `unit`'s next start job until the block ends: a oneshot unit ordered before it
    is kept starting (it reads a FIFO the test writes at the end), and systemd runs a start
    job only once the start jobs of the units ordered before it are done. A restart's stop
    goes first (a stop is always ordered before a start), so `systemctl restart` stops the
    daemon and then waits, for as long as the test needs the daemon to be down."""
    os.mkfifo(fifo)
    machine.run(["systemd-run", "--no-block", "--unit=nsd-e2e-hold", "--service-type=oneshot",
                 f"--property=Before={unit}", "--", "sh", "-c", f"read go < {fifo}"], check=True)
    try:
        yield
    finally:
        # Non-blocking: ENXIO until the holder has the FIFO open for reading.
        fd = poll_until(lambda: _open_writer(fifo), 30, "the holding unit opens its FIFO")
        os.write(fd, b"go\n")
        os.close(fd)
        poll_until(lambda: machine.show("nsd-e2e-hold.service", "ActiveState")["ActiveState"] == "inactive", 30,
                   "the holding unit ends")


def _open_writer(fifo: Path) -> int | None:
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


# ---- 1. socket activation -----------------------------------------------------------------


def test_first_request_starts_the_daemon_through_systemd(node, user, bundle):
    m = node.machine
    # Only the socket is started (enabled, as README says); no daemon runs yet.
    assert m.systemctl("is-enabled", "nodestepd.socket").stdout == "enabled-runtime\n"
    assert node.service("ActiveState", "MainPID") == {"ActiveState": "inactive", "MainPID": "0"}
    sock = m.path(SOCKET)
    made = sock.lstat()
    assert stat.S_ISSOCK(made.st_mode) and stat.S_IMODE(made.st_mode) == 0o666  # SocketMode=0666
    cursor = m.cursor()

    run = node.ctl("run", "--job-id", "8001", "--bundle", str(bundle), "--", "sh", "-c", "echo served by $(hostname)")
    assert (run.returncode, run.stdout) == (0, "served by runc\n"), run.stderr

    service = node.service("ActiveState", "SubState", "MainPID")
    assert (service["ActiveState"], service["SubState"]) == ("active", "running")
    pid = service["MainPID"]
    # This daemon was handed systemd's listening socket (LISTEN_FDS) and serves it as it is.
    (passed,) = m.wait_journal(f"_PID={pid}", after=cursor,
                               message=f"serving the socket passed by the service manager socket={SOCKET}")
    assert passed["_SYSTEMD_UNIT"] == SERVICE and passed["NODESTEPD_SOCKET"] == SOCKET
    (listening,) = m.wait_journal(f"_PID={pid}", "NODESTEPD_ACTIVATED=True", after=cursor)
    assert listening["MESSAGE"].startswith("listening ") and listening["NODESTEPD_SOCKET"] == SOCKET
    problems = [e["MESSAGE"] for e in m.journal(f"_PID={pid}", after=cursor) if int(e["PRIORITY"]) <= 4]
    assert problems == []  # no warning, no error
    after = sock.lstat()
    assert (after.st_dev, after.st_ino) == (made.st_dev, made.st_ino)  # the same socket: not bound anew
    status = node.ctl("status")
    assert f"socket:       {SOCKET}\n" in status.stdout and "0 running, 1 finished" in status.stdout, status


# ---- 2. journald ----------------------------------------------------------------------------


def test_step_records_and_detached_output_reach_journald(node, user, bundle):
    m = node.machine
    run = node.ctl("run", "--job-id", "8101", "--step-id", "3", "--bundle", str(bundle), "--", "sh", "-c", "exit 7")
    assert run.returncode == 7, run.stderr
    records = m.wait_journal("NODESTEPD_JOB_ID=8101", count=3)
    assert [e["MESSAGE"].split(" job_id=")[0] for e in records] == ["step started", "task exited", "step finished"]
    started, exited, finished = records
    for entry in records:
        assert (entry["NODESTEPD_JOB_ID"], entry["NODESTEPD_STEP_ID"], entry["NODESTEPD_USER"]) == (
            "8101", "3", user.name)
        assert (entry["SYSLOG_IDENTIFIER"], entry["_SYSTEMD_UNIT"], entry["PRIORITY"]) == ("nodestepd", SERVICE, "6")
        # Sent over journald's native protocol (the daemon saw JOURNAL_STREAM), not as stderr lines.
        assert entry["_TRANSPORT"] == "journal"
    assert (started["NODESTEPD_NTASKS"], started["NODESTEPD_BUNDLE"]) == ("1", str(bundle))
    assert (exited["NODESTEPD_TASK_ID"], exited["NODESTEPD_STATUS"]) == ("0", "7")
    assert finished["NODESTEPD_STATUS"] == "7"

    # Detached with nowhere to write: each output line becomes a journal entry.
    node.launch_detached(8102, ["sh", "-c", "echo to the journal; echo oops >&2"])
    assert node.ctl("wait", "8102.0").returncode == 0
    lines = m.wait_journal("NODESTEPD_JOB_ID=8102", "SYSLOG_IDENTIFIER=nodestepd-step", count=2)
    assert sorted((e["NODESTEPD_STREAM"], e["PRIORITY"], e["MESSAGE"]) for e in lines) == [
        ("stderr", "3", "oops"), ("stdout", "6", "to the journal")]
    for entry in lines:
        assert (entry["NODESTEPD_JOB_ID"], entry["NODESTEPD_STEP_ID"], entry["NODESTEPD_TASK_ID"],
                entry["NODESTEPD_USER"], entry["_SYSTEMD_UNIT"]) == ("8102", "0", "0", user.name, SERVICE)


# ---- 3. systemctl restart ---------------------------------------------------------------------


def test_steps_survive_systemctl_restart_with_their_statuses(node, user, gate):
    m = node.machine
    during = {8201: 3, 8202: 0, 8203: 5}  # end while the daemon is down
    after = {8204: 7, 8205: 1}  # still running when the next daemon takes over
    opens, processes = {}, {}
    for job, status in {**during, **after}.items():
        command, opens[job] = gate(job, status)
        # --output: the container writes to a file, not to a pipe the daemon reads.
        node.launch_detached(job, command, output=node.out / f"{job}.out")
        processes[job] = processes_of(node.container_name(job))
        assert processes[job], f"no process of step {job} found"  # else waiting for them below would prove nothing
    old = node.service("MainPID")["MainPID"]
    cursor = m.cursor()

    with start_held(m, SERVICE, node.base / "hold"):
        restart = subprocess.Popen(m.enter(["systemctl", "restart", SERVICE]), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            # The old daemon has stopped (SIGTERM to it alone, KillMode=process); the new one waits.
            poll_until(lambda: node.service("ActiveState", "MainPID") == {"ActiveState": "inactive", "MainPID": "0"},
                       60, "the daemon stopped")
            assert sorted(node.containers()) == sorted(node.container_name(j) for j in {**during, **after})
            for job in during:
                opens[job]()
            # Every process of those tasks has exited, the monitor (which records the status
            # before it reaps, and exits last) included.
            wait_gone([pid for job in during for pid in processes[job]])
        except BaseException:
            restart.kill()
            raise
    out, _ = restart.communicate(timeout=60)
    assert restart.returncode == 0, out
    new = node.service("ActiveState", "MainPID")
    assert new["ActiveState"] == "active" and new["MainPID"] not in ("0", old)
    (left,) = m.wait_journal(f"_PID={old}", after=cursor, predicate=lambda e: e["MESSAGE"].startswith(
        "shutting down: leaving running steps alone for the next daemon"))
    assert left["NODESTEPD_STEPS"] == str(len(during) + len(after))
    # The next daemon found the first ones ended, with their statuses, and the others running.
    ended = m.wait_journal(f"_PID={new['MainPID']}", after=cursor, count=len(during),
                           predicate=lambda e: e["MESSAGE"].startswith("task ended while the daemon was down"))
    assert sorted((int(e["NODESTEPD_JOB_ID"]), int(e["NODESTEPD_STATUS"])) for e in ended) == sorted(during.items())
    ps = json.loads(node.ctl("ps", "--json").stdout)
    assert sorted(s["job_id"] for s in ps if s["state"] == "running") == sorted(after)

    for job in after:
        opens[job]()
    for job, status in {**during, **after}.items():
        result = node.ctl("wait", f"{job}.0")
        assert result.returncode == status, (job, result.stderr)
        assert (node.out / f"{job}.out").read_text() == "ready\ndone\n"
    node.assert_nothing_left()


# ---- 4. the watchdog --------------------------------------------------------------------------


@pytest.fixture
def short_watchdog(node):
    """WatchdogSec=3 for the daemons started from now on (in a drop-in of its own)."""
    dropin = node.machine.path(f"/run/systemd/system/{SERVICE}.d/e2e-watchdog.conf")
    dropin.write_text("[Service]\nWatchdogSec=3\n")
    node.machine.systemctl("daemon-reload")
    yield 3
    dropin.unlink()
    node.machine.systemctl("daemon-reload")
    node.machine.systemctl("stop", SERVICE)


def test_a_frozen_daemon_is_restarted_by_the_watchdog_and_its_steps_recovered(node, short_watchdog, gate):
    m = node.machine
    running, ending = 8301, 8302
    run_command, open_running = gate(running, 6)
    end_command, open_ending = gate(ending, 4)
    node.launch_detached(running, run_command, output=node.out / f"{running}.out")
    node.launch_detached(ending, end_command, output=node.out / f"{ending}.out")
    before = node.service("MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] == "3s"
    frozen = before["MainPID"]
    cursor = m.cursor()

    m.systemctl("kill", "--kill-whom=main", "--signal=SIGSTOP", SERVICE)
    poll_until(lambda: m.path(f"/proc/{frozen}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", 10,
               "the daemon stopped")
    # One step is let end while the daemon is frozen: only its monitor sees it (it writes
    # the status to the exit file; its report to the daemon stays unread). Should the
    # watchdog be quicker than the container, the next daemon sees it end instead: either
    # way, its status must come back exact.
    open_ending()

    # systemd's watchdog fires (no WATCHDOG=1 for 3 s), kills the daemon (SIGABRT, and
    # SIGCONT so that a stopped process gets it) and, Restart=on-failure, starts the next one.
    restarted = poll_until(
        lambda: (s := node.service("ActiveState", "MainPID", "NRestarts"))["ActiveState"] == "active"
        and s["MainPID"] not in ("0", frozen) and s, 60, "the daemon restarted")
    assert int(restarted["NRestarts"]) == int(before["NRestarts"]) + 1
    systemd_says = [e["MESSAGE"] for e in m.journal("_PID=1", f"UNIT={SERVICE}", after=cursor)]
    assert f"{SERVICE}: Watchdog timeout (limit 3s)!" in systemd_says, systemd_says
    assert f"{SERVICE}: Failed with result 'watchdog'." in systemd_says, systemd_says
    assert not m.path(f"/proc/{frozen}").exists()

    open_running()
    assert node.ctl("wait", f"{running}.0").returncode == 6
    assert node.ctl("wait", f"{ending}.0").returncode == 4
    for job in (running, ending):
        assert (node.out / f"{job}.out").read_text() == "ready\ndone\n"
    node.assert_nothing_left()
