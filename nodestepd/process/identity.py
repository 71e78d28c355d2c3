"""Who a process runs as: a user resolved from a kernel-reported uid, never from a request."""

from __future__ import annotations

import pwd
from dataclasses import dataclass

from nodestepd.process.kernel import grouplist


@dataclass(frozen=True)
class Identity:
    """A user: name, uid, gid, supplementary groups and home, from the passwd and group databases."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    @classmethod
    def for_uid(cls, uid: int) -> "Identity":
        """Blocking NSS lookups: call through asyncio.to_thread on the event loop."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise LookupError(f"uid {uid} has no passwd entry on this node") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, grouplist(pw.pw_name, pw.pw_gid), pw.pw_dir)
