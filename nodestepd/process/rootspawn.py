"""Starting a program as ourselves (root) through glibc's posix_spawn, called through ctypes.

Python 3.11 holds the GIL while it makes a child: subprocess's fork_exec and
os.posix_spawn both keep it until the child has exec'ed (or failed), with vfork as with
fork. Each task's nodestepd-monitor is started that way, once per launch: profiled with
16 launches at a time, that hold was 40-47 % of all the time any thread of the daemon
held the GIL (py-spy --gil), the event loop waiting behind it. A foreign call through
ctypes lets go of the GIL, and glibc's posix_spawn (clone with CLONE_VM|CLONE_VFORK, on a
stack of its own) returns once the child has exec'ed or failed, with the exec's errno.

What the child gets: stdin, stdout and stderr, the fds asked for (at 3, 4, ... in order:
the caller's argv names them by their new numbers) and nothing else (every fd from 3 +
their count on is closed, close-on-exec or not), `/` as its working directory, every
signal at its default disposition (more than subprocess's restore_signals, which resets
only SIGPIPE and SIGXFSZ), no signal blocked, our umask, session and process group (the
monitor leaves them itself).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Callable, Mapping, Sequence

from nodestepd.process.kernel import LIBC, LIBC_HOLDING
from nodestepd.process.spawn import StartDeadline, kill_unstarted, start_timed_out
from nodestepd.process.watch import ProcessWatch, spawning

_libc = LIBC  # posix_spawn: the GIL let go for the call
# Everything else is quick and never blocks: called holding the GIL, so that the spawning
# thread does not queue for it again after each of a dozen calls.
_quick = LIBC_HOLDING

# Opaque glibc structures, given more room than they take (x86-64: 80, 336 and 128 bytes);
# a sigset_t is a bit per signal, signal n at bit n - 1 of an array of unsigned longs.
_FILE_ACTIONS_SIZE = 512
_ATTR_SIZE = 1024
_SIGSET_SIZE = 256

_POSIX_SPAWN_SETSIGDEF = 0x04  # glibc's spawn.h
_POSIX_SPAWN_SETSIGMASK = 0x08

_c = ctypes.c_int
_p = ctypes.c_void_p
_libc.posix_spawn.argtypes = [ctypes.POINTER(_c), ctypes.c_char_p, _p, _p, _p, _p]
_libc.posix_spawn.restype = _c
for _name, _args in (
    ("posix_spawn_file_actions_init", [_p]),
    ("posix_spawn_file_actions_destroy", [_p]),
    ("posix_spawn_file_actions_adddup2", [_p, _c, _c]),
    ("posix_spawn_file_actions_addopen", [_p, _c, ctypes.c_char_p, _c, ctypes.c_uint]),
    ("posix_spawn_file_actions_addchdir_np", [_p, ctypes.c_char_p]),
    ("posix_spawn_file_actions_addclosefrom_np", [_p, _c]),
    ("posix_spawnattr_init", [_p]),
    ("posix_spawnattr_destroy", [_p]),
    ("posix_spawnattr_setflags", [_p, ctypes.c_short]),
    ("posix_spawnattr_setsigdefault", [_p, _p]),
    ("posix_spawnattr_setsigmask", [_p, _p]),
    ("sigemptyset", [_p]),
):
    _f = getattr(_quick, _name)
    _f.argtypes = _args
    _f.restype = _c

# Every signal at its default in the child: Python ignores SIGPIPE and SIGXFSZ, whatever
# started the daemon may have left others ignored (a shell's background job SIGINT and
# SIGQUIT, nohup SIGHUP), and glibc's posix_spawn leaves its own internal signals (32 and
# 33, below SIGRTMIN: thread cancellation, setxid) ignored unless they are named here.
# (SIGKILL and SIGSTOP cannot be changed; glibc's child skips them.)
_RESTORED = tuple(range(1, signal.NSIG))


def _attributes() -> ctypes.Array:
    """The posix_spawnattr_t every spawn uses (posix_spawn only reads it): the signals of
    _RESTORED at their defaults, none blocked. Made once; never destroyed."""
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    _check(_quick.posix_spawnattr_init(attr), "posix_spawnattr_init")
    restored = ctypes.create_string_buffer(_SIGSET_SIZE)
    none = ctypes.create_string_buffer(_SIGSET_SIZE)
    _quick.sigemptyset(restored)
    _quick.sigemptyset(none)
    words = (ctypes.c_ulong * (_SIGSET_SIZE // ctypes.sizeof(ctypes.c_ulong))).from_buffer(restored)
    bits = 8 * ctypes.sizeof(ctypes.c_ulong)
    for signum in _RESTORED:  # set by hand: glibc's sigaddset refuses its internal signals
        words[(signum - 1) // bits] |= 1 << ((signum - 1) % bits)
    _check(_quick.posix_spawnattr_setsigdefault(attr, restored), "posix_spawnattr_setsigdefault")
    _check(_quick.posix_spawnattr_setsigmask(attr, none), "posix_spawnattr_setsigmask")
    _check(_quick.posix_spawnattr_setflags(attr, _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK),
           "posix_spawnattr_setflags")
    return attr


def _check(err: int, what: str) -> None:
    """posix_spawn and its helpers return an errno (0: done)."""
    if err:
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _cstrings(items: Sequence[bytes]) -> ctypes.Array:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


_ATTR = _attributes()


def spawn_as_root(program: str, argv_for: Callable[[list[int]], list[str]], *, env: Mapping[str, str],
                  stdin: int, stdout: int, stderr: int, fds: Sequence[int] = (),
                  start_timeout: float | None = None, what: str = "the program") -> ProcessWatch:
    """Start `program` (an absolute path) as we are, without holding the GIL, and watch it
    by pidfd. Blocking (until the child's exec): call it off the event loop.

    fds: the fds the child gets besides stdin/stdout/stderr (fds, or subprocess.DEVNULL),
    at 3, 4, ... in this order; argv_for(those numbers) returns the argv (argv[0]
    included). env: exactly the child's environment. start_timeout: seconds it may take
    to reach its exec (None: no limit), then it is killed and the OSError is
    start_timed_out(what, start_timeout). Raises OSError when it cannot be started (the
    errno of the exec, or of the step before it); nothing is left behind.
    """
    if not os.path.isabs(program):
        raise ValueError(f"{program}: not an absolute path")
    targets = list(range(3, 3 + len(fds)))
    argv = [os.fsencode(a) for a in argv_for(targets)]
    envp = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
    sources = [stdin, stdout, stderr, *fds]
    # Every source goes first to a number above all of them and above every target, then to
    # its target: a source that is another's target is never overwritten before it is moved.
    park = max([2 + len(fds), *[s for s in sources if s >= 0]]) + 1
    actions = ctypes.create_string_buffer(_FILE_ACTIONS_SIZE)
    _check(_quick.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
    try:
        for k, source in enumerate(sources):
            if source == subprocess.DEVNULL:
                _check(_quick.posix_spawn_file_actions_addopen(actions, park + k, b"/dev/null", os.O_RDWR, 0),
                       "posix_spawn_file_actions_addopen")
            elif source < 0:
                raise ValueError(f"fd {source} cannot be given to {what}")
            else:
                _check(_quick.posix_spawn_file_actions_adddup2(actions, source, park + k),
                       "posix_spawn_file_actions_adddup2")
        for k, target in enumerate([0, 1, 2, *targets]):
            _check(_quick.posix_spawn_file_actions_adddup2(actions, park + k, target),
                   "posix_spawn_file_actions_adddup2")  # dup2 clears close-on-exec on the target
        _check(_quick.posix_spawn_file_actions_addclosefrom_np(actions, 3 + len(fds)),
               "posix_spawn_file_actions_addclosefrom_np")
        _check(_quick.posix_spawn_file_actions_addchdir_np(actions, b"/"), "posix_spawn_file_actions_addchdir_np")
        c_argv, c_envp = _cstrings(argv), _cstrings(envp)
        pid = ctypes.c_int(0)
        with spawning() as tid:  # until the pidfd is ours, the reaper must not take the new child for an orphan
            deadline = None if start_timeout is None else StartDeadline(tid, start_timeout)
            try:
                # The GIL is let go for the call (ctypes): the event loop runs on meanwhile.
                err = _libc.posix_spawn(ctypes.byref(pid), os.fsencode(program), actions, _ATTR, c_argv, c_envp)
            finally:
                killed = deadline is not None and deadline.cancel()
            if err:  # glibc has reaped the child
                if killed:
                    assert start_timeout is not None
                    raise start_timed_out(what, start_timeout)
                raise OSError(err, os.strerror(err), program)
            try:
                watch = ProcessWatch.open(pid.value)  # our child: nobody else can reap it, the pid is still ours
            except BaseException:
                os.kill(pid.value, signal.SIGKILL)  # no pidfd (EMFILE...): it would run and end unwatched
                os.waitpid(pid.value, 0)
                raise
    finally:
        _quick.posix_spawn_file_actions_destroy(actions)
    if killed:  # (it may have exec'ed just before the kill: it counts as not started all the same)
        assert start_timeout is not None
        raise kill_unstarted(watch, what, start_timeout)
    return watch
