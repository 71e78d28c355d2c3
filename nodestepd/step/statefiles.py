"""Files in the state dir: root's own directories, replaced atomically, read without
following links, and moved aside when they cannot be read.

The step records (record.py), the kept results (results.py) and the next daemon-assigned
job id (daemon/jobids.py) are all written this way. Every function blocks (small writes
with fsync): call them through asyncio.to_thread.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import msgspec

T = TypeVar("T")

NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW


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


def write_atomically(dir_fd: int, name: str, data: bytes, *, durable: bool = True) -> None:
    """Replace `name` in the directory with `data`, durably; on failure (OSError: a full
    disk) the file before it stands and no temporary file is left.

    durable=False skips both fsyncs: the new file is what any process (a restarted daemon)
    reads at once, but a crash of the machine may leave the one before it, or none."""
    tmp = f".{name}.tmp"
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
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    if durable:
        os.fsync(dir_fd)


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
