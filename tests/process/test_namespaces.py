"""namespaces.py: a connected caller's user and mount namespaces, pinned through its pidfd
and checked, with real processes in real namespaces (as root, the test users as callers)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from nodestepd.process.namespaces import NamespaceRefused, caller_namespaces, owner_uid

# Connects to argv[1], says so, and waits for the line that ends it (stdlib only: run by
# /usr/bin/python3, which any user may exec).
CONNECT = "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\nprint('connected', flush=True)\nsys.stdin.readline()\n"

ENTER_AS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid, uid, gid = map(int, sys.argv[1:4])
for name, flag in (("user", 0x10000000), ("mnt", 0x00020000)):
    fd = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY)
    if libc.setns(fd, flag) != 0:
        raise OSError(ctypes.get_errno(), f"setns {name}")
os.setgroups([])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
os.execv(sys.argv[4], sys.argv[4:])
"""


@pytest.fixture
def listener(new_dir):
    path = new_dir("ns-") / "sock"  # reachable by the test users (pytest's tmp dirs are root's)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    path.chmod(0o777)
    s.listen(4)
    yield s, str(path)
    s.close()


def connected(listener, argv: list[str]) -> tuple[subprocess.Popen, socket.socket]:
    s, path = listener
    proc = subprocess.Popen([*argv, "/usr/bin/python3", "-c", CONNECT, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, cwd="/")
    assert proc.stdout.readline() == b"connected\n"
    conn, _ = s.accept()
    return proc, conn


def ns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def fd_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def end(proc: subprocess.Popen, conn: socket.socket) -> None:
    conn.close()
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_caller_in_our_user_namespace_enters_nothing(listener, user):
    proc, conn = connected(listener, user.command([]))
    try:
        assert caller_namespaces(conn, user.uid) is None
    finally:
        end(proc, conn)


def test_the_users_own_namespaces_are_pinned(listener, user):
    """As podman's: a user namespace the user made (uid 0 inside) and a mount namespace of it."""
    proc, conn = connected(listener, user.command(["unshare", "--user", "--map-root-user", "--mount"]))
    try:
        namespaces = caller_namespaces(conn, user.uid)
        assert namespaces is not None
        try:
            assert fd_id(namespaces.user) == ns_id(f"/proc/{proc.pid}/ns/user")
            assert fd_id(namespaces.mount) == ns_id(f"/proc/{proc.pid}/ns/mnt")
            assert fd_id(namespaces.user) != ns_id("/proc/self/ns/user")
            assert owner_uid(namespaces.user) == user.uid
            argv = namespaces.nsenter_argv()
            assert argv[0] == "/usr/bin/nsenter" and f"--user=/proc/self/fd/{namespaces.user}" in argv
        finally:
            namespaces.close()
        assert (namespaces.user, namespaces.mount) == (-1, -1)
    finally:
        end(proc, conn)


def test_namespaces_of_another_uid_are_refused(listener, user, other_user):
    """The connection's uid is the kernel's; a namespace owned by anyone else is refused."""
    proc, conn = connected(listener, user.command(["unshare", "--user", "--map-root-user", "--mount"]))
    try:
        with pytest.raises(NamespaceRefused, match=f"belongs to uid {user.uid}, not to uid {other_user.uid}"):
            caller_namespaces(conn, other_user.uid)
    finally:
        end(proc, conn)


def test_a_user_namespace_root_made_is_refused(listener, user):
    """Root maps the user's uid into a namespace of root's and runs the user inside: the
    caller is the user (SO_PEERCRED), the namespace is not theirs."""
    holder = subprocess.Popen(["unshare", "--user", "--mount", "sh", "-c", "echo ready; exec sleep 1000"],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        Path(f"/proc/{holder.pid}/uid_map").write_text(f"{user.uid} {user.uid} 1\n")
        Path(f"/proc/{holder.pid}/gid_map").write_text(f"{user.gid} {user.gid} 1\n")
        enter = ["/usr/bin/python3", "-c", ENTER_AS, str(holder.pid), str(user.uid), str(user.gid)]
        proc, conn = connected(listener, enter)
        try:
            with pytest.raises(NamespaceRefused, match=f"belongs to uid 0, not to uid {user.uid}"):
                caller_namespaces(conn, user.uid)
        finally:
            end(proc, conn)
    finally:
        holder.kill()
        holder.wait()
