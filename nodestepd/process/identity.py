"""Who a process runs as: a user resolved from a kernel-reported uid, never from a request."""

from __future__ import annotations

import ctypes
import os
import pwd
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_libc.getgrouplist.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_uint),
                               ctypes.POINTER(ctypes.c_int)]
_libc.getgrouplist.restype = ctypes.c_int
_NGROUPS_MAX = 65536  # the kernel's


def grouplist(user: str, gid: int, *, size: int = 64) -> tuple[int, ...]:
    """os.getgrouplist, letting go of the GIL: Python's holds it through the NSS lookups
    (nss-systemd's walk of the userdb directories, a directory service's round trip), once
    per launch, while the event loop waits. glibc's getgrouplist through ctypes does not.
    Blocking: call it off the event loop. size: room for this many groups at first."""
    while True:
        groups = (ctypes.c_uint * size)()
        count = ctypes.c_int(size)
        if _libc.getgrouplist(os.fsencode(user), gid, groups, ctypes.byref(count)) >= 0:
            return tuple(groups[:count.value])
        if size >= _NGROUPS_MAX:
            raise OSError(f"{user} is in more than {_NGROUPS_MAX} groups")
        size = min(_NGROUPS_MAX, max(2 * size, count.value))  # glibc says how many there are


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
