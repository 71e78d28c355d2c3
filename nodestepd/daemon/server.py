"""The server's lifecycle and the admission of connections.

Like uvicorn's Server: recover() takes over the steps a previous daemon left (before
anyone is served), serve() accepts until request_shutdown(), and shutdown() stops
accepting, then leaves running steps alone (their records stay for the next daemon) or
cancels them (steps_on_stop). Each accepted connection within the caps gets a Session
(session.py), which answers its requests.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time

from nodestepd.daemon.closer import MAX_CLOSE_BACKLOG, too_many_unclosed
from nodestepd.daemon.connection import Connection
from nodestepd.daemon.listener import Listener
from nodestepd.daemon.session import DaemonState, Session
from nodestepd.logs import BoundLogger, get_logger
from nodestepd.process.kernel import peer_credentials
from nodestepd.protocol import messages
from nodestepd.protocol.messages import ErrorReply
from nodestepd.step.recovery import recover_steps
from nodestepd.step.step import StepState


class Server:
    def __init__(self, state: DaemonState, listener: Listener) -> None:
        self.state = state
        self.listener = listener
        self.log = get_logger()
        self._stopping = asyncio.Event()
        self._connections: dict[asyncio.Task[None], Session] = {}  # each connection's task, and its session

    async def recover(self) -> None:
        """Take over the steps the records in the state dir name, and the results of finished
        ones (before serving anyone); the attached steps wait for their clients to attach
        again (reattach.py)."""
        results, unreadable = await asyncio.to_thread(self.state.results.load_all)
        for problem in unreadable:
            self.log.error("step result unreadable; quarantined", file=problem.name, reason=problem.reason)
        steps = await recover_steps(self.state.store, self.state.reaper, self.state.results)
        self.state.registry.recovered(steps, results)
        if results or unreadable:
            self.log.info("results kept", results=len(results), quarantined=len(unreadable),
                          retained=len(self.state.registry.finished))
        self.state.reattachments.expect(steps)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(self._stopping.wait())
        backoff = _AcceptBackoff(self.log)
        accept: asyncio.Future | None = None
        try:
            while True:
                accept = asyncio.ensure_future(loop.sock_accept(self.listener.sock))
                done, _ = await asyncio.wait({accept, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    break
                try:
                    sock, _ = accept.result()
                except OSError as e:
                    if e.errno not in _ACCEPT_TRANSIENT:
                        raise
                    # Out of fds or memory, or a client gone before we took it: never fatal.
                    # Waiting lets sessions end and the closer release what it holds; the
                    # clients wait in the listen backlog meanwhile.
                    await asyncio.wait({stopping}, timeout=backoff.failed(e))
                    continue
                backoff.succeeded()
                self._admit(sock)
        finally:
            if accept is not None:
                accept.cancel()
            stopping.cancel()

    def _admit(self, sock: socket.socket) -> None:
        try:
            peer = pid, uid, _ = peer_credentials(sock)
        except OSError as e:
            self.log.warning("cannot read a new connection's credentials; closing it", error=str(e))
            self.state.closer.close_socket(sock, -1)
            return
        account = self.state.accounts.account(uid)
        self.state.accounts.refresh_soon()
        refusal = self._connection_refusal(uid, account)
        if refusal is not None:
            self._refuse_connection(sock, pid, uid, account, refusal)
            return
        c = self.state.configuration.config
        conn = Connection(sock, peer, closer=self.state.closer, account=account, max_message=c.max_message_size,
                          send_timeout=c.client_timeout)
        session = Session(conn, self.state)
        task = asyncio.create_task(session.serve())
        self._connections[task] = session
        task.add_done_callback(self._connections.pop)

    def _connection_refusal(self, uid: int, account: int) -> str | None:
        """Why a new connection from uid (counted as account's: accounts.py) cannot be served now, or None.

        max_connections is node-wide; max_connections_per_user keeps one user, their
        subordinate uids included, from taking all of it (operators, srun's launcher among
        them, are not held to it), and so does the number of the user's fds still waiting
        to be closed (closer.py)."""
        c = self.state.configuration.config
        if len(self._connections) >= c.max_connections:
            return f"nodestepd has too many connections (limit {c.max_connections}); try again later"
        if self.state.configuration.policy.is_operator(uid):
            return None
        if sum(1 for session in self._connections.values() if session.conn.account == account) >= c.max_connections_per_user:
            return (f"you have too many connections to nodestepd (limit {c.max_connections_per_user} per user); "
                    "try again later")
        if self.state.closer.backlog(account) >= MAX_CLOSE_BACKLOG:
            return too_many_unclosed()
        return None

    def _refuse_connection(self, sock: socket.socket, pid: int, uid: int, account: int, reason: str) -> None:
        """One `busy` error reply if the socket takes it at once, then close."""
        self.log.warning("connection refused: too many connections", peer_uid=uid, peer_pid=pid, reason=reason)
        try:
            sock.setblocking(False)
            sock.send(messages.frame(ErrorReply(code="busy", error=reason)))
        except OSError:
            pass  # the reply is a courtesy; closing is the refusal
        finally:
            self.state.closer.close_socket(sock, account)  # fds may be in flight in it

    def request_shutdown(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, then leave running steps alone, or cancel them (steps_on_stop = "cancel")."""
        self.listener.close()
        self.state.reattachments.close()
        running = list(self.state.registry.running.values())
        # Steps whose exit went out finish their release first (a few ms): none is left half-released.
        await asyncio.gather(*(step.wait() for step in running if step.told().done()))
        running = [step for step in running if step.state is not StepState.FINISHED]
        if running and self.state.configuration.config.steps_on_stop == "cancel":
            self.log.info("shutting down: cancelling running steps", steps=len(running))
            await asyncio.gather(*(step.cancel("daemon shutdown") for step in running))
            # Their attached clients get the exit (the cancellation's status), not a lost
            # connection: each such session ends once it has sent it.
            attending = [task for task, session in self._connections.items() if session.attending]
            if attending:
                await asyncio.wait(attending, timeout=self.state.configuration.config.client_timeout)
        elif running:
            # Their records stay: the next daemon takes them over (recovery.py).
            self.log.info("shutting down: leaving running steps alone for the next daemon", steps=len(running),
                          refs=[step.ref for step in running])
            for step in running:
                step.leave_running()
        for session in list(self._connections):
            session.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)


# accept(2) errors that say nothing about the listening socket itself: out of fds (ours or
# the node's), of memory or buffers, or a client that went before it was accepted.
_ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
                               errno.EPROTO, errno.EPERM})


class _AcceptBackoff:
    """How long to wait after a failed accept: 10 ms doubling to 1 s, back to the start on
    success. Logged at most every 10 s, with how many failures were not logged."""

    FIRST, MAX, LOG_EVERY = 0.01, 1.0, 10.0

    def __init__(self, log: BoundLogger) -> None:
        self.log = log
        self.delay = 0.0
        self.unlogged = 0
        self.logged_at = -self.LOG_EVERY

    def failed(self, error: OSError) -> float:
        self.delay = min(self.MAX, self.delay * 2 or self.FIRST)
        now = time.monotonic()
        if now - self.logged_at >= self.LOG_EVERY:
            self.log.warning("cannot accept connections; backing off", error=str(error), backoff_s=self.delay,
                             failures_not_logged=self.unlogged)
            self.logged_at, self.unlogged = now, 0
        else:
            self.unlogged += 1
        return self.delay

    def succeeded(self) -> None:
        if self.delay:
            self.log.info("accepting connections again")
        self.delay = 0.0
