"""Client and Step: launching and following steps from one asyncio program.

A Client holds no connection of its own: each request (ps, status, signal, cancel, wait)
opens one and closes it, and each attached step has its own for life, read by one task on
the event loop (no thread per step). The protocol and the authorisation are the CLI's:
the daemon knows the caller by the connection's uid, and a step that is not the caller's
is reported as not found (docs/protocol.md).

Like `nodestepctl run`, an attached step rides through a daemon restart: its containers
keep their stdio, so output flows on; its task reconnects (with backoff) to the next
daemon, sends `attach` and forwards the signals held meanwhile (docs/restart.md#clients).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal as signals
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Union

from nodestepd.client.connection import Connection, Lost, open_connection, try_connection
from nodestepd.client.errors import (
    BadRequest,
    ConnectionLost,
    DaemonUnavailable,
    LaunchFailed,
    NotFound,
    ProtocolError,
    StatusUnknown,
    refusal,
)
from nodestepd.client.results import DaemonStatus, StepExit, StepInfo
from nodestepd.protocol import wire

log = logging.getLogger("nodestepd.client")

DEFAULT_SOCKET = "/run/nodestepd/nodestepd.sock"
SOCKET_ENV = "NODESTEPD_SOCKET"
REATTACH_TIMEOUT = 60.0  # seconds a lost daemon has to come back (nodestepctl's default)
RECONNECT_FIRST, RECONNECT_MAX = 0.05, 0.5  # the backoff between connection attempts, in seconds
LAUNCH_FAILED = wire.STATUS_LAUNCH_FAILED


class _Special:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"nodestepd.client.{self.name}"


DEVNULL = _Special("DEVNULL")  # /dev/null
PIPE = _Special("PIPE")  # a pipe read as it comes: Step.stdout / Step.stderr are asyncio.StreamReaders
COLLECT = _Special("COLLECT")  # a pipe read to its end: StepExit.stdout / .stderr hold the bytes
STDOUT = _Special("STDOUT")  # stderr only: where stdout goes

# Where a stream goes: None (stdin: /dev/null; stdout, stderr: this process's own 1 and 2,
# or /dev/null for a detached step),
# DEVNULL, PIPE, COLLECT, STDOUT (stderr), an fd, a file object with fileno(), or a path.
Stream = Union[None, int, str, "os.PathLike[str]", IO[Any], _Special]


@dataclass(frozen=True)
class Mount:
    """A bind mount of an image step: source on this node (made absolute), destination in the container."""

    source: str
    destination: str
    readonly: bool = False


class Client:
    """A client of the nodestepd at `socket` (default $NODESTEPD_SOCKET, else
    /run/nodestepd/nodestepd.sock).

    reattach_timeout: seconds a daemon that went away (a restart) has to come back before
    an attached step's wait() raises DaemonUnavailable (nodestepctl's --reattach-timeout).

    Leaving `async with` (or aclose()) closes the connections of the steps still attached:
    nodestepd cancels those steps, as it does when nodestepctl run is killed. Detached
    steps run on.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 reattach_timeout: float = REATTACH_TIMEOUT) -> None:
        self.socket = os.fspath(socket) if socket is not None else os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        if not 0 <= reattach_timeout <= 86400:  # also refuses nan
            raise ValueError(f"reattach_timeout {reattach_timeout!r} is not between 0 and 86400 seconds")
        self.reattach_timeout = reattach_timeout
        # Steps holding what aclose() lets go of: a connection (until the exit) or output
        # pipes (COLLECT: until wait() has their bytes; PIPE: until aclose()).
        self._holding: set[Step] = set()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let go of every attached step (nodestepd cancels them); detached ones run on."""
        for step in list(self._holding):
            await step._abandon()

    # ---- launching --------------------------------------------------------------------------

    async def run(
        self,
        bundle: str | os.PathLike[str] | None,
        args: Sequence[str],
        *,
        ntasks: int = 1,
        env: Mapping[str, str] | None = None,
        chdir: str | os.PathLike[str] | None = None,
        job: int | None = None,
        step: int | None = None,
        stdin: Stream = None,
        stdout: Stream = None,
        stderr: Stream = None,
        detach: bool = False,
        pty: bool = False,
        journal: bool = False,
        task_offset: int | None = None,
        local_offset: int | None = None,
        node_id: int | None = None,
        container_id: str | None = None,
        user: str | int | None = None,
        image: str | None = None,
        mounts: Sequence[Mount | tuple[str, str] | tuple[str, str, bool]] = (),
        entrypoint: str | None = None,
        workdir: str | None = None,
    ) -> Step:
        """Launch a step; returns once nodestepd has started it (its `started` reply).

        Raises a Refused subclass (status 125) when the daemon refuses or cannot start it,
        BadRequest for arguments it can tell are wrong before sending, DaemonUnavailable
        when no daemon serves the socket. docs/api.md describes every parameter.
        """
        if isinstance(args, (str, bytes)) or not all(isinstance(a, str) for a in args):
            raise BadRequest("args is a sequence of strings (the command and its arguments)", status=LAUNCH_FAILED)
        args = list(args)
        if not args and image is None:
            raise BadRequest("no command given: args must not be empty", status=LAUNCH_FAILED)
        if image is None and not bundle:
            raise BadRequest("run needs a bundle directory, or an image", status=LAUNCH_FAILED)
        if image is not None and bundle:
            raise BadRequest("run takes a bundle or an image, not both", status=LAUNCH_FAILED)
        if image is None and (mounts or entrypoint is not None or workdir is not None):
            raise BadRequest("mounts, entrypoint and workdir go with image", status=LAUNCH_FAILED)
        if journal and not detach:
            raise BadRequest("journal goes with detach", status=LAUNCH_FAILED)
        if local_offset is not None and task_offset is None:
            raise BadRequest("local_offset goes with a per-task launch (task_offset)", status=LAUNCH_FAILED)
        if pty and not detach and not (isinstance(stdin, int) and os.isatty(stdin)):
            raise BadRequest("pty needs a terminal as stdin (an fd)", status=LAUNCH_FAILED)
        bundle_path = os.path.abspath(os.fspath(bundle)) if image is None and bundle else ""
        environment = dict(os.environ) if env is None else dict(env)
        workdir_here = os.path.abspath(os.fspath(chdir)) if chdir is not None else os.getcwd()
        user_name = None if user is None else str(user)
        _require_utf8("the bundle path", bundle_path)
        _require_utf8("the working directory", workdir_here)
        for i, arg in enumerate(args):
            _require_utf8(f"command argument {i}", arg)
        for name, value in environment.items():
            if not isinstance(name, str) or not isinstance(value, str) or not name or "=" in name:
                raise BadRequest(f"environment variable {name!r}: names and values are strings, a name has no '='",
                                 status=LAUNCH_FAILED)
            _require_utf8(f"environment variable {name!r}", name + value)
            if "\0" in value or "\0" in name:
                raise BadRequest(f"environment variable {name!r} contains a NUL byte", status=LAUNCH_FAILED)
        message: dict[str, Any] = {
            "op": "run", "bundle": bundle_path, "args": args, "env": environment, "job_id": job, "step_id": step,
            "ntasks": ntasks, "chdir": workdir_here, "pty": pty, "detach": detach,
            "output_to_journal": journal, "task_offset": task_offset, "local_offset": local_offset,
            "node_id": node_id, "container_id": container_id,
        }
        if image is not None:
            message.update(_image_fields(image, mounts, entrypoint, workdir, user_name))
        if user_name is not None:
            message["user"] = user_name
        loop = asyncio.get_running_loop()
        # The blocking part, off the loop: config.json read and the output files opened with
        # our own rights (the daemon never opens a caller's path as root).
        opening = asyncio.ensure_future(asyncio.to_thread(_open_launch, bundle_path, user_name, detach, stdin, stdout,
                                                          stderr))
        try:
            opened = await asyncio.shield(opening)
        except asyncio.CancelledError:  # the thread runs on: close what it opens
            opening.add_done_callback(_discard_opened)
            raise
        message.update(opened.fields)
        outputs: _Outputs | None = None
        conn: Connection | None = None
        try:
            outputs = await _Outputs.connect(loop, opened.pipes)
            conn = await open_connection(self.socket)
            try:
                await conn.send(message, opened.fds)
                opened.close()
                reply = await conn.receive()
            except Lost:
                reply = await conn.receive()  # why it closed (busy), if it said so
                if reply is None:
                    raise ConnectionLost("nodestepd closed the connection before the request was sent") from None
            given = None if job is None else (job, step or 0)
            if reply is None:
                conn.close()
                conn = None
                if detach or given is None:
                    which = f"step {given[0]}.{given[1]}" if given else "the step"
                    raise ConnectionLost(f"lost the connection to nodestepd before it acknowledged the launch; "
                                         f"{which} may be running (ps() tells)")
                # The daemon went before acknowledging: the next one knows from the step's
                # record whether it started (attach), and gives its status.
                launched = Step(self, given[0], given[1], ntasks=ntasks, first_task=task_offset or 0,
                                user=user_name, outputs=outputs)
                launched._follow(None)
                return launched
            if reply["type"] == "error":
                error = refusal(reply)
                if error.status is None:
                    error.status = LAUNCH_FAILED
                raise error
            if reply["type"] != "started":
                raise ProtocolError(f"unexpected reply from nodestepd: {reply['type']!r} instead of 'started'")
            launched = Step(self, _int(reply, "job_id"), _int(reply, "step_id"), ntasks=_int(reply, "ntasks"),
                            first_task=task_offset or 0, user=user_name, outputs=outputs)
            if detach:
                conn.close()
                conn = None
            else:
                launched._follow(conn)
                conn = None
            outputs = None
            return launched
        finally:
            opened.discard()  # what was not sent or taken over: our copies, unread pipes
            if conn is not None:
                conn.close()
            if outputs is not None:
                outputs.close()

    def step(self, job: int, step: int = 0, *, user: str | int | None = None) -> Step:
        """A handle on step job.step (one launched detached, by another program, or whose
        client went): wait(), signal(), cancel() by request. Nothing is sent until then."""
        return Step(self, job, step, user=None if user is None else str(user))

    async def attach(self, job: int, step: int = 0, *, first_task: int = 0) -> Step:
        """Take up again an attached launch whose client lost its daemon (a restart): the
        `attach` request. NotFound when there is no such launch of yours; Conflict when it
        was launched detached (use step(job, step).wait()) or already has its client."""
        conn: Connection | None = await open_connection(self.socket)
        assert conn is not None
        try:
            reply = await _exchange(conn, {"op": "attach", "job_id": job, "step_id": step, "first_task": first_task})
            if reply["type"] == "exit":  # a launch that had ended: started came first
                raise ProtocolError("unexpected reply from nodestepd: 'exit' before 'started'")
            _expect(reply, "started")
            attached = Step(self, _int(reply, "job_id"), _int(reply, "step_id"), ntasks=_int(reply, "ntasks"),
                            first_task=first_task)
            attached._follow(conn)
            conn = None
            return attached
        finally:
            if conn is not None:
                conn.close()

    # ---- requests -----------------------------------------------------------------------------

    async def signal(self, job: int, step: int, sig: int | str, *, user: str | int | None = None) -> None:
        """Send `sig` to every running task of job.step. NotFound when it is not running (or not yours)."""
        await self._request({"op": "signal", "signal": signal_name(sig), "job_id": job, "step_id": step,
                             **_whose(user)}, "ok")

    async def cancel(self, job: int, step: int = 0, *, user: str | int | None = None) -> StepExit:
        """Cancel job.step (every launch of it): the termination sequence of oci.conf; returns
        once it is done, with how the step ended. NotFound when it is not running."""
        return StepExit.from_reply(await self._request({"op": "cancel", "job_id": job, "step_id": step,
                                                        **_whose(user)}, "exit"))

    async def wait(self, job: int, step: int = 0, *, user: str | int | None = None) -> StepExit:
        """How job.step ended, once it has (at once for a finished one whose result the
        daemon keeps). Rides through a daemon restart while it waits."""
        reply = await self._request({"op": "wait", "job_id": job, "step_id": step, **_whose(user)}, "exit",
                                    ride=True)
        return StepExit.from_reply(reply)

    async def ps(self) -> list[StepInfo]:
        """Your steps (an operator's: everyone's), running and recently finished."""
        steps = (await self._request({"op": "ps"}, "steps")).get("steps")
        if not isinstance(steps, list):
            raise ProtocolError("malformed reply from nodestepd: steps is not a list")
        return [StepInfo.from_reply(s) for s in steps]

    async def status(self) -> DaemonStatus:
        """The daemon's version, configuration and counters."""
        return DaemonStatus.from_reply(await self._request({"op": "status"}, "status"))

    async def reload(self) -> None:
        """Have nodestepd re-read its settings and oci.conf (root only: PermissionDenied
        otherwise; ReloadFailed, listing every problem, when the new files are rejected)."""
        await self._request({"op": "reload"}, "ok")

    async def _request(self, message: dict[str, Any], kind: str, ride: bool = False) -> dict[str, Any]:
        """One request on its own connection and its reply of `kind`. ride: a connection lost
        before the reply is tried again on the next daemon, within reattach_timeout."""
        deadline: float | None = None
        delay = RECONNECT_FIRST
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn = await open_connection(self.socket)
                try:
                    return _expect(await _exchange(conn, message), kind)
                finally:
                    conn.close()
            except (ConnectionLost, DaemonUnavailable) as e:
                if not ride or (deadline is None and isinstance(e, DaemonUnavailable)):
                    raise
                if deadline is None:
                    deadline = loop.time() + self.reattach_timeout
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DaemonUnavailable(f"nodestepd did not come back within {self.reattach_timeout:g} s") from e
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, RECONNECT_MAX)


class Step:
    """A step: launched by Client.run(), taken up by Client.attach(), or a handle from
    Client.step(). job_id, step_id; ntasks (None for a handle); first_task (the launch's
    task_offset); attached: whether this client holds its connection (and so its life);
    stdout, stderr: asyncio.StreamReaders when launched with PIPE, else None."""

    def __init__(self, client: Client, job_id: int, step_id: int, *, ntasks: int | None = None, first_task: int = 0,
                 user: str | None = None, outputs: _Outputs | None = None) -> None:
        self.client = client
        self.job_id = job_id
        self.step_id = step_id
        self.ntasks = ntasks
        self.first_task = first_task
        self.user = user
        self._outputs = outputs
        self.stdout = outputs.streams.get("stdout") if outputs is not None else None
        self.stderr = outputs.streams.get("stderr") if outputs is not None else None
        self._conn: Connection | None = None
        self._following: asyncio.Task[StepExit] | None = None
        self._held: list[str] = []  # signals sent while no daemon had us attached, in order
        self._abandoned = False
        self._result: StepExit | None = None
        if outputs is not None:
            client._holding.add(self)

    def __repr__(self) -> str:
        return f"<Step {self.ref}{' attached' if self.attached else ''}{' done' if self.done() else ''}>"

    @property
    def ref(self) -> str:
        return f"{self.job_id}.{self.step_id}"

    @property
    def attached(self) -> bool:
        return self._following is not None and not self._following.done()

    def done(self) -> bool:
        """Whether this client knows the step has ended."""
        return self._result is not None or (self._following is not None and self._following.done())

    async def wait(self) -> StepExit:
        """How the step ended (with the output collected with COLLECT). For an attached step,
        its exit on its own connection, through daemon restarts (DaemonUnavailable when none
        comes back within reattach_timeout); otherwise Client.wait()."""
        if self._result is not None:
            return self._result
        if self._abandoned:
            raise ConnectionLost(f"the client let go of step {self.ref}: nodestepd cancelled it")
        if self._following is not None:
            ended = await asyncio.shield(self._following)
        else:
            ended = await self.client.wait(self.job_id, self.step_id, user=self.user)
        if self._outputs is not None:
            stdout, stderr = await self._outputs.collected()
            ended = StepExit(ended.job_id, ended.step_id, ended.status, ended.tasks, ended.cancelled,
                             ended.stage_out_error, stdout, stderr)
        self._result = ended
        self._release()
        return ended

    def _release(self) -> None:
        """Out of the client's hands once nothing of ours is left to close."""
        connected = self._following is not None and not self._following.done()
        piped = self._outputs is not None and (self._outputs.streams or self._result is None)
        if not connected and not piped:
            self.client._holding.discard(self)

    async def signal(self, sig: int | str) -> None:
        """Send `sig` (a number, signal.Signals, or a name: "USR1", "SIGUSR1") to the step's
        running tasks. Attached: on the step's own connection, held while the daemon
        restarts; otherwise by request. NotFound once the step has ended."""
        name = signal_name(sig)
        if self._following is None:
            await self.client.signal(self.job_id, self.step_id, name, user=self.user)
            return
        if self.done():
            raise NotFound(f"step {self.ref} has already finished")
        conn = self._conn
        if conn is None:
            self._held.append(name)  # forwarded once attached to the next daemon
            return
        try:
            await conn.send({"op": "signal", "signal": name})
        except (Lost, OSError):
            self._held.append(name)

    async def cancel(self) -> StepExit:
        """Cancel the step (Client.cancel: every launch of its job.step); how it ended."""
        ended = await self.client.cancel(self.job_id, self.step_id, user=self.user)
        if self._following is not None:
            return await self.wait()  # the same exit, from our own connection, with collected output
        return ended

    # ---- following an attached step ------------------------------------------------------------

    def _follow(self, conn: Connection | None) -> None:
        """Read the step's connection until its exit, in one task; conn None: the daemon went
        before acknowledging the launch."""
        self._conn = conn  # ours to close if the task is cancelled before it runs
        self._following = asyncio.get_running_loop().create_task(self._ride(conn), name=f"nodestepd step {self.ref}")
        self.client._holding.add(self)
        self._following.add_done_callback(lambda _: self._release())

    async def _ride(self, conn: Connection | None) -> StepExit:
        acknowledged = conn is not None
        while True:
            if conn is not None:
                self._conn = conn
                try:
                    await self._forward_held(conn)
                    reply = await self._until_exit(conn)
                finally:
                    self._conn = None
                    conn.close()
                if reply is not None:
                    return StepExit.from_reply(reply)
                log.warning("lost the connection to nodestepd; reconnecting (step %s runs on; giving up after %g s)",
                            self.ref, self.client.reattach_timeout)
            conn, reply = await self._reattach(acknowledged)
            if reply is not None:
                return StepExit.from_reply(reply)
            log.info("re-attached to step %s", self.ref)
            acknowledged = True

    async def _forward_held(self, conn: Connection) -> None:
        while self._held:
            try:
                await conn.send({"op": "signal", "signal": self._held[0]})
            except (Lost, OSError):
                return  # held for the next daemon; the read that follows sees the end
            del self._held[0]

    async def _until_exit(self, conn: Connection) -> dict[str, Any] | None:
        """The `exit` reply, or None when the connection is lost first."""
        while True:
            reply = await conn.receive()
            if reply is None or reply["type"] == "exit":
                return reply
            if reply["type"] == "error":  # a signal the daemon would not take: nothing else answers it
                log.warning("nodestepd, on step %s: %s", self.ref, reply.get("error"))
            else:
                log.warning("unexpected reply from nodestepd on step %s: %r", self.ref, reply["type"])

    async def _reattach(self, acknowledged: bool) -> tuple[Connection | None, dict[str, Any] | None]:
        """Attached to the next daemon: (its connection, None), or (None, the exit) for a step
        that had ended. Raises when no daemon answers within reattach_timeout, or the step
        cannot be attached to."""
        loop = asyncio.get_running_loop()
        timeout = self.client.reattach_timeout
        deadline = loop.time() + timeout
        delay = RECONNECT_FIRST
        while True:
            conn = await try_connection(self.client.socket)
            if conn is not None:
                try:
                    reply = await self._attach(conn, deadline - loop.time())
                except BaseException:  # cancelled (the client let go): the connection goes with us
                    conn.close()
                    raise
                if reply is not None and reply["type"] == "started":
                    return conn, None
                conn.close()
                if reply is not None and reply["type"] == "exit":
                    return None, reply
                if reply is not None and not (reply["type"] == "error" and reply.get("code") == "busy"):
                    raise self._refused(reply, acknowledged)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DaemonUnavailable(
                    f"nodestepd did not come back within {timeout:g} s; step {self.ref} may still be running "
                    f"(Client.wait({self.job_id}, {self.step_id}) tells its status once nodestepd is back)")
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, RECONNECT_MAX)

    async def _attach(self, conn: Connection, seconds: float) -> dict[str, Any] | None:
        """The reply to `attach`, or None when the connection ends (or time runs out) first:
        under systemd the socket holds a connection until the daemon serves it."""
        try:
            await conn.send({"op": "attach", "job_id": self.job_id, "step_id": self.step_id,
                             "first_task": self.first_task})
        except (Lost, OSError):
            return None
        try:
            return await asyncio.wait_for(conn.receive(), max(0.0, seconds))
        except TimeoutError:
            return None

    def _refused(self, reply: dict[str, Any], acknowledged: bool) -> Exception:
        if reply["type"] == "error" and reply.get("code") == "not-found":
            if not acknowledged:  # no record of the launch survived: the daemon died before anything ran
                return LaunchFailed(f"nodestepd went away while launching step {self.ref}, and the step did not "
                                    "start", status=LAUNCH_FAILED)
            return StatusUnknown(f"step {self.ref} ended while nodestepd restarted, and the next nodestepd does "
                                 "not know its status")
        if reply["type"] == "error":
            error = refusal(reply)
            error.args = (f"cannot attach to step {self.ref} again: {error}",)
            return error
        return ProtocolError(f"unexpected reply from nodestepd to attach: {reply['type']!r}")

    async def _abandon(self) -> None:
        """Close the step's connection (nodestepd cancels it) and its output pipes."""
        self.client._holding.discard(self)
        self._abandoned = not self.done()
        if self._following is not None and not self._following.done():
            self._following.cancel()
            await asyncio.wait([self._following])  # its end, whatever it was; our own cancellation still raises
            if not self._following.cancelled():
                self._following.exception()  # retrieved: it failed before we let go, and that is moot now
        if self._conn is not None:  # a task cancelled before it ran never reached its own close
            self._conn.close()
            self._conn = None
        if self._outputs is not None:
            self._outputs.close()


# ---- the launch's stdio --------------------------------------------------------------------


def _discard_opened(opening: asyncio.Future[_Opened]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().discard()


class _Opened:
    """What _open_launch made: the request's config.json fields, the three fds to send,
    those we own (closed once sent), the read ends of PIPE/COLLECT pipes by stream."""

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.fds: list[int] = []
        self.owned: list[int] = []
        self.pipes: dict[str, tuple[int, bool]] = {}  # stream -> (read end, collect)

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)
        self.owned = []

    def discard(self) -> None:
        self.close()
        for fd, _ in self.pipes.values():
            os.close(fd)
        self.pipes = {}


def _open_launch(bundle: str, user: str | None, detach: bool, stdin: Stream, stdout: Stream,
                 stderr: Stream) -> _Opened:
    """In a worker thread: what a launch opens before it is sent (files may block)."""
    opened = _Opened()
    try:
        if bundle and user is None:
            if not os.path.isdir(bundle):
                raise LaunchFailed(f"bundle {bundle} does not exist or is not a directory", status=LAUNCH_FAILED)
            config_json, config_json_error = wire.read_bundle_config(bundle)
            opened.fields = {"config_json": config_json, "config_json_error": config_json_error}
        stdin_fd = _stdin_fd(stdin, opened)
        # Not given: attached, our own stdout and stderr; detached, /dev/null (nodestepctl run
        # --detach's): a step that outlives us must not hold our output open.
        stdout_fd = _output_fd("stdout", DEVNULL if stdout is None and detach else stdout, 1, user, opened)
        stderr_fd = (stdout_fd if stderr is STDOUT
                     else _output_fd("stderr", DEVNULL if stderr is None and detach else stderr, 2, user, opened))
        opened.fds = [stdin_fd, stdout_fd, stderr_fd]
        return opened
    except BaseException:
        opened.discard()
        raise


def _stdin_fd(stream: Stream, opened: _Opened) -> int:
    if stream is None or stream is DEVNULL:
        return _own(opened, os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    if isinstance(stream, (str, os.PathLike)):
        path = os.fspath(stream)
        try:
            return _own(opened, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            raise LaunchFailed(f"cannot open input file {path}: {e.strerror}", status=LAUNCH_FAILED) from None
    if isinstance(stream, _Special):
        raise BadRequest(f"stdin cannot be {stream!r}", status=LAUNCH_FAILED)
    return _fd_of("stdin", stream)


def _output_fd(name: str, stream: Stream, inherited: int, user: str | None, opened: _Opened) -> int:
    if stream is None:
        return inherited
    if stream is DEVNULL:
        return _own(opened, os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
    if stream is PIPE or stream is COLLECT:
        r, w = os.pipe2(os.O_CLOEXEC)
        opened.pipes[name] = (r, stream is COLLECT)
        return _own(opened, w)
    if stream is STDOUT:
        raise BadRequest("only stderr can be STDOUT", status=LAUNCH_FAILED)
    if isinstance(stream, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(stream))
        if user is not None:  # the daemon opens it as that user, never with our (an operator's) rights
            opened.fields["output" if name == "stdout" else "error"] = path
            return _own(opened, os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC))
        try:
            return _own(opened, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666))
        except OSError as e:
            raise LaunchFailed(f"cannot open output file {path}: {e.strerror}", status=LAUNCH_FAILED) from None
    return _fd_of(name, stream)


def _fd_of(name: str, stream: Any) -> int:
    """The fd of an int or a file object; ours to pass, not to close."""
    fd = stream
    if isinstance(stream, bool) or not isinstance(stream, int):
        fileno = getattr(stream, "fileno", None)
        if fileno is None:
            raise BadRequest(f"{name}: expected None, DEVNULL, PIPE, COLLECT, an fd, a file or a path; "
                             f"got {stream!r}", status=LAUNCH_FAILED)
        fd = fileno()
    if not isinstance(fd, int) or fd < 0:
        raise BadRequest(f"{name}: {fd!r} is not a file descriptor", status=LAUNCH_FAILED)
    return int(fd)


def _own(opened: _Opened, fd: int) -> int:
    opened.owned.append(fd)
    return fd


class _Outputs:
    """The read ends of a step's PIPE and COLLECT pipes, read on the loop."""

    def __init__(self) -> None:
        self.streams: dict[str, asyncio.StreamReader] = {}
        self.transports: list[asyncio.BaseTransport] = []
        self.collecting: dict[str, asyncio.Task[bytes]] = {}

    @classmethod
    async def connect(cls, loop: asyncio.AbstractEventLoop, pipes: dict[str, tuple[int, bool]]) -> _Outputs | None:
        if not pipes:
            return None
        outputs = cls()
        try:
            for name in list(pipes):
                fd, collect = pipes.pop(name)
                reader = asyncio.StreamReader(loop=loop)
                pipe = os.fdopen(fd, "rb", buffering=0)
                try:
                    transport, _ = await loop.connect_read_pipe(
                        functools.partial(asyncio.StreamReaderProtocol, reader), pipe)
                except BaseException:
                    pipe.close()
                    raise
                outputs.transports.append(transport)
                if collect:
                    outputs.collecting[name] = loop.create_task(reader.read())
                else:
                    outputs.streams[name] = reader
        except BaseException:
            for fd, _ in pipes.values():
                os.close(fd)
            outputs.close()
            raise
        return outputs

    async def collected(self) -> tuple[bytes | None, bytes | None]:
        """COLLECT's bytes, once every task has closed the pipes (at their end)."""
        stdout = await self.collecting["stdout"] if "stdout" in self.collecting else None
        stderr = await self.collecting["stderr"] if "stderr" in self.collecting else None
        return stdout, stderr

    def close(self) -> None:
        """Close the pipes: their readers see the end (COLLECT keeps what it has read)."""
        for transport in self.transports:
            transport.close()


# ---- helpers --------------------------------------------------------------------------------


def signal_name(sig: int | str) -> str:
    """The name the protocol carries for `sig` (a number, signal.Signals, or a name with or
    without SIG); BadRequest for something that is not a signal of this system."""
    try:
        if isinstance(sig, str):
            text = sig.strip().upper()
            if text.isascii() and text.isdigit():
                return signals.Signals(int(text)).name
            return signals.Signals[text if text.startswith("SIG") else "SIG" + text].name
        if isinstance(sig, int) and not isinstance(sig, bool):
            return signals.Signals(sig).name
    except (KeyError, ValueError):
        pass
    raise BadRequest(f"unknown signal {sig!r}")


def _whose(user: str | int | None) -> dict[str, Any]:
    return {} if user is None else {"user": str(user)}


def _require_utf8(what: str, value: str) -> None:
    """The protocol carries text; a value with lone surrogates (undecodable bytes) would not survive."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid UTF-8 ({os.fsencode(value)!r}); nodestepd passes text only",
                         status=LAUNCH_FAILED) from None



def _image_fields(image: str, mounts: Sequence[Any], entrypoint: str | None, workdir: str | None,
                  user: str | None) -> dict[str, Any]:
    """The run request's image fields, as nodestepctl run --image makes them."""
    from nodestepd.image.refs import RefError, fingerprint, parse_ref  # only an image launch loads it

    try:
        ref = parse_ref(image, os.getcwd())
    except RefError as e:
        raise BadRequest(str(e), status=LAUNCH_FAILED) from None
    _require_utf8("the image reference", ref.canonical)
    listed = []
    for mount in mounts:
        m = mount if isinstance(mount, Mount) else Mount(*mount)
        if not m.destination.startswith("/"):
            raise BadRequest(f"mount {m.source}:{m.destination}: the destination must be an absolute path",
                             status=LAUNCH_FAILED)
        source = os.path.abspath(m.source)
        _require_utf8("a mount path", source + m.destination)
        listed.append({"source": source, "destination": m.destination, "readonly": bool(m.readonly)})
    if workdir is not None and not workdir.startswith("/"):
        raise BadRequest(f"workdir {workdir!r}: must be an absolute path in the container", status=LAUNCH_FAILED)
    return {"image": ref.canonical, "image_fingerprint": fingerprint(ref) if user is None else None,
            "mounts": listed, "entrypoint": entrypoint, "workdir": workdir}


async def _exchange(conn: Connection, message: dict[str, Any]) -> dict[str, Any]:
    """Send one request and read its reply; what the daemon said before closing, if it did."""
    try:
        await conn.send(message)
    except Lost:
        pass  # a daemon that refused at once (busy) closed after its reply: read it
    reply = await conn.receive()
    if reply is None:
        raise ConnectionLost("nodestepd closed the connection without replying")
    return reply


def _expect(reply: dict[str, Any], kind: str) -> dict[str, Any]:
    if reply["type"] == "error":
        raise refusal(reply)
    if reply["type"] != kind:
        raise ProtocolError(f"unexpected reply from nodestepd: {reply['type']!r} instead of {kind!r}")
    return reply


def _int(reply: dict[str, Any], name: str) -> int:
    value = reply.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"malformed reply from nodestepd: {reply['type']} without an integer {name}")
    return value
