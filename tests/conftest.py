"""Shared fixtures: real test users, a real rootless bundle, a real daemon on a private socket.

The tests run as root (like CI); the daemon runs as root and clients run as the
unprivileged test users through setpriv, which execs (so a client's pid is its own).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import queue
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodestepd.protocol.wire import HEADER_SIZE, VERSION, frame_dict, frame_length, loads

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NODESTEPD = BIN / "nodestepd"
NODESTEPCTL = BIN / "nodestepctl"
# Two unprivileged users; NODESTEPD_TEST_USERS=a,b picks others so that two checkouts can run
# their suites at once without clearing each other's containers.
TEST_USERS = tuple(os.environ.get("NODESTEPD_TEST_USERS", "nsdtest1,nsdtest2").split(","))
assert len(TEST_USERS) == 2, "NODESTEPD_TEST_USERS names exactly two users"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNC_RUN_CONF = (REPO / "tests" / "oci-conf-examples" / "runc-run.conf").read_text()


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name, "PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}

    def command(self, argv: list[str]) -> list[str]:
        """argv run as this user: setpriv execs, so the process keeps its pid."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *argv]


def _ensure_user(name: str) -> User:
    if os.geteuid() != 0:
        pytest.skip("these tests run as root: the daemon is root and clients are test users")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        pw = pwd.getpwnam(name)
    runtime_dir = Path(f"/run/user/{pw.pw_uid}")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    os.chown(runtime_dir, pw.pw_uid, pw.pw_gid)
    runtime_dir.chmod(0o700)
    return User(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def _clear_runc_root(user: User) -> None:
    """Containers an earlier, interrupted run left behind would confuse the container counts."""
    for name in runc_containers(user):
        subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "delete", "--force", name]),
                       env=user.env, check=True)


@pytest.fixture(scope="session")
def user() -> User:
    user = _ensure_user(TEST_USERS[0])
    _clear_runc_root(user)
    return user


@pytest.fixture(scope="session")
def other_user() -> User:
    return _ensure_user(TEST_USERS[1])


@pytest.fixture(scope="session")
def workdir() -> Path:
    """A directory every test user can traverse (pytest's own tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="nodestepd-tests-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def stopper_program(workdir) -> str:
    """tests/stopper.c built (as the package's monitor is: cc): stops new processes before
    their exec, as a user's SIGSTOP can (docs/security.md, "A process stopped before its exec")."""
    path = workdir / "stopper"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(path), str(REPO / "tests" / "stopper.c")],
                   check=True, timeout=120)
    return str(path)


@contextlib.contextmanager
def stopping(stopper: str, pid: int, depth: int):
    """While in the block, every process forked `depth` levels below pid is stopped right after
    its fork, before its exec (stopper.c, root mode); yields a queue.Queue of the pids it stopped."""
    proc = subprocess.Popen([stopper, str(pid), str(depth)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    stopped: queue.Queue[int] = queue.Queue()
    try:
        line = read_line_from(proc.stdout, b"ready", timeout=30)
        assert line.strip() == b"ready", line

        def reader():
            for out in proc.stdout:
                stopped.put(int(out))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        yield stopped
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def new_dir(workdir):
    """new_dir(prefix, mode=0o755, owner=None) -> a new directory under workdir (root's unless
    owner is given), removed after the test."""
    made: list[Path] = []

    def make(prefix: str, mode: int = 0o755, owner: User | None = None) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
        if owner is not None:
            os.chown(path, owner.uid, owner.gid)
        path.chmod(mode)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def user_dir(new_dir, user):
    """user_dir(prefix, mode=0o755) -> a new directory owned by the test user, removed after the test."""
    return lambda prefix, mode=0o755: new_dir(prefix, mode, owner=user)


def make_bundle(owner: User, path: Path) -> Path:
    subprocess.run(["sh", str(REPO / "scripts" / "make-bundle.sh"), owner.name, str(path)], check=True)
    # A program that exists only inside the image: proves the command is not resolved on the host.
    only = path / "rootfs" / "bin" / "only-in-image"
    only.write_text("#!/bin/sh\necho only-in-image \"$@\"\n")
    only.chmod(0o755)
    os.chown(only, owner.uid, owner.gid)
    return path


@pytest.fixture(scope="session")
def bundle(workdir: Path, user: User) -> Path:
    return make_bundle(user, workdir / "bundle")


@dataclass
class Daemon:
    socket: Path
    spool_dir: Path
    state_dir: Path
    oci_conf: Path
    log_path: Path
    proc: subprocess.Popen
    notify: socket.socket  # the daemon's NOTIFY_SOCKET, bound by the test: read what it tells systemd
    clients: list[subprocess.Popen] = field(default_factory=list)

    def next_notification(self, timeout: float = 30) -> dict[str, str]:
        """The next sd_notify datagram as {VAR: value}."""
        self.notify.settimeout(timeout)
        try:
            data = self.notify.recv(4096)
        except TimeoutError:
            raise AssertionError(f"no notification from nodestepd within {timeout} s:\n{self.log()}") from None
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    def ctl_argv(self, *args: str) -> list[str]:
        return [str(NODESTEPCTL), "--socket", str(self.socket), *args]

    def ctl(self, user: User, *args: str, timeout: float = 60, env: dict | None = None, cwd: str | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            user.command(self.ctl_argv(*args)), env=env or user.env, cwd=cwd or "/", input=input,
            capture_output=True, timeout=timeout,
        )

    def ctl_popen(self, user: User, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(user.command(self.ctl_argv(*args)), env=env or user.env, cwd="/", **kwargs)
        self.clients.append(proc)
        return proc

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, then its exit status. A daemon still there after timeout fails the test
        with its log, which ends with every thread's stack (SIGABRT: the daemon's faulthandler)."""
        if not self._stopped_by_sigterm(timeout):
            self.proc.send_signal(signal.SIGABRT)
            if not self._exited(10):
                self.proc.kill()
                self.proc.wait()
            raise AssertionError(f"nodestepd did not stop within {timeout} s of SIGTERM:\n{self.log()[-20000:]}")
        return self.proc.returncode

    def _stopped_by_sigterm(self, timeout: float) -> bool:
        self.proc.send_signal(signal.SIGTERM)
        return self._exited(timeout)

    def _exited(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self) -> int:
        for client in self.clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        if self.proc.poll() is None and not self._stopped_by_sigterm(60):
            self.proc.kill()
            self.proc.wait()
        self.notify.close()
        return self.proc.returncode


@pytest.fixture
def start_daemon(workdir: Path, request):
    """start_daemon(oci_conf_text, *extra_args) -> Daemon, ready (READY=1 received) and stopped after the test.

    start_daemon(..., after=previous) starts the next daemon of the same node: the same
    socket, oci.conf, spool and state dirs as `previous` (which must have stopped), with
    its own log and notify socket. Its READY=1 comes after its recovery.

    The daemon cancels its running steps when stopped (--steps-on-stop cancel), so that a
    failing test leaves no containers behind; a test of the default passes
    --steps-on-stop leave, which comes later on the command line and wins.
    """
    started: list[Daemon] = []
    base = Path(tempfile.mkdtemp(prefix="daemon-", dir=workdir))
    base.chmod(0o755)

    def start(oci_conf: str = RUNC_RUN_CONF, *extra: str, env: dict | None = None, after: Daemon | None = None,
              ready_timeout: float = 30) -> Daemon:
        n = len(started)
        conf = base / f"oci-{n}.conf"
        if after is None:
            conf.write_text(textwrap.dedent(oci_conf))
            m = n
        else:
            assert after.proc.poll() is not None, "the previous daemon is still running"
            conf = after.oci_conf
            m = int(after.socket.name.removeprefix("sock-"))
        notify_path = base / f"notify-{n}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        notify.settimeout(30)
        log_path = base / f"daemon-{n}.log"
        daemon_env = {"PATH": SYSTEM_PATH, "NOTIFY_SOCKET": str(notify_path), "LANG": "C.UTF-8", **(env or {})}
        argv = [
            str(NODESTEPD), "--socket", str(base / f"sock-{m}"), "--oci-conf", str(conf),
            "--spool-dir", str(base / f"spool-{m}"), "--state-dir", str(base / f"state-{m}"),
            "--image-cache-dir", str(base / f"images-{m}"),
            "--node-name", "testnode", "--log-level", "debug", "--steps-on-stop", "cancel", *extra,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, env=daemon_env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        daemon = Daemon(base / f"sock-{m}", base / f"spool-{m}", base / f"state-{m}", conf, log_path, proc, notify)
        started.append(daemon)
        # Whichever comes first: the daemon's first notification, or its exit (then fail at once).
        exited = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([notify, exited], [], [], ready_timeout)
        finally:
            os.close(exited)
        if notify not in ready:
            what = f"exited with status {proc.wait()}" if ready else f"did not report READY=1 within {ready_timeout} s"
            raise AssertionError(f"nodestepd {what}:\n{daemon.log()}")
        message = notify.recv(4096)
        assert message == b"READY=1", (message, daemon.log())
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
    shutil.rmtree(base, ignore_errors=True)


def read_line_from(stream, expect: bytes, timeout: float = 30) -> bytes:
    """Read lines from a pipe until one equals `expect`; returns everything read. Event-driven via select."""
    import select

    seen = b""
    fd = stream.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"timed out waiting for {expect!r}; got {seen!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"stream ended before {expect!r}; got {seen!r}"
        seen += chunk
        if expect in seen.split(b"\n"):
            return seen


def runc_containers(user: User) -> list[str]:
    """Containers runc knows in the user's root (the guide's --root=/run/user/UID/)."""
    out = subprocess.run(
        user.command(["runc", "--root", f"/run/user/{user.uid}/", "list", "-q"]),
        capture_output=True, text=True, env=user.env, check=True,
    )
    return out.stdout.split()


def proc_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, Z, ...), or None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def pidfd_pids() -> list[int]:
    """The pids named by the pidfds this process holds (fdinfo's Pid:, -1 for one already
    reaped), sorted: what it still watches. Self-contained (os only), so that scripts run in
    a fresh interpreter can take its source (inspect.getsource)."""
    pids = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    pids += [int(line.split()[1]) for line in f if line.startswith("Pid:")]
        except FileNotFoundError:
            pass  # the listing's own fd, closed by now
    return sorted(pids)


@pytest.fixture
def shell_ignored_signals():
    """This process with SIGINT, SIGQUIT and SIGHUP ignored while the test runs, as a daemon
    started from a shell's background job (SIGINT, SIGQUIT) or by nohup (SIGHUP) is: what
    it spawns must not inherit them."""
    ignored = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignored}
    try:
        yield ignored
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def settle(daemon: Daemon) -> None:
    """Until the daemon has released every step whose exit it has told (nothing when it is
    not running). A step's exit event goes out before its release's filesystem work (the
    spool dir's removal, the result file, the record's removal: docs/watching.md); the
    daemon answers no request of the step's user, nor an operator's, before that work is
    done. So one request answered, root's `status`, and every such release is over."""
    if daemon.proc.poll() is not None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        try:
            sock.connect(str(daemon.socket))
        except (FileNotFoundError, ConnectionRefusedError):
            return  # stopping, or not listening yet: no step of it to wait for
        sock.sendall(frame_dict({"op": "status", "v": VERSION}))
        with sock.makefile("rb") as replies:
            header = replies.read(HEADER_SIZE)
            assert header, "the daemon closed the connection without answering `status`"
            reply = loads(replies.read(frame_length(header)))
        # Anything else (an error: a malformed request is answered at once) proves nothing.
        assert isinstance(reply, dict) and reply.get("type") == "status", reply


def spool_entries(daemon: Daemon) -> list[str]:
    """The spool dir's entries once every step whose exit was told is released (settle)."""
    settle(daemon)
    return sorted(os.listdir(daemon.spool_dir)) if daemon.spool_dir.exists() else []


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    """Until every pid has exited (its pidfd polls readable); a pid already gone counts."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
    try:
        for fd in fds:
            assert select.select([fd], [], [], timeout)[0], f"a process did not end within {timeout} s"
    finally:
        for fd in fds:
            os.close(fd)
