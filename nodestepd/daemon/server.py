"""The server's lifecycle and the admission of connections.

Like uvicorn's Server: recover() takes over the steps a previous daemon left (before
anyone is served), serve() accepts until request_shutdown(), and shutdown() stops
accepting, then leaves running steps alone (their records stay for the next daemon) or
cancels them (steps_on_stop). Each accepted connection within the caps gets a Session
(session.py), which answers its requests.
"""

from __future__ import annotations

import asyncio
import socket

from nodestepd.daemon.connection import Connection
from nodestepd.daemon.listener import Listener
from nodestepd.daemon.session import DaemonState, Session
from nodestepd.logs import get_logger
from nodestepd.process.kernel import peer_credentials
from nodestepd.protocol import messages
from nodestepd.protocol.messages import ErrorReply
from nodestepd.step.recovery import recover_steps


class Server:
    def __init__(self, state: DaemonState, listener: Listener) -> None:
        self.state = state
        self.listener = listener
        self.log = get_logger()
        self._stopping = asyncio.Event()
        self._connections: dict[asyncio.Task[None], Session] = {}  # each connection's task, and its session

    async def recover(self) -> None:
        """Take over the steps the records in the state dir name (before serving anyone); the
        attached ones wait for their clients to attach again (reattach.py)."""
        steps = await recover_steps(self.state.store, self.state.reaper)
        self.state.registry.recovered(steps)
        self.state.reattachments.expect(steps)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        accept = asyncio.ensure_future(loop.sock_accept(self.listener.sock))
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                done, _ = await asyncio.wait({accept, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping in done:
                    break
                sock, _ = accept.result()
                accept = asyncio.ensure_future(loop.sock_accept(self.listener.sock))
                self._admit(sock)
        finally:
            accept.cancel()
            stopping.cancel()

    def _admit(self, sock: socket.socket) -> None:
        peer = pid, uid, _ = peer_credentials(sock)
        refusal = self._connection_refusal(uid)
        if refusal is not None:
            self._refuse_connection(sock, pid, uid, refusal)
            return
        c = self.state.configuration.config
        conn = Connection(sock, peer, max_message=c.max_message_size, send_timeout=c.client_timeout)
        session = Session(conn, self.state)
        task = asyncio.create_task(session.serve())
        self._connections[task] = session
        task.add_done_callback(self._connections.pop)

    def _connection_refusal(self, uid: int) -> str | None:
        """Why a new connection from uid cannot be served now, or None.

        max_connections is node-wide; max_connections_per_user keeps one user from taking
        all of it (operators, srun's launcher among them, are not held to it)."""
        c = self.state.configuration.config
        if len(self._connections) >= c.max_connections:
            return f"nodestepd has too many connections (limit {c.max_connections}); try again later"
        if (not self.state.configuration.policy.is_operator(uid)
                and sum(1 for session in self._connections.values() if session.uid == uid) >= c.max_connections_per_user):
            return (f"you have too many connections to nodestepd (limit {c.max_connections_per_user} per user); "
                    "try again later")
        return None

    def _refuse_connection(self, sock: socket.socket, pid: int, uid: int, reason: str) -> None:
        """One `busy` error reply if the socket takes it at once, then close."""
        self.log.warning("connection refused: too many connections", peer_uid=uid, peer_pid=pid, reason=reason)
        try:
            sock.setblocking(False)
            sock.send(messages.frame(ErrorReply(code="busy", error=reason)))
        except OSError:
            pass  # the reply is a courtesy; closing is the refusal
        finally:
            sock.close()

    def request_shutdown(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        """Stop accepting, then leave running steps alone, or cancel them (steps_on_stop = "cancel")."""
        self.listener.close()
        self.state.reattachments.close()
        running = list(self.state.registry.running.values())
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
