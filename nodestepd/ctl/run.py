"""`nodestepctl run`: build the launch request, send it with the step's stdin/stdout/stderr,
wait for `started`, then (attached) forward our signals to the step and exit with its status.

Attached, the client passes its own stdin/stdout/stderr, so container output never passes
through either process. Detached, it passes /dev/null as stdin and, as stdout and stderr,
the --output/--error files it opened itself, else /dev/null (with --user the daemon opens
those files, as that user).

Attached, it rides through a daemon restart (docs/restart.md#clients): the containers keep
its stdio, so output flows on; it reconnects to the next daemon (with backoff: the socket
path reappears, or systemd's socket holds the connection), attaches to its step again and
forwards the signals it held meanwhile. Only a daemon that does not come back within
--reattach-timeout makes it give up, with 255.
"""

from __future__ import annotations

import _signal  # signal's C half: signal.py builds its enums at import, milliseconds of every launch
import posix  # os's C half (nodestepd/ctl/__init__.py says why)
import select
import sys
import time

from nodestepd.ctl import abspath, environ, getenv, isdir
from nodestepd.ctl.exits import EXIT_USAGE, ClientError, step_exit_status
from nodestepd.ctl.parser import remainder
from nodestepd.ctl.transport import ConnectionLost, connect, expect, receive, send, try_connect
from nodestepd.protocol import wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import socket

# The signals forwarded to the step, by their names in the `signal` request.
SIGNAL_NAMES = {
    _signal.SIGINT: "SIGINT", _signal.SIGTERM: "SIGTERM", _signal.SIGHUP: "SIGHUP", _signal.SIGUSR1: "SIGUSR1",
    _signal.SIGUSR2: "SIGUSR2", _signal.SIGCONT: "SIGCONT", _signal.SIGTSTP: "SIGTSTP",
}
FORWARDED_SIGNALS = tuple(SIGNAL_NAMES)
PROGRESS_AFTER = 1.0  # seconds without a reply before the first progress line
PROGRESS_EVERY = 10.0
REATTACH_TIMEOUT_ENV = "NODESTEPCTL_REATTACH_TIMEOUT"
REATTACH_TIMEOUT = 60.0  # seconds a lost daemon has to come back
RECONNECT_FIRST, RECONNECT_MAX = 0.05, 0.5  # the backoff between connection attempts, in seconds


def _step_ids(args: argparse.Namespace) -> tuple[int | None, int | None]:
    job_id, step_id = args.job_id, args.step_id
    if job_id is None and getenv("SLURM_JOB_ID"):
        job_id = _int_from_env("SLURM_JOB_ID")
    if step_id is None and getenv("SLURM_STEP_ID"):
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
    under_srun = bool(getenv("SLURM_STEP_ID") and getenv("SLURM_PROCID"))
    if task_offset is None and args.ntasks is None and under_srun:
        task_offset = _int_from_env("SLURM_PROCID")
        if local_offset is None and getenv("SLURM_LOCALID"):
            local_offset = _int_from_env("SLURM_LOCALID")
    if task_offset is None and local_offset is not None:
        raise ClientError("--local-id goes with a per-task launch (--task-id, or srun's SLURM_PROCID)", EXIT_USAGE)
    node_id = _int_from_env("SLURM_NODEID") if getenv("SLURM_NODEID") else None
    container_id = args.container_id or getenv("SLURM_CONTAINER_ID") or None
    return {"task_offset": task_offset, "local_offset": local_offset, "node_id": node_id, "container_id": container_id}


def _int_from_env(name: str) -> int:
    try:
        return int(environ()[name])
    except ValueError:
        raise ClientError(f"{name}={environ()[name]!r} is not a number", wire.STATUS_LAUNCH_FAILED) from None



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
        raw = value.encode(sys.getfilesystemencoding(), "surrogateescape")  # os.fsencode
        raise ClientError(f"{what} is not valid UTF-8 ({raw!r}); nodestepd passes text only",
                          wire.STATUS_LAUNCH_FAILED) from None


def _open_output(path: str) -> int:
    try:
        return posix.open(path, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ClientError(f"cannot open output file {path}: {e.strerror}", wire.STATUS_LAUNCH_FAILED) from None


def preserved_fds(args: argparse.Namespace, env: dict[str, str]) -> list[int]:
    """The fds sent after stdio, for the containers' fds 3, 4, ...: --preserve-fds N's
    3..3+N-1, then srun --mpi=pmi2's PMI_FD (the task's PMI channel) when the environment
    passed on names one that is open and not among them already."""
    count = args.preserve_fds
    if not 0 <= count <= wire.MAX_PRESERVE_FDS:
        raise ClientError(f"--preserve-fds {count}: must be between 0 and {wire.MAX_PRESERVE_FDS}", EXIT_USAGE)
    fds = list(range(3, 3 + count))
    pmi = env.get("PMI_FD", "")
    if pmi.isdigit() and int(pmi) > 2 and int(pmi) not in fds and _is_open(int(pmi)):
        if len(fds) == wire.MAX_PRESERVE_FDS:
            raise ClientError(f"--preserve-fds {count} leaves no room for PMI_FD (at most "
                              f"{wire.MAX_PRESERVE_FDS} fds in all)", EXIT_USAGE)
        fds.append(int(pmi))
    for fd in fds:
        if not _is_open(fd):
            raise ClientError(f"--preserve-fds {count}: fd {fd} is not open", EXIT_USAGE)
    return fds


def _is_open(fd: int) -> bool:
    try:
        posix.fstat(fd)
    except OSError:
        return False
    return True


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
    bundle = abspath(args.bundle) if image is None else ""
    if image is None and args.user is None and not isdir(bundle):
        raise ClientError(f"bundle {bundle} does not exist or is not a directory", failed)
    if args.pty and not args.detach and not posix.isatty(0):
        raise ClientError("--pty needs a terminal on standard input", EXIT_USAGE)
    if (args.output or args.error) and not args.detach:
        raise ClientError("--output and --error go with --detach", EXIT_USAGE)
    # With --user the daemon opens config.json and the output files as that user, never
    # with our (an operator's) rights: see docs/security.md.
    config_json, config_json_error = (wire.read_bundle_config(bundle) if args.user is None and image is None
                                      else (None, None))
    job_id, step_id = _step_ids(args)
    task_fields = _slurm_task_fields(args)
    env = dict(environ()) if args.export == "ALL" else {}
    env.update(_parse_env(args.env))
    preserved = preserved_fds(args, env)
    if len(preserved) > args.preserve_fds:
        env["PMI_FD"] = str(3 + args.preserve_fds)  # where the container finds it
    chdir = abspath(args.chdir) if args.chdir else posix.getcwd()
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
        "preserve_fds": len(preserved),
        **task_fields,
        **image_fields,
    }
    if args.user is not None:
        message["user"] = args.user
        for name in ("output", "error"):
            if getattr(args, name):
                message[name] = abspath(getattr(args, name))
    return message


def reattach_timeout(args: argparse.Namespace) -> float:
    """--reattach-timeout, else $NODESTEPCTL_REATTACH_TIMEOUT, else REATTACH_TIMEOUT seconds."""
    value, source = args.reattach_timeout, "--reattach-timeout"
    if value is None and getenv(REATTACH_TIMEOUT_ENV):
        source = REATTACH_TIMEOUT_ENV
        try:
            value = float(environ()[REATTACH_TIMEOUT_ENV])
        except ValueError:
            raise ClientError(f"{REATTACH_TIMEOUT_ENV}={environ()[REATTACH_TIMEOUT_ENV]!r} is not a number of "
                              "seconds", EXIT_USAGE) from None
    if value is None:
        return REATTACH_TIMEOUT
    if not 0 <= value <= 86400:  # also refuses nan
        raise ClientError(f"{source}: {value:g} is not between 0 and 86400 seconds", EXIT_USAGE)
    return value


def _image_fields(args: argparse.Namespace) -> dict:
    """The run request's image fields: the reference (an archive's path made absolute here),
    the archive's fingerprint as we see it, the mounts, --entrypoint and --workdir."""
    from nodestepd.image.refs import RefError, fingerprint, parse_ref  # only an image launch loads it

    failed = wire.STATUS_LAUNCH_FAILED
    try:
        ref = parse_ref(args.image, posix.getcwd())
    except RefError as e:
        raise ClientError(str(e), failed) from None
    _require_utf8("the image reference", ref.canonical)
    mounts = []
    for text in args.mount:
        parts = text.split(":")
        readonly = len(parts) == 3 and parts[2] in ("ro", "rw") and parts[2] == "ro"
        if len(parts) == 3 and parts[2] not in ("ro", "rw") or len(parts) not in (2, 3) or not all(parts[:2]):
            raise ClientError(f"--mount {text!r}: expected SRC:DST[:ro]", EXIT_USAGE)
        source, destination = abspath(parts[0]), parts[1]
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
    given_env = dict(environ()) if args.export == "ALL" else {}
    given_env.update(_parse_env(args.env))
    preserved = preserved_fds(args, given_env)
    job_id, step_id = message["job_id"], message["step_id"]
    timeout = None if args.detach else reattach_timeout(args)
    owned: list[int] = []  # what we opened for a detached step; the daemon has its own copies once sent
    try:
        if args.detach:
            stdin = posix.open("/dev/null", posix.O_RDONLY | posix.O_CLOEXEC)
            owned.append(stdin)
            user_opens = args.user is not None  # the daemon opens --output/--error as the user
            stdout = _open_output(args.output if args.output and not user_opens else "/dev/null")
            owned.append(stdout)
            stderr = stdout if not args.error or user_opens else _open_output(args.error)
            if stderr != stdout:
                owned.append(stderr)
            fds = [stdin, stdout, stderr, *preserved]
        else:
            fds = [0, 1, 2, *preserved]
        wakeup = None if args.detach else catch_signals()
        sock = connect(args.socket)
        try:
            try:
                send(sock, message, fds)
            except ConnectionLost as e:
                raise ClientError(str(e), wire.STATUS_LAUNCH_FAILED) from None
            for fd in owned:
                posix.close(fd)
            owned = []
            reply = _await_started(sock, message.get("image"))
        except BaseException:
            sock.close()
            raise
        given = None if job_id is None else f"{job_id}.{step_id or 0}"
        if reply is None and (args.detach or given is None):
            sock.close()
            _launch_lost(given)
        if args.detach:
            sock.close()
            print(f"{reply['job_id']}.{reply['step_id']}")
            return 0
        assert wakeup is not None and timeout is not None
        first_task = message["task_offset"] or 0
        if reply is None:
            # The daemon went before acknowledging the launch: the next one knows from the
            # step's record whether it started, and gives its status (125 if it did not).
            sock.close()
            return Attachment(args.socket, wakeup, (job_id, step_id or 0, first_task), timeout).ride(None)
        return Attachment(args.socket, wakeup, (reply["job_id"], reply["step_id"], first_task), timeout).ride(sock)
    finally:
        for fd in owned:
            posix.close(fd)


def _launch_lost(ref: str | None) -> None:
    """The daemon went before acknowledging a launch nobody here can attach to again: say so."""
    which = f"step {ref}" if ref else "the step"
    then = f"nodestepctl wait {ref}" if ref else "nodestepctl ps"
    raise ClientError(
        f"lost the connection to nodestepd before it acknowledged the launch; {which} may be "
        f"running ({then} tells)", wire.STATUS_CONNECTION_LOST,
    )


def _await_started(sock: socket.socket, image: str | None = None) -> dict | None:
    """The `started` reply, or None when the daemon went away before it. While the daemon
    is still preparing the step (an image import, stage-in, a slow runtime create), say so
    on stderr: after PROGRESS_AFTER seconds, not before."""
    began = time.monotonic()
    deadline = began + PROGRESS_AFTER
    noted = False
    while True:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if readable:
            received = receive(sock)
            if received is None:
                return None
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


def catch_signals() -> int:
    """Route the forwarded signals into a pipe the attach loop selects on."""
    r, w = posix.pipe2(posix.O_NONBLOCK | posix.O_CLOEXEC)
    _signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for sig in FORWARDED_SIGNALS:
        _signal.signal(sig, lambda *_: None)
    return r


def caught_signals(wakeup: int) -> bytes:
    """The signals caught since the last call, in order (each byte a signal number)."""
    try:
        return posix.read(wakeup, 64)
    except BlockingIOError:
        return b""


class Attachment:
    """An attached client and its step, from daemon to daemon until the step's exit.

    launch: (job id, step id, first task id) of the launch: what `attach` names."""

    def __init__(self, socket_path: str, wakeup: int, launch: tuple[int, int, int], timeout: float) -> None:
        self.socket_path = socket_path
        self.wakeup = wakeup
        self.job_id, self.step_id, self.first_task = launch
        self.ref = f"{self.job_id}.{self.step_id}"
        self.timeout = timeout
        self.held: list[int] = []  # signals caught while no daemon had us attached, to forward in order

    def ride(self, sock: socket.socket | None) -> int:
        """The step's status. sock: the connection of the acknowledged launch; None when the
        daemon went before acknowledging it (then the next daemon may not know the step)."""
        acknowledged = sock is not None
        while True:
            if sock is not None:
                with sock:
                    status = self._attend(sock)
                if status is not None:
                    return status
                print(f"nodestepctl: lost the connection to nodestepd; reconnecting (step {self.ref} runs on; "
                      f"giving up after {self.timeout:g} s)", file=sys.stderr, flush=True)
            else:
                print(f"nodestepctl: lost the connection to nodestepd before it acknowledged the launch; "
                      f"reconnecting (giving up after {self.timeout:g} s)", file=sys.stderr, flush=True)
            sock, status = self._reattach(acknowledged)
            if status is not None:
                return status
            print(f"nodestepctl: re-attached to step {self.ref}", file=sys.stderr, flush=True)
            acknowledged = True

    def _attend(self, sock: socket.socket) -> int | None:
        """Until the step's `exit` (its status), or None when the connection is lost: forward
        the signals we hold and those we catch, and print the errors the daemon reports."""
        while True:
            self.held += caught_signals(self.wakeup)
            while self.held:
                try:
                    send(sock, {"op": "signal", "signal": SIGNAL_NAMES[self.held[0]]})
                except ConnectionLost:
                    break  # held for the next daemon; the read below sees the end
                del self.held[0]
            readable, _, _ = select.select([sock, self.wakeup], [], [])
            if sock in readable:
                reply = receive(sock)
                if reply is None:
                    return None
                if reply["type"] == "exit":
                    return _exit_status(reply)
                if reply["type"] == "error":
                    print(f"nodestepctl: {reply.get('error')}", file=sys.stderr)

    def _reattach(self, acknowledged: bool) -> tuple[socket.socket | None, int | None]:
        """Connect to the next daemon and attach to the step: (the connection, None) once it
        is `started`, or (None, the status) when the step had ended. Raises ClientError when
        no daemon answers within the timeout, or the step cannot be attached to."""
        deadline = time.monotonic() + self.timeout
        delay = RECONNECT_FIRST
        while True:
            sock = try_connect(self.socket_path)
            if sock is not None:
                reply = self._attach(sock, deadline)
                if reply is not None and reply["type"] == "started":
                    return sock, None
                sock.close()
                if reply is not None and reply["type"] == "exit":
                    return None, _exit_status(reply)
                if reply is not None and reply.get("code") != "busy":
                    self._refused(reply, acknowledged)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClientError(
                    f"nodestepd did not come back within {self.timeout:g} s; step {self.ref} may still be running "
                    f"(nodestepctl wait {self.ref} tells its status once nodestepd is back)",
                    wire.STATUS_CONNECTION_LOST,
                )
            self._hold_signals(min(delay, remaining))
            delay = min(delay * 2, RECONNECT_MAX)

    def _attach(self, sock: socket.socket, deadline: float) -> dict | None:
        """The daemon's reply to `attach`, or None when the connection ends (or the deadline
        comes) first. Under systemd the socket holds the connection until the daemon serves."""
        try:
            send(sock, {"op": "attach", "job_id": self.job_id, "step_id": self.step_id, "first_task": self.first_task})
        except ConnectionLost:
            return None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([sock, self.wakeup], [], [], remaining)
            if self.wakeup in readable:
                self._hold(caught_signals(self.wakeup))
            if sock in readable:
                return receive(sock)

    def _refused(self, reply: dict, acknowledged: bool) -> None:
        if reply.get("code") == "not-found" and not acknowledged:
            # No record of the launch survived: the daemon died before anything ran.
            raise ClientError(f"nodestepd went away while launching step {self.ref}, and the step did not start",
                              wire.STATUS_LAUNCH_FAILED)
        if reply.get("code") == "not-found":
            raise ClientError(f"step {self.ref} ended while nodestepd restarted, and the next nodestepd does not "
                              "know its status", wire.STATUS_UNKNOWN)
        raise ClientError(f"cannot attach to step {self.ref} again: {reply.get('error')}",
                          wire.STATUS_CONNECTION_LOST)

    def _hold_signals(self, seconds: float) -> None:
        """Wait `seconds` (less if a signal comes), holding the signals caught meanwhile."""
        readable, _, _ = select.select([self.wakeup], [], [], seconds)
        if readable:
            self._hold(caught_signals(self.wakeup))

    def _hold(self, signums: bytes) -> None:
        for signum in signums:
            print(f"nodestepctl: signal {SIGNAL_NAMES[signum]} held until nodestepd is back",
                  file=sys.stderr, flush=True)
        self.held += signums


def _exit_status(reply: dict) -> int:
    """The status an `exit` reply gives, saying first what went wrong after the step (stage_out)."""
    if reply.get("stage_out_error"):
        print(f"nodestepctl: warning: {reply['stage_out_error']}", file=sys.stderr)
    return step_exit_status(reply)
