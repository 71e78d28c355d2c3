"""rootspawn.spawn_as_root, with real processes: what the child gets (its fds renumbered, nothing
else open, `/`, default signal dispositions) and its errors. (That the GIL is let go is ctypes'
doing; the benchmark's fan-out shows what it is worth.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from nodestepd.process.rootspawn import spawn_as_root
from nodestepd.process.watch import CLAIMED

# The child's view of itself: its open fds, its working directory, what it reads from the fds in READ.
REPORT = ("import os\n"
          "def is_open(fd):\n"
          "    try: return bool(os.fstat(fd))\n"
          "    except OSError: return False\n"
          "print([fd for fd in range(1024) if is_open(fd)])\n"
          "print(os.getcwd())\n"
          "for fd in map(int, os.environ.get('READ', '').split()): print(os.read(fd, 100).decode())\n")


def run(fds, env=None, stdin=subprocess.DEVNULL, program=sys.executable, argv=(sys.executable, "-c", REPORT)):
    """spawn_as_root of `program` (the REPORT script); its output lines and the fd numbers it was given."""
    r, w = os.pipe()
    given = []

    def argv_for(numbers):
        given.extend(numbers)
        return list(argv)
    try:
        watch = spawn_as_root(program, argv_for, env=env or {}, stdin=stdin, stdout=w,
                              stderr=subprocess.DEVNULL, fds=fds, start_timeout=30)
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        out = f.read().splitlines()
    assert watch.wait_blocking(None) == 0
    watch.reap()
    return out, given


def test_the_child_gets_its_fds_at_3_and_on_in_order_and_nothing_else():
    leaked = os.open("/dev/null", os.O_RDONLY)  # not close-on-exec: closed all the same
    os.set_inheritable(leaked, True)
    pipes = [os.pipe() for _ in range(3)]
    try:
        for k, (_, w) in enumerate(pipes):
            os.write(w, f"pipe{k}".encode())
        fds = [pipes[2][0], pipes[0][0], pipes[1][0]]
        out, given = run(fds, env={"READ": "3 4 5"})
    finally:
        os.close(leaked)
        for r, w in pipes:
            os.close(r)
            os.close(w)
    assert given == [3, 4, 5]
    assert out[0] == "[0, 1, 2, 3, 4, 5]"
    assert out[1] == "/"
    assert out[2:] == ["pipe2", "pipe0", "pipe1"]


def test_sources_that_are_each_others_targets_are_not_overwritten():
    # Whatever the caller's fds are numbered, each reaches the child as asked: here the fds
    # at 3 and 4 (if free) given in the other order.
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    try:
        os.write(a_w, b"a")
        os.write(b_w, b"b")
        out, _ = run([b_r, a_r], env={"READ": "3 4"}, stdin=a_r)
    finally:
        for fd in (a_r, a_w, b_r, b_w):
            os.close(fd)
    assert out[2:] == ["b", "a"]


def test_a_program_that_cannot_be_executed_is_an_oserror_and_leaves_nothing():
    before = set(CLAIMED)
    with pytest.raises(FileNotFoundError):
        spawn_as_root("/nonexistent/program", lambda fds: ["program"], env={}, stdin=subprocess.DEVNULL,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert set(CLAIMED) == before
    with pytest.raises(ValueError, match="absolute"):
        spawn_as_root("true", lambda fds: ["true"], env={}, stdin=0, stdout=1, stderr=2)


def test_no_signal_is_ignored_or_blocked_in_the_child(shell_ignored_signals):
    # Python ignores SIGPIPE and SIGXFSZ, glibc's posix_spawn its internal signals (32, 33),
    # and a daemon started from a shell's background job or by nohup SIGINT, SIGQUIT or
    # SIGHUP: the child (a shell, which ignores nothing itself) must inherit none of it.
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in shell_ignored_signals)
    out, _ = run([], env={"PATH": "/usr/bin:/bin"}, program="/bin/sh",
                 argv=["sh", "-c", "grep -E '^Sig(Blk|Ign)' /proc/self/status"])
    assert " ".join(out).split() == ["SigBlk:", "0000000000000000", "SigIgn:", "0000000000000000"]
