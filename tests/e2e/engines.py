"""Rootless podman and docker for the tests: each test gets its own engine, configured for one
OCI runtime (plain runc, or nodestep-oci in front of a test daemon), and leaves nothing behind.

Everything an engine writes lives in directories the fixture made and removes: podman's
configuration, storage and temporary files under /run/user/UID/engines-podman-*, rootless
dockerd's runtime dir under /run/user/UID/engines-docker-* (its data-root under the tests'
workdir: runc refuses a rootfs under rootlesskit's copied-up /run, where /run/user is a
symlink). Nothing goes into the user's ~/.config or ~/.local. The settings are the ones
docs/oci-runtime-proxy-facts.md (shared) found necessary here: host network, k8s-file logs,
cgroupfs, file events (no systemd, no /dev/net/tun).

Every engine command has a timeout. What an engine leaves running (podman's pause process,
conmon, dockerd, containerd's shims) is ended by pid at teardown, after the engine removed
its containers.

The runtime a test uses is an EngineRuntime: `runc_runtime()` or `proxy_runtime(daemon)`,
which writes a wrapper that points nodestep-oci at the test daemon's socket (the engines
call their runtime with an environment of their own, so NODESTEPD_SOCKET must be set by
the runtime command itself).
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import BIN, REPO, SYSTEM_PATH, User, wait_gone

PODMAN = "/usr/bin/podman"
DOCKER = "/usr/bin/docker"  # /usr/local/bin/docker is an unrelated newer client
DOCKERD_ROOTLESS = "/usr/share/docker.io/contrib/dockerd-rootless.sh"
RUNC = shutil.which("runc", path=SYSTEM_PATH) or "/usr/sbin/runc"
NODESTEP_OCI = BIN / "nodestep-oci"
IMAGE = "localhost/bb"
RUNTIME_NAME = "testrt"  # the name the engines' configurations give the runtime under test
# Bounds on every engine command: generous, the machine is shared and slow.
ENGINE_TIMEOUT = float(os.environ.get("NODESTEPD_ENGINE_TIMEOUT", "120"))
DOCKERD_START_TIMEOUT = 90.0


def engines_missing() -> str | None:
    """Why the engines cannot run here, or None."""
    for path in (PODMAN, DOCKER, DOCKERD_ROOTLESS, "/usr/bin/conmon", "/usr/bin/rootlesskit", "/usr/sbin/dockerd"):
        if not os.path.exists(path):
            return f"{path} is not installed (scripts/setup.sh installs the engines)"
    return None


def has_subids(user: User) -> bool:
    """Rootless engines need subordinate uids and gids for the user."""
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                if not any(line.split(":")[0] in (user.name, str(user.uid)) for line in f):
                    return False
        except FileNotFoundError:
            return False
    return True


def skip_unless_engines(user: User) -> None:
    why = engines_missing()
    if why:
        pytest.skip(why)
    if not has_subids(user):
        pytest.skip(f"{user.name} has no /etc/subuid and /etc/subgid ranges (scripts/setup.sh gives them)")


# ---------------------------------------------------------------- runtimes


@dataclass(frozen=True)
class EngineRuntime:
    """The OCI runtime the engines are configured with: `path` is what their configuration names."""
    name: str           # "runc", or "proxy-run" / "proxy-create-start"
    path: str
    daemon: object | None = None  # tests.conftest.Daemon behind the proxy

    @property
    def proxied(self) -> bool:
        return self.daemon is not None


def runc_runtime() -> EngineRuntime:
    return EngineRuntime("runc", RUNC)


def proxy_missing() -> str | None:
    if not NODESTEP_OCI.exists():
        return f"{NODESTEP_OCI} does not exist: the OCI runtime proxy is not installed in this venv (branch oci)"
    return None


def proxy_program(user: User) -> str:
    """How the engines' processes (the user's) can run nodestep-oci: the venv's program,
    unless its interpreter is out of the users' reach (a venv made from root's own Python,
    under a root-only home: only setpriv's own exec gets through, with root's rights still
    in hand); then the same package through the system's Python."""
    probe = subprocess.run(user.command(["sh", "-c", f"exec {shlex.quote(str(NODESTEP_OCI))} --version"]),
                           capture_output=True, env=user.env, cwd="/", timeout=60, stdin=subprocess.DEVNULL)
    if probe.returncode == 0:
        return shlex.quote(str(NODESTEP_OCI))
    return f"/usr/bin/env PYTHONPATH={shlex.quote(str(REPO))} /usr/bin/python3 -m nodestepd.oci.cli"


def proxy_runtime(daemon, name: str, workdir: Path, user: User) -> EngineRuntime:
    """nodestep-oci talking to `daemon`: a wrapper script (root's, 0755) setting its socket."""
    why = proxy_missing()
    if why:
        pytest.skip(why)
    wrapper = Path(tempfile.mkdtemp(prefix="engines-rt-", dir=workdir))
    wrapper.chmod(0o755)
    script = wrapper / "nodestep-oci"
    script.write_text(f"#!/bin/sh\nNODESTEPD_SOCKET={shlex.quote(str(daemon.socket))}\nexport NODESTEPD_SOCKET\n"
                      f"exec {proxy_program(user)} \"$@\"\n")
    script.chmod(0o755)
    return EngineRuntime(name, str(script), daemon)


# ---------------------------------------------------------------- the image


def busybox_rootfs_tar(path: Path) -> Path:
    """A busybox root filesystem as a tar (root-owned entries, world-readable): what `podman
    import` / `docker import` make the test image from, offline. The same tree as
    scripts/make-bundle.sh's rootfs."""
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()

    def entry(name: str, kind: bytes, mode: int, link: str = "") -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, 0, 0, link
        return info

    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "tmp", "proc", "dev", "sys", "root"):
            tar.addfile(entry(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        with open("/bin/busybox", "rb") as f:
            info = entry("bin/busybox", tarfile.REGTYPE, 0o755)
            info.size = os.fstat(f.fileno()).st_size
            tar.addfile(info, f)
        for applet in applets:
            if applet != "busybox":
                tar.addfile(entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, "busybox"))
        for name, text in (("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", b"root:x:0:\n")):
            import io
            info = entry(name, tarfile.REGTYPE, 0o644)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    path.chmod(0o644)
    return path


@pytest.fixture(scope="session")
def busybox_tar(workdir: Path) -> Path:
    return busybox_rootfs_tar(workdir / "busybox-rootfs.tar")


# ---------------------------------------------------------------- helpers


def run_as(user: User, argv: list[str], env: dict[str, str], timeout: float = ENGINE_TIMEOUT,
           input: bytes | None = None, cwd: str = "/") -> subprocess.CompletedProcess:
    try:
        return subprocess.run(user.command(argv), env=env, cwd=cwd, input=input, capture_output=True,
                              timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{argv} did not finish within {timeout} s: stdout {e.stdout!r} stderr {e.stderr!r}") from None


def run_in_pty(user: User, argv: list[str], env: dict[str, str], timeout: float = ENGINE_TIMEOUT
               ) -> subprocess.CompletedProcess:
    """argv with a terminal as its stdio (util-linux `script`), as a user typing it would run it;
    returns its exit status and what the terminal showed."""
    command = shlex.join(argv)
    proc = subprocess.Popen(user.command(["script", "-qec", command, "/dev/null"]), env=env, cwd="/",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # stdin stays open (and empty) until the command ends: script ends the session on its EOF.
        out, err = _communicate_keeping_stdin(proc, timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _communicate_keeping_stdin(proc: subprocess.Popen, timeout: float) -> tuple[bytes, bytes]:
    deadline = time.monotonic() + timeout
    chunks = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    open_fds = set(chunks)
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{proc.args} did not finish within {timeout} s: {chunks}")
        ready, _, _ = select.select(list(open_fds), [], [], left)
        for fd in ready:
            data = os.read(fd, 65536)
            if data:
                chunks[fd].append(data)
            else:
                open_fds.discard(fd)
    proc.stdin.close()
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return b"".join(chunks[proc.stdout.fileno()]), b"".join(chunks[proc.stderr.fileno()])


def _user_dir(parent: Path, prefix: str, user: User) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chown(path, user.uid, user.gid)
    path.chmod(0o700)
    return path


def _kill_pids(pids: list[int], uid: int) -> list[int]:
    """SIGKILL those of `pids` that still run as `uid` (a recycled pid of someone else is spared)."""
    killed = []
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    wait_gone(killed)
    return killed


def _processes_naming(uid: int, text: str) -> list[int]:
    """The processes of uid whose command line contains text."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def _end_processes_naming(uid: int, text: str, grace: float = 30.0) -> None:
    """Wait up to `grace` seconds for uid's processes naming `text` to end; SIGKILL the rest."""
    pids = _processes_naming(uid, text)
    try:
        wait_gone(pids, timeout=grace)
    except AssertionError:
        pass
    _kill_pids(_processes_naming(uid, text), uid)


def _pid_from(path: Path) -> list[int]:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [int(text)] if text.isdigit() else []


def _rmtree(path: Path) -> None:
    """Remove an engine's tree as root (its files belong to the user's subordinate ids)."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, timeout=120)


# ---------------------------------------------------------------- podman


@dataclass
class Podman:
    user: User
    runtime: EngineRuntime
    base: Path          # /run/user/UID/engines-podman-*: configuration, storage, temporary files
    env: dict[str, str]
    home_before: set[str] = field(default_factory=set)  # the user's home's entries before the engine ran

    def argv(self, *args: str) -> list[str]:
        return [PODMAN, *args]

    def __call__(self, *args: str, timeout: float = ENGINE_TIMEOUT, input: bytes | None = None,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return run_as(self.user, self.argv(*args), {**self.env, **(env or {})}, timeout, input)

    def ok(self, *args: str, **kwargs) -> str:
        """The command's stdout; fails the test unless it exits 0."""
        r = self(*args, **kwargs)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr)
        return r.stdout.decode()

    def popen(self, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.user.command(self.argv(*args)), env={**self.env, **(env or {})}, cwd="/", **kwargs)

    def in_pty(self, *args: str, timeout: float = ENGINE_TIMEOUT) -> subprocess.CompletedProcess:
        return run_in_pty(self.user, self.argv(*args), self.env, timeout)

    def inspect(self, container: str, fmt: str) -> str:
        return self.ok("inspect", "--format", fmt, container).strip()

    def runtime_root(self) -> Path:
        """Where runc keeps podman's containers when podman gives it no --root (rootless: $XDG_RUNTIME_DIR/runc)."""
        return Path(f"/run/user/{self.user.uid}/runc")

    def cleanup(self) -> None:
        """Remove every container (bounded), end what podman leaves running, remove its files.
        Every step runs, whatever an earlier one did (a hung engine command times out)."""
        try:
            self("rm", "--all", "--force", "--time", "0", timeout=ENGINE_TIMEOUT)
        except AssertionError:
            pass  # what it left is killed below
        # conmon (and the `podman container cleanup` it runs) may outlive `run --rm` and `rm`
        # by a moment: they name our directories on their command lines. Waited for, then killed.
        _end_processes_naming(self.user.uid, str(self.base))
        # The pause process holding podman's user and mount namespaces (and so the overlay mounts).
        _kill_pids(_pid_from(self.base / "tmp" / "pause.pid"), self.user.uid)
        _rmtree(self.base)


def podman_config(base: Path, runtime: EngineRuntime) -> tuple[str, str]:
    """containers.conf and storage.conf for a rootless podman whose files all live under `base`."""
    containers = f"""\
[containers]
netns = "host"
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{base}/tmp"
volume_path = "{base}/volumes"
runtime = "{RUNTIME_NAME}"
runtime_supports_json = ["{RUNTIME_NAME}"]
runtime_supports_nocgroups = ["{RUNTIME_NAME}"]

[engine.runtimes]
{RUNTIME_NAME} = ["{runtime.path}"]
"""
    storage = f"""\
[storage]
driver = "overlay"
runroot = "{base}/runroot"
graphroot = "{base}/graphroot"
"""
    return containers, storage


def start_podman(user: User, runtime: EngineRuntime, image_tar: Path | None) -> Podman:
    """A podman for `user` with its own configuration under /run/user/UID, the image imported.

    Both files go under $XDG_CONFIG_HOME/containers: podman 4.3 honours a storage.conf's
    runroot and graphroot for a rootless user only there (named by CONTAINERS_STORAGE_CONF,
    they are ignored and storage lands in the user's home). CONTAINERS_CONF names
    containers.conf as well, so that no system or home file overrides it."""
    skip_unless_engines(user)
    run_dir = Path(f"/run/user/{user.uid}")
    base = _user_dir(run_dir, "engines-podman-", user)
    config_home = base / "config"
    (config_home / "containers").mkdir(parents=True)
    containers, storage = podman_config(base, runtime)
    (config_home / "containers" / "containers.conf").write_text(containers)
    (config_home / "containers" / "storage.conf").write_text(storage)
    for path in (config_home, config_home / "containers", *(config_home / "containers").iterdir()):
        os.chown(path, user.uid, user.gid)
    env = {**user.env, "XDG_RUNTIME_DIR": str(run_dir), "XDG_CONFIG_HOME": str(config_home),
           "XDG_DATA_HOME": str(base / "data"), "XDG_CACHE_HOME": str(base / "cache"),
           "CONTAINERS_CONF": str(config_home / "containers" / "containers.conf")}
    podman = Podman(user, runtime, base, env, {p.name for p in Path(user.home).iterdir()})
    if image_tar is not None:
        try:
            podman.ok("import", "--quiet", str(image_tar), IMAGE)
        except BaseException:
            podman.cleanup()
            raise
    return podman


@pytest.fixture
def make_podman(busybox_tar):
    """make_podman(user, runtime) -> Podman with IMAGE imported; all removed after the test."""
    made: list[Podman] = []
    run_dirs: dict[int, set[str]] = {}

    def make(user: User, runtime: EngineRuntime, image: bool = True) -> Podman:
        run_dir = Path(f"/run/user/{user.uid}")
        run_dirs.setdefault(user.uid, set(os.listdir(run_dir)) if run_dir.exists() else set())
        podman = start_podman(user, runtime, busybox_tar if image else None)
        made.append(podman)
        return podman

    yield make
    for podman in made:
        podman.cleanup()
    _assert_homes_untouched(made)
    # What podman makes in $XDG_RUNTIME_DIR outside its configured dirs: runc's default root
    # and libpod's; removed when empty (a container left in them is a failure to see).
    for uid, before in run_dirs.items():
        for name in ("runc", "libpod", "containers"):
            path = Path(f"/run/user/{uid}") / name
            if name not in before and path.is_dir():
                _remove_empty_tree(path)


def _assert_homes_untouched(engines: list) -> None:
    """The engines wrote nothing into the users' homes (their configuration and state go to
    the directories the fixtures made)."""
    for engine in engines:
        home = Path(engine.user.home)
        found = {p.name for p in home.iterdir()} - engine.home_before
        assert not found, f"the engine left {sorted(found)} in {home}"


def _remove_empty_tree(path: Path) -> None:
    """Remove directories holding only empty directories; keep anything with a file in it."""
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if sub.is_dir() and not sub.is_symlink():
            try:
                sub.rmdir()
            except OSError:
                pass
    try:
        path.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------- docker


@dataclass
class Docker:
    user: User
    runtime: EngineRuntime
    run_dir: Path       # dockerd's XDG_RUNTIME_DIR: socket, exec-root, pid file, rootlesskit's state
    data_root: Path
    proc: subprocess.Popen  # rootlesskit (setpriv, env and dockerd-rootless.sh exec it)
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    home_before: set[str] = field(default_factory=set)  # the user's home's entries before the engine ran

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    def argv(self, *args: str) -> list[str]:
        return [DOCKER, *args]

    def run_args(self) -> list[str]:
        """What every `docker run` / `create` needs here: no network (--network host cannot
        setns in rootless docker here) and the runtime under test."""
        return ["--network", "none", "--runtime", RUNTIME_NAME]

    def __call__(self, *args: str, timeout: float = ENGINE_TIMEOUT, input: bytes | None = None
                 ) -> subprocess.CompletedProcess:
        return run_as(self.user, self.argv(*args), self.env, timeout, input)

    def ok(self, *args: str, **kwargs) -> str:
        r = self(*args, **kwargs)
        assert r.returncode == 0, (args, r.returncode, r.stdout, r.stderr, self.log()[-3000:])
        return r.stdout.decode()

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(self.user.command(self.argv(*args)), env=self.env, cwd="/", **kwargs)

    def in_pty(self, *args: str, timeout: float = ENGINE_TIMEOUT) -> subprocess.CompletedProcess:
        return run_in_pty(self.user, self.argv(*args), self.env, timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def shim_pids(self) -> list[int]:
        """containerd-shim processes of this dockerd (they are daemons: parent PID 1)."""
        address = str(self.run_dir / "docker" / "containerd")
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.stat(f"/proc/{entry}").st_uid != self.user.uid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and any(address.encode() in a for a in argv):
                pids.append(int(entry))
        return pids

    def cleanup(self) -> None:
        """Remove every container (bounded), stop dockerd, end its shims, remove its files.
        Every step runs, whatever an earlier one did (a hung engine command times out)."""
        if self.proc.poll() is None:
            try:
                ids = self("ps", "--all", "--quiet", timeout=ENGINE_TIMEOUT).stdout.decode().split()
                if ids:
                    self("rm", "--force", *ids, timeout=ENGINE_TIMEOUT)
            except AssertionError:
                pass  # dockerd is stopped all the same, and its shims killed
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _kill_pids(self.shim_pids(), self.user.uid)
        _end_processes_naming(self.user.uid, str(self.run_dir), grace=5.0)
        _rmtree(self.run_dir)
        _rmtree(self.data_root)


def start_dockerd(user: User, runtime: EngineRuntime, workdir: Path, image_tar: Path | None) -> Docker:
    """Rootless dockerd for `user` (dockerd-rootless.sh under rootlesskit, started as the user),
    its runtime dir under /run/user/UID and its data-root under workdir, READY when its socket
    answers; the image imported."""
    skip_unless_engines(user)
    run_dir = _user_dir(Path(f"/run/user/{user.uid}"), "engines-docker-", user)
    data_root = _user_dir(workdir, "engines-docker-data-", user)
    config = run_dir / "daemon.json"
    config.write_text(docker_daemon_json(runtime))
    os.chown(config, user.uid, user.gid)
    log_path = workdir / f"{run_dir.name}.log"
    home_before = {p.name for p in Path(user.home).iterdir()}
    # XDG_CONFIG_HOME too: dockerd writes its key.json under it (else ~/.config/docker).
    env = {**user.env, "PATH": f"/usr/share/docker.io/contrib:{SYSTEM_PATH}", "XDG_RUNTIME_DIR": str(run_dir),
           "XDG_CONFIG_HOME": str(run_dir / "config"), "XDG_DATA_HOME": str(data_root / "xdg-data"),
           "DOCKERD_ROOTLESS_ROOTLESSKIT_NET": "host", "DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER": "none"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            user.command([DOCKERD_ROOTLESS, "--data-root", str(data_root), "--config-file", str(config),
                          "--pidfile", str(run_dir / "docker.pid")]),
            env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client_env = {**user.env, "DOCKER_HOST": f"unix://{run_dir}/docker.sock", "DOCKER_CONFIG": str(run_dir / "cli")}
    docker = Docker(user, runtime, run_dir, data_root, proc, log_path, client_env, home_before)
    try:
        deadline = time.monotonic() + DOCKERD_START_TIMEOUT
        # Polled: dockerd tells nobody when it is ready; `docker version` answers once it is.
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"dockerd-rootless exited with {proc.returncode}:\n{docker.log()[-5000:]}")
            if docker.socket.exists() and docker("version", "--format", "{{.Server.Version}}", timeout=30).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not answer within {DOCKERD_START_TIMEOUT} s:\n{docker.log()[-5000:]}")
            time.sleep(0.2)
        if image_tar is not None:
            docker.ok("import", str(image_tar), IMAGE)
    except BaseException:
        docker.cleanup()
        raise
    return docker


def docker_daemon_json(runtime: EngineRuntime) -> str:
    import json
    return json.dumps({"bridge": "none", "iptables": False, "ip-forward": False, "ip-masq": False,
                       "userland-proxy": False, "runtimes": {RUNTIME_NAME: {"path": runtime.path}}})


@pytest.fixture
def make_docker(busybox_tar, workdir):
    """make_docker(user, runtime) -> Docker (its own rootless dockerd) with IMAGE imported; stopped after the test."""
    made: list[Docker] = []

    def make(user: User, runtime: EngineRuntime, image: bool = True) -> Docker:
        docker = start_dockerd(user, runtime, workdir, busybox_tar if image else None)
        made.append(docker)
        return docker

    yield make
    for docker in made:
        docker.cleanup()
    _assert_homes_untouched(made)


# ---------------------------------------------------------------- the runtime parameter

RUNTIME_PARAMS = ["runc", "proxy-run", "proxy-create-start"]


@pytest.fixture(params=RUNTIME_PARAMS)
def engine_runtime(request, start_daemon, workdir, user) -> EngineRuntime:
    """The runtime the engines use: runc itself (the reference), or nodestep-oci in front of a
    real daemon with a runc oci.conf in each of its two modes (skipped while nodestep-oci is
    not installed)."""
    from conftest import RUNC_RUN_CONF

    if request.param == "runc":
        return runc_runtime()
    why = proxy_missing()
    if why:
        pytest.skip(why)
    conf = RUNC_RUN_CONF if request.param == "proxy-run" else \
        (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text()
    daemon = start_daemon(conf)
    return proxy_runtime(daemon, request.param, workdir, user)


def wait_output(engine: Podman | Docker, container: str, line: bytes = b"ready",
                timeout: float = ENGINE_TIMEOUT) -> None:
    """Until the container printed `line` (e.g. once its traps are set), read from `logs --follow`."""
    from conftest import read_line_from
    follow = engine.popen("logs", "--follow", container, stderr=subprocess.DEVNULL)
    try:
        read_line_from(follow.stdout, line, timeout)
    finally:
        follow.kill()
        follow.wait()
