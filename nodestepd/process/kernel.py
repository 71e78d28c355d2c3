"""Process-wide privilege settings of the daemon that every process it starts inherits.

PR_SET_NO_NEW_PRIVS is set on the daemon itself, not in each child: it is inherited
across fork and execve and can never be unset, and setting it in the child would need a
preexec_fn, which is unsafe in a threaded program (the daemon spawns from worker
threads). Root keeps its own privileges under it; it only stops execve from granting
new ones (setuid bits, file capabilities) to the user processes we start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import socket
import struct

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def _prctl(option: int, arg: int = 0) -> int:
    result = _libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")
    return result


def no_new_privs() -> bool:
    return _prctl(PR_GET_NO_NEW_PRIVS) == 1


def set_no_new_privs() -> None:
    """Irreversible for this process and everything it starts from now on."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a Unix socket's peer, from the kernel (SO_PEERCRED)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid, gid


# fds the daemon needs besides one per connection: steps' pidfds, spool dir fds, logs.
FD_HEADROOM = 4096


def raise_fd_limit(max_connections: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to what max_connections needs (at most the hard limit).

    Only as far as needed: runtimes inherit the soft limit, and some programs slow down
    with a huge one. Returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_HEADROOM
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft, hard
