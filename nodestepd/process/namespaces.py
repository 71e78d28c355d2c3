"""A caller's user and mount namespaces, pinned, for its container's runtime to run in.

Rootless podman and docker pass bundles and root filesystems that exist only in their own
user and mount namespaces (docs/oci-proxy.md). nodestep-oci's requests come from there, so
the daemon pins the namespaces of the process at the other end of the connection, through
the pidfd the kernel gives for it (SO_PEERPIDFD: the process that connected, never a pid
that may have been reused), and the runtime enters them AS THE USER: the monitor after
dropping to the user's uid (monitor.c --userns-fd/--mntns-fd), short runtime commands
through nsenter run as the user. The kernel then lets in only a user who owns the user
namespace, and the mount namespace only if that user namespace owns it: nobody gets more
than they had. The checks here refuse early with a clear reason (docs/security.md).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
_PIDFD_GET_MNT_NAMESPACE = 0xFF03  # _IO(PIDFS_IOCTL_MAGIC, 3), Linux 6.11
_PIDFD_GET_USER_NAMESPACE = 0xFF09  # _IO(PIDFS_IOCTL_MAGIC, 9)
_NS_GET_USERNS = 0xB701  # _IO(NSIO, 0x1): the user namespace owning a namespace
_NS_GET_OWNER_UID = 0xB704  # _IO(NSIO, 0x4): the uid owning a user namespace
NSENTER = "/usr/bin/nsenter"


class NamespaceRefused(Exception):
    """The caller's namespaces cannot be entered for it (the message says why)."""


@dataclass
class Namespaces:
    """Pinned fds of a user namespace and a mount namespace owned by it; closed by close()."""

    user: int
    mount: int

    def fds(self) -> tuple[int, int]:
        return (self.user, self.mount)

    def close(self) -> None:
        for fd in (self.user, self.mount):
            if fd >= 0:
                os.close(fd)
        self.user = self.mount = -1

    def nsenter_argv(self) -> list[str]:
        """What enters them before a command, as the user: nsenter with the pinned fds (pass them on)."""
        return [NSENTER, f"--user=/proc/self/fd/{self.user}", f"--mount=/proc/self/fd/{self.mount}",
                "--preserve-credentials", "--"]


def peer_pidfd(sock: socket.socket) -> int:
    """A pidfd of the process that connected `sock` (SO_PEERPIDFD)."""
    try:
        return struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError as e:
        raise NamespaceRefused(f"cannot pin the caller's process (SO_PEERPIDFD needs Linux 6.5): {e.strerror}") \
            from None


def _ns_of(pidfd: int, request: int, name: str) -> int:
    try:
        return fcntl.ioctl(pidfd, request, 0)
    except OSError as e:
        if e.errno not in (errno.ENOTTY, errno.EINVAL):
            raise NamespaceRefused(f"cannot open the caller's {name} namespace: {e.strerror}") from None
    # Before Linux 6.11: by pid, then proven to be the same process (the pidfd still alive).
    pid = _pidfd_pid(pidfd)
    try:
        fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise NamespaceRefused(f"cannot open the caller's {name} namespace: {e.strerror}") from None
    if _pidfd_pid(pidfd) != pid:
        os.close(fd)
        raise NamespaceRefused("the caller ended before its namespaces could be pinned")
    return fd


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])  # -1 once the process is gone
    raise NamespaceRefused("not a pidfd")


def owner_uid(userns: int) -> int:
    buf = fcntl.ioctl(userns, _NS_GET_OWNER_UID, b"\0\0\0\0")
    return struct.unpack("I", buf)[0]


def _same(fd: int, path_or_fd: str | int) -> bool:
    a = os.fstat(fd)
    b = os.stat(path_or_fd) if isinstance(path_or_fd, str) else os.fstat(path_or_fd)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def caller_namespaces(sock: socket.socket, uid: int) -> Namespaces | None:
    """The namespaces of the process connected on `sock`, checked for uid; None when it is
    in our own user namespace (the runtime then runs as any step's). Raises NamespaceRefused."""
    pidfd = peer_pidfd(sock)
    try:
        user = _ns_of(pidfd, _PIDFD_GET_USER_NAMESPACE, "user")
        try:
            if _same(user, "/proc/self/ns/user"):
                os.close(user)
                return None
            owner = owner_uid(user)
            if owner != uid:
                raise NamespaceRefused(f"the caller's user namespace belongs to uid {owner}, not to uid {uid}")
            mount = _ns_of(pidfd, _PIDFD_GET_MNT_NAMESPACE, "mnt")
            try:
                owning = fcntl.ioctl(mount, _NS_GET_USERNS, 0)
                try:
                    if not _same(owning, user):
                        raise NamespaceRefused("the caller's mount namespace is not owned by its user namespace")
                finally:
                    os.close(owning)
            except BaseException:
                os.close(mount)
                raise
        except BaseException:
            if user >= 0:
                os.close(user)
            raise
        return Namespaces(user, mount)
    finally:
        os.close(pidfd)
