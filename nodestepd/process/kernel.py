"""The daemon's own dealings with the kernel: prctl, peer credentials, the fd limit, sealed memfds,
renameat2.

What concerns one process the daemon watches (its pidfd) is in watch.py; this module
holds the calls about the daemon itself and its sockets and files.

PR_SET_NO_NEW_PRIVS is set on the daemon itself, not in each child: it is inherited
across fork and execve and can never be unset, and setting it in the child would need a
preexec_fn, which is unsafe in a threaded program (the daemon spawns from worker
threads). Root keeps its own privileges under it; it only stops execve from granting
new ones (setuid bits, file capabilities) to the user processes we start.

PR_SET_CHILD_SUBREAPER makes the daemon the parent of whatever gets orphaned below it
(reaper.py says what that is and who reaps it).
"""

from __future__ import annotations

import ctypes
import enum
import fcntl
import os
import resource
import socket
import struct
from typing import NamedTuple


class _Prctl(enum.IntEnum):
    """The prctl(2) options used here (linux/prctl.h)."""

    PR_SET_CHILD_SUBREAPER = 36
    PR_SET_NO_NEW_PRIVS = 38
    PR_GET_NO_NEW_PRIVS = 39


# The one ctypes handle: Python has no prctl. dlopen(NULL) is the interpreter's own
# symbol table, which holds the C library it is linked against; nothing is searched for.
_libc = ctypes.CDLL(None, use_errno=True)
# The C library for the other modules of process/ (rootspawn.py): LIBC lets go of the GIL
# for each call, LIBC_HOLDING keeps it (quick calls that never block: no queueing for the
# GIL again after each).
LIBC = _libc
LIBC_HOLDING = ctypes.PyDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


def _prctl(option: _Prctl, arg: int = 0) -> int:
    result = _libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option.name}): {os.strerror(errno)}")
    return result


def no_new_privs() -> bool:
    return _prctl(_Prctl.PR_GET_NO_NEW_PRIVS) == 1


def set_no_new_privs() -> None:
    """Irreversible for this process and everything it starts from now on."""
    _prctl(_Prctl.PR_SET_NO_NEW_PRIVS, 1)


def become_subreaper() -> None:
    """Orphans of our descendants become our children instead of PID 1's, for the life of the process."""
    _prctl(_Prctl.PR_SET_CHILD_SUBREAPER, 1)


class Credentials(NamedTuple):
    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> Credentials:
    """Who is at the other end of a connected AF_UNIX socket, as the kernel saw it (SO_PEERCRED).

    The ids are the peer's when it connected (or created the socketpair): nothing the
    peer sends can change them, which is why they are the only identity the daemon trusts.
    """
    return Credentials(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


_fd_limit_at_start: tuple[int, int] | None = None


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to `wanted` (at most the hard limit); never lower it.

    Only as far as asked, and the limits from before are kept for what we start as a
    user (user_fd_limit). Returns the (soft, hard) limits now in force.
    """
    global _fd_limit_at_start
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _fd_limit_at_start is None:
        _fd_limit_at_start = (soft, hard)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft, hard


def user_fd_limit() -> tuple[int, int]:
    """The RLIMIT_NOFILE (soft, hard) for a user's processes (tasks, runtime commands, the
    as-user helper): the daemon's own from before raise_fd_limit raised it, not the raised
    one (pam_limits is not run: the service's LimitNOFILE= is the users' limit, 1024:524288
    in the shipped unit, as systemd gives user sessions). Before any raise: the current."""
    return _fd_limit_at_start or resource.getrlimit(resource.RLIMIT_NOFILE)


_ALL_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def sealed_memfd(name: str, data: bytes) -> int:
    """A close-on-exec memfd holding `data`, sealed so that nobody can change it any more.

    For handing data to another process by fd (journald reads a record too large for a
    datagram this way): with every seal set (no shrinking, growing or writing, and no
    seal removed) the reader can trust what it maps or reads. The caller owns the fd.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _ALL_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def _renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
    """Python has no renameat2. Both names are single components relative to their directory fds."""
    if _libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def rename_noreplace(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """renameat2(RENAME_NOREPLACE): move src to dst, or FileExistsError when dst exists (a
    rename onto an empty directory would otherwise replace it silently)."""
    _renameat2(src_dir_fd, src, dst_dir_fd, dst, _RENAME_NOREPLACE)


def rename_exchange(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
    """renameat2(RENAME_EXCHANGE): swap src and dst atomically, both of which must exist
    (FileNotFoundError otherwise)."""
    _renameat2(src_dir_fd, src, dst_dir_fd, dst, _RENAME_EXCHANGE)


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
