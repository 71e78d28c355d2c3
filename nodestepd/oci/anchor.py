"""`nodestep-oci create` and the anchor it leaves behind.

The container runs under nodestepd, not below the engine's process that called us
(conmon, containerd-shim). Engines wait for the pid in --pid-file as their own child, so
`create` forks an anchor that stays in the caller's tree (orphaned to the caller, a child
subreaper, once `create` exits): it writes its own pid to the pid file, keeps the caller's
stdio, holds the step's connection as an attached `nodestepctl run` does (riding through a
daemon restart by attaching again), and exits with the container's status: its exit code,
or the same signal raised on itself. docs/oci-proxy.md has the whole design.

`create` returns once the daemon has prepared the step and holds it before its start (and,
for a terminal, once the pty master went to --console-socket); the anchor tells it over a
pipe.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import re
import resource
import select
import signal
import socket
import sys

from nodestepd.ctl.exits import ClientError
from nodestepd.ctl.run import REATTACH_TIMEOUT, Attachment, catch_signals, caught_signals, preserved_fds
from nodestepd.ctl.transport import connect, expect, receive, send
from nodestepd.oci.errors import OciError, report
from nodestepd.protocol import wire

# Signals whose default action does not end a process: a status 128+N for these is an exit code.
_NOT_FATAL = {signal.SIGCHLD, signal.SIGCONT, signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
              signal.SIGURG, signal.SIGWINCH}


def bundle_request(bundle: str, config: dict, container_id: str, env: dict[str, str], cgroup: str = "") -> dict:
    """The `run` request of an OCI create (pure): the bundle's process and the caller's Slurm job."""
    process = config.get("process")
    if not isinstance(process, dict) or not isinstance(process.get("args"), list) or not process["args"]:
        raise OciError(f"{bundle}/config.json has no process.args")
    if not all(isinstance(a, str) for a in process["args"]):
        raise OciError(f"{bundle}/config.json: process.args must be strings")
    container_env = {}
    for item in process.get("env") or []:
        if isinstance(item, str) and "=" in item:
            name, _, value = item.partition("=")
            if name:
                container_env[name] = value
    annotations = config.get("annotations") if isinstance(config.get("annotations"), dict) else {}
    job_id, step_id = slurm_job(env, cgroup, container_env)
    return {
        "op": "run",
        "bundle": bundle,
        "args": list(process["args"]),
        "env": container_env,
        "job_id": job_id,
        "step_id": None,
        "chdir": process.get("cwd") if isinstance(process.get("cwd"), str) and process.get("cwd") else "/",
        "pty": bool(process.get("terminal")),
        "detach": False,
        "oci": {
            "id": container_id,
            "bundle": bundle,
            "annotations": {str(k): str(v) for k, v in annotations.items()},
            "slurm_step_id": step_id,
        },
    }


def _slurm_id(env: dict[str, str], name: str) -> int | None:
    value = env.get(name, "")
    return int(value) if value.isdigit() and len(value) < 11 else None


_CGROUP_JOB = re.compile(r"/job_(\d{1,10})(?:/step_(\d{1,10}))?")


def slurm_job(env: dict[str, str], cgroup: str, container_env: dict[str, str]) -> tuple[int | None, int | None]:
    """The caller's Slurm job and step (pure). The engines give their runtime an environment
    of their own, without SLURM_*: so, in turn, our environment (a runtime run by hand or a
    wrapper), the job's cgroup we run in (Slurm's proctrack/cgroup: .../job_J/step_S, which
    conmon and the shim inherit from the engine), the container's own environment (podman
    --env-host, -e SLURM_JOB_ID)."""
    job = _slurm_id(env, "SLURM_JOB_ID")
    if job is not None:
        return job, _slurm_id(env, "SLURM_STEP_ID")
    for line in cgroup.splitlines():
        found = _CGROUP_JOB.search(line)
        if found:
            return int(found.group(1)), int(found.group(2)) if found.group(2) else None
    job = _slurm_id(container_env, "SLURM_JOB_ID")
    return job, _slurm_id(container_env, "SLURM_STEP_ID") if job is not None else None


def create(args: argparse.Namespace) -> int:
    try:
        # As `nodestepctl run --preserve-fds`: the engine's fds 3 .. 3+N-1, checked open,
        # go to the daemon with the run request for the container's fds 3 ..
        preserved = preserved_fds(args, {})
    except ClientError as e:
        raise OciError(str(e)) from None
    bundle = os.path.abspath(args.bundle)
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            raw = f.read()
        config = json.loads(raw)
    except (OSError, ValueError) as e:
        raise OciError(f"cannot read {bundle}/config.json: {e}") from None
    if not isinstance(config, dict):
        raise OciError(f"{bundle}/config.json is not a JSON object")
    try:
        with open("/proc/self/cgroup") as f:
            cgroup = f.read()
    except OSError:
        cgroup = ""
    message = bundle_request(bundle, config, args.id, dict(os.environ), cgroup)
    message["config_json"] = raw.decode("utf-8", "replace")
    message["preserve_fds"] = len(preserved)
    pid_file = os.path.abspath(args.pid_file) if args.pid_file else None
    master = slave = None
    if message["pty"]:
        if not args.console_socket:
            raise OciError("process.terminal is set but no --console-socket was given")
        master, slave = os.openpty()
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the anchor
        os.close(ready_r)
        code = 125
        try:
            code = _anchor(args, message, pid_file, ready_w, master, slave, preserved)
        except BaseException as e:  # noqa: BLE001 - everything goes to the engine, nothing escapes the fork
            _tell(ready_w, f"error {e}")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        _exit_as(code)
    os.close(ready_w)
    for fd in (master, slave):
        if fd is not None:
            os.close(fd)
    said = b""
    while True:
        chunk = os.read(ready_r, 65536)
        if not chunk:
            break
        said += chunk
    os.close(ready_r)
    if said == b"ok":
        return 0
    os.waitpid(pid, 0)  # it told us why and ended: not left for the engine to reap
    raise OciError(said.decode("utf-8", "replace").removeprefix("error ") or "the anchor ended without a word")


def _tell(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
        os.close(fd)
    except OSError:
        pass


def _anchor(args: argparse.Namespace, message: dict, pid_file: str | None, ready: int,
            master: int | None, slave: int | None, preserved: list[int]) -> int:
    """The anchor's life: the step created, the engine told, the step followed to its status."""
    wakeup = catch_signals()
    fds = [slave, slave, slave] if slave is not None else [0, 1, 2]
    sock = connect(args.socket)
    send(sock, message, [*fds, *preserved])
    for fd in preserved:
        os.close(fd)  # the daemon holds them for the container now: the anchor keeps only stdio
    if slave is not None:
        os.close(slave)  # the tasks hold it: the master sees the end once they are gone
        # The container's stdio is the terminal: like runc, we keep none of the caller's.
        # (containerd's shim reads a terminal create's output until end-of-file.)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
    created = expect(receive(sock), "created", wire.STATUS_LAUNCH_FAILED)
    if master is not None:
        _send_console(args.console_socket, master)
        os.close(master)
    if pid_file is not None:
        _write_pid_file(pid_file, os.getpid())
    _tell(ready, "ok")
    # From here on nobody reads our errors but the engine's logs: the status says it all.
    try:
        held = _wait_readable(sock, wakeup)  # signals caught before the start go to the container after it
        started = receive(sock)
        if started is None:
            sock.close()
            attachment = Attachment(args.socket, wakeup, (created["job_id"], created["step_id"], 0), REATTACH_TIMEOUT)
            attachment.held += held
            return attachment.ride(None)
        if started["type"] == "exit":
            return started["status"] if started["status"] is not None else wire.STATUS_UNKNOWN
        expect(started, "started", wire.STATUS_LAUNCH_FAILED)
        attachment = Attachment(args.socket, wakeup, (started["job_id"], started["step_id"], 0), REATTACH_TIMEOUT)
        attachment.held += held
        return attachment.ride(sock)
    except ClientError as e:
        report(args, f"container {args.id}: {e}")
        return e.status


def _wait_readable(sock: socket.socket, wakeup: int) -> list[int]:
    """Until the daemon says more (the start, or an end): the signals caught meanwhile."""
    held: list[int] = []
    while True:
        readable, _, _ = select.select([sock, wakeup], [], [])
        if wakeup in readable:
            held += caught_signals(wakeup)
        if sock in readable:
            return held


def _send_console(path: str, master: int) -> None:
    """The pty master to the engine's console socket, as runc sends it (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendmsg([os.ttyname(master).encode() if os.isatty(master) else b"/dev/ptmx"],
                      [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [master]).tobytes())])
        except OSError as e:
            raise OciError(f"cannot send the terminal to --console-socket {path}: {e.strerror or e}") from None


def _write_pid_file(path: str, pid: int) -> None:
    """Written whole, then renamed into place: the engine parses it as one number, no newline."""
    tmp = f"{path}.{pid}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        raise OciError(f"cannot write --pid-file {path}: {e.strerror or e}") from None


def exit_signal(status: int) -> int | None:
    """The signal a status 128+N stands for, when raising it ends a process (pure)."""
    if 128 < status < 128 + signal.NSIG:
        try:
            sig = signal.Signals(status - 128)
        except ValueError:
            return None
        if sig not in _NOT_FATAL:
            return sig.value
    return None


def _exit_as(status: int) -> None:
    """End like the container: the same signal for a signalled one (SIGKILL included), else its code."""
    sig = exit_signal(status)
    if sig is not None:
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the container dumped its core, if any
            if sig != signal.SIGKILL:  # no handler can be set for SIGKILL, nor is one needed
                signal.signal(sig, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
    os._exit(status & 0xFF)
