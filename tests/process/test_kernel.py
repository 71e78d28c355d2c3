"""kernel.py: prctl, peer credentials, the fd limit and sealed memfds, on the real kernel.

What changes the calling process for good (no_new_privs, subreaper, rlimits) runs in a
fresh Python process."""

from __future__ import annotations

import ast
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nodestepd.process import kernel
from nodestepd.process.kernel import Credentials, peer_credentials, sealed_memfd


def run_python(body: str) -> dict:
    """Run body in a fresh interpreter; the JSON it prints last."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- prctl ---------------------------------------------------------------------------


def test_no_new_privs_is_set_read_back_and_inherited():
    out = run_python("""
        import json, subprocess
        from nodestepd.process.kernel import no_new_privs, set_no_new_privs

        def in_proc(path):
            with open(path) as f:
                return next(line.split()[1] for line in f if line.startswith("NoNewPrivs:"))

        before = (no_new_privs(), in_proc("/proc/self/status"))
        set_no_new_privs()
        after = (no_new_privs(), in_proc("/proc/self/status"))
        child = subprocess.run(["grep", "^NoNewPrivs:", "/proc/self/status"], capture_output=True, text=True).stdout.split()[1]
        print(json.dumps({"before": before, "after": after, "child": child}))
    """)
    assert out == {"before": [False, "0"], "after": [True, "1"], "child": "1"}


def test_become_subreaper_makes_an_orphan_ours():
    out = run_python("""
        import json, os
        from nodestepd.process.kernel import become_subreaper

        become_subreaper()
        r, w = os.pipe()
        pids_r, pids_w = os.pipe()
        middle = os.fork()
        if middle == 0:  # leaves a grandchild behind and exits
            grandchild = os.fork()
            if grandchild == 0:
                os.read(r, 1)
                os._exit(7)
            os.write(pids_w, str(grandchild).encode())
            os._exit(0)
        os.waitpid(middle, 0)
        grandchild = int(os.read(pids_r, 100))
        with open(f"/proc/{grandchild}/status") as f:
            parent = int(next(line.split()[1] for line in f if line.startswith("PPid:")))
        os.write(w, b"x")
        _, status = os.waitpid(grandchild, 0)  # ours to reap
        print(json.dumps({"me": os.getpid(), "parent": parent, "status": os.waitstatus_to_exitcode(status)}))
    """)
    assert out["parent"] == out["me"]
    assert out["status"] == 7


def test_a_refused_prctl_raises_with_its_name_and_errno():
    with pytest.raises(OSError) as failure:
        kernel._prctl(kernel._Prctl.PR_SET_NO_NEW_PRIVS, 2)  # only 1 is valid; nothing is set
    assert failure.value.errno == errno.EINVAL
    assert str(failure.value) == f"[Errno {errno.EINVAL}] prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(errno.EINVAL)}"
    assert kernel.no_new_privs() is False


# ---- peer credentials -----------------------------------------------------------------


def test_peer_credentials_of_a_socketpair_are_ours():
    a, b = socket.socketpair()
    with a, b:
        assert peer_credentials(a) == peer_credentials(b) == (os.getpid(), os.getuid(), os.getgid())
        assert isinstance(peer_credentials(a), Credentials)
        assert peer_credentials(a).uid == os.getuid()


def test_peer_credentials_name_another_users_process(user, new_dir):
    path = new_dir("peer-") / "socket"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen(1)
        listener.settimeout(30)
        # setpriv execs: the pid we start is the client's.
        client = subprocess.Popen(user.command([
            "/usr/bin/python3", "-c",
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)", str(path)]))
        try:
            conn, _ = listener.accept()
            with conn:
                assert peer_credentials(conn) == (client.pid, user.uid, user.gid)
        finally:
            assert client.wait(30) == 0  # our close ended its recv


# ---- the fd limit ---------------------------------------------------------------------


def test_raise_fd_limit_raises_the_soft_limit_up_to_the_hard_one_and_never_lowers_it():
    out = run_python("""
        import json, resource
        from nodestepd.process.kernel import raise_fd_limit

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))
        results = []
        for wanted in (512, 100, 5000):
            results.append([raise_fd_limit(wanted), resource.getrlimit(resource.RLIMIT_NOFILE)])
        print(json.dumps(results))
    """)
    assert out == [
        [[512, 1024], [512, 1024]],  # raised as asked
        [[512, 1024], [512, 1024]],  # never lowered
        [[1024, 1024], [1024, 1024]],  # at most the hard limit
    ]


# ---- sealed memfds ---------------------------------------------------------------------


def test_a_sealed_memfd_holds_the_data_and_cannot_change():
    data = os.urandom(3 * 4096 + 17)
    fd = sealed_memfd("test-sealed", data)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) == (
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data) + 1, 0) == data
        assert not os.get_inheritable(fd)  # close-on-exec: no process we start gets it
        assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:test-sealed (deleted)"
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"y", 0)
        with pytest.raises(PermissionError):
            os.write(fd, b"more")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # F_SEAL_SEAL: no seal added, even one already set
    finally:
        os.close(fd)


def test_an_empty_sealed_memfd():
    fd = sealed_memfd("test-empty", b"")
    try:
        assert os.fstat(fd).st_size == 0
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_GROW
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


# ---- the rule: only nodestepd/process/ touches the kernel directly ---------------------------

PACKAGE = Path(kernel.__file__).resolve().parent.parent
KERNEL_MODULES = {"ctypes", "fcntl"}
KERNEL_NAMES = {"pidfd_open", "pidfd_send_signal", "prctl", "SO_PEERCRED"}


def kernel_uses(path: Path) -> list[str]:
    """Where a module imports ctypes or fcntl, or names a raw kernel call (code only: words in
    docstrings and comments do not count)."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]] + [alias.name for alias in node.names]
        elif isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Name):
            names = [node.id]
        uses += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}" for name in names
                 if name in KERNEL_MODULES | KERNEL_NAMES]
    return uses


def test_only_the_process_package_touches_the_kernel():
    outside = [p for p in PACKAGE.rglob("*.py") if PACKAGE / "process" not in p.parents]
    assert len(outside) > 20  # the scan really looks at the package
    assert [use for path in sorted(outside) for use in kernel_uses(path)] == []


def test_one_ctypes_loader_serves_every_prctl():
    found: dict[str, list[str]] = {"CDLL": [], "LoadLibrary": [], "prctl": []}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in found:
                found[node.attr].append(str(path.relative_to(PACKAGE)))
    assert found["CDLL"] + found["LoadLibrary"] == ["process/kernel.py"]
    assert found["prctl"] and set(found["prctl"]) == {"process/kernel.py"}
