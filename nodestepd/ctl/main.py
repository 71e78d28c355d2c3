"""`nodestepctl`: the command-line client of nodestepd.

Synchronous on purpose: one request, one connection. Messages are plain dicts framed by
wire.py (docs/protocol.md lists their fields); the daemon validates them. The client
stays off msgspec and asyncio because its start-up time is part of every launch.
For an attached run the client hands its own stdin/stdout/stderr to the daemon, so
container output never passes through either process, and it forwards the signals it
receives to the step.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import select
import signal
import socket
import sys
import time

from nodestepd import __version__
from nodestepd.protocol import wire
from nodestepd.protocol.wire import ProtocolError

DEFAULT_SOCKET = "/run/nodestepd/nodestepd.sock"
DEFAULT_OCI_CONF = "/etc/slurm/oci.conf"
FORWARDED_SIGNALS = (
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCONT, signal.SIGTSTP,
)
EXIT_USAGE = 2
EXIT_ERROR = 1


class ClientError(Exception):
    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


class ConnectionLost(ClientError):
    pass


# ---- talking to the daemon ----------------------------------------------------------


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except FileNotFoundError:
        raise ClientError(f"nodestepd is not running: no socket at {path} (set --socket or NODESTEPD_SOCKET)") from None
    except PermissionError:
        raise ClientError(f"cannot connect to {path}: permission denied") from None
    except ConnectionRefusedError:
        raise ClientError(f"nodestepd is not running: nobody listens on {path}") from None
    return sock


def send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = wire.frame_dict({"v": wire.VERSION, **message})
    try:
        if fds:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            sent = sock.sendmsg([data], ancillary)
            data = data[sent:]
        if data:  # sendall(b"") still calls send(): EPIPE if the daemon already answered and closed
            sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        raise ConnectionLost("nodestepd closed the connection before the request was sent") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(n - len(chunks))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks.extend(chunk)
    return bytes(chunks)


def receive(sock: socket.socket) -> dict | None:
    """The next reply, or None when the daemon closed the connection."""
    header = _recv_exact(sock, wire.HEADER.size)
    if header is None:
        return None
    body = _recv_exact(sock, wire.frame_length(header))
    if body is None:
        return None
    try:
        reply = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"malformed reply from nodestepd: {e}") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("type"), str):
        raise ProtocolError("malformed reply from nodestepd: no type")
    return reply


def expect(reply: dict | None, kind: str, status: int = EXIT_ERROR) -> dict:
    """The reply if it is of `kind`; otherwise a ClientError exiting with the daemon's status, or `status`."""
    if reply is None:
        raise ClientError("nodestepd closed the connection without replying", status)
    if reply["type"] == "error":
        raise ClientError(reply.get("error", "unknown error"), reply.get("status") or status)
    if reply["type"] != kind:
        raise ClientError(f"unexpected reply from nodestepd: {reply['type']!r} instead of {kind!r}", status)
    return reply


def request(path: str, message: dict, kind: str) -> dict:
    with connect(path) as sock:
        send(sock, message)
        return expect(receive(sock), kind)


# ---- run ----------------------------------------------------------------------


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


def cmd_run(args: argparse.Namespace) -> int:
    failed = wire.STATUS_LAUNCH_FAILED
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ClientError("no command given: nodestepctl run --bundle DIR -- COMMAND [ARG...]", EXIT_USAGE)
    bundle = os.path.abspath(args.bundle)
    if args.user is None and not os.path.isdir(bundle):
        raise ClientError(f"bundle {bundle} does not exist or is not a directory", failed)
    if args.pty and not args.detach and not os.isatty(0):
        raise ClientError("--pty needs a terminal on standard input", EXIT_USAGE)
    if (args.output or args.error) and not args.detach:
        raise ClientError("--output and --error go with --detach", EXIT_USAGE)
    # With --user the daemon opens config.json and the output files as that user, never
    # with our (an operator's) rights: see docs/security.md.
    config_json, config_json_error = _read_bundle_config(bundle) if args.user is None else (None, None)
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
    }
    if args.user is not None:
        message["user"] = args.user
        for name in ("output", "error"):
            if getattr(args, name):
                message[name] = os.path.abspath(getattr(args, name))
    owned: list[int] = []
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
                raise ClientError(str(e), failed) from None
            for fd in owned:
                os.close(fd)
            owned = []
            reply = _await_started(sock, None if job_id is None else f"{job_id}.{step_id or 0}")
            ref = f"{reply['job_id']}.{reply['step_id']}"
            if args.detach:
                print(ref)
                return 0
            assert wakeup is not None
            return _attend(sock, wakeup, ref)
    finally:
        for fd in owned:
            os.close(fd)


PROGRESS_AFTER = 1.0  # seconds without a reply before the first progress line
PROGRESS_EVERY = 10.0


def _await_started(sock: socket.socket, ref: str | None) -> dict:
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
                  "the step (spool, stage-in, runtime create)", file=sys.stderr, flush=True)
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
                return _exit_status(reply)
            if reply["type"] == "error":
                print(f"nodestepctl: {reply.get('error')}", file=sys.stderr)


# ---- other commands -------------------------------------------------------------


def _ref(text: str) -> tuple[int, int]:
    try:
        return wire.parse_step_ref(text)
    except ValueError as e:
        raise ClientError(str(e), EXIT_USAGE) from None


def cmd_signal(args: argparse.Namespace) -> int:
    job_id, step_id = _ref(args.step)
    request(args.socket, {"op": "signal", "signal": args.signal, "job_id": job_id, "step_id": step_id}, "ok")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job_id, step_id = _ref(args.step)
    reply = request(args.socket, {"op": "cancel", "job_id": job_id, "step_id": step_id}, "exit")
    status = "unknown" if reply["status"] is None else reply["status"]
    print(f"step {job_id}.{step_id} cancelled (status {status})")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    job_id, step_id = _ref(args.step)
    reply = request(args.socket, {"op": "wait", "job_id": job_id, "step_id": step_id}, "exit")
    return _exit_status(reply)


def _exit_status(reply: dict) -> int:
    """The step's status; when the daemon could not know it, say so and exit STATUS_UNKNOWN."""
    if reply["status"] is not None:
        return reply["status"]
    unknown = [str(t["task_id"]) for t in reply.get("tasks", []) if t["status"] is None]
    print(f"nodestepctl: step {reply['job_id']}.{reply['step_id']} ended, but the exit status of task(s) "
          f"{', '.join(unknown) or '?'} is not known (nodestepd could not watch their process: the daemon's "
          f"log says why); exiting with {wire.STATUS_UNKNOWN}", file=sys.stderr)
    return wire.STATUS_UNKNOWN


def cmd_ps(args: argparse.Namespace) -> int:
    steps = request(args.socket, {"op": "ps"}, "steps")["steps"]
    if args.json:
        print(json.dumps(steps, indent=2))
        return 0
    rows = [("STEP", "USER", "STATE", "TASKS", "STATUS", "AGE", "COMMAND")]
    now = time.time()
    for s in steps:
        rows.append((
            f"{s['job_id']}.{s['step_id']}", s["user"], s["state"], str(len(s["tasks"])),
            _status_column(s), _age(now - s["started_at"]), " ".join(s["args"]),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _status_column(step: dict) -> str:
    if step["status"] is not None:
        return str(step["status"])
    return "unknown" if step["state"] == "finished" else "-"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def cmd_status(args: argparse.Namespace) -> int:
    r = request(args.socket, {"op": "status"}, "status")
    print(f"nodestepd {r['version']} on {r['node_name']}, up {_age(r['uptime'])}")
    print(f"config file:  {r['config_file'] or '(none, built-in defaults)'}")
    print(f"oci.conf:     {r['oci_conf']} ({r['oci_mode']} mode)")
    print(f"socket:       {r['socket']}")
    print(f"spool dir:    {r['spool_dir']}")
    print(f"state dir:    {r['state_dir']}")
    print(f"steps:        {r['steps_running']} running, {r['steps_finished']} finished")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    request(args.socket, {"op": "reload"}, "ok")
    print("nodestepd reloaded its settings file and oci.conf")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from nodestepd.ctl.checkconfig import check_config

    return check_config(args.file, node_name=args.node_name)


def cmd_doctor(args: argparse.Namespace) -> int:
    from nodestepd.ctl.doctor import DoctorOptions, DoctorUsageError, print_report, run_doctor

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    options = DoctorOptions(user=args.user, bundle=args.bundle, config_file=args.config, oci_conf=args.oci_conf,
                            args=tuple(command))
    try:
        checks = run_doctor(options)
    except DoctorUsageError as e:
        raise ClientError(str(e), EXIT_USAGE) from None
    return print_report(checks, as_json=args.json)


def cmd_completion(args: argparse.Namespace) -> int:
    from nodestepd.ctl.completion import bash_completion

    sys.stdout.write(bash_completion(build_parser()))
    return 0


# ---- command line ----------------------------------------------------------------


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (only=NAME) the same with just that subcommand's parser."""
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="nodestepctl",
        description="Run and manage OCI container steps through the local nodestepd.",
        epilog="Examples:\n"
        "  nodestepctl run --bundle ~/images/alpine -- cat /etc/os-release\n"
        "  nodestepctl run --detach --output out.txt --bundle ~/images/alpine -- ./simulate\n"
        "  nodestepctl ps\n"
        "  nodestepctl check-config /etc/slurm/oci.conf",
        formatter_class=raw,
    )
    p.add_argument("--socket", default=os.environ.get("NODESTEPD_SOCKET", DEFAULT_SOCKET),
                   help=f"daemon socket (default $NODESTEPD_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--version", action="version", version=f"nodestepctl {__version__}")
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    for name, add in SUBCOMMANDS.items():
        if only is None or name == only:
            add(sub, raw)
    return p


def _add_run(sub, raw) -> None:
    run = sub.add_parser(
        "run", formatter_class=raw, help="run a container step and wait for it (or --detach)",
        description="Run COMMAND in a container made from the OCI bundle DIR, one container per task.\n"
        "Attached (default): the containers use this terminal's stdin/stdout/stderr, signals sent to\n"
        "nodestepctl (INT, TERM, HUP, USR1, USR2, CONT, TSTP) go to the step, the step is cancelled if\n"
        "nodestepctl dies, and nodestepctl exits with the step's status: the first non-zero task\n"
        "status (128+N for signal N), else 0. 125: the step could not start.\n"
        "COMMAND is passed as given; the container resolves it against its own PATH.\n"
        "Under srun (SLURM_JOB_ID, SLURM_STEP_ID, SLURM_PROCID set) each nodestepctl is one task of\n"
        "Slurm's step: %j %s %t are SLURM_JOB_ID, SLURM_STEP_ID, SLURM_PROCID, and the container sees\n"
        "SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID as Slurm gives them to the task.\n"
        "While the daemon prepares a slow launch, a progress line goes to stderr after 1 s.",
        epilog="Examples:\n"
        "  nodestepctl run --bundle /images/alpine -- uname -a\n"
        "  nodestepctl run --ntasks 4 --env MODE=fast --bundle /images/app -- /app/run\n"
        "  nodestepctl run --detach --output job.log --bundle /images/app -- /app/run  # prints JOB.STEP\n"
        "  srun -N 64 --ntasks-per-node 2 nodestepctl run --bundle /images/app -- /app/run  # one container per task\n"
        "  nodestepctl run --user alice --detach --output /home/alice/job.log --bundle /home/alice/app -- /app/run"
        "  # operators",
    )
    run.add_argument("--bundle", required=True, metavar="DIR", help="OCI bundle (with config.json unless the site ignores it)")
    run.add_argument("--job-id", type=int, metavar="J", help="job id (default $SLURM_JOB_ID, else assigned by the daemon)")
    run.add_argument("--step-id", type=int, metavar="S", help="step id (default $SLURM_STEP_ID, else 0)")
    run.add_argument("--ntasks", type=int, metavar="N",
                     help="containers to run from this one launch, task ids 0..N-1 (default 1; under srun: this task)")
    run.add_argument("--task-id", type=int, metavar="T",
                     help="launch task T of the step only (default under srun: $SLURM_PROCID); "
                     "other launches of the step may run the other tasks")
    run.add_argument("--local-id", type=int, metavar="L",
                     help="with a per-task launch: SLURM_LOCALID of the task (default $SLURM_LOCALID, else T)")
    run.add_argument("--container-id", metavar="ID", help="SLURM_CONTAINER_ID in the container (default $SLURM_CONTAINER_ID)")
    run.add_argument("--chdir", metavar="DIR", help="the step's working directory, %%Z in oci.conf (default: here)")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set a variable in the step (repeatable)")
    run.add_argument("--export", choices=["ALL", "NONE"], default="ALL",
                     help="ALL: pass this environment plus --env (default); NONE: only --env")
    run.add_argument("--pty", action="store_true", help="give the container a terminal (process.terminal)")
    run.add_argument("--detach", action="store_true", help="print JOB.STEP and return at once; the step runs on")
    run.add_argument("--output", metavar="FILE",
                     help="with --detach: stdout (and stderr) to FILE, opened by you (default: the journal, "
                     "with the step's fields, when nodestepd logs there; else discarded)")
    run.add_argument("--error", metavar="FILE", help="with --detach: stderr to FILE (default: same as --output)")
    run.add_argument("--user", metavar="NAME|UID",
                     help="operators only: run the step as this user (config.json and --output/--error are then "
                     "opened by the daemon as that user)")
    run.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    run.set_defaults(func=cmd_run)


def _add_ps(sub, raw) -> None:
    ps = sub.add_parser("ps", help="list steps (yours; everyone's for operators)",
                        description="List running and recently finished steps.",
                        epilog="Examples:\n  nodestepctl ps\n  nodestepctl ps --json | jq '.[].job_id'", formatter_class=raw)
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.set_defaults(func=cmd_ps)


def _add_signal(sub, raw) -> None:
    sig = sub.add_parser("signal", help="send a signal to a step's runtimes",
                         description="Send SIGNAL (a name like USR1 or SIGUSR1, or a number) to every task of the step.",
                         epilog="Example:\n  nodestepctl signal 42.0 USR1", formatter_class=raw)
    sig.add_argument("step", metavar="JOB.STEP")
    sig.add_argument("signal", metavar="SIGNAL")
    sig.set_defaults(func=cmd_signal)


def _add_cancel(sub, raw) -> None:
    cancel = sub.add_parser("cancel", help="cancel a step: RunTimeKill, grace period, SIGKILL, RunTimeDelete, cleanup",
                            description="Cancel a step and wait until its containers are gone and its spool removed.",
                            epilog="Example:\n  nodestepctl cancel 42.0", formatter_class=raw)
    cancel.add_argument("step", metavar="JOB.STEP")
    cancel.set_defaults(func=cmd_cancel)


def _add_wait(sub, raw) -> None:
    wait = sub.add_parser("wait", help="wait for a step and exit with its status",
                          description="Wait until the step ends; exit with its status (also for a step that already ended).",
                          epilog="Example:\n  nodestepctl wait 42.0; echo $?", formatter_class=raw)
    wait.add_argument("step", metavar="JOB.STEP")
    wait.set_defaults(func=cmd_wait)


def _add_status(sub, raw) -> None:
    status = sub.add_parser("status", help="daemon version, uptime, configuration and step counts",
                            epilog="Example:\n  nodestepctl status", formatter_class=raw)
    status.set_defaults(func=cmd_status)


def _add_reload(sub, raw) -> None:
    reload = sub.add_parser(
        "reload", formatter_class=raw, help="make nodestepd re-read its settings file and oci.conf (root)",
        description="Re-read the daemon's TOML settings file and oci.conf (as SIGHUP does) and wait for the\n"
        "outcome. New steps use the new configuration; running steps keep the one they started with.\n"
        "A file with problems is rejected, every problem printed, and the old configuration stays in use\n"
        "(exit status 1). socket, state_dir, log_format, log_level, no_new_privs and max_connections\n"
        "change only at restart.",
        epilog="Example:\n  nodestepctl reload   # what systemctl reload nodestepd runs",
    )
    reload.set_defaults(func=cmd_reload)


def _add_check_config(sub, raw) -> None:
    check = sub.add_parser(
        "check-config", formatter_class=raw, help="validate an oci.conf (no daemon needed)",
        description="Validate an oci.conf the way nodestepd loads it; print the mode and every RunTime*\n"
        "command expanded for a sample step. Exits 1 and lists every problem on an invalid file.",
        epilog="Example:\n  nodestepctl check-config /etc/slurm/oci.conf",
    )
    check.add_argument("file", nargs="?", default=DEFAULT_OCI_CONF, metavar="FILE", help=f"default {DEFAULT_OCI_CONF}")
    check.add_argument("--node-name", help="node name for %%n in the sample (default: this host)")
    check.set_defaults(func=cmd_check_config)


def _add_doctor(sub, raw) -> None:
    doctor = sub.add_parser(
        "doctor", formatter_class=raw, help="find what keeps containers from running here (no daemon needed)",
        description="Check this node for a user: user namespaces, the daemon's settings and oci.conf, every\n"
        "runtime program (`--version` as the user), /run/user/UID and lingering, the spool and state dirs,\n"
        "the bundle, and finally the Slurm guide's \"test outside Slurm\" with the configured commands.\n"
        "One line per check (ok, warn, fail) with the fix; exits 0 only when nothing fails.\n"
        "An ordinary user checks for themselves. root must name the user with --user: every runtime\n"
        "command then runs as that user (never as root). The runtimes see doctor's environment (PATH)\n"
        "where the daemon's would see the daemon's: run doctor with the daemon's environment.",
        epilog="Examples:\n"
        "  nodestepctl doctor --bundle ~/images/alpine\n"
        "  nodestepctl doctor --user alice --bundle /home/alice/images/alpine   # as root\n"
        "  nodestepctl doctor --oci-conf /etc/slurm/oci.conf --bundle B -- /bin/echo hello",
    )
    doctor.add_argument("--bundle", metavar="DIR", help="OCI bundle to check and to run the test on")
    doctor.add_argument("--user", metavar="NAME", help="as root: the user to check for (default: yourself)")
    doctor.add_argument("--config", metavar="FILE",
                        help="the daemon's TOML settings (default /etc/nodestepd/nodestepd.toml, optional)")
    doctor.add_argument("--oci-conf", metavar="FILE", help="oci.conf to check (default: the daemon's setting)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]",
                        help="command for the test run (default: true in run mode, sleep 60 in create/start mode)")
    doctor.set_defaults(func=cmd_doctor)


def _add_completion(sub, raw) -> None:
    completion = sub.add_parser(
        "completion", formatter_class=raw, help="print the bash completion script",
        description="Print the bash completion script for nodestepctl (the package also installs it\n"
        "in share/bash-completion/completions).",
        epilog="Example:\n  source <(nodestepctl completion bash)",
    )
    completion.add_argument("shell", choices=["bash"], help="the shell (bash)")
    completion.set_defaults(func=cmd_completion)


# Each subcommand's parser, built only when needed: building them all costs nodestepctl
# several milliseconds at every start, and `run` is on every launch's path.
SUBCOMMANDS = {
    "run": _add_run,
    "ps": _add_ps,
    "signal": _add_signal,
    "cancel": _add_cancel,
    "wait": _add_wait,
    "status": _add_status,
    "reload": _add_reload,
    "check-config": _add_check_config,
    "doctor": _add_doctor,
    "completion": _add_completion,
}


def named_subcommand(argv: list[str]) -> str | None:
    """The subcommand argv names, read the way argparse reads it; None when unsure.

    Past the global option --socket VALUE (or --socket=VALUE), the first word is the
    subcommand. Anything else starting with "-" (--help, --version, an abbreviation, a
    mistake) gives None, and then the whole parser decides, with its usual messages. The
    global part of the parser is the same either way, so a parser built with only the
    named subcommand reads argv exactly as the whole one would.
    """
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--socket":
            i += 2
        elif word.startswith("--socket="):
            i += 1
        elif word.startswith("-"):
            return None
        else:
            return word if word in SUBCOMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(only=named_subcommand(argv)).parse_args(argv)
    try:
        return args.func(args)
    except ClientError as e:
        print(f"nodestepctl: {e}", file=sys.stderr)
        return e.status
    except ProtocolError as e:
        print(f"nodestepctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as coreutils do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
