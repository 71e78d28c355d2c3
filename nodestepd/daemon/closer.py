"""Closing what clients send, off the event loop.

close(2) can block: the last close of a TCP socket with SO_LINGER set and unsent data
waits until the peer acknowledges it or the linger time (which may be years) runs out
(sk_stream_wait_close); a FUSE file's flush waits on its server. A client may send such
an fd with any request, and may leave one in flight in a connection's socket (the kernel
drops it when that socket is closed). So every fd a client sent and every client
connection's socket is closed here, in a thread, never on the loop: the FdCloser is the
one release point for them.

Each account (a user, its subordinate ids included: server.py) has its own lane, closed
in order by at most one thread at a time, so that a close stuck in one user's lane holds
up only that user's later closes. At most MAX_THREADS (64) lanes are worked at once (a lane
waits for a thread beyond that): stuck closes cannot make threads without bound. The
loop's default executor is not used: a stuck close would hold one of the threads that
the launch's preparation and every to_thread call share. A thread whose lanes are empty
waits, blocked and costing nothing, for the next lane (up to KEEP_IDLE of them) rather
than ending: starting a thread blocks the loop until it runs (Thread.start), which
profiling found on every launch's path to `started`, up to 1.5 ms each on a loaded
machine, twice per launch (its fds, then its connection). backlog() tells the server how
many of a user's fds still wait, so that one user cannot pile up fds in the daemon behind a close
that never ends (session.py and server.py refuse them more).
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Iterable

MAX_THREADS = 64
KEEP_IDLE = 4  # threads kept waiting for work when no lane has any
# A user with this many fds still to close gets no more connections, and a connection of
# theirs that brings more is ended: fds stuck behind a close that never ends stay bounded.
# Well above a burst's (an srun of 64 tasks ends 64 connections, each with 3 fds).
MAX_CLOSE_BACKLOG = 512


def too_many_unclosed() -> str:
    return ("too many of your file descriptors are still being closed by nodestepd "
            f"(limit {MAX_CLOSE_BACKLOG}); try again later")


class FdCloser:
    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self._max_threads = max_threads
        self._lock = threading.Lock()
        self._lanes: dict[int, deque[int]] = {}  # account -> fds to close, in order
        self._closing: dict[int, int] = {}  # account -> fds being closed now (0 or 1)
        self._worked: set[int] = set()  # accounts with a thread
        self._waiting: deque[int] = deque()  # accounts with fds and no thread yet
        self._idle: list[queue.SimpleQueue[int]] = []  # threads with no lane, each waiting on its inbox

    def close(self, fds: Iterable[int | None], account: int) -> None:
        """Close fds (None entries skipped) in account's lane; returns at once. The fds are the closer's now."""
        given = [fd for fd in fds if fd is not None]
        if not given:
            return
        with self._lock:
            self._lanes.setdefault(account, deque()).extend(given)
            if account in self._worked or account in self._waiting:
                return
            if len(self._worked) >= self._max_threads:
                self._waiting.append(account)
                return
            self._worked.add(account)
        self._start(account)

    def close_socket(self, sock: socket.socket, account: int) -> None:
        """Close a client's connection socket here (what is still in flight in it goes with it)."""
        self.close([sock.detach()], account)

    def backlog(self, account: int) -> int:
        """How many of account's fds are not closed yet."""
        with self._lock:
            return len(self._lanes.get(account, ())) + self._closing.get(account, 0)

    @property
    def threads(self) -> int:
        with self._lock:
            return len(self._worked)

    def _start(self, account: int) -> None:
        """A thread for account's lane (just added to _worked): an idle one, or a new one."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(inbox,), name="fd closer", daemon=True).start()
        inbox.put(account)

    def _work(self, inbox: queue.SimpleQueue[int]) -> None:
        account = inbox.get()
        while True:
            with self._lock:
                fd = self._next_fd(account)
                if fd is None:  # the lane is done
                    if self._waiting:
                        account = self._waiting.popleft()  # this thread works the next waiting lane
                        self._worked.add(account)
                        continue
                    if len(self._idle) >= KEEP_IDLE:
                        return
                    self._idle.append(inbox)
            if fd is None:
                account = inbox.get()  # the next lane _start gives this thread
                continue
            with contextlib.suppress(OSError):
                os.close(fd)
            with self._lock:
                self._closing[account] = 0

    def _next_fd(self, account: int) -> int | None:
        """The lane's next fd to close, marked as being closed; None when the lane is empty
        (it is then dropped, and the account no longer worked). Called with the lock held."""
        lane = self._lanes.get(account)
        if not lane:
            self._lanes.pop(account, None)
            self._closing.pop(account, None)
            self._worked.discard(account)
            return None
        self._closing[account] = 1
        return lane.popleft()
