"""Opening files with a user's rights, for an operator's launch on that user's behalf.

The daemon is root and never opens a path a user controls. When an operator launches a
step as another user (`run --user`), the bundle's config.json and the --output/--error
files must be opened with the *step user's* rights, not the operator's (root's): a user
could point config.json or an output path at a root-only file. So a short-lived helper
process (`python -I -m nodestepd.process.asuser`) runs as the user (uid, gid, groups), opens each
path and passes the open fds back over a socketpair (SCM_RIGHTS). Access is checked by
the kernel at open time, as the user; reading an fd the user opened gives root nothing
the user could not read.

Files to read are opened O_NONBLOCK and must be regular files, so a FIFO cannot stall
the daemon; the helper as a whole is bounded by a timeout.
"""

from __future__ import annotations

import array
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass

from nodestepd.process.identity import Identity
from nodestepd.process.kernel import user_fd_limit
from nodestepd.process.spawn import RUNTIME_UMASK, spawn

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
_MAX_REPLY = 64 * 1024


@dataclass
class Opened:
    """One path's outcome: an fd (owned by the caller) or the reason it could not be opened."""

    path: str
    fd: int | None
    error: str | None


def open_as(identity: Identity, reads: list[str], writes: list[str], *, timeout: float) -> list[Opened]:
    """Open `reads` for reading and `writes` for writing (created 0666 & ~022, truncated) as the user.

    Blocking: call through spawn.off_loop (it waits for a process the user can stop, for
    up to `timeout` seconds). Returns one Opened per path, reads first.
    Raises OSError when the helper itself cannot run or does not answer in time.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        argv = [sys.executable, "-I", "-m", "nodestepd.process.asuser"]
        argv += [a for path in reads for a in ("--read", path)]
        argv += [a for path in writes for a in ("--write", path)]
        argv += ["--nofile", "%d:%d" % user_fd_limit()]
        with theirs:  # the helper holds its end alone: its exit is our end-of-file
            helper = spawn(
                argv + ["--channel", str(theirs.fileno())],
                identity=identity,
                cwd="/",
                env={"LANG": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                process_group=False,  # it starts nothing: signalling it alone is enough
                pass_fds=(theirs.fileno(),),
                umask=RUNTIME_UMASK,
                start_timeout=timeout,  # the user can stop it before its exec
                what=f"the helper opening files as {identity.user}",
            )
        try:
            ours.settimeout(timeout)
            data, fds = _receive_all(ours)
        except TimeoutError:
            helper.send_signal(signal.SIGKILL)
            raise OSError(f"opening files as {identity.user} timed out after {timeout:g} s") from None
        finally:
            status = helper.wait_blocking(timeout)
            if status is None:
                helper.send_signal(signal.SIGKILL)
                status = helper.wait_blocking(None)
            helper.reap()
    finally:
        ours.close()
    try:
        outcomes = json.loads(data) if data else None
        if not isinstance(outcomes, list) or len(outcomes) != len(reads) + len(writes):
            raise OSError(f"the helper opening files as {identity.user} failed (exit status {status})")
        results, used = [], 0
        for path, outcome in zip(reads + writes, outcomes):
            if outcome is None:
                results.append(Opened(path, fds[used], None))
                used += 1
            else:
                results.append(Opened(path, None, str(outcome)))
        if used != len(fds):
            raise OSError(f"the helper opening files as {identity.user} sent {len(fds)} fds for {used} files")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return results


def read_regular(opened: Opened, limit: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not) from an fd open_as gave for reading. Closes the fd."""
    assert opened.fd is not None
    try:
        st = os.fstat(opened.fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        data = os.read(opened.fd, limit + 1)
        while len(data) <= limit:
            more = os.read(opened.fd, limit + 1 - len(data))
            if not more:
                break
            data += more
    except OSError as e:
        return None, e.strerror
    finally:
        os.close(opened.fd)
        opened.fd = None
    if len(data) > limit:
        return None, f"larger than {limit} bytes"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start})"


def _receive_all(sock: socket.socket) -> tuple[bytes, list[int]]:
    data = bytearray()
    fds: list[int] = []
    try:
        while True:
            chunk, ancdata, flags, _ = sock.recvmsg(_MAX_REPLY, socket.CMSG_SPACE(64 * 4), socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    fds.extend(received)
            if not chunk:
                return bytes(data), fds
            data += chunk
            if len(data) > _MAX_REPLY or flags & socket.MSG_CTRUNC:
                raise OSError("the helper's reply is too large")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


# ---- the helper process, running as the user ------------------------------------------


def _helper(argv: list[str]) -> int:
    reads, writes, channel = [], [], None
    i = 0
    while i + 1 < len(argv):
        option, value = argv[i], argv[i + 1]
        if option == "--read":
            reads.append(value)
        elif option == "--write":
            writes.append(value)
        elif option == "--channel":
            channel = int(value)
        elif option == "--nofile":  # the users' limit, not the daemon's (we are the user already)
            soft, hard = map(int, value.split(":"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        else:
            return 2
        i += 2
    if channel is None or i != len(argv):
        return 2
    outcomes: list[str | None] = []
    fds: list[int] = []
    for path, flags in [(p, _READ_FLAGS) for p in reads] + [(p, _WRITE_FLAGS) for p in writes]:
        try:
            fd = os.open(path, flags, 0o666)
        except OSError as e:
            outcomes.append(e.strerror or str(e))
            continue
        if flags == _WRITE_FLAGS:
            os.set_blocking(fd, True)  # O_NONBLOCK only kept open() from waiting for a FIFO's reader
        fds.append(fd)
        outcomes.append(None)
    with socket.socket(fileno=channel) as sock:
        message = json.dumps(outcomes).encode()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sent = sock.sendmsg([message], ancillary)
        if sent < len(message):
            sock.sendall(message[sent:])
    return 0


if __name__ == "__main__":
    sys.exit(_helper(sys.argv[1:]))
