"""The socket server: accepts clients, authenticates them by peer credentials, dispatches requests.

Lifecycle like uvicorn's: Server(config, oci).start() checks the paths, prepares
directories and binds (or takes the socket systemd passed), recover() takes over the
steps a previous daemon left (recovery.py), serve() accepts until request_shutdown(),
and shutdown() stops accepting and leaves running steps alone (their records stay for
the next daemon) or cancels them (steps_on_stop).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import stat
import time
from typing import Awaitable, Callable

from nodestepd import __version__
from nodestepd.systemd import activation
from nodestepd.process import asuser
from nodestepd.config import limits
from nodestepd.daemon import metrics
from nodestepd.process import kernel as privileges
from nodestepd.protocol import messages as protocol
from nodestepd.daemon.authz import Policy, parse_user, resolve_operators
from nodestepd.config.settings import DaemonConfig
from nodestepd.daemon.connection import Connection, ConnectionClosed
from nodestepd.systemd.journal import JournalSender
from nodestepd.logs import get_logger
from nodestepd.config.ociconf import OciConf
from nodestepd.protocol.messages import (
    CancelRequest,
    ErrorReply,
    ExitReply,
    OkReply,
    ProtocolError,
    PsRequest,
    ReloadRequest,
    RunRequest,
    SignalRequest,
    StartedReply,
    StatusReply,
    StatusRequest,
    StepInfo,
    StepsReply,
    TaskExit,
    TaskInfo,
    WaitRequest,
)
from nodestepd.process.reaper import Reaper
from nodestepd.process.identity import Identity
from nodestepd.step.runtime import shell_warnings
from nodestepd.process.monitor import MonitorMissing, monitor_program
from nodestepd.step.recovery import recover_steps
from nodestepd.daemon.jobids import JobIdAllocator
from nodestepd.step.step import LaunchFailed, Stdio, Step, StepResult, StepSettings, StepSpec, StepState, step_status
from nodestepd.step.record import RecordStore
from nodestepd.step.env import validate_env_name
from nodestepd.systemd.output import StepOutputToJournal
from nodestepd.daemon.trustedpaths import untrusted_reason

MAX_STEP_ID = 0xFFFFFFF0  # Slurm keeps the ids above for its special steps
MAX_JOB_ID = 0xFFFFFFF0
MAX_NTASKS = 1024
MAX_TASK_ID = 0xFFFFFFF0  # task offsets, local ids and node ids are Slurm's 32-bit ids
FINISHED_KEPT = 1024  # finished steps remembered for `wait` and `ps`


class Refused(Exception):
    """A request the daemon will not carry out; becomes an error reply with this code."""

    def __init__(self, code: str, message: str, **detail: object) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail  # for the log only, never the reply (e.g. whose step it really was)


class BadRequest(Refused):
    """A request that is well-formed JSON but asks for something invalid."""

    def __init__(self, message: str) -> None:
        super().__init__("bad-request", message)


class Server:
    def __init__(self, config: DaemonConfig, oci: OciConf) -> None:
        self.config = config
        self.oci = oci
        self.log = get_logger()
        self.started_at = time.time()
        # Keyed (job id, step id, first task id): a step launched task by task (srun -n 2 on
        # one node) is several entries, one per launch (see _parts).
        self.steps: dict[tuple[int, int, int], Step] = {}
        self.finished: collections.OrderedDict[tuple[int, int, int], Step] = collections.OrderedDict()
        self._listener: socket.socket | None = None
        self._stopping: asyncio.Event | None = None
        self._connections: dict[asyncio.Task[None], int] = {}  # each connection's handler, and its peer's uid
        self._background: set[asyncio.Task[None]] = set()
        self._job_ids: JobIdAllocator | None = None
        self.store: RecordStore | None = None
        self._step_settings: StepSettings | None = None
        self.reaper = Reaper()
        self._bound_path: str | None = None  # the socket file we created (never a passed one)
        # Hooks the service layer (service.py) sets: told when the running steps change,
        # asked to reload, and the journal for detached steps' output (when logging there).
        self.on_steps_changed: Callable[[], None] = lambda: None
        self.reload_handler: Callable[[], Awaitable[list[str]]] | None = None
        self.output_journal: JournalSender | None = None
        self.policy = Policy(frozenset({0}))

    # ---- lifecycle ------------------------------------------------------------------

    def start(self, listener: socket.socket | None = None) -> None:
        """Prepare directories and serve `listener` (a socket passed by the service manager), else bind our own."""
        self._stopping = asyncio.Event()
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(self.config.socket), mode=0o755, exist_ok=True)
        self.apply_config(self.config, self.oci)  # first: it refuses untrusted paths before anything uses them
        self._secure_process()
        self._job_ids = JobIdAllocator(self.config.state_dir)
        self.store = RecordStore(self.config.state_dir)
        # Container inits that create/start runtimes leave behind become our children, so
        # their real exit statuses are ours to collect (container.py, reaper.py).
        privileges.become_subreaper()
        if listener is None:
            self._listener = _bind(self.config.socket)
            self._bound_path = self.config.socket
        else:
            self._listener = listener
        self.log.info(
            "listening", socket=self.socket_path(), oci_conf=self.oci.path, mode=self.oci.mode, version=__version__,
            activated=listener is not None,
        )
        self.warn_about_oci_conf()

    async def recover(self) -> None:
        """Take over the steps the records in the state dir name (before serving anyone)."""
        assert self.store is not None
        for step in await recover_steps(self.store, self.reaper):
            key = _key(step.spec)
            if step.state is StepState.FINISHED:  # an undone launch
                self.finished[key] = step
                continue
            self.steps[key] = step
            self._retire_when_done(step)

    def apply_config(self, config: DaemonConfig, oci: OciConf) -> None:
        """Use these settings for steps launched from now on; running steps keep the ones they started with.

        Raises OSError, changing nothing, when a directory cannot be made or a path is not
        safe for a root daemon (at start and on every reload alike)."""
        os.makedirs(config.spool_dir, mode=0o755, exist_ok=True)
        _check_trusted(config, oci)
        policy = Policy(resolve_operators(config.operators))
        self.config, self.oci, self.policy = config, oci, policy
        self._step_settings = StepSettings(
            oci=oci,
            # Steps walk to their spool dir refusing every symlink; resolve the operator's
            # own links (/var/run -> /run and the like) once, here.
            spool_dir=os.path.realpath(config.spool_dir),
            node_name=config.node_name,
            kill_wait=config.kill_wait,
            runtime_timeout=config.runtime_timeout,
            daemon_env=dict(os.environ),
        )

    def warn_about_oci_conf(self) -> None:
        for warning in shell_warnings(self.oci.patterns()):
            self.log.warning("oci.conf will not work as written on this host", problem=warning)

    def _secure_process(self) -> None:
        """Security checks and settings before serving anyone (docs/security.md)."""
        c = self.config
        soft, hard = privileges.raise_fd_limit(c.max_connections + limits.FD_HEADROOM)
        if soft < c.max_connections + 64:
            self.log.warning("RLIMIT_NOFILE is too low for max_connections", soft=soft, hard=hard,
                             max_connections=c.max_connections)
        if c.no_new_privs:
            privileges.set_no_new_privs()
        self.log.info("security settings", operators=sorted(self.policy.operators),
                      no_new_privs=privileges.no_new_privs(), nofile_limit=soft)

    async def serve(self) -> None:
        assert self._listener is not None and self._stopping is not None
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(self._listener))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                done, _ = await asyncio.wait({accept, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    break
                sock, _ = accept.result()
                accept = asyncio.ensure_future(loop.sock_accept(self._listener))
                pid, uid, _ = privileges.peer_credentials(sock)
                refusal = self._connection_refusal(uid)
                if refusal is not None:
                    self._refuse_connection(sock, pid, uid, refusal)
                    continue
                task = asyncio.create_task(self._handle(sock))
                self._connections[task] = uid
                task.add_done_callback(self._connections.pop)
        finally:
            accept.cancel()
            stopping.cancel()

    def _connection_refusal(self, uid: int) -> str | None:
        """Why a new connection from uid cannot be served now, or None.

        max_connections is node-wide; max_connections_per_user keeps one user from taking
        all of it (operators, srun's launcher among them, are not held to it)."""
        c = self.config
        if len(self._connections) >= c.max_connections:
            return f"nodestepd has too many connections (limit {c.max_connections}); try again later"
        if (not self.policy.is_operator(uid)
                and sum(1 for peer in self._connections.values() if peer == uid) >= c.max_connections_per_user):
            return (f"you have too many connections to nodestepd (limit {c.max_connections_per_user} per user); "
                    "try again later")
        return None

    def _refuse_connection(self, sock: socket.socket, pid: int, uid: int, reason: str) -> None:
        """One `busy` error reply if the socket takes it at once, then close."""
        self.log.warning("connection refused: too many connections", peer_uid=uid, peer_pid=pid, reason=reason)
        try:
            sock.setblocking(False)
            sock.send(protocol.frame(ErrorReply(code="busy", error=reason)))
        except OSError:
            pass  # the reply is a courtesy; closing is the refusal
        finally:
            sock.close()

    def request_shutdown(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, then leave running steps alone, or cancel them (steps_on_stop = "cancel").

        A socket passed by the service manager stays: it is the manager's, and clients
        that connect while we are down wait in it for the next start.
        """
        if self._listener is not None:
            self._listener.close()
            if self._bound_path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._bound_path)
            self._listener = None
        running = list(self.steps.values())
        if running and self.config.steps_on_stop == "cancel":
            self.log.info("shutting down: cancelling running steps", steps=len(running))
            await asyncio.gather(*(step.cancel("daemon shutdown") for step in running))
        elif running:
            # Their records stay: the next daemon takes them over (recovery.py).
            self.log.info("shutting down: leaving running steps alone for the next daemon", steps=len(running),
                          refs=[step.ref for step in running])
            for step in running:
                step.leave_running()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # ---- connections ------------------------------------------------------------------

    async def _handle(self, sock: socket.socket) -> None:
        timeout = self.config.client_timeout
        conn = Connection(sock, max_message=self.config.max_message_size, send_timeout=timeout)
        log = self.log.bind(peer_uid=conn.peer_uid, peer_pid=conn.peer_pid)
        try:
            while True:
                try:
                    # Idle or slow (half a message, then nothing): either way the
                    # connection is given up after client_timeout, and with it its fds.
                    received = await asyncio.wait_for(conn.receive(), timeout)
                except TimeoutError:
                    log.info("client timed out; closing connection", client_timeout=timeout)
                    await conn.send(ErrorReply(code="timeout", error=f"no complete request within {timeout:g} s"))
                    return
                except ProtocolError as e:
                    log.warning("bad message; closing connection", error=str(e))
                    await conn.send(ErrorReply(code="bad-request", error=str(e)))
                    return
                if received is None:
                    return
                body, fds = received
                received_at = time.monotonic()
                try:
                    request = protocol.decode_request(body)
                except ProtocolError as e:
                    _close_all(fds)
                    log.info("malformed request", error=str(e))
                    await conn.send(ErrorReply(code="bad-request", error=str(e)))
                    continue
                if isinstance(request, RunRequest):
                    await self._run(conn, request, fds, log, received_at)
                    return  # a run owns its connection until the step ends (or is detached)
                _close_all(fds)
                await self._dispatch(conn, request, log)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            conn.close()

    async def _dispatch(self, conn: Connection, request, log) -> None:
        try:
            if isinstance(request, StatusRequest):
                reply = self._status()
            elif isinstance(request, PsRequest):
                reply = StepsReply(steps=[_step_info(s) for s in self._visible_steps(conn.peer_uid)])
            elif isinstance(request, SignalRequest):
                if request.job_id is None:
                    raise BadRequest("signal needs a job id outside an attached run")
                signum = _parse_signal(request.signal)  # a bad request before any lookup
                for step in self._own_running_parts(conn.peer_uid, request.job_id, request.step_id or 0):
                    step.signal(signum)
                reply = OkReply()
            elif isinstance(request, CancelRequest):
                parts = self._own_running_parts(conn.peer_uid, request.job_id, request.step_id)
                reason = f"cancel requested by uid {conn.peer_uid}"
                results = await asyncio.gather(*(step.cancel(reason) for step in parts))
                reply = _parts_exit_reply(list(zip(parts, results)))
            elif isinstance(request, WaitRequest):
                parts = self._own_parts(conn.peer_uid, request.job_id, request.step_id)
                results = await asyncio.gather(*(step.wait() for step in parts))
                reply = _parts_exit_reply(list(zip(parts, results)))
            elif isinstance(request, ReloadRequest):
                reply = await self._reload(conn.peer_uid)
            else:
                raise BadRequest(f"unexpected request {type(request).__name__}")
        except Refused as e:
            log.info("request refused", op=type(request).__name__, code=e.code, error=str(e), **e.detail)
            reply = ErrorReply(code=e.code, error=str(e))
        await conn.send(reply)

    async def _reload(self, uid: int) -> OkReply:
        if uid != 0:
            raise Refused("permission-denied", "only root may reload nodestepd's configuration")
        if self.reload_handler is None:
            raise Refused("reload-failed", "this nodestepd cannot reload")
        problems = await self.reload_handler()
        if problems:
            listing = "".join(f"\n  {problem}" for problem in problems)
            raise Refused("reload-failed", f"configuration not reloaded, the old one stays in use:{listing}")
        return OkReply()

    # ---- run ----------------------------------------------------------------------

    async def _run(self, conn: Connection, request: RunRequest, fds: list[int], log, received_at: float) -> None:
        try:
            try:
                spec = await self._validate_run(conn.peer_uid, request, fds)
                key = _key(spec)
                self._check_no_overlap(spec)
                self._check_step_limits(spec.identity)
            except Refused as e:
                log.info("launch refused", code=e.code, error=str(e), **e.detail)
                await conn.send(ErrorReply(code=e.code, error=str(e), status=protocol.STATUS_LAUNCH_FAILED))
                return
            assert self._step_settings is not None
            assert self.store is not None
            step = Step(spec, self._step_settings, self.reaper, self.store)
            step.timings = metrics.for_step(self.config.debug_timings, received_at)
            self.steps[key] = step
            output = None
            try:
                stdio = Stdio(fds[0], fds[1], fds[2])
                if request.output_to_journal and request.detach and self.output_journal is not None:
                    output = StepOutputToJournal(self.output_journal, job_id=spec.job_id, step_id=spec.step_id,
                                                 user=spec.identity.user, task_ids=spec.task_ids)
                    stdio = Stdio(fds[0], fds[1], fds[2], output.task_outputs)
                await step.launch(stdio, received_at)
            except Exception as e:
                del self.steps[key]
                if isinstance(e, LaunchFailed):
                    step.log.warning("launch failed", error=str(e))
                    message = str(e)
                else:
                    step.log.exception("launch failed unexpectedly")
                    message = f"internal error in nodestepd while launching: {e!r} (see the daemon's log)"
                await conn.send(ErrorReply(code="launch-failed", error=message, status=protocol.STATUS_LAUNCH_FAILED))
                return
            finally:
                if output is not None:
                    output.release_write_ends()  # the tasks have their own; end of file when they are gone
        finally:
            _close_all(fds)  # the tasks have their own copies now
        self.on_steps_changed()
        self._retire_when_done(step)
        await conn.send(StartedReply(job_id=spec.job_id, step_id=spec.step_id, ntasks=spec.ntasks))
        step.timings.started(step.log)
        if request.detach:
            return
        await self._attend(conn, step)

    async def _attend(self, conn: Connection, step: Step) -> None:
        """An attached run: forward signal requests until the step ends; cancel it if the client goes."""
        done = asyncio.ensure_future(step.wait())
        while not done.done():
            incoming = asyncio.ensure_future(conn.receive())
            await asyncio.wait({done, incoming}, return_when=asyncio.FIRST_COMPLETED)
            if not incoming.done():
                incoming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await incoming
                break
            reason = "attached client went away"
            try:
                received = incoming.result()
            except (ProtocolError, ConnectionClosed) as e:
                received, reason = None, f"attached client's connection broke: {e}"
            if received is None:
                # Like srun: the step does not outlive the client that holds its stdio.
                await step.cancel(reason)
                break
            body, fds = received
            _close_all(fds)
            try:
                request = protocol.decode_request(body)
                if not isinstance(request, SignalRequest) or request.job_id is not None:
                    raise ProtocolError("an attached run accepts only signal requests without ids")
                step.signal(_parse_signal(request.signal))
            except (ProtocolError, BadRequest) as e:
                step.log.info("request refused on an attached run", peer_uid=conn.peer_uid, error=str(e))
                await conn.send(ErrorReply(code="bad-request", error=str(e)))
        await conn.send(_exit_reply(step, done.result()))
        step.timings.sent(step.log)

    def _check_step_limits(self, identity: Identity) -> None:
        """Called right before a step is added, with no await in between: the counts are exact."""
        c = self.config
        if len(self.steps) >= c.max_steps:
            raise Refused("limit", f"this node runs its maximum of {c.max_steps} steps (max_steps); try again later")
        own = sum(1 for s in self.steps.values() if s.spec.identity.uid == identity.uid)
        if own >= c.max_steps_per_user:
            raise Refused("limit", f"{identity.user} already has {own} steps on this node, the maximum "
                          f"(max_steps_per_user)")

    def _retire_when_done(self, step: Step) -> None:
        retire = asyncio.create_task(self._retire(step))
        self._background.add(retire)  # the loop holds tasks weakly
        retire.add_done_callback(self._background.discard)

    async def _retire(self, step: Step) -> None:
        """Move a step from running to finished when it ends, keeping a bounded history."""
        await step.wait()
        key = _key(step.spec)
        if self.steps.get(key) is step:
            del self.steps[key]
            self.on_steps_changed()
        self.finished[key] = step
        self.finished.move_to_end(key)
        while len(self.finished) > FINISHED_KEPT:
            self.finished.popitem(last=False)

    async def _validate_run(self, uid: int, request: RunRequest, fds: list[int]) -> StepSpec:
        if len(fds) != 3:
            raise BadRequest(f"a run request carries exactly 3 file descriptors (stdin, stdout, stderr), got {len(fds)}")
        _check_path("bundle", request.bundle)
        _check_path("chdir", request.chdir)
        for name in ("output", "error"):
            if getattr(request, name) is not None:
                _check_path(name, getattr(request, name))
        if not request.args:
            raise BadRequest("no command given: args must not be empty")
        for arg in request.args:
            if "\0" in arg:
                raise BadRequest("command arguments cannot contain NUL bytes")
        c = self.config
        if limits.args_size(request.args) > c.max_args_bytes:
            raise Refused("limit", f"the command is {limits.args_size(request.args)} bytes, more than max_args_bytes "
                          f"({c.max_args_bytes})")
        if limits.env_size(request.env) > c.max_env_bytes:
            raise Refused("limit", f"the environment is {limits.env_size(request.env)} bytes, more than max_env_bytes "
                          f"({c.max_env_bytes})")
        for name, value in request.env.items():
            try:
                validate_env_name(name)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            if "\0" in value:
                raise BadRequest(f"environment variable {name} contains a NUL byte")
        if not 1 <= request.ntasks <= MAX_NTASKS:
            raise BadRequest(f"ntasks must be between 1 and {MAX_NTASKS}, got {request.ntasks}")
        for name in ("task_offset", "local_offset", "node_id"):
            value = getattr(request, name)
            if value is not None and not 0 <= value <= MAX_TASK_ID:
                raise BadRequest(f"{name} must be between 0 and {MAX_TASK_ID}, got {value}")
        if request.container_id is not None and ("\0" in request.container_id or not request.container_id):
            raise BadRequest("container_id must be a non-empty string without NUL bytes")
        if request.job_id is not None and not 0 < request.job_id < MAX_JOB_ID:
            raise BadRequest(f"job id must be between 1 and {MAX_JOB_ID - 1}, got {request.job_id}")
        step_id = request.step_id if request.step_id is not None else 0
        if not 0 <= step_id < MAX_STEP_ID:
            raise BadRequest(f"step id must be between 0 and {MAX_STEP_ID - 1}, got {step_id}")
        target = uid
        if request.user is not None:
            if request.config_json is not None or request.config_json_error is not None:
                raise BadRequest("a run with user must not carry config_json: the daemon reads it as that user")
            try:
                target = await asyncio.to_thread(parse_user, request.user)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            if not self.policy.may_launch_as(uid, target):
                raise Refused("permission-denied", f"only operators may launch steps as another user "
                              f"(uid {uid} is not one; see `operators` in nodestepd.toml)", target_uid=target)
        try:
            identity = await asyncio.to_thread(Identity.for_uid, target)
        except LookupError as e:
            raise BadRequest(str(e)) from None
        config_json, config_json_error = request.config_json, request.config_json_error
        if request.user is not None or request.output is not None or request.error is not None:
            config_json, config_json_error = await self._open_as_user(identity, request, fds)
        assert self._job_ids is not None
        job_id = request.job_id if request.job_id is not None else await asyncio.to_thread(self._job_ids.allocate)
        return StepSpec(
            job_id=job_id,
            step_id=step_id,
            ntasks=request.ntasks,
            identity=identity,
            bundle=os.path.normpath(request.bundle),
            args=tuple(request.args),
            env=dict(request.env),
            workdir=request.chdir,
            pty=request.pty,
            attached=not request.detach,
            config_json=config_json,
            config_json_error=config_json_error,
            task_offset=request.task_offset,
            local_offset=request.local_offset,
            node_id=request.node_id,
            container_id=request.container_id,
        )

    async def _open_as_user(
        self, identity: Identity, request: RunRequest, fds: list[int]
    ) -> tuple[str | None, str | None]:
        """Read config.json (for a run with `user`) and open output/error as the step's user.

        The opened output files replace fds[1] and fds[2] (closing the ones the request
        brought). Returns (config_json, config_json_error) for the step.
        """
        reads = []
        if request.user is not None and not self.oci.ignore_file_config_json:
            reads.append(os.path.join(os.path.normpath(request.bundle), "config.json"))
        writes = list(dict.fromkeys(p for p in (request.output, request.error) if p is not None))
        try:
            opened = await asyncio.to_thread(
                asuser.open_as, identity, reads, writes, timeout=self.config.client_timeout
            )
        except OSError as e:
            raise Refused("launch-failed", str(e)) from None
        config_json = config_json_error = None
        if reads:
            result = opened.pop(0)
            if result.fd is None:
                config_json_error = result.error
            else:
                limit = self.config.max_message_size
                config_json, config_json_error = await asyncio.to_thread(asuser.read_regular, result, limit)
        failed = next((o for o in opened if o.fd is None), None)
        if failed is not None:
            _close_all([o.fd for o in opened if o.fd is not None])
            raise Refused("launch-failed", f"cannot open {failed.path} as {identity.user}: {failed.error}")
        by_path = {o.path: o.fd for o in opened}
        if request.output is not None:
            os.close(fds[1])
            fds[1] = by_path[request.output]
            if request.error is None:
                os.close(fds[2])
                fds[2] = os.dup(fds[1])
        if request.error is not None:
            os.close(fds[2])
            # One file for both: a second fd of it, so that each fd has one owner.
            fds[2] = by_path[request.error] if request.error != request.output else os.dup(fds[1])
        return config_json, config_json_error

    # ---- lookups and authorisation -------------------------------------------------------

    def _visible_steps(self, uid: int) -> list[Step]:
        steps = list(self.steps.values()) + list(self.finished.values())
        return [s for s in steps if self.policy.may_act_on(uid, s.spec.identity.uid)]

    def _check_no_overlap(self, spec: StepSpec) -> None:
        """Launches of one job.step may coexist on a node only with disjoint task ids."""
        others = [s.spec for key, s in self.steps.items() if key[:2] == (spec.job_id, spec.step_id)]
        shared = {t for other in others for t in other.task_ids if t in spec.task_ids}
        if not shared:
            return
        if spec.task_offset is None and all(o.task_offset is None for o in others):
            raise Refused("conflict", f"step {spec.job_id}.{spec.step_id} is already running on this node")
        raise Refused("conflict", f"task {min(shared)} of step {spec.job_id}.{spec.step_id} is already running on this node")

    def _parts(self, job_id: int, step_id: int) -> list[Step]:
        """Every launch of job.step this daemon knows: the running ones, and finished ones not since relaunched."""
        running = {k: s for k, s in self.steps.items() if k[:2] == (job_id, step_id)}
        finished = {k: s for k, s in self.finished.items() if k[:2] == (job_id, step_id) and k not in running}
        return [s for _, s in sorted({**finished, **running}.items())]

    def _own_parts(self, uid: int, job_id: int, step_id: int) -> list[Step]:
        parts = self._parts(job_id, step_id)
        if not parts:
            raise Refused("not-found", f"no step {job_id}.{step_id} of yours on this node")
        mine = [s for s in parts if self.policy.may_act_on(uid, s.spec.identity.uid)]
        if not mine:
            # Someone else's step is reported exactly like a missing one: no probing.
            raise Refused("not-found", f"no step {job_id}.{step_id} of yours on this node",
                          owner_uid=parts[0].spec.identity.uid,
                          reason="not the caller's step and the caller is no operator")
        return mine

    def _own_running_parts(self, uid: int, job_id: int, step_id: int) -> list[Step]:
        parts = [s for s in self._own_parts(uid, job_id, step_id) if s.state is not StepState.FINISHED]
        if not parts:
            raise Refused("not-found", f"step {job_id}.{step_id} has already finished")
        return parts

    def socket_path(self) -> str:
        """Where clients connect: the socket we bound, or the one the service manager passed."""
        if self._bound_path is None and self._listener is not None:
            return activation.socket_path(self._listener)
        return self._bound_path or self.config.socket

    def _status(self) -> StatusReply:
        c = self.config
        return StatusReply(
            version=__version__,
            uptime=time.time() - self.started_at,
            node_name=c.node_name,
            config_file=c.config_file,
            oci_conf=self.oci.path,
            oci_mode=self.oci.mode,
            socket=self.socket_path(),
            spool_dir=c.spool_dir,
            state_dir=c.state_dir,
            steps_running=len(self.steps),
            steps_finished=len(self.finished),
        )


def _check_trusted(config: DaemonConfig, oci: OciConf) -> None:
    """Refuse paths anyone but root could change: the daemon would act as root through them."""
    try:
        monitor = monitor_program()  # every task starts through it: no launch could work without
    except MonitorMissing as e:
        raise OSError(str(e)) from None
    if os.geteuid() != 0:
        return  # a daemon run by a user for itself trusts that user's paths anyway
    for what, path in (("spool_dir", config.spool_dir), ("state_dir", config.state_dir),
                       ("socket directory", os.path.dirname(config.socket)), ("oci_conf", oci.path),
                       ("nodestepd-monitor (run as root for every task)", monitor)):
        reason = untrusted_reason(path)
        if reason is not None:
            raise OSError(f"{what} {path} is not safe for a root daemon: {reason}")


def _bind(path: str) -> socket.socket:
    """Bind the listening socket, replacing a stale one but never a live daemon's."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody is listening
        else:
            raise OSError(f"another nodestepd is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    # Every local user may connect: who may do what is decided per request from SO_PEERCRED.
    os.chmod(path, 0o666)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _check_path(name: str, value: str) -> None:
    if "\0" in value:
        raise BadRequest(f"{name} contains a NUL byte")
    if not os.path.isabs(value):
        raise BadRequest(f"{name} must be an absolute path, got {value[:200]!r}")
    if len(value.encode("utf-8", "surrogatepass")) > limits.MAX_PATH_BYTES:
        raise BadRequest(f"{name} is longer than {limits.MAX_PATH_BYTES} bytes")


def _parse_signal(name: str) -> int:
    if not name.isascii() or len(name) > 32:
        raise BadRequest(f"unknown signal {name[:32]!r}")
    text = name.strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text)).value
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text].value
    except (KeyError, ValueError):
        raise BadRequest(f"unknown signal {name!r}") from None


def _key(spec: StepSpec) -> tuple[int, int, int]:
    return (spec.job_id, spec.step_id, spec.first_task)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _step_info(step: Step) -> StepInfo:
    spec = step.spec
    return StepInfo(
        job_id=spec.job_id,
        step_id=spec.step_id,
        user=spec.identity.user,
        uid=spec.identity.uid,
        state=step.state.value,
        attached=spec.attached,
        bundle=spec.bundle,
        args=list(spec.args),
        started_at=step.started_at,
        tasks=[TaskInfo(task_id=t.task_id, pid=t.watch.pid if t.watch else None,
                        status=t.status if t.status_known else None) for t in step.tasks],
        status=step.result.status if step.result else None,
    )


def _exit_reply(step: Step, result: StepResult) -> ExitReply:
    return _parts_exit_reply([(step, result)])


def _parts_exit_reply(parts: list[tuple[Step, StepResult]]) -> ExitReply:
    """One exit for a step launched in one or several parts: the first non-zero task status in task order."""
    tasks = sorted(
        (TaskExit(task_id=t, status=s) for step, result in parts for t, s in zip(step.spec.task_ids, result.task_statuses)),
        key=lambda task: task.task_id,
    )
    # Each part's status is its first non-zero task status, and parts hold disjoint runs
    # of task ids: in task order, the first non-zero part status is the step's.
    ordered = sorted(parts, key=lambda part: part[0].spec.first_task)
    status = step_status([result.status for _, result in ordered])
    spec = parts[0][0].spec
    return ExitReply(
        job_id=spec.job_id,
        step_id=spec.step_id,
        status=status,
        tasks=tasks,
        cancelled=any(result.cancelled for _, result in parts),
    )
