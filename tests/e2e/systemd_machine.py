"""A private machine run by this host's real systemd, for end-to-end tests of the units.

boot() starts /lib/systemd/systemd as PID 1 of new PID, mount, network, UTS, IPC and
cgroup namespaces, the way a container manager would:

- the root file system is the host's seen through an overlay whose upper layer is a
  tmpfs: the machine reads the host's programs, users and venvs, and everything it
  writes (tmpfiles' /var and /etc entries, StateDirectory=, the journal) stays in its
  own memory. /tmp, /var/tmp, /run, /dev and /dev/shm are fresh, and only the
  directory the test names (`share`) is the host's, at the same path;
- /proc/sys and /sys are read-only, /dev holds only the usual character devices
  (no host device node can be created or re-permissioned), and the capabilities to load
  kernel modules, set the clock and do raw I/O are dropped: nothing systemd's boot would
  do to a real machine (sysctl, binfmt, kmod, udev) reaches this host;
- its cgroups are a subtree of the test's own (nsd-e2e-PID in every hierarchy), which
  the machine sees as its root, so two machines, or this one and the host, never touch
  each other's units; shutdown() removes the subtree;
- it boots `nsd-e2e.target`: sysinit.target (journald, tmpfiles, ...) and nothing of the
  host's multi-user.target, whose services here (slurmd, slurmctld, munge, postgresql)
  are not ours to start.

Commands run inside through nsenter (Machine.run); the machine's /run is reachable from
the host at /proc/PID/root/run (Machine.path). Boot waits for systemd's own READY=1
(systemd as a container's PID 1 sends it to $NOTIFY_SOCKET once its boot jobs are done).
shutdown() is SIGKILL to PID 1: the kernel then kills everything in its PID namespace.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

SYSTEMD = "/lib/systemd/systemd"
TARGET = "nsd-e2e.target"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# What the machine's PID 1 may never do to the host, whatever a unit asks: load kernel
# modules (systemd-modules-load, kmod-static-nodes), set the clock, raw I/O.
DROPPED_CAPABILITIES = "-sys_module,-sys_time,-sys_rawio"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
SUBTREE_PREFIX = "nsd-e2e-"  # then the pid of the test process that made it

T = TypeVar("T")


def poll_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """condition()'s first truthy value, checked every `interval` s: for states that announce
    themselves to nobody (a unit's state, a journal entry). Fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


@dataclass(frozen=True)
class CgroupMount:
    target: Path  # under /sys/fs/cgroup
    fstype: str  # tmpfs, cgroup or cgroup2
    options: str  # the super block's options: which v1 hierarchy this is


def _cgroup_mounts() -> list[CgroupMount]:
    """The host's cgroup layout (unified, hybrid or legacy), to be mounted again inside."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            target, fstype, super_options = Path(fields[4]), fields[sep + 1], fields[sep + 3]
            if target == CGROUP_ROOT or CGROUP_ROOT in target.parents:
                options = ",".join(o for o in super_options.split(",") if o not in ("rw", "ro"))
                mounts.append(CgroupMount(target, fstype, options))
    return mounts


def _own_cgroups() -> dict[Path, str]:
    """Mount point of each hierarchy -> this process's cgroup in it."""
    by_hierarchy = {}
    for m in _cgroup_mounts():
        if m.fstype == "cgroup2":
            by_hierarchy[("",)] = m.target
        elif m.fstype == "cgroup":
            by_hierarchy[tuple(sorted(o for o in m.options.split(",") if o not in ("xattr", "nsdelegate")))] = m.target
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            key = ("",) if controllers == "" else tuple(sorted(controllers.split(",")))
            if key in by_hierarchy:
                own[by_hierarchy[key]] = path
    return own


def _make_cgroup_subtree(name: str) -> list[Path]:
    """A new child of this process's cgroup in every hierarchy (cpuset given its parent's
    cpus and mems, without which nothing can join it). Subtrees left by a test process
    that was killed before its shutdown() are removed first."""
    made = []
    try:
        for mount, path in _own_cgroups().items():
            parent = mount / path.lstrip("/")
            for stale in parent.glob(f"{SUBTREE_PREFIX}*"):
                if not Path(f"/proc/{stale.name.removeprefix(SUBTREE_PREFIX).split('-')[0]}").exists():
                    try:
                        _remove_cgroup_subtrees([stale], timeout=5)
                    except OSError:
                        pass  # still in use after all: not ours to force
            child = parent / name
            child.mkdir()
            made.append(child)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (child / knob).exists() and not (child / knob).read_text().strip():
                    (child / knob).write_text((parent / knob).read_text())
    except BaseException:
        _remove_cgroup_subtrees(made, timeout=5)
        raise
    return made


def _remove_cgroup_subtrees(roots: list[Path], timeout: float) -> None:
    """rmdir each cgroup below and at each root, deepest first. A cgroup whose last
    process just died can refuse for a moment (EBUSY): retried until the deadline."""
    deadline = time.monotonic() + timeout
    for root in roots:
        if not root.exists():
            continue
        dirs = sorted((Path(d) for d, _, _ in os.walk(root)), key=lambda p: len(p.parts), reverse=True)
        for d in dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


def _boot_script(root: Path, share: Path, run_seed: Path, notify: Path) -> str:
    """What PID 1 of the new namespaces runs before it execs systemd."""
    q = shlex.quote
    r = q(str(root / "root"))
    lines = [
        "set -eu",
        # Nothing mounted from here on may propagate back to the host.
        "mount --make-rprivate /",
        f"mount -t tmpfs -o mode=0700 nsd-e2e-layers {q(str(root))}",
        f"mkdir {q(str(root / 'upper'))} {q(str(root / 'work'))} {r}",
        f"mount -t overlay -o lowerdir=/,upperdir={q(str(root / 'upper'))},workdir={q(str(root / 'work'))} "
        f"nsd-e2e-root {r}",
        f"mount -t proc proc {r}/proc",
        f"mount --bind {r}/proc/sys {r}/proc/sys",
        f"mount -o remount,bind,ro {r}/proc/sys",
        f"mount -t sysfs -o ro sysfs {r}/sys",
    ]
    # The cgroup file systems again, now rooted at this cgroup namespace's root (the subtree).
    for m in _cgroup_mounts():
        target = f"{r}{q(str(m.target))}"
        options = "mode=0755" if m.fstype == "tmpfs" else m.options
        lines.append(f"mkdir -p {target}")
        lines.append(f"mount -t {q(m.fstype)} {'-o ' + q(options) if options else ''} nsd-e2e-{q(m.fstype)} {target}")
    lines += [
        f"mount -t tmpfs -o mode=0755 nsd-e2e-dev {r}/dev",
        *(f"touch {r}/dev/{d} && mount --bind /dev/{d} {r}/dev/{d}" for d in DEVICES),
        # systemd writes its status to /dev/console: the host's console is not the machine's.
        f"touch {r}/dev/console && mount --bind /dev/null {r}/dev/console",
        f"mkdir {r}/dev/pts {r}/dev/shm {r}/dev/mqueue",
        f"mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 nsd-e2e-devpts {r}/dev/pts",
        f"ln -s pts/ptmx {r}/dev/ptmx",
        f"mount -t tmpfs -o mode=1777 nsd-e2e-shm {r}/dev/shm",
        f"mount -t mqueue nsd-e2e-mqueue {r}/dev/mqueue",
        f"ln -s /proc/self/fd {r}/dev/fd",
        f"ln -s /proc/self/fd/0 {r}/dev/stdin && ln -s /proc/self/fd/1 {r}/dev/stdout && ln -s /proc/self/fd/2 {r}/dev/stderr",
        f"mount -t tmpfs -o mode=1777 nsd-e2e-tmp {r}/tmp",
        f"mount -t tmpfs -o mode=1777 nsd-e2e-var-tmp {r}/var/tmp",
        f"mount -t tmpfs -o mode=0755 nsd-e2e-run {r}/run",
        f"cp -a {q(str(run_seed))}/. {r}/run/",
        # The kernel lets a user namespace (a rootless container) mount proc only where a
        # proc mount is fully visible already, without anything mounted over part of it:
        # /proc is not (/proc/sys), so here is one, where only root can reach it.
        f"mkdir -m 0700 {r}/run/nsd-e2e-proc",
        f"mount -t proc -o nosuid,nodev,noexec nsd-e2e-proc {r}/run/nsd-e2e-proc",
        f"mkdir -p {r}{q(str(share))}",
        f"mount --bind {q(str(share))} {r}{q(str(share))}",
        f"cd {r}",
        "mkdir .nsd-e2e-old-root",
        "pivot_root . .nsd-e2e-old-root",
        "umount -l /.nsd-e2e-old-root",
        "rmdir /.nsd-e2e-old-root",
        # container= makes systemd behave as a container's PID 1 (and skip units marked
        # ConditionVirtualization=!container); it logs to stderr, which is our log file.
        f"exec env -i container=nsd-e2e PATH={PATH} NOTIFY_SOCKET={q(str(notify))} "
        f"setpriv --bounding-set {DROPPED_CAPABILITIES} -- {SYSTEMD} --unit={TARGET} --show-status=no",
    ]
    return "\n".join(lines) + "\n"


TARGET_UNIT = """\
[Unit]
Description=nodestepd end-to-end test machine
# What every service's default dependencies need (journald and the rest of early boot),
# and nothing else: no getty, no timers, none of the host's enabled services.
Requires=sysinit.target
After=sysinit.target
AllowIsolate=yes
"""

# The journal lives in /run (the machine's memory), never in the host's /var/log/journal.
JOURNALD_CONF = "[Journal]\nStorage=volatile\n"
# A service killed by a signal that dumps core (the watchdog's SIGABRT) would write its
# core file into its working directory: "/", the host's core_pattern being "core".
SYSTEM_CONF = "[Manager]\nDefaultLimitCORE=0\nShowStatus=no\n"


class Machine:
    def __init__(self, base: Path, share: Path) -> None:
        self.base = base
        self.share = share
        self.log_path = base / "systemd.log"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None  # systemd, as the host sees it
        self.cgroups: list[Path] = []

    # ---- boot and shutdown -----------------------------------------------------------

    def boot(self, run_files: dict[str, tuple[str | None, int, int, int]] | None = None, timeout: float = 60) -> None:
        """Start systemd and return once it has reported its boot done.

        run_files: {path under /run: (text, mode, uid, gid)} present in the machine's /run
        before systemd starts (text None: a directory), every parent directory root's, 0755."""
        seed = self.base / "run-seed"
        files = {
            f"systemd/system/{TARGET}": (TARGET_UNIT, 0o644, 0, 0),
            "systemd/journald.conf.d/nsd-e2e.conf": (JOURNALD_CONF, 0o644, 0, 0),
            "systemd/system.conf.d/nsd-e2e.conf": (SYSTEM_CONF, 0o644, 0, 0),
            **(run_files or {}),
        }
        for rel, (text, mode, uid, gid) in files.items():
            path = seed / rel
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if text is None:
                path.mkdir(mode=mode)
            else:
                path.write_text(text)
            path.chmod(mode)
            os.chown(path, uid, gid)
        layers = self.base / "layers"
        layers.mkdir()
        notify_path = self.base / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        self.cgroups = _make_cgroup_subtree(f"{SUBTREE_PREFIX}{os.getpid()}-{self.base.name}")
        join = " && ".join(f"echo $$ > {shlex.quote(str(c / 'cgroup.procs'))}" for c in self.cgroups)
        # The cgroup namespace is rooted where unshare runs: join the subtree first.
        # --kill-child and the parent-death signal: should the test process die, the
        # machine dies with it.
        outer = (f"{join} && exec setpriv --pdeathsig KILL -- unshare --kill-child=SIGKILL --fork --pid --mount "
                 f"--net --uts --ipc --cgroup -- sh -c {shlex.quote(_boot_script(layers, self.share, seed, notify_path))}")
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(["sh", "-c", outer], stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env={"PATH": PATH})
            self._wait_ready(notify, timeout)
        finally:
            notify.close()
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            (self.pid,) = map(int, f.read().split())
        state = self.run(["systemctl", "is-system-running", "--wait"], timeout=timeout).stdout.strip()
        assert state in ("running", "degraded"), (state, self.run(["systemctl", "--failed"]).stdout, self.log())

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        exited = os.pidfd_open(self.proc.pid)
        deadline = time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select([notify, exited], [], [], max(0.0, deadline - time.monotonic()))
                if exited in ready:
                    raise AssertionError(f"the machine exited with status {self.proc.wait()}:\n{self.log()}")
                if not ready:
                    raise AssertionError(f"systemd did not report its boot done within {timeout} s:\n{self.log()}")
                message = notify.recv(4096).decode()
                if "READY=1" in message.split("\n"):
                    return
        finally:
            os.close(exited)

    def shutdown(self) -> None:
        """SIGKILL to systemd: the kernel kills every process of its PID namespace, and the
        namespaces, mounts and tmpfs go with the last of them. Then the cgroups go."""
        if self.proc is not None:
            if self.proc.poll() is None:
                if self.pid is not None:
                    os.kill(self.pid, signal.SIGKILL)
                else:  # booting failed before we learnt its pid: unshare takes it down
                    self.proc.kill()
            # unshare exits once its child is reaped, which happens only after every other
            # process of the namespace has been.
            self.proc.wait(timeout=60)
        _remove_cgroup_subtrees(self.cgroups, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ---- inside the machine ----------------------------------------------------------

    def path(self, inside: str) -> Path:
        """A path of the machine, from the host."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def enter(self, argv: list[str]) -> list[str]:
        """argv run in the machine's namespaces, root and working directory (as root)."""
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-i", "--root", "--wd", "--", *argv]

    def run(self, argv: list[str], *, env: dict | None = None, input: str | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
        result = subprocess.run(self.enter(argv), env=env or {"PATH": PATH, "LANG": "C.UTF-8"}, input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (argv, result.returncode, result.stdout, result.stderr)
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    def journal(self, *matches: str, after: str | None = None) -> list[dict]:
        """The journal's entries matching `matches` (FIELD=VALUE, as journalctl takes them),
        oldest first; `after`: only those after this cursor (see cursor())."""
        argv = ["journalctl", "--no-pager", "--output=json", "--all"]
        if after:
            # Not --after-cursor: with matches, systemd 252's skips the first entry after the
            # cursor that matches. --cursor starts at the cursor's own entry, left out here.
            argv.append(f"--cursor={after}")
        out = self.run([*argv, *matches], check=True).stdout
        entries = [json.loads(line) for line in out.splitlines()]
        return [e for e in entries if e["__CURSOR"] != after]

    def cursor(self) -> str:
        """The journal's position now: journal(..., after=cursor()) sees only what comes next."""
        out = self.run(["journalctl", "--no-pager", "--output=json", "--lines=1"], check=True).stdout
        return json.loads(out.splitlines()[-1])["__CURSOR"]

    def wait_journal(self, *matches: str, after: str | None = None, message: str | None = None,
                     predicate: Callable[[dict], bool] | None = None, count: int = 1,
                     timeout: float = 30) -> list[dict]:
        """The entries matching (with this MESSAGE, for which predicate holds, if given), once
        there are at least `count`: journald stores what it is sent a moment later, so the
        entries a command caused are waited for."""
        def found():
            entries = [e for e in self.journal(*matches, after=after)
                       if (message is None or e.get("MESSAGE") == message) and (predicate is None or predicate(e))]
            return entries if len(entries) >= count else None

        return poll_until(found, timeout, f"{count} journal entries {matches} {message!r}", interval=0.1)
