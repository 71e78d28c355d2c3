"""asuser.py: files opened by a helper running as the user, handed back as fds."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nodestepd.process.asuser import open_as, read_regular
from nodestepd.process.identity import Identity
from nodestepd.process.watch import children


@pytest.fixture
def identity(user) -> Identity:
    return Identity.for_uid(user.uid)


@pytest.fixture
def home(user_dir) -> Path:
    """A directory only the user may enter."""
    return user_dir("asuser-", 0o700)


def test_reads_and_writes_with_the_users_rights(identity, user, home, workdir):
    mine = home / "config.json"
    mine.write_text('{"mine": true}')
    os.chown(mine, user.uid, user.gid)
    mine.chmod(0o600)
    roots = workdir / "root-only.json"
    roots.write_text("{}")
    roots.chmod(0o600)
    opened = open_as(identity, [str(mine), str(roots)], [str(home / "out.log"), "/etc/shadow"], timeout=30)
    assert [(o.path, o.fd is not None, o.error) for o in opened] == [
        (str(mine), True, None), (str(roots), False, "Permission denied"),
        (str(home / "out.log"), True, None), ("/etc/shadow", False, "Permission denied"),
    ]
    assert read_regular(opened[0], 1000) == ('{"mine": true}', None)
    os.write(opened[2].fd, b"hello")
    os.close(opened[2].fd)
    st = (home / "out.log").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o644)
    assert (home / "out.log").read_bytes() == b"hello"
    roots.unlink()


def test_a_fifo_or_a_directory_is_not_read_and_does_not_block(identity, user, home):
    fifo = home / "config.json"
    os.mkfifo(fifo)
    os.chown(fifo, user.uid, user.gid)
    opened = open_as(identity, [str(fifo), str(home)], [], timeout=30)
    assert [read_regular(o, 1000) for o in opened] == [(None, "not a regular file")] * 2


def test_size_limit_and_utf8(identity, user, home):
    big, latin = home / "big", home / "latin"
    big.write_bytes(b"x" * 2000)
    latin.write_bytes(b"caf\xe9")
    for p in (big, latin):
        os.chown(p, user.uid, user.gid)
    opened = open_as(identity, [str(big), str(latin)], [], timeout=30)
    assert read_regular(opened[0], 1000) == (None, "larger than 1000 bytes")
    assert read_regular(opened[1], 1000) == (None, "not UTF-8 (unexpected end of data at byte 3)")


def test_the_helper_leaves_no_process_and_no_fd_behind(identity, user, home):
    """The helper is started and reaped through spawn: no child, zombie, pidfd or socket of it stays."""
    mine = home / "in"
    mine.write_text("x")
    os.chown(mine, user.uid, user.gid)
    kids, fds = set(children(os.getpid())), set(os.listdir("/proc/self/fd"))
    opened = open_as(identity, [str(mine)], [str(home / "out")], timeout=30)
    assert read_regular(opened[0], 100) == ("x", None)  # closes its fd
    os.close(opened[1].fd)
    assert set(children(os.getpid())) == kids
    assert set(os.listdir("/proc/self/fd")) == fds
