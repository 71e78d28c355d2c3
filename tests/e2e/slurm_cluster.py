"""A two-node Slurm cluster on one machine, for tests: two simulated nodes, each with its own
slurmd and its own nodestepd, one slurmctld, one munged.

Each node is a set of fresh namespaces (network, UTS, IPC, mount, pid) held by a small init
process (NODE_INIT below, pid 1 of the node's pid namespace):

- network: its own veth end with a private address (10.171.17.1 and .2), created directly
  inside the namespaces (`ip link add ... netns`), and its own loopback; nothing is added to
  the host's network. Each node has the same ports (6817, 6818) without clashing with
  anything outside.
- UTS: its own host name (nsd-n1, nsd-n2); /etc/hosts is bind-mounted over with both names.
- mount: private tmpfs on /tmp, /dev/shm and /run (so that each node has its own
  /run/user/UID for runc's state, its own /run/nodestepd for the daemon's socket at the
  client's default path, and its own /tmp for Slurm's PMIx directories); the test's work dir
  is bind-mounted back at its own path (the bundle, slurm.conf, logs, spool and state dirs
  live there, shared as a cluster file system would be); a fresh sysfs shows the node's own
  network interfaces (UCX reads them there), with the host's cgroup hierarchies bound under it
  (slurmd 22.05 will not start without them).
- IPC: its own SysV shared memory, as a real node has. (UCX still takes both simulated nodes
  for one machine, as they share the boot and machine ids, and tries shared memory between
  them: MPICH runs need UCX_TLS set, see test_slurm_two_nodes.py.)
- pid: killing the init kills everything in the node, container processes included.

Lifetimes: every process started here gets PR_SET_PDEATHSIG (the node inits through
`unshare --kill-child`), so a killed pytest leaves no daemon, slurmstepd or container
behind; stop() ends them by pid in order, every wait bounded. munged runs on the host
(its socket is a file, reached from both nodes).

Processes enter a node with nsenter (which forks for the pid namespace: the process proper
is nsenter's child, found by Node.start).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import NODESTEPCTL, NODESTEPD, SYSTEM_PATH, User

START_TIMEOUT = 90.0  # this machine is slow and shared: generous
STOP_TIMEOUT = 30.0
SUBNET = "10.171.17"
NODE_NAMES = ("nsd-n1", "nsd-n2")
NODESTEPD_SOCKET = "/run/nodestepd/nodestepd.sock"  # the client's default, inside each node

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this process when the test process (its parent thread) dies."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(127)


# pid 1 of a node: set up its mounts and host name, say "ready", then reap orphans until killed.
# argv[1]: JSON {name, workdir (bound back over the node's private /tmp), hosts (file),
# users ([uid, gid] of each user who gets a /run/user/UID), hidden: [dir, child] or null (a
# dir users cannot traverse, replaced by a tmpfs holding only child: the test's Python).
NODE_INIT = r"""
import ctypes, json, os, signal, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_REC = 4096, 16384

def mount(src, target, fstype, flags=0, data=None):
    if libc.mount(src.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                  data.encode() if data else None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} on {target}: {os.strerror(e)}")

conf = json.loads(sys.argv[1])
name, workdir, hosts, users, hidden = conf["name"], conf["workdir"], conf["hosts"], conf["users"], conf["hidden"]
socket.sethostname(name)
if hidden:
    # The test's Python lives under a dir users cannot traverse (pyenv under /root): outside
    # this mount namespace they run it anyway, here they cannot. Only the child is shown.
    parent, child = hidden
    keep_child = os.open(os.path.join(parent, child), os.O_PATH | os.O_DIRECTORY)
    mount("tmpfs", parent, "tmpfs", 0, "mode=755")
    os.mkdir(os.path.join(parent, child))
    mount(f"/proc/self/fd/{keep_child}", os.path.join(parent, child), None, MS_BIND | MS_REC)
    os.close(keep_child)
# fds to what the new mounts below will cover, bound back through /proc/self/fd
keep_workdir = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
keep_cgroup = os.open("/sys/fs/cgroup", os.O_PATH | os.O_DIRECTORY)
mount("tmpfs", "/tmp", "tmpfs", 0, "mode=1777")
os.makedirs(workdir)
mount(f"/proc/self/fd/{keep_workdir}", workdir, None, MS_BIND | MS_REC)
mount("tmpfs", "/dev/shm", "tmpfs", 0, "mode=1777")
mount("tmpfs", "/run", "tmpfs", 0, "mode=755")
os.makedirs("/run/nodestepd", mode=0o755)
for uid, gid in users:
    os.makedirs(f"/run/user/{uid}", mode=0o700)
    os.chown(f"/run/user/{uid}", uid, gid)
mount("sysfs", "/sys", "sysfs")
mount(f"/proc/self/fd/{keep_cgroup}", "/sys/fs/cgroup", None, MS_BIND | MS_REC)
mount(hosts, "/etc/hosts", None, MS_BIND)
os.close(keep_workdir)
os.close(keep_cgroup)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
print("ready", flush=True)
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    signal.sigtimedwait([signal.SIGCHLD], 5)
"""


def _hidden_python() -> list[str] | None:
    """[dir, child]: the first dir on the way to the real Python that others cannot traverse,
    and the next component; None when there is none."""
    path = Path(os.path.realpath(sys.executable))
    for parent in reversed(path.parents):
        if parent != Path("/") and not parent.stat().st_mode & 0o001:
            return [str(parent), path.relative_to(parent).parts[0]]
    return None


def _child_of(pid: int, timeout: float = 30) -> int:
    """The one child of pid (nsenter's, once it has forked), polled with a deadline: no event
    tells of a fork."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            raise AssertionError(f"process {pid} ended before its child could be found") from None
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not fork within {timeout} s")


def _wait_pid(pid: int, timeout: float) -> bool:
    """Until pid has ended (pidfd readable), at most timeout seconds; True if it has."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@dataclass
class Proc:
    """A process started in a node: nsenter (what the test spawned) and its child, the process proper."""
    name: str
    popen: subprocess.Popen
    pid: int

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.kill()
            self.popen.wait(timeout=STOP_TIMEOUT)


@dataclass
class Node:
    name: str
    address: str
    base: Path  # this node's own files: spool, state, nodestepd's log
    init: subprocess.Popen  # `unshare ... python NODE_INIT`
    init_pid: int  # the node's pid 1 (as the host sees it)
    procs: list[Proc] = field(default_factory=list)
    nodestepd: Proc | None = None

    @property
    def spool_dir(self) -> Path:
        return self.base / "nodestepd-spool"

    @property
    def state_dir(self) -> Path:
        return self.base / "nodestepd-state"

    def enter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.init_pid}", "--net", "--uts", "--ipc", "--mount", "--pid", "--wd=/", "--", *argv]

    def start(self, argv: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        """A long-running process in this node, its output in base/NAME.out, ended by stop()."""
        with open(self.base / f"{name}.out", "wb") as log:
            popen = subprocess.Popen(self.enter(argv), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env or {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
                                     preexec_fn=_die_with_parent)
        proc = Proc(name, popen, _child_of(popen.pid))
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 60,
            **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.enter(argv), env=env or {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"},
                              timeout=timeout, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent, **kwargs)

    def popen(self, argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.enter(argv), env=env, preexec_fn=_die_with_parent, **kwargs)

    # ---- what the tests look at --------------------------------------------------------

    def job_processes(self) -> list[str]:
        """Processes in this node of a job: not running as root (real uid: its tasks, their
        containers, srun), or Slurm's step daemons. Each as 'pid uid command', pids as the
        node sees them (read from its own /proc, through its init's root)."""
        proc = Path(f"/proc/{self.init_pid}/root/proc")
        found = []
        for entry in os.listdir(proc):
            if not entry.isdigit():
                continue
            try:
                status = (proc / entry / "status").read_text()
                cmdline = (proc / entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError):
                continue  # ended meanwhile
            uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
            if uid != "0" or cmdline.startswith("slurmstepd"):
                found.append(f"{entry} {uid} {cmdline.strip()}")
        return found

    def runc_containers(self, user: User) -> list[str]:
        out = self.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "list", "-q"]), env=user.env)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    def spool_entries(self) -> list[str]:
        return sorted(os.listdir(self.spool_dir)) if self.spool_dir.exists() else []

    def records(self) -> list[str]:
        steps = self.state_dir / "steps"
        return sorted(p.name for p in steps.iterdir()) if steps.exists() else []

    def ps(self, user: User) -> list[dict]:
        """The node's daemon's `ps --json`, as the user (at the client's default socket)."""
        out = self.run(user.command([str(NODESTEPCTL), "ps", "--json"]), env=user.env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def leftovers(self, user: User) -> dict[str, list[str]]:
        """What a finished job could leave behind in this node; empty when nothing."""
        found = {"containers": self.runc_containers(user), "spool": self.spool_entries(),
                 "records": self.records(), "processes": self.job_processes()}
        return {k: v for k, v in found.items() if v}


# What both test clusters (this one and test_slurm_srun.py's) run without: no cgroups, no
# accounting, no MPI unless srun asks; cores as the consumable resource.
SLURM_PLUGINS = """\
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
"""


def slurm_conf(base: Path, munge_socket: Path) -> str:
    n1, n2 = NODE_NAMES
    return f"""\
ClusterName=nsdtwo
SlurmctldHost={n1}({SUBNET}.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={base}/slurmctld-state
SlurmdSpoolDir={base}/%n/slurmd-spool
Epilog={base}/epilog
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/%n/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/%n/slurmd.log
SlurmdDebug=debug
{SLURM_PLUGINS}KillWait=10
PlugStackConfig=/dev/null
NodeName={n1} NodeAddr={SUBNET}.1 CPUs=2 State=UNKNOWN
NodeName={n2} NodeAddr={SUBNET}.2 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={n1},{n2} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """Two nodes (nodes[0] also runs slurmctld and is where srun runs), munged on the host."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "slurm.conf"
        self.munge_dir = base / "munge"
        self.nodes: list[Node] = []
        self.host_procs: list[subprocess.Popen] = []
        self.slurmctld: Proc | None = None

    @property
    def login(self) -> Node:
        return self.nodes[0]

    def env(self, user: User, **extra: str) -> dict[str, str]:
        return {**user.env, "SLURM_CONF": str(self.conf), **extra}

    def logs(self) -> str:
        files = sorted(self.base.glob("*.log")) + sorted(self.base.glob("*/*.out")) + sorted(self.base.glob("*/*.log"))
        return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in files)

    # ---- start -------------------------------------------------------------------------

    def start(self, users: list[User], oci_conf: str, nodestepd_args: tuple[str, ...] = ()) -> None:
        for program in ("munged", "slurmctld", "slurmd", "srun", "sinfo", "nsenter", "unshare", "ip"):
            assert shutil.which(program), f"{program} is missing: scripts/setup.sh installs munge, slurmctld, slurmd"
        self.munge_dir.mkdir(mode=0o711)  # users' srun reaches the socket; the key stays root's
        key = self.munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        (self.base / "slurmctld-state").mkdir(mode=0o755)
        (self.base / "oci.conf").write_text(oci_conf)
        (self.base / "node-init.py").write_text(NODE_INIT)
        hosts = self.base / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{SUBNET}.{i + 1} {n}\n" for i, n in enumerate(NODE_NAMES)))
        self.conf.write_text(slurm_conf(self.base, self.munge_dir / "munge.sock"))
        # The node Epilog the admin guide gives: whatever a job left running on a node (a
        # detached step, a podman container) ends with the job.
        epilog = self.base / "epilog"
        epilog.write_text(f'#!/bin/sh\nexec {NODESTEPCTL} job-end "$SLURM_JOB_ID"\n')
        epilog.chmod(0o755)
        m = self.munge_dir
        with open(self.base / "munged.log", "wb") as log:
            self.host_procs.append(subprocess.Popen(
                ["munged", "--foreground", "--force", f"--socket={m}/munge.sock", f"--key-file={key}",
                 f"--pid-file={m}/munged.pid", f"--seed-file={m}/seed", f"--log-file={self.base}/munged-own.log"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))
        for i, name in enumerate(NODE_NAMES):
            self.nodes.append(self._start_node(name, f"{SUBNET}.{i + 1}", hosts, users))
        self._connect_nodes()
        self.slurmctld = self.login.start(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        for node in self.nodes:
            node.start(["slurmd", "-D", "-N", node.name, "-f", str(self.conf)], "slurmd")
        for node in self.nodes:
            node.nodestepd = self._start_nodestepd(node, nodestepd_args)
        self.wait_idle()

    def _start_node(self, name: str, address: str, hosts: Path, users: list[User]) -> Node:
        base = self.base / name
        base.mkdir(mode=0o755)
        (base / "slurmd-spool").mkdir(mode=0o755)
        conf = {"name": name, "workdir": str(self.base.parent), "hosts": str(hosts),
                "users": [[u.uid, u.gid] for u in users], "hidden": _hidden_python()}
        argv = ["unshare", "--net", "--uts", "--ipc", "--mount", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc",
                "--propagation", "slave", "--", sys.executable, str(self.base / "node-init.py"), json.dumps(conf)]
        log = open(base / "init.out", "wb")
        with log:
            init = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                    env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}, preexec_fn=_die_with_parent)
        ready, _, _ = select.select([init.stdout], [], [], START_TIMEOUT)
        line = init.stdout.readline() if ready else b""
        if line != b"ready\n":
            init.kill()
            init.wait()
            raise AssertionError(f"node {name} did not start: {line!r}\n{(base / 'init.out').read_text()}")
        return Node(name, address, base, init, _child_of(init.pid))

    def _connect_nodes(self) -> None:
        """A veth pair made directly inside the two nodes' network namespaces."""
        a, b = self.nodes
        subprocess.run(["ip", "link", "add", "eth0", "netns", str(a.init_pid), "type", "veth", "peer", "name", "eth0",
                        "netns", str(b.init_pid)], check=True, timeout=30)
        for node in self.nodes:
            for argv in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{node.address}/24", "dev", "eth0"],
                         ["ip", "link", "set", "eth0", "up"]):
                result = node.run(argv)
                assert result.returncode == 0, f"{argv}: {result.stderr}"

    def _start_nodestepd(self, node: Node, extra: tuple[str, ...]) -> Proc:
        notify_path = node.base / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        try:
            env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "NOTIFY_SOCKET": str(notify_path)}
            argv = [str(NODESTEPD), "--socket", NODESTEPD_SOCKET, "--oci-conf", str(self.base / "oci.conf"),
                    "--spool-dir", str(node.spool_dir), "--state-dir", str(node.state_dir),
                    "--image-cache-dir", str(node.base / "nodestepd-images"), "--node-name", node.name,
                    "--slurm-conf", str(self.conf), "--log-level", "debug", "--steps-on-stop", "cancel", *extra]
            proc = node.start(argv, "nodestepd", env=env)
            exited = os.pidfd_open(proc.popen.pid)
            try:
                ready, _, _ = select.select([notify, exited], [], [], START_TIMEOUT)
            finally:
                os.close(exited)
            if notify not in ready:
                raise AssertionError(f"nodestepd in {node.name} did not get ready:\n"
                                     f"{(node.base / 'nodestepd.out').read_text(errors='replace')}")
            assert notify.recv(4096) == b"READY=1"
        finally:
            notify.close()
        return proc

    def wait_idle(self) -> None:
        """Until sinfo reports both nodes idle: slurmctld is up and both slurmd registered."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for node in self.nodes:
                for proc in node.procs:
                    assert proc.alive(), f"{proc.name} in {node.name} exited:\n{self.logs()}"
            state = self.login.run(["sinfo", "-h", "-N", "-o", "%N %t"],
                                   env={"PATH": SYSTEM_PATH, "SLURM_CONF": str(self.conf)}, timeout=30)
            if sorted(state.stdout.split("\n")) == ["", *(f"{n} idle" for n in NODE_NAMES)]:
                return
            time.sleep(0.5)  # polling a condition with a deadline: Slurm offers no readiness event
        raise AssertionError(f"the Slurm nodes did not become idle within {START_TIMEOUT:g} s:\n{self.logs()}")

    # ---- use -----------------------------------------------------------------------------

    def srun(self, user: User, args: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
        """srun ARGS as the user on the login node; the result with text output."""
        return self.login.run(user.command(["srun", *args]), env=env or self.env(user), timeout=timeout)

    def srun_popen(self, user: User, args: list[str], env: dict | None = None) -> subprocess.Popen:
        return self.login.popen(user.command(["srun", *args]), env=env or self.env(user), text=True)

    def squeue(self) -> list[str]:
        out = self.login.run(["squeue", "-h", "-o", "%i %T"], env={"PATH": SYSTEM_PATH, "SLURM_CONF": str(self.conf)})
        assert out.returncode == 0, out.stderr
        return out.stdout.split("\n")[:-1]

    def wait_clean(self, user: User, timeout: float = 60) -> None:
        """Until no node has anything of a job left (leftovers) and no job is in the queue;
        bounded: fails with what is left."""
        deadline = time.monotonic() + timeout
        while True:
            left = {node.name: node.leftovers(user) for node in self.nodes}
            left = {k: v for k, v in left.items() if v}
            queue = self.squeue()
            if not left and not queue:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"left behind after {timeout:g} s: {left}, queue {queue}\n{self.logs()}")
            time.sleep(0.2)  # polling with a deadline: what ends is in other processes and runc

    # ---- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Each node's processes by pid, last started first; then the nodes' inits (which
        takes whatever else is in them, slurmstepds included); then munged."""
        for node in reversed(self.nodes):
            for proc in reversed(node.procs):
                proc.stop()
        for node in self.nodes:
            if node.init.poll() is None:
                node.init.kill()  # unshare --kill-child: its child, the node's pid 1, gets SIGKILL
            node.init.wait(timeout=STOP_TIMEOUT)
            _wait_pid(node.init_pid, STOP_TIMEOUT)
        for proc in reversed(self.host_procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
