"""`nodestepctl run`: build the launch request, send it with the step's stdin/stdout/stderr,
wait for `started`, then (attached) forward our signals to the step and exit with its status.

Attached, the client passes its own stdin/stdout/stderr, so container output never passes
through either process. Detached, it passes /dev/null as stdin and, as stdout and stderr,
the --output/--error files it opened itself, else /dev/null (with --user the daemon opens
those files, as that user).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import time

from nodestepd.ctl.exits import EXIT_USAGE, ClientError, step_exit_status
from nodestepd.ctl.parser import remainder
from nodestepd.ctl.transport import ConnectionLost, connect, expect, receive, send
from nodestepd.protocol import wire

FORWARDED_SIGNALS = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGTSTP,
)
PROGRESS_AFTER = 1.0  # seconds without a reply before the first progress line
PROGRESS_EVERY = 10.0


def _step_ids(args: argparse.Namespace) -> tuple[int | None, int | None]:
    job_id, step_id = args.job_id, args.step_id
    if job_id is None and os.environ.get("SLURM_JOB_ID"):
        job_id = _int_from_env("SLURM_JOB_ID")
    if step_id is None and os.environ.get("SLURM_STEP_ID"):
        step_id = _int_from_env("SLURM_STEP_ID")
    return job_id, step_id


def _slurm_task_fields(args: argparse.Namespace) -> dict:
    """The per-task fields of a run request (docs/protocol.md).

    Under srun (SLURM_STEP_ID and SLURM_PROCID set) each nodestepctl is one task of the
    step, so the launch is that task: %t is SLURM_PROCID. An explicit --ntasks means
    "this many containers from here", a whole-step launch; --task-id makes a per-task
    launch outside srun.
    """
    task_offset, local_offset = args.task_id, args.local_id
    under_srun = bool(os.environ.get("SLURM_STEP_ID") and os.environ.get("SLURM_PROCID"))
    if task_offset is None and args.ntasks is None and under_srun:
        task_offset = _int_from_env("SLURM_PROCID")
        if local_offset is None and os.environ.get("SLURM_LOCALID"):
            local_offset = _int_from_env("SLURM_LOCALID")
    if task_offset is None and local_offset is not None:
        raise ClientError("--local-id goes with a per-task launch (--task-id, or srun's SLURM_PROCID)", EXIT_USAGE)
    node_id = _int_from_env("SLURM_NODEID") if os.environ.get("SLURM_NODEID") else None
    container_id = args.container_id or os.environ.get("SLURM_CONTAINER_ID") or None
    return {"task_offset": task_offset, "local_offset": local_offset, "node_id": node_id, "container_id": container_id}


def _int_from_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ClientError(f"{name}={os.environ[name]!r} is not a number", wire.STATUS_LAUNCH_FAILED) from None


def _read_bundle_config(bundle: str) -> tuple[str | None, str | None]:
    """config.json read with the caller's own rights (the daemon never opens it as root)."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            data = f.read(wire.MAX_MESSAGE // 2 + 1)
    except OSError as e:
        return None, e.strerror or str(e)
    if len(data) > wire.MAX_MESSAGE // 2:
        return None, f"larger than {wire.MAX_MESSAGE // 2} bytes"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start})"


def _parse_env(values: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ClientError(f"--env {item!r}: expected NAME=VALUE", EXIT_USAGE)
        env[name] = value
    return env


def _require_utf8(what: str, value: str) -> None:
    """The protocol carries text; a value Python could only decode with surrogates would not survive."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ClientError(
            f"{what} is not valid UTF-8 ({os.fsencode(value)!r}); nodestepd passes text only",
            wire.STATUS_LAUNCH_FAILED,
        ) from None


def _open_output(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ClientError(f"cannot open output file {path}: {e.strerror}", wire.STATUS_LAUNCH_FAILED) from None


def run_request(args: argparse.Namespace) -> dict:
    """The `run` message for the parsed command line, or a ClientError saying what is wrong with it.

    Values come from the options, else from Slurm's environment (under srun). Without
    --user the bundle's config.json is read here, with the caller's own rights.
    """
    failed = wire.STATUS_LAUNCH_FAILED
    command = remainder(args.command)
    image = getattr(args, "image", None)
    if not command and image is None:
        raise ClientError("no command given: nodestepctl run --bundle DIR -- COMMAND [ARG...]", EXIT_USAGE)
    image_fields = _image_fields(args) if image is not None else {}
    if image is None and (args.mount or args.workdir is not None or args.entrypoint is not None):
        raise ClientError("--mount, --workdir and --entrypoint go with --image", EXIT_USAGE)
    bundle = os.path.abspath(args.bundle) if image is None else ""
    if image is None and args.user is None and not os.path.isdir(bundle):
        raise ClientError(f"bundle {bundle} does not exist or is not a directory", failed)
    if args.pty and not args.detach and not os.isatty(0):
        raise ClientError("--pty needs a terminal on standard input", EXIT_USAGE)
    if (args.output or args.error) and not args.detach:
        raise ClientError("--output and --error go with --detach", EXIT_USAGE)
    # With --user the daemon opens config.json and the output files as that user, never
    # with our (an operator's) rights: see docs/security.md.
    config_json, config_json_error = (_read_bundle_config(bundle) if args.user is None and image is None
                                      else (None, None))
    job_id, step_id = _step_ids(args)
    task_fields = _slurm_task_fields(args)
    env = dict(os.environ) if args.export == "ALL" else {}
    env.update(_parse_env(args.env))
    chdir = os.path.abspath(args.chdir) if args.chdir else os.getcwd()
    _require_utf8("the bundle path", bundle)
    _require_utf8("the working directory", chdir)
    for i, arg in enumerate(command):
        _require_utf8(f"command argument {i}", arg)
    for name, value in env.items():
        _require_utf8(f"environment variable {name!r}", name + value)
        if "\0" in value:
            raise ClientError(f"environment variable {name!r} contains a NUL byte", failed)
    message = {
        "op": "run",
        "bundle": bundle,
        "args": command,
        "env": env,
        "job_id": job_id,
        "step_id": step_id,
        "ntasks": args.ntasks if args.ntasks is not None else 1,
        "chdir": chdir,
        "pty": args.pty,
        "detach": args.detach,
        "config_json": config_json,
        "config_json_error": config_json_error,
        # Detached with nowhere to write: the daemon sends the output to the journal when it logs there.
        "output_to_journal": args.detach and not args.output and not args.error,
        **task_fields,
        **image_fields,
    }
    if args.user is not None:
        message["user"] = args.user
        for name in ("output", "error"):
            if getattr(args, name):
                message[name] = os.path.abspath(getattr(args, name))
    return message


def _image_fields(args: argparse.Namespace) -> dict:
    """The run request's image fields: the reference (an archive's path made absolute here),
    the archive's fingerprint as we see it, the mounts, --entrypoint and --workdir."""
    from nodestepd.image.refs import RefError, fingerprint, parse_ref  # only an image launch loads it

    failed = wire.STATUS_LAUNCH_FAILED
    try:
        ref = parse_ref(args.image, os.getcwd())
    except RefError as e:
        raise ClientError(str(e), failed) from None
    _require_utf8("the image reference", ref.canonical)
    mounts = []
    for text in args.mount:
        parts = text.split(":")
        readonly = len(parts) == 3 and parts[2] in ("ro", "rw") and parts[2] == "ro"
        if len(parts) == 3 and parts[2] not in ("ro", "rw") or len(parts) not in (2, 3) or not all(parts[:2]):
            raise ClientError(f"--mount {text!r}: expected SRC:DST[:ro]", EXIT_USAGE)
        source, destination = os.path.abspath(parts[0]), parts[1]
        if not destination.startswith("/"):
            raise ClientError(f"--mount {text!r}: the destination must be an absolute path", EXIT_USAGE)
        _require_utf8("a --mount path", source + destination)
        mounts.append({"source": source, "destination": destination, "readonly": readonly})
    if args.workdir is not None and not args.workdir.startswith("/"):
        raise ClientError(f"--workdir {args.workdir!r}: must be an absolute path in the container", EXIT_USAGE)
    return {"image": ref.canonical, "image_fingerprint": fingerprint(ref) if args.user is None else None,
            "mounts": mounts, "entrypoint": args.entrypoint, "workdir": args.workdir}


def cmd_run(args: argparse.Namespace) -> int:
    message = run_request(args)
    job_id, step_id = message["job_id"], message["step_id"]
    owned: list[int] = []  # what we opened for a detached step; the daemon has its own copies once sent
    try:
        if args.detach:
            stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            owned.append(stdin)
            user_opens = args.user is not None  # the daemon opens --output/--error as the user
            stdout = _open_output(args.output if args.output and not user_opens else os.devnull)
            owned.append(stdout)
            stderr = stdout if not args.error or user_opens else _open_output(args.error)
            if stderr != stdout:
                owned.append(stderr)
            fds = [stdin, stdout, stderr]
        else:
            fds = [0, 1, 2]
        wakeup = None if args.detach else _catch_signals()
        sock = connect(args.socket)
        with sock:
            try:
                send(sock, message, fds)
            except ConnectionLost as e:
                raise ClientError(str(e), wire.STATUS_LAUNCH_FAILED) from None
            for fd in owned:
                os.close(fd)
            owned = []
            reply = _await_started(sock, None if job_id is None else f"{job_id}.{step_id or 0}", message.get("image"))
            ref = f"{reply['job_id']}.{reply['step_id']}"
            if args.detach:
                print(ref)
                return 0
            assert wakeup is not None
            return _attend(sock, wakeup, ref)
    finally:
        for fd in owned:
            os.close(fd)


def _await_started(sock: socket.socket, ref: str | None, image: str | None = None) -> dict:
    """The `started` reply. While the daemon is still preparing the step (stage-in, a
    slow runtime create), say so on stderr: after PROGRESS_AFTER seconds, not before.

    ref: the step's JOB.STEP when the caller chose the job id, for the message when the
    daemon goes away before its reply (then nobody here knows whether the step runs)."""
    began = time.monotonic()
    deadline = began + PROGRESS_AFTER
    noted = False
    while True:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if readable:
            received = receive(sock)
            if received is None:
                which = f"step {ref}" if ref else "the step"
                then = f"nodestepctl wait {ref}" if ref else "nodestepctl ps"
                raise ClientError(
                    f"lost the connection to nodestepd before it acknowledged the launch; {which} may be "
                    f"running ({then} tells)", wire.STATUS_CONNECTION_LOST,
                )
            reply = expect(received, "started", wire.STATUS_LAUNCH_FAILED)
            if noted:
                waited = time.monotonic() - began
                print(f"nodestepctl: step {reply['job_id']}.{reply['step_id']} started after {waited:.1f} s",
                      file=sys.stderr)
            return reply
        if time.monotonic() >= deadline:
            print(f"nodestepctl: still launching after {deadline - began:.0f} s: nodestepd is preparing "
                  f"the step ({'importing the image: copying layers, unpacking; ' if image else ''}"
                  "spool, stage-in, runtime create)", file=sys.stderr, flush=True)
            noted = True
            deadline += PROGRESS_EVERY


def _catch_signals() -> int:
    """Route the forwarded signals into a pipe the attach loop selects on."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda *_: None)
    return r


def _attend(sock: socket.socket, wakeup: int, ref: str) -> int:
    """Until the step's `exit`: forward the signals we catch to it, and print the errors the daemon reports."""
    while True:
        readable, _, _ = select.select([sock, wakeup], [], [])
        if wakeup in readable:
            try:
                for signum in os.read(wakeup, 64):
                    send(sock, {"op": "signal", "signal": signal.Signals(signum).name})
            except BlockingIOError:
                pass
            except ConnectionLost:
                pass  # the daemon is gone; the read below says so
        if sock in readable:
            reply = receive(sock)
            if reply is None:
                raise ClientError(
                    f"lost the connection to nodestepd; step {ref} may still be running "
                    f"(nodestepctl wait {ref} tells its status)",
                    wire.STATUS_CONNECTION_LOST,
                )
            if reply["type"] == "exit":
                return step_exit_status(reply)
            if reply["type"] == "error":
                print(f"nodestepctl: {reply.get('error')}", file=sys.stderr)
