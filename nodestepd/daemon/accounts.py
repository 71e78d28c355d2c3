"""Whose a connection is, for the per-user connection cap: a peer uid, or the user who owns
it as a subordinate uid (/etc/subuid).

Inside `unshare --map-auto` a user's processes may run as any of their subordinate uids,
and each reaches the daemon as its own peer uid (SO_PEERCRED gives the uid as the daemon's
user namespace sees it). Without this, one user with 65536 subordinate uids had 65536
per-user caps. /etc/subuid is what newuidmap itself trusts (a root-owned file; an
unprivileged user can map no other uid than their own without it), so it is what counts.
The owner of the peer's user namespace (NS_GET_OWNER_UID) would also do, but needs the
peer process alive when its connection is accepted and /proc of a user's process opened;
the file needs neither, and nothing the user sends.

The table is read at start and again when the file changes (its mtime, size or inode,
looked at in a worker thread at most every RECHECK seconds, when connections come).
"""

from __future__ import annotations

import asyncio
import bisect
import os
import pwd
import time

from nodestepd.config.subids import DEFAULT_SUBUID, parse_subids
from nodestepd.logs import get_logger

RECHECK = 5.0  # seconds


class Accounts:
    def __init__(self, path: str = DEFAULT_SUBUID) -> None:
        self.path = path
        self._starts: list[int] = []  # sorted range starts
        self._ranges: list[tuple[int, int, int]] = []  # (start, end, owner uid), by start
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    def account(self, uid: int) -> int:
        """The uid whose connection cap a connection from uid counts against."""
        i = bisect.bisect_right(self._starts, uid) - 1
        if i >= 0:
            start, end, owner = self._ranges[i]
            if uid < end:
                return owner
        return uid

    def load(self) -> None:
        """Read the file if it changed (blocking: at start, or in a worker thread)."""
        self._checked_at = time.monotonic()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and (stamp is not None or not self._ranges):
            return
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        except OSError as e:
            get_logger().warning("cannot read the subordinate uids; keeping the ones read before", path=self.path,
                                 error=str(e))
            return
        table = []
        for r in parse_subids(text):
            owner = _uid_of(r.owner)
            if owner is not None and not r.start <= owner < r.start + r.count:
                table.append((r.start, r.start + r.count, owner))
        table.sort()
        # Overlapping ranges (a misconfiguration newuidmap would allow): the first by start wins.
        merged: list[tuple[int, int, int]] = []
        for start, end, owner in table:
            if merged and start < merged[-1][1]:
                start = merged[-1][1]
                if start >= end:
                    continue
            merged.append((start, end, owner))
        self._ranges, self._starts, self._stamp = merged, [r[0] for r in merged], stamp
        get_logger().info("subordinate uids read", path=self.path, ranges=len(merged))

    def refresh_soon(self) -> None:
        """Look at the file again in a worker thread if it was not looked at for RECHECK seconds."""
        if time.monotonic() - self._checked_at < RECHECK or (self._refreshing and not self._refreshing.done()):
            return
        self._checked_at = time.monotonic()
        self._refreshing = asyncio.ensure_future(asyncio.to_thread(self.load))


def _uid_of(owner: str) -> int | None:
    if owner.isascii() and owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        return None
