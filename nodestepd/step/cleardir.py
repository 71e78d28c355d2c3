"""Emptying a directory as root through the fd held on it: never following a symlink, never
crossing into another filesystem, whatever its owner does to it meanwhile, and with a
bounded number of fds however deep the tree is."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from nodestepd.step.layout import join

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# How often the walk starts again from the top when the owner moved a directory it was in.
# Each restart is caused by a rename of the user's, so this bounds the work they can cause.
MAX_RESTARTS = 16


@dataclass
class _Level:
    name: str  # its name in the level above ("" for the top)
    path: str  # for messages only: never resolved by name
    dev: int
    ino: int
    pending: list[str]  # entries still to remove


def _list_dir(fd: int, path: str, errors: list[str]) -> list[str]:
    try:
        return os.listdir(fd)
    except OSError as exc:
        errors.append(f"cannot list {path}: {exc.strerror}")
        return []


def clear_dir(top_fd: int, top_path: str, errors: list[str]) -> None:
    """Delete everything inside the directory open at top_fd, never following symlinks.

    Iterative, and holding one fd besides top_fd (two for a moment while it moves between
    levels): going down, the parent's fd is closed once the child's is open; going up, the
    parent is reopened through the child's '..' and accepted only if it is the very
    directory (device and inode) that was left, else the walk starts again from the top.
    A tree nested tens of thousands deep is removed within any fd limit.
    """
    try:
        st = os.fstat(top_fd)
    except OSError as exc:
        errors.append(f"cannot inspect {top_path}: {exc.strerror}")
        return
    top = _Level("", top_path, st.st_dev, st.st_ino, [])
    levels: list[_Level] = []
    fd = top_fd  # the fd of levels[-1]: ours to close unless it is top_fd
    restarts = 0

    def restart() -> None:
        nonlocal fd
        if fd != top_fd:
            os.close(fd)
        fd = top_fd
        top.pending = _list_dir(top_fd, top_path, errors)
        levels[:] = [top]

    restart()
    try:
        while levels:
            level = levels[-1]
            if not level.pending:
                if len(levels) == 1:
                    break
                parent = levels[-2]
                parent_fd = top_fd if len(levels) == 2 else _reopen_parent(fd, parent)
                if parent_fd is None:
                    restarts += 1
                    if restarts > MAX_RESTARTS:
                        errors.append(f"cannot empty {top_path}: its directories keep being moved")
                        return
                    restart()
                    continue
                if fd != top_fd:
                    os.close(fd)
                fd = parent_fd
                levels.pop()
                _remove_entry(fd, parent.path, level.name, errors, rmdir=True)
                continue
            name = level.pending.pop()
            path = join(level.path, name)
            if _remove_entry(fd, level.path, name, errors, rmdir=False):
                continue
            # It is a directory (unlink said so): open it without following anything.
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    # Swapped for a file or symlink since the unlink attempt: try once more.
                    if not _remove_entry(fd, level.path, name, errors, rmdir=False):
                        errors.append(f"cannot remove {path}: it keeps changing")
                else:
                    errors.append(f"cannot open {path}: {exc.strerror}")
                continue
            try:
                cst = os.fstat(child)
            except OSError as exc:
                os.close(child)
                errors.append(f"cannot inspect {path}: {exc.strerror}")
                continue
            if cst.st_dev != top.dev:
                # A mount point (e.g. a user's FUSE mount): never descend into another fs.
                os.close(child)
                errors.append(f"{path} is a mount point, which was left alone")
                continue
            if fd != top_fd:
                os.close(fd)
            fd = child
            levels.append(_Level(name, path, cst.st_dev, cst.st_ino, _list_dir(child, path, errors)))
    finally:
        if fd != top_fd:
            os.close(fd)


def _reopen_parent(fd: int, parent: _Level) -> int | None:
    """An fd on '..' of the directory open at fd, if that is still `parent`; else None."""
    try:
        up = os.open("..", _DIR_FLAGS, dir_fd=fd)
    except OSError:
        return None
    try:
        st = os.fstat(up)
    except OSError:
        os.close(up)
        return None
    if (st.st_dev, st.st_ino) != (parent.dev, parent.ino):
        # Its owner moved it elsewhere while we were inside: '..' is not where we came from.
        os.close(up)
        return None
    return up


def _remove_entry(dir_fd: int, dir_path: str, name: str, errors: list[str], *, rmdir: bool) -> bool:
    """unlink (or rmdir) name in the directory at dir_fd; False only when it turned out to be a directory."""
    path = join(dir_path, name)
    try:
        if rmdir:
            os.rmdir(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # Linux answers unlink() of a directory with EISDIR, POSIX allows EPERM.
        if not rmdir and exc.errno in (errno.EISDIR, errno.EPERM):
            try:
                if stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
                    return False
            except OSError:
                pass
        errors.append(f"cannot remove {path}: {exc.strerror}")
    return True
