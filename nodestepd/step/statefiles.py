"""Files in the state dir: root's own directories, replaced atomically, read without
following links, and moved aside when they cannot be read.

The step records (record.py), the kept results (results.py) and the next daemon-assigned
job id (daemon/jobids.py) are all written this way. Every function blocks (small writes
with fsync): call them through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import msgspec

from nodestepd.process.kernel import rename_exchange, rename_noreplace

T = TypeVar("T")

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW
SELINUX_ENFORCE = "/sys/fs/selinux/enforce"  # there when SELinux is enabled


@dataclass(frozen=True)
class LoadProblem:
    """A file a store could not load at start: moved to the quarantine, and why."""

    name: str  # the file's name in its directory
    reason: str


def open_private_dir(path: str) -> int:
    """The directory's fd, made 0700 if missing; refused (OSError) unless root alone may
    write it, since root writes and reads through it."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(path, DIR_FLAGS)
    st = os.fstat(fd)
    if os.geteuid() == 0 and (st.st_uid != 0 or st.st_mode & 0o022):
        os.close(fd)
        raise OSError(f"{path} must be owned by root and writable by root only")
    return fd


class Spare(NamedTuple):
    """A spare file or directory: its directory's fd, its name there, and an fd open on it
    (a file's O_WRONLY|O_APPEND, a directory's O_RDONLY)."""

    dir_fd: int
    name: str
    fd: int


class SpareFiles:
    """Empty files and directories made ahead of time in a directory of their own, taken by
    a launch instead of creating one while the launch waits, and renamed or linked into
    place: write_atomically's temporary file and the step's exit file (record.py), the
    spool's directories and task files (spool.py) when the spool is on the same filesystem.

    Creating a file or a directory allocates an inode, the slow part of a small write:
    0.2-0.6 ms each on ext4 on a loaded node (the benchmark's), against 0.03 ms for a
    rename. The owner makes them again with top_up() once a launch's tasks run. In a
    directory of their own: making them never holds the lock of a directory launches write
    in, and the steps dir keeps only records and exit files. Each is root's, 0600 (a
    directory 0700) and empty; the directory is emptied when the store opens it (what a
    daemon that died left), and at close(). Files are not used (take() finds none) when the
    directory is on another filesystem than `target_fd`'s, where no rename could move them;
    the spool takes directories and files only on the filesystem `device` names. A record
    replaced or removed comes back as a spare (recycle()) while the pool is short of
    `keep` files. Thread-safe: take(), take_dir() and recycle() from any thread;
    top_up() blocks (one file or directory created per missing spare).
    """

    def __init__(self, path: str, target_fd: int, keep: int = 12, keep_dirs: int = 6) -> None:
        self._fd = open_private_dir(path)
        for name in os.listdir(self._fd):  # a previous daemon's
            _remove(self._fd, name)
        device = os.fstat(self._fd).st_dev
        self._keep = keep if device == os.fstat(target_fd).st_dev else 0
        # The filesystem whose spool dirs may take spares (StepSpool.create); None under
        # SELinux, where a file keeps the label of the directory it was made in: the state
        # dir's, not the spool's that the runtime is allowed to read.
        self.device: int | None = None if os.path.exists(SELINUX_ENFORCE) else device
        self._keep_dirs = keep_dirs
        self._lock = threading.Lock()
        self._files: list[Spare] = []
        self._dirs: list[Spare] = []
        self._made = 0
        self._topped_up = False  # recycle() keeps files only once top_up() has run

    def take(self) -> Spare | None:
        """A spare file (its fd and name now the taker's to close and to move or unlink),
        or None when there is none left."""
        with self._lock:
            return self._files.pop() if self._files else None

    def recycle(self, dir_fd: int, name: str) -> bool:
        """Keep the file `name` in dir_fd (root's, emptied) as a spare instead of unlinking
        it: on ext4 without a journal, each inode allocated scans past every inode freed in
        the last 30 s (the kernel's recently_deleted check), so a launch that frees one
        slows every later one; this one is used again instead. Only into a pool that
        top_up() has filled before (a daemon that launched nothing keeps no spares) and
        while it holds fewer than `keep` files (launches took them). True when it was taken
        (it has left dir_fd); False when it was not (the pool is full, or it is not a plain
        file of root's on the spares' filesystem): the caller unlinks it as before. A file
        in the spares' own directory (write_atomically's exchange) keeps its name."""
        with self._lock:
            if self._fd < 0 or not self._topped_up or len(self._files) >= self._keep:
                return False
            spares_fd, moving = self._fd, dir_fd != self._fd
            if moving:
                self._made += 1
                spare = f"{os.getpid()}.{self._made}"
        if moving:
            try:
                rename_noreplace(dir_fd, name, spares_fd, spare)
            except OSError:  # another filesystem (EXDEV), or gone
                return False
            name = spare
        try:
            fd = os.open(name, os.O_WRONLY | os.O_APPEND | NOFOLLOW, dir_fd=spares_fd)
        except OSError:  # a link or a directory where a record was: not a spare
            _remove(spares_fd, name)
            return True
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            os.close(fd)
            _remove(spares_fd, name)
            return True
        try:
            os.ftruncate(fd, 0)
        except OSError:
            os.close(fd)
            _remove(spares_fd, name)
            return True
        with self._lock:
            if self._fd == spares_fd:
                self._files.append(Spare(spares_fd, name, fd))
                return True
        os.close(fd)  # closed meanwhile: close() has emptied the directory, or the next store does
        return True

    def take_dir(self) -> Spare | None:
        """A spare directory (its fd and name now the taker's to close and to move or
        rmdir), or None when there is none left."""
        with self._lock:
            return self._dirs.pop() if self._dirs else None

    def top_up(self) -> None:
        """Make spares until there are `keep` files and `keep_dirs` directories. One that
        cannot be made (a full disk) is not an error here: the taker then finds none and
        creates its own, which reports the error where it matters."""
        self._topped_up = True
        for pool, keep, make in ((self._files, self._keep, self._make_file), (self._dirs, self._keep_dirs,
                                                                             self._make_dir)):
            while True:
                with self._lock:
                    if len(pool) >= keep or self._fd < 0:
                        break
                    self._made += 1
                    name = f"{os.getpid()}.{self._made}"  # never a name a previous daemon left
                try:
                    fd = make(name)
                except OSError:
                    return
                with self._lock:
                    pool.append(Spare(self._fd, name, fd))

    def _make_file(self, name: str) -> int:
        return os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600, dir_fd=self._fd)

    def _make_dir(self, name: str) -> int:
        os.mkdir(name, 0o700, dir_fd=self._fd)
        try:
            return os.open(name, DIR_FLAGS, dir_fd=self._fd)
        except OSError:
            os.rmdir(name, dir_fd=self._fd)
            raise

    def close(self) -> None:
        """Remove the spares and close the directory (the store is closed)."""
        with self._lock:
            files, self._files = self._files, []
            dirs, self._dirs = self._dirs, []
            dir_fd, self._fd = self._fd, -1
        for spare in (*files, *dirs):
            os.close(spare.fd)
            _remove(dir_fd, spare.name)
        if dir_fd >= 0:
            os.close(dir_fd)


def _remove(dir_fd: int, name: str) -> None:
    """Unlink a file, or remove an empty directory, at name: whatever it is, if it can be."""
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=dir_fd)


def write_atomically(dir_fd: int, name: str, data: bytes, *, durable: bool = True,
                     spares: SpareFiles | None = None) -> None:
    """Replace `name` in the directory with `data`, durably; on failure (OSError: a full
    disk) the file before it stands and no temporary file is left.

    durable=False skips both fsyncs: the new file is what any process (a restarted daemon)
    reads at once, but a crash of the machine may leave the one before it, or none.
    spares: where a spare file (if one is left) is taken as the temporary file, instead
    of creating one (SpareFiles, on the directory's filesystem); the file it replaces is
    then swapped into the spare's place (RENAME_EXCHANGE, as atomic as a rename) and kept
    as a spare (SpareFiles.recycle) instead of being freed."""
    taken = spares.take() if spares is not None else None
    if taken is not None:
        tmp_dir_fd, tmp, fd = taken
    else:
        tmp_dir_fd, tmp = dir_fd, f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)  # O_EXCL below: nothing stale may be written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        exchanged = False
        if taken is not None:
            try:
                rename_exchange(tmp_dir_fd, tmp, dir_fd, name)
                exchanged = True
            except FileNotFoundError:  # nothing to replace: the first write of this name
                pass
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise  # EINVAL...: a filesystem without RENAME_EXCHANGE replaces as before
        if not exchanged:
            os.replace(tmp, name, src_dir_fd=tmp_dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=tmp_dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)
    if exchanged:
        assert spares is not None
        if not spares.recycle(tmp_dir_fd, tmp):
            _remove(tmp_dir_fd, tmp)


def is_unfinished_write(name: str) -> bool:
    """A temporary file write_atomically left when its daemon died: the file before it stands."""
    return name.startswith(".") and name.endswith(".tmp")


def read_file(dir_fd: int, name: str, limit: int = 1 << 20) -> bytes:
    """At most `limit` bytes of the file, never through a symlink."""
    fd = os.open(name, os.O_RDONLY | NOFOLLOW, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read(limit)


def move_to_quarantine(dir_fd: int, quarantine: str, name: str, *, prefix: str = "",
                       companions: Iterable[tuple[str, str]] = ()) -> str:
    """Move a file that cannot be used out of the way, keeping it for a human to read, as
    PREFIX+NAME.TIME.PID in `quarantine`; each companion (its name, a suffix) present goes
    beside it with the suffix added. Returns the file's new path."""
    os.makedirs(quarantine, mode=0o700, exist_ok=True)
    target = f"{prefix}{name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
    qfd = os.open(quarantine, DIR_FLAGS)
    try:
        os.replace(name, target, src_dir_fd=dir_fd, dst_dir_fd=qfd)
        for companion, suffix in companions:
            with contextlib.suppress(FileNotFoundError):
                os.replace(companion, target + suffix, src_dir_fd=dir_fd, dst_dir_fd=qfd)
        os.fsync(qfd)
    finally:
        os.close(qfd)
    os.fsync(dir_fd)
    return os.path.join(quarantine, target)


def decode_versioned(data: bytes, decoder: msgspec.json.Decoder[T], *, fmt: str, version: int, kind: str,
                     error: type[Exception]) -> T:
    """A state file of this format and version, decoded; anything else raises error with
    why (kind: what the file is called in the sentence: record, result)."""
    try:
        header = msgspec.json.decode(data, type=dict)
    except msgspec.DecodeError as e:
        raise error(f"not JSON ({str(e)[:200]}): truncated or overwritten") from None
    if header.get("format") != fmt:
        raise error(f"not a {fmt} file")
    if header.get("version") != version:
        raise error(f"{kind} version {header.get('version')!r}; this nodestepd reads version {version}")
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as e:
        raise error(f"invalid {kind}: {str(e)[:200]}") from None
