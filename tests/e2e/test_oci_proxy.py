"""nodestep-oci driven directly as conmon drives an OCI runtime, with real runc behind a
real daemon, in both oci.conf modes: create (the anchor's pid in the pid file, the step
prepared and held), state, start, kill, the exit status from the anchor, delete leaving
nothing; a terminal over the console socket; another user's requests; namespaces that are
not the caller's own; a daemon SIGKILLed and restarted under a running container.

tests/e2e/oci_conmon.py plays conmon: a child subreaper that runs `create` and waits for
the pid in the pid file as its child (an anchor that is not its descendant fails the test). Job ids 16000-16099 (SLURM_JOB_ID of the Slurm test).
"""

from __future__ import annotations

import json
import os
import select
import shlex
import statistics
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import BIN, REPO, RUNC_RUN_CONF, proc_state, runc_containers, spool_entries
from engines import IMAGE, EngineRuntime, busybox_tar, make_podman, runc_runtime  # noqa: F401  (fixtures)

INSTALLED_OCI = str(BIN / "nodestep-oci")
CONMON = str(Path(__file__).with_name("oci_conmon.py"))
CONFS = {"run": RUNC_RUN_CONF,
         "create-start": (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text()}


class Conmon:
    """oci_conmon.py as the user: its report lines (fd 3), the container's output (its stdout)."""

    def __init__(self, proc: subprocess.Popen, report: int) -> None:
        self.proc = proc
        self.report = report
        self._buffer = b""

    def line(self, timeout: float = 60) -> str:
        while b"\n" not in self._buffer:
            ready, _, _ = select.select([self.report], [], [], timeout)
            assert ready, f"no report from the conmon within {timeout} s; stderr: {self.stderr()}"
            chunk = os.read(self.report, 4096)
            assert chunk, f"conmon ended without reporting; stderr: {self.stderr()}"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")

    def created(self) -> int:
        word, _, value = self.line().partition(" ")
        assert word == "created", (word, value, self.stderr())
        return int(value)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.report)


@pytest.fixture(scope="session")
def oci_program(workdir, user) -> str:
    """nodestep-oci as the engines run it: a program the user's processes exec. The venv's,
    unless its interpreter is out of the users' reach (a venv made from root's own Python):
    then the same package through the system's Python, by a wrapper."""
    probe = subprocess.run(user.command(["sh", "-c", f"exec {INSTALLED_OCI} --version"]), capture_output=True,
                           env=user.env)
    if probe.returncode == 0:
        return INSTALLED_OCI
    wrapper = workdir / "nodestep-oci"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec /usr/bin/python3 -m nodestepd.oci.cli \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def oci_env(user):
    """The user's environment as conmon gives it to the runtime."""
    return {**user.env, "XDG_RUNTIME_DIR": f"/run/user/{user.uid}"}


@pytest.fixture
def container_bundle(bundle, user_dir, user):
    """container_bundle(*args, terminal=False) -> a bundle of the user's running args on the shared rootfs."""

    def make(*args: str, terminal: bool = False) -> Path:
        path = user_dir("oci-bundle-")
        config = json.loads((bundle / "config.json").read_text())
        config["root"]["path"] = str(bundle / "rootfs")
        config["process"]["args"] = list(args)
        config["process"]["terminal"] = terminal
        config["annotations"] = {"org.test": "yes"}
        (path / "config.json").write_text(json.dumps(config))
        os.chown(path / "config.json", user.uid, user.gid)
        return path

    return make


@pytest.fixture
def conmon(user, oci_env, user_dir, oci_program):
    """conmon(daemon, bundle, cid, terminal=False, env=None, wrap=()) -> Conmon, create running."""
    started: list[Conmon] = []

    def start(daemon, bundle: Path, cid: str, *, terminal: bool = False, env: dict | None = None,
              wrap: tuple[str, ...] = ()) -> Conmon:
        work = user_dir("oci-conmon-")
        r, w = os.pipe()
        argv = ["/usr/bin/python3", CONMON, str(w), oci_program, str(daemon.socket), str(bundle), str(work / "pid"), cid]
        if terminal:
            argv.append(str(work / "console.sock"))
        try:
            command = [*wrap, *argv] if wrap else user.command(argv)
            proc = subprocess.Popen(command, env=env or oci_env, cwd="/", stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(w,))
        finally:
            os.close(w)
        c = Conmon(proc, r)
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


def oci(daemon, user, env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(user.command([INSTALLED_OCI, "--socket", str(daemon.socket), *args]), env=env, cwd="/",
                          capture_output=True, text=True, timeout=120)


def state(daemon, user, env, cid: str) -> dict:
    done = oci(daemon, user, env, "state", cid)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def new_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex digits, as the engines make them


def records(daemon) -> list[str]:
    steps = daemon.state_dir / "steps"
    return sorted(os.listdir(steps)) if steps.exists() else []


@pytest.mark.parametrize("mode", ["run", "create-start"])
def test_lifecycle_as_conmon_drives_it(mode, start_daemon, user, oci_env, container_bundle, conmon):
    daemon = start_daemon(CONFS[mode])
    cid = new_id()
    bundle = container_bundle("sh", "-c", "trap 'echo got-usr1; exit 7' USR1; echo started; "
                              "while :; do sleep 0.1; done")
    c = conmon(daemon, bundle, cid)
    anchor = c.created()
    created = state(daemon, user, oci_env, cid)
    assert created == {"ociVersion": "1.0.2", "id": cid, "status": "created", "pid": anchor, "bundle": str(bundle),
                       "annotations": {"org.test": "yes"}}
    assert proc_state(anchor) not in (None, "Z")
    # Created: prepared, nothing of the container's runs (create/start: runc holds it created).
    ps = json.loads(subprocess.run([str(BIN / "nodestepctl"), "--socket", str(daemon.socket), "ps", "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert [s["container_id"] for s in ps] == [cid]
    assert ps[0]["tasks"][0]["pid"] is None if mode == "run" else True

    done = oci(daemon, user, oci_env, "start", cid)
    assert done.returncode == 0, done.stderr
    assert c.proc.stdout.readline() == b"started\n"
    assert state(daemon, user, oci_env, cid)["status"] == "running"

    done = oci(daemon, user, oci_env, "kill", cid, "10")
    assert done.returncode == 0, done.stderr
    assert c.line() == "exited 7"
    assert c.proc.stdout.readline() == b"got-usr1\n"
    assert state(daemon, user, oci_env, cid)["status"] == "stopped"

    done = oci(daemon, user, oci_env, "delete", "--force", cid)
    assert done.returncode == 0, done.stderr
    gone = oci(daemon, user, oci_env, "state", cid)
    assert gone.returncode == 1 and "does not exist" in gone.stderr
    assert oci(daemon, user, oci_env, "delete", cid).returncode == 0  # idempotent
    assert runc_containers(user) == []
    assert spool_entries(daemon) == [] or all(not os.listdir(daemon.spool_dir / e) for e in spool_entries(daemon))
    assert records(daemon) == []
    assert proc_state(anchor) is None


@pytest.mark.parametrize("mode", ["run", "create-start"])
def test_exit_code_and_signal_reach_the_anchor(mode, start_daemon, user, oci_env, container_bundle, conmon):
    daemon = start_daemon(CONFS[mode])
    exits, killed = new_id(), new_id()
    a = conmon(daemon, container_bundle("sh", "-c", "exit 3"), exits)
    b = conmon(daemon, container_bundle("sleep", "1000"), killed)
    a.created()
    b.created()
    for cid in (exits, killed):
        done = oci(daemon, user, oci_env, "start", cid)
        assert done.returncode == 0, done.stderr
    assert a.line() == "exited 3"
    done = oci(daemon, user, oci_env, "kill", killed, "KILL")
    assert done.returncode == 0, done.stderr
    assert b.line() == "signalled 9"  # the anchor dies of the same signal: conmon's 137
    for cid in (exits, killed):
        assert oci(daemon, user, oci_env, "delete", cid).returncode == 0
    assert runc_containers(user) == []
    assert records(daemon) == []


def test_delete_of_a_created_container_starts_nothing(start_daemon, user, oci_env, container_bundle, conmon):
    daemon = start_daemon(CONFS["create-start"])
    cid = new_id()
    c = conmon(daemon, container_bundle("sh", "-c", "echo must-not-run"), cid)
    c.created()
    assert len(runc_containers(user)) == 1  # RunTimeCreate done
    done = oci(daemon, user, oci_env, "delete", "--force", cid)
    assert done.returncode == 0, done.stderr
    word = c.line().split()[0]
    assert word in ("exited", "signalled")
    assert c.proc.stdout.read() == b""
    assert runc_containers(user) == []
    assert records(daemon) == []


def test_terminal_goes_over_the_console_socket(start_daemon, user, oci_env, container_bundle, conmon):
    daemon = start_daemon(CONFS["run"])
    cid = new_id()
    c = conmon(daemon, container_bundle("sh", "-c", "test -t 0 && test -t 1 && echo on-a-tty; exit 4",
                                        terminal=True), cid, terminal=True)
    c.created()
    assert c.proc.stdout.readline() == b"console received\n"  # before create returned
    assert oci(daemon, user, oci_env, "start", cid).returncode == 0
    assert c.line() == "exited 4"
    assert b"on-a-tty" in c.proc.stdout.read()
    assert oci(daemon, user, oci_env, "delete", cid).returncode == 0


def test_another_user_cannot_see_signal_or_delete(start_daemon, user, other_user, oci_env, container_bundle,
                                                   conmon):
    daemon = start_daemon(CONFS["run"])
    cid = new_id()
    c = conmon(daemon, container_bundle("sleep", "1000"), cid)
    c.created()
    assert oci(daemon, user, oci_env, "start", cid).returncode == 0
    other_env = {**other_user.env, "XDG_RUNTIME_DIR": f"/run/user/{other_user.uid}"}
    for args in (("state", cid), ("kill", cid, "KILL"), ("delete", "--force", cid), ("start", cid)):
        done = oci(daemon, other_user, other_env, *args)
        assert done.returncode == 1 and f"container {cid} does not exist" in done.stderr, (args, done.stderr)
    assert state(daemon, user, oci_env, cid)["status"] == "running"
    assert oci(daemon, user, oci_env, "delete", "--force", cid).returncode == 0
    assert c.line() in ("signalled 9", "exited 137", "signalled 15", "exited 143")


# Run as root: enter PID's user and mount namespaces, become UID:GID there, exec the rest.
ENTER_AS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid, uid, gid = map(int, sys.argv[1:4])
for name, flag in (("user", 0x10000000), ("mnt", 0x00020000)):
    fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY)
    if libc.setns(fd, flag) != 0:
        raise OSError(ctypes.get_errno(), f"setns {name}")
    os.close(fd)
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.execv(sys.argv[4], sys.argv[4:])
"""


@pytest.fixture
def roots_user_namespace(user):
    """A user namespace (and a mount namespace of it) made by root, mapping the user's ids
    onto themselves: the user's process inside is the user for the daemon, the namespace
    is root's. Yields the pid of its holder."""
    holder = subprocess.Popen(["unshare", "--user", "--mount", "sh", "-c", "echo ready; exec sleep 1000"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        Path(f"/proc/{holder.pid}/uid_map").write_text(f"{user.uid} {user.uid} 1\n")
        Path(f"/proc/{holder.pid}/gid_map").write_text(f"{user.gid} {user.gid} 1\n")
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_user_namespace_not_owned_by_the_caller_is_refused(start_daemon, user, oci_env, container_bundle, conmon,
                                                             roots_user_namespace):
    """The user's create runs inside a user namespace root made: the daemon must not run
    anything of the user's there (the kernel would let root's monitor in; we check first)."""
    daemon = start_daemon(CONFS["run"])
    cid = new_id()
    wrap = ("/usr/bin/python3", "-c", ENTER_AS, str(roots_user_namespace), str(user.uid), str(user.gid))
    c = conmon(daemon, container_bundle("sh", "-c", "echo must-not-run"), cid, wrap=wrap)
    word, _, status = c.line().partition(" ")
    assert word == "create-failed", c.stderr()
    c.proc.wait()
    assert records(daemon) == [] and runc_containers(user) == []
    assert f"the caller's user namespace belongs to uid 0, not to uid {user.uid}" in daemon.log()
    assert c.proc.stdout.read() == b""


def test_a_container_in_a_slurm_job_is_a_step_of_it(start_daemon, user, oci_env, container_bundle, conmon):
    daemon = start_daemon(CONFS["run"])
    first, second = new_id(), new_id()
    env = {**oci_env, "SLURM_JOB_ID": "16001", "SLURM_STEP_ID": "2"}
    a = conmon(daemon, container_bundle("sleep", "1000"), first, env=env)
    b = conmon(daemon, container_bundle("sleep", "1000"), second, env=env)
    a.created()
    b.created()
    ps = json.loads(subprocess.run([str(BIN / "nodestepctl"), "--socket", str(daemon.socket), "ps", "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert sorted((s["job_id"], s["step_id"], s["container_id"]) for s in ps) == sorted(
        [(16001, 100000, first), (16001, 100001, second)]) or sorted(
        (s["job_id"], s["step_id"], s["container_id"]) for s in ps) == sorted(
        [(16001, 100000, second), (16001, 100001, first)])
    assert [s["slurm_step_id"] for s in ps] == [2, 2]  # the caller's Slurm step, kept beside the daemon's number
    table = subprocess.run([str(BIN / "nodestepctl"), "--socket", str(daemon.socket), "ps"],
                           capture_output=True, text=True, check=True).stdout
    assert first[:12] in table and second[:12] in table
    for cid in (first, second):
        assert oci(daemon, user, oci_env, "delete", cid).returncode == 0
    assert records(daemon) == []


@pytest.mark.parametrize("mode", ["run", "create-start"])
def test_daemon_killed_and_restarted_under_a_running_container(mode, start_daemon, user, oci_env, bundle,
                                                               container_bundle, conmon):
    daemon = start_daemon(CONFS[mode])
    cid = new_id()
    go = f"/tmp/oci-go-{cid[:16]}"
    c = conmon(daemon, container_bundle("sh", "-c", f"echo waiting; while [ ! -e {go} ]; do sleep 0.1; done; exit 5"),
               cid)
    anchor = c.created()
    assert oci(daemon, user, oci_env, "start", cid).returncode == 0
    assert c.proc.stdout.readline() == b"waiting\n"
    daemon.proc.kill()
    daemon.proc.wait()
    after = start_daemon(CONFS[mode], after=daemon)
    assert state(after, user, oci_env, cid)["status"] == "running"
    marker = bundle / "rootfs" / go.lstrip("/")
    marker.write_text("")
    try:
        assert c.line() == "exited 5"  # the real status, through the next daemon
    finally:
        marker.unlink()
    assert proc_state(anchor) is None
    # The engine's cleanup still deletes it: a container the next daemon saw end is stopped, not unknown.
    assert state(after, user, oci_env, cid)["status"] == "stopped"
    done = oci(after, user, oci_env, "delete", "--force", cid)
    assert done.returncode == 0, done.stderr
    assert "does not exist" in oci(after, user, oci_env, "state", cid).stderr
    assert runc_containers(user) == []


def proxy_for(daemon, program: str, workdir: Path) -> EngineRuntime:
    """The engines' runtime: nodestep-oci pointed at `daemon` (the engines give their runtime
    an environment of their own, so the wrapper sets the socket)."""
    script = workdir / f"nodestep-oci-{daemon.socket.name}-{uuid.uuid4().hex[:8]}"
    script.write_text(f"#!/bin/sh\nNODESTEPD_SOCKET={shlex.quote(str(daemon.socket))}\nexport NODESTEPD_SOCKET\n"
                      f"exec {shlex.quote(program)} \"$@\"\n")
    script.chmod(0o755)
    return EngineRuntime("proxy", str(script), daemon)


@pytest.mark.parametrize("mode", ["run", "create-start"])
def test_podman_run_rm_through_the_proxy(mode, start_daemon, make_podman, user, workdir, oci_program):
    """The smoke test with the real engine (tests/e2e/test_engines*.py have the rest): output,
    exit code, and nothing left behind; the bundle and rootfs exist only in podman's namespaces."""
    daemon = start_daemon(CONFS[mode])
    podman = make_podman(user, proxy_for(daemon, oci_program, workdir))
    r = podman("run", "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out\n", b"err\n"), daemon.log()[-3000:]
    assert records(daemon) == [] and runc_containers(user) == []
    assert "OCI container" in daemon.log() and "namespaces=True" in daemon.log()


def test_podman_container_inside_a_slurm_job(start_daemon, make_podman, user, workdir, oci_program):
    """podman gives its runtime no SLURM_* of its own environment: the job comes from the
    container's environment here (-e; --env-host passes the whole job's)."""
    daemon = start_daemon(CONFS["run"])
    podman = make_podman(user, proxy_for(daemon, oci_program, workdir))
    cid = podman.ok("run", "-d", "-e", "SLURM_JOB_ID=16002", "-e", "SLURM_STEP_ID=4", IMAGE,
                    "sh", "-c", "echo ready; exec sleep 1000").strip()
    ps = json.loads(subprocess.run([str(BIN / "nodestepctl"), "--socket", str(daemon.socket), "ps", "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert [(s["job_id"], s["step_id"], s["slurm_step_id"]) for s in ps if s["container_id"] == cid] == [
        (16002, 100000, 4)]
    podman.ok("rm", "--force", "--time", "0", cid)
    assert records(daemon) == [] and runc_containers(user) == []


def _median_run_s(podman, runs: int) -> float:
    times = []
    for _ in range(runs):
        began = time.monotonic()
        podman.ok("run", "--rm", IMAGE, "true")
        times.append(time.monotonic() - began)
    return statistics.median(times)


@pytest.mark.skipif(not os.environ.get("NODESTEP_OCI_MEASURE"), reason="a measurement: NODESTEP_OCI_MEASURE=N runs")
def test_measure_podman_run_rm_true(start_daemon, make_podman, user, workdir, oci_program):
    """`podman run --rm bb true`, median of N runs, with runc directly and through the proxy
    (run mode), alternating rounds so that the machine's load falls on both alike."""
    runs = int(os.environ["NODESTEP_OCI_MEASURE"])
    daemon = start_daemon(CONFS["run"])
    direct = make_podman(user, runc_runtime())
    proxied = make_podman(user, proxy_for(daemon, oci_program, workdir))
    for p in (direct, proxied):
        p.ok("run", "--rm", IMAGE, "true")  # warm: the storage, the pause process
    runc_s, proxy_s = [], []
    for _ in range(runs):
        runc_s.append(_median_run_s(direct, 1))
        proxy_s.append(_median_run_s(proxied, 1))
    print(f"\npodman run --rm {IMAGE} true, median of {runs}: runc {statistics.median(runc_s) * 1000:.0f} ms, "
          f"nodestep-oci {statistics.median(proxy_s) * 1000:.0f} ms")
