"""Emptying a directory as root through the fd held on it: never following a symlink, never
crossing into another filesystem, whatever its owner does to it meanwhile."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from nodestepd.step.layout import join

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Frame:
    fd: int
    path: str
    pending: list[str]


def _list_dir(fd: int, path: str, errors: list[str]) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError as exc:
        errors.append(f"cannot list {path}: {exc.strerror}")
        return []


def clear_dir(top_fd: int, top_path: str, errors: list[str]) -> None:
    """Delete everything inside the directory open at top_fd, never following symlinks.

    Iterative rather than recursive: the user can nest directories deeper than Python's
    recursion limit. It still holds one fd per level being descended.
    """
    try:
        top_dev = os.fstat(top_fd).st_dev
    except OSError as exc:
        errors.append(f"cannot inspect {top_path}: {exc.strerror}")
        return
    stack = [_Frame(top_fd, top_path, _list_dir(top_fd, top_path, errors))]
    try:
        while stack:
            frame = stack[-1]
            if not frame.pending:
                stack.pop()
                if stack:
                    os.close(frame.fd)
                    _remove_entry(stack[-1], os.path.basename(frame.path), errors, rmdir=True)
                continue
            name = frame.pending.pop()
            path = join(frame.path, name)
            if _remove_entry(frame, name, errors, rmdir=False):
                continue
            # It is a directory (unlink said so): open it without following anything.
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=frame.fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    # Swapped for a file or symlink since the unlink attempt: try once more.
                    if not _remove_entry(frame, name, errors, rmdir=False):
                        errors.append(f"cannot remove {path}: it keeps changing")
                else:
                    errors.append(f"cannot open {path}: {exc.strerror}")
                continue
            try:
                dev = os.fstat(fd).st_dev
            except OSError as exc:
                os.close(fd)
                errors.append(f"cannot inspect {path}: {exc.strerror}")
                continue
            if dev != top_dev:
                # A mount point (e.g. a user's FUSE mount): never descend into another fs.
                os.close(fd)
                errors.append(f"{path} is a mount point, which was left alone")
                continue
            stack.append(_Frame(fd, path, _list_dir(fd, path, errors)))
    finally:
        # Only reached with frames left when something unexpected was raised.
        for frame in stack[1:]:
            os.close(frame.fd)


def _remove_entry(frame: _Frame, name: str, errors: list[str], *, rmdir: bool) -> bool:
    """unlink (or rmdir) name in frame's dir; False only when it turned out to be a directory."""
    path = join(frame.path, name)
    try:
        if rmdir:
            os.rmdir(name, dir_fd=frame.fd)
        else:
            os.unlink(name, dir_fd=frame.fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Linux answers unlink() of a directory with EISDIR, POSIX allows EPERM.
        if not rmdir and exc.errno in (errno.EISDIR, errno.EPERM):
            try:
                if stat.S_ISDIR(os.lstat(name, dir_fd=frame.fd).st_mode):
                    return False
            except OSError:
                pass
        errors.append(f"cannot remove {path}: {exc.strerror}")
    return True
