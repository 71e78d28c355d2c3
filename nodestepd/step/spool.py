"""Per-step spool directories: creating, reopening and removing them safely as root.

The daemon runs as root, but the spool tree ends up owned by the step's user, and
ContainerPath may put it anywhere. So every path is walked one component at a time from
an open directory fd with O_NOFOLLOW, and nothing here ever resolves a multi-component
path name as root.

The parents of the step dir are trusted or refused: every existing one must be root's
and not writable by others (config/trust.py, the rule the daemon applies to its own
dirs), the ones created here stay root's (0755), and only the step dir and what is
inside it are handed to the user. Otherwise whoever can write a parent could rename the
step dir away once it is handed over and put a link to a tree of their own in its place,
and the step's runtime, which opens the spool dirs by name (%b, %m), would run their
config.json as the step's user.

Ownership story: ``StepSpool.create`` returns an object that holds open fds for the
directories it created. The caller then either calls ``remove()`` (normal cleanup; it
implies ``close()``) or ``close()`` alone (DisableCleanup: leave the tree in place).
Used as a context manager it only closes on exit; it never removes implicitly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from dataclasses import dataclass
from types import TracebackType

from nodestepd.config.trust import untrusted_dir_reason
from nodestepd.process.kernel import rename_noreplace
from nodestepd.step.cleardir import clear_dir
from nodestepd.step.layout import SpoolError, SpoolLayout, components, join
from nodestepd.step.statefiles import Spare, SpareFiles

__all__ = ["StepSpool"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PRIVATE_DIR_MODE = 0o700
# A parent the daemon creates: root's, traversable by the user whose step dir is inside.
_PARENT_DIR_MODE = 0o755


@dataclass
class _Dir:
    fd: int
    path: str  # absolute, for messages only: never resolved by name
    parent: _Dir | None  # None only for the anchor (deepest pre-existing ancestor)
    created: bool  # made by this StepSpool, so handed over and removed by it

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _describe_open_error(exc: OSError, parent: _Dir, name: str, path: str) -> SpoolError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        # O_DIRECTORY|O_NOFOLLOW reports a symlink as ENOTDIR on Linux; lstat tells them apart.
        try:
            st = os.lstat(name, dir_fd=parent.fd)
        except OSError:
            st = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            return SpoolError(f"{path} is a symbolic link; refusing to follow it")
        return SpoolError(f"{path} is not a directory")
    return SpoolError(f"cannot open {path}: {exc.strerror}")


def _open_dir(parent: _Dir, name: str, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
    except OSError as exc:
        raise _describe_open_error(exc, parent, name, path) from exc


def _check_trusted(d: _Dir, step_dir: str, *, last: bool) -> None:
    """Refuse an existing parent of the step dir that someone other than root could change."""
    st = os.fstat(d.fd)
    reason = untrusted_dir_reason(d.path, st.st_uid, st.st_mode, last=last)
    if reason is not None:
        raise SpoolError(
            f"{reason}, so the spool dir {step_dir} cannot be made safely under it: every existing parent of a"
            " step spool dir must be root's and not writable by others (see ContainerPath in oci-conf.md)"
        )


def _make_private_dir(parent: _Dir, name: str, path: str, mode: int = _PRIVATE_DIR_MODE,
                      spares: SpareFiles | None = None) -> _Dir:
    """mkdir name (root-owned, `mode`) and open it; FileExistsError when it already exists.
    spares: a spare directory (root's, 0700, empty) is moved there instead, if one is left
    (never over anything already there: RENAME_NOREPLACE)."""
    spare = spares.take_dir() if spares is not None else None
    try:
        if spare is None:
            os.mkdir(name, mode & 0o700, dir_fd=parent.fd)
        else:
            _put_spare(spare, parent, name, os.rmdir)
    except FileExistsError:
        raise
    except OSError as exc:
        raise SpoolError(f"cannot create {path}: {exc.strerror}") from exc
    new = _Dir(fd=-1, path=path, parent=parent, created=True)
    ours = True
    try:
        new.fd = _open_dir(parent, name, path)
        st = os.fstat(new.fd)
        # Between mkdir and open, someone able to write the parent could have swapped in
        # a directory of their own; only a directory we own can be ours (and only the
        # very spare we moved there, for a spare).
        if st.st_uid != os.geteuid():
            ours = False
            raise SpoolError(f"{path} was replaced by a directory owned by uid {st.st_uid} while it was being created")
        if spare is not None and not os.path.samestat(st, os.fstat(spare.fd)):
            ours = False
            raise SpoolError(f"{path} was replaced by another directory while it was being created")
        # Explicit mode: umask must not matter, and a setgid parent must not leak its bit.
        os.fchmod(new.fd, mode)
    except BaseException:
        if new.fd >= 0:
            os.close(new.fd)
        if ours:
            # rmdir never follows a symlink and only removes an empty directory.
            try:
                os.rmdir(name, dir_fd=parent.fd)
            except OSError:
                pass
        raise
    finally:
        if spare is not None:
            os.close(spare.fd)
    return new


def _put_spare(spare: Spare, parent: _Dir, name: str, remove) -> None:
    """Move a spare (SpareFiles) to name in parent, never over anything there; when it
    cannot be, the spare is removed (remove: os.rmdir or os.unlink) and its fd closed."""
    try:
        rename_noreplace(spare.dir_fd, spare.name, parent.fd, name)
    except BaseException:
        with contextlib.suppress(OSError):
            remove(spare.name, dir_fd=spare.dir_fd)
        os.close(spare.fd)
        raise


class StepSpool:
    """Owns the step's directory fds; the only place that creates and removes spool dirs."""

    layout: SpoolLayout

    def __init__(self, layout: SpoolLayout, uid: int, gid: int) -> None:
        # Use StepSpool.create(); this only sets up an empty holder.
        self.layout = layout
        self._uid = uid
        self._gid = gid
        self._above: list[_Dir] = []  # anchor, then created ancestors, down to the step dir's parent
        self._step: _Dir | None = None
        self._inner: dict[str, _Dir] = {}  # created dirs below the step dir, by absolute path, parents first
        self._tasks: list[_Dir] = []
        self._closed = False
        self._removed = False
        self._created: list[tuple[str, int, int]] | None = None  # created_dirs(), once read
        # Where the step dir, the task dirs and the task files come from while the spool is
        # root's alone (until hand_over), when they are on the same filesystem: SpareFiles.
        self._spares: SpareFiles | None = None

    @classmethod
    def create(cls, layout: SpoolLayout, uid: int, gid: int, spares: SpareFiles | None = None) -> StepSpool:
        """Create the step dir and task dirs, root-owned 0700 until hand_over(). spares:
        directories and files made ahead (the state dir's), taken instead of making the
        step dir, the task dirs and the task files when they are on the same filesystem."""
        spool = cls(layout, uid, gid)
        try:
            spool._create(spares)
        except BaseException as exc:
            undo_errors = spool._undo_create()
            if isinstance(exc, SpoolError) and undo_errors:
                raise SpoolError(f"{exc} (and undoing the partial creation failed: {undo_errors[0]})") from exc
            raise
        return spool

    def _create(self, spares: SpareFiles | None) -> None:
        parent_parts = components(self.layout.step_dir)[:-1]
        step_dir = self.layout.step_dir
        anchor = _Dir(fd=os.open("/", _DIR_FLAGS), path="/", parent=None, created=False)
        self._above.append(anchor)
        _check_trusted(anchor, step_dir, last=not parent_parts)
        current = anchor
        for depth, part in enumerate(parent_parts, start=1):
            last = depth == len(parent_parts)
            path = join(current.path, part)
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=current.fd)
            except FileNotFoundError:
                fd = -1
            except OSError as exc:
                raise _describe_open_error(exc, current, part, path) from exc
            if fd >= 0:
                if current.created:
                    # Cannot happen unless someone else writes into our private dir.
                    os.close(fd)
                    raise SpoolError(f"{path} appeared inside a directory this daemon had just created")
                # Still only pre-existing dirs: move the anchor down, keep just one fd.
                os.close(current.fd)
                current.fd, current.path = fd, path
                _check_trusted(current, step_dir, last=last)
                continue
            if not self.layout.create_parents:
                raise SpoolError(f"{path} does not exist; the daemon's spool dir must be created at startup")
            try:
                current = _make_private_dir(current, part, path, _PARENT_DIR_MODE)
            except FileExistsError:
                # Another step created it concurrently (or someone else did): use it only if
                # it is trusted like any other existing parent; it is not ours.
                if current.created:
                    raise SpoolError(f"{path} appeared inside a directory this daemon had just created") from None
                fd = _open_dir(current, part, path)
                os.close(current.fd)
                current.fd, current.path = fd, path
                _check_trusted(current, step_dir, last=last)
                continue
            self._above.append(current)

        if spares is not None and os.fstat(current.fd).st_dev == spares.device:
            self._spares = spares
        try:
            self._step = _make_private_dir(current, os.path.basename(self.layout.step_dir), self.layout.step_dir,
                                           spares=self._spares)
        except FileExistsError:
            match = re.fullmatch(r"oci-job(\d+)-(\d+)(?:-task\d+)?(?:-uid\d+)?", os.path.basename(self.layout.step_dir))
            which = f"step {match[1]}.{match[2]}" if match else "this step"
            raise SpoolError(
                f"spool dir {self.layout.step_dir} already exists: is {which} already running,"
                " or left over by DisableCleanup?"
            ) from None

        for task_dir in self.layout.task_dirs:
            current = self._step
            for part in components(task_dir.removeprefix(self.layout.step_dir)):
                path = join(current.path, part)
                existing = self._inner.get(path)
                if existing is not None:
                    current = existing
                    continue
                try:
                    current = _make_private_dir(current, part, path, spares=self._spares)
                except FileExistsError:
                    # The step dir is fresh and private: only root could have put this here.
                    raise SpoolError(f"{path} appeared inside a directory this daemon had just created") from None
                self._inner[path] = current
            self._tasks.append(current)

    def created_dirs(self) -> list[tuple[str, int, int]]:
        """(path, st_dev, st_ino) of every directory this spool created, parents first.

        What a step record keeps, so that a restarted daemon can tell these directories
        from anything put in their place (reopen). Read once: the directories never change
        while the spool holds them."""
        if self._created is None:
            self._created = []
            for d in reversed(self._created_dirs_deepest_first()):
                st = os.fstat(d.fd)
                self._created.append((d.path, st.st_dev, st.st_ino))
        return self._created

    @classmethod
    def reopen(cls, layout: SpoolLayout, created: list[tuple[str, int, int]], uid: int, gid: int) -> StepSpool | None:
        """Take a step's spool dir back after a daemon restart, to run commands in it and remove it.

        Walks the path as create() does (O_NOFOLLOW, one component at a time) and accepts
        a created directory only if it is the very one recorded (same device and inode):
        the user owns the step dir and could have replaced anything below or beside it.
        Returns None when the step dir no longer exists. Raises SpoolError when something
        is in the way that is not ours.
        """
        spool = cls(layout, uid, gid)
        try:
            return spool if spool._reopen({p: (dev, ino) for p, dev, ino in created}) else None
        except BaseException:
            spool.close()
            raise

    def _reopen(self, created: dict[str, tuple[int, int]]) -> bool:
        def open_child(parent: _Dir, name: str, path: str) -> _Dir | None:
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _describe_open_error(exc, parent, name, path) from exc
            d = _Dir(fd=fd, path=path, parent=parent, created=path in created)
            if d.created:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != created[path]:
                    os.close(fd)
                    raise SpoolError(f"{path} is no longer the directory the step created; it was left alone")
            return d

        current = _Dir(fd=os.open("/", _DIR_FLAGS), path="/", parent=None, created=False)
        self._above.append(current)
        for part in components(self.layout.step_dir)[:-1]:
            child = open_child(current, part, join(current.path, part))
            if child is None:
                return False
            if not child.created and not current.created:
                os.close(current.fd)  # still above everything we made: move the anchor down
                current.fd, current.path = child.fd, child.path
                continue
            self._above.append(child)
            current = child
        self._step = open_child(current, os.path.basename(self.layout.step_dir), self.layout.step_dir)
        if self._step is None:
            return False
        if not self._step.created:
            raise SpoolError(f"{self.layout.step_dir} is not recorded as created by the step; it was left alone")
        for task_dir in self.layout.task_dirs:
            current = self._step
            for part in components(task_dir.removeprefix(self.layout.step_dir)):
                path = join(current.path, part)
                existing = self._inner.get(path)
                if existing is None:
                    existing = open_child(current, part, path)
                    if existing is None or not existing.created:
                        if existing is not None:
                            os.close(existing.fd)
                        raise SpoolError(f"{path} is missing or not the one the step created")
                    self._inner[path] = existing
                current = existing
            self._tasks.append(current)
        return True

    @classmethod
    def remove_pending(cls, layout: SpoolLayout) -> bool:
        """Remove the step dir of a launch recorded before its spool was created (the daemon
        died while creating it); True if it was there, False if it never was.

        With no devices and inodes recorded, the name is what makes it the launch's: every
        parent of the step dir is root's and not writable by others (checked again here, as
        create() does), so no one else can have put or renamed anything at that name. The
        tree inside, the user's once handed over, is removed through the step dir's fd like
        any spool (clear_dir: no link followed, no mount crossed). Parents the launch may
        have created are left: root's, empty and harmless, and maybe another step's by now.
        Raises SpoolError when something is in the way or not trusted; it is then left alone.
        """
        spool = cls(layout, 0, 0)
        try:
            parts = components(layout.step_dir)
            current = _Dir(fd=os.open("/", _DIR_FLAGS), path="/", parent=None, created=False)
            spool._above.append(current)
            _check_trusted(current, layout.step_dir, last=len(parts) == 1)
            for depth, part in enumerate(parts[:-1], start=1):
                path = join(current.path, part)
                try:
                    fd = os.open(part, _DIR_FLAGS, dir_fd=current.fd)
                except FileNotFoundError:
                    return False
                except OSError as exc:
                    raise _describe_open_error(exc, current, part, path) from exc
                os.close(current.fd)  # only the step dir's parent is needed: keep one fd
                current.fd, current.path = fd, path
                _check_trusted(current, layout.step_dir, last=depth == len(parts) - 1)
            try:
                fd = os.open(parts[-1], _DIR_FLAGS, dir_fd=current.fd)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise _describe_open_error(exc, current, parts[-1], layout.step_dir) from exc
            spool._step = _Dir(fd=fd, path=layout.step_dir, parent=current, created=True)
        except BaseException:
            spool.close()
            raise
        spool.remove()
        return True

    def _created_dirs_deepest_first(self) -> list[_Dir]:
        dirs = [d for d in self._above if d.created]
        if self._step is not None:
            dirs.append(self._step)
        dirs.extend(self._inner.values())
        return dirs[::-1]

    def _undo_create(self) -> list[str]:
        # Everything created so far is root-owned 0700 and empty (no files are written
        # during create), so plain rmdir through the parent fds is enough and safe.
        errors: list[str] = []
        for d in self._created_dirs_deepest_first():
            _rmdir_if_same(d, errors, ignore_not_empty=False)
        self.close()
        return errors

    def _task(self, task_index: int) -> _Dir:
        if self._closed:
            raise SpoolError(f"spool dir {self.layout.step_dir} is already closed")
        if not 0 <= task_index < len(self._tasks):
            raise IndexError(f"task index {task_index} is out of range for {len(self._tasks)} task(s)")
        return self._tasks[task_index]

    def task_dir_pinned(self, task_index: int) -> str:
        """A path to the task dir through the daemon's own fd (/proc/PID/fd/N).

        The runtime's working directory is entered by this path, as root, just before the
        switch to the user: the user owns the step dir and could swap task-N for a link
        after any check of the name, but not the directory this fd holds."""
        return f"/proc/{os.getpid()}/fd/{self._task(task_index).fd}"

    def step_dir_pinned(self) -> str:
        """The step dir through the daemon's own fd (/proc/PID/fd/N), like task_dir_pinned."""
        if self._closed or self._step is None:
            raise SpoolError(f"spool dir {self.layout.step_dir} is already closed")
        return f"/proc/{os.getpid()}/fd/{self._step.fd}"

    def remove_task_file(self, task_index: int, name: str) -> None:
        """Unlink name in the task dir (through its fd; a link there is removed, never followed), if it is there."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        task = self._task(task_index)
        try:
            os.unlink(name, dir_fd=task.fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpoolError(f"cannot remove {join(task.path, name)}: {exc.strerror}") from exc

    def write_task_file(self, task_index: int, name: str, data: bytes, mode: int) -> str:
        """Create name exclusively in the task dir, owned by the user with the given mode."""
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        task = self._task(task_index)
        path = join(task.path, name)
        spare = self._spares.take() if self._spares is not None else None
        if spare is not None:
            # Written and given its owner and mode in the spare directory, then moved in whole.
            fd, directory, written_name = spare.fd, spare.dir_fd, spare.name
        else:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=task.fd)
            except OSError as exc:
                raise SpoolError(f"cannot create {path}: {exc.strerror}") from exc
            directory, written_name = task.fd, name
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchown(fd, self._uid, self._gid)
            # After fchown: chown clears set-id bits, so the mode must come last.
            os.fchmod(fd, mode)
        except OSError as exc:
            try:
                os.unlink(written_name, dir_fd=directory)
            except OSError:
                pass
            os.close(fd)
            raise SpoolError(f"cannot write {path}: {exc.strerror}") from exc
        except BaseException:
            os.close(fd)
            raise
        if spare is not None:
            try:
                _put_spare(spare, task, name, os.unlink)  # closes the fd if it fails
            except OSError as exc:
                raise SpoolError(f"cannot create {path}: {exc.strerror}") from exc
        os.close(fd)
        return path

    def hand_over(self) -> None:
        """Give the step dir and every directory inside it to the user (modes stay 0700).

        Never a parent: parents created here stay root's, or the user could rename the
        step dirs of other users' steps inside them."""
        if self._closed:
            raise SpoolError(f"spool dir {self.layout.step_dir} is already closed")
        assert self._step is not None
        self._spares = None  # the user's from here on: nothing is moved in any more, it is created there
        for d in [*reversed(self._inner.values()), self._step]:
            try:
                os.fchown(d.fd, self._uid, self._gid)
            except OSError as exc:
                raise SpoolError(f"cannot hand {d.path} over to uid {self._uid}: {exc.strerror}") from exc

    def remove(self) -> None:
        """Remove the step dir tree and now-empty created ancestors; implies close().

        A step dir that cannot be removed (a mount point inside, a file root may not
        delete) is renamed aside in its parent (TRASH_PREFIX...), so that it does not
        block the next launch of the same job.step, and the SpoolError says where."""
        if self._removed:
            return
        if self._closed:
            raise SpoolError(f"spool dir {self.layout.step_dir} was closed without removal; it can no longer be removed safely")
        errors: list[str] = []
        step = self._step
        assert step is not None and step.parent is not None
        # Empty the tree through the fd we hold, so a rename of the step dir by its
        # (user) owner cannot redirect us anywhere else.
        clear_dir(step.fd, step.path, errors)
        _rmdir_if_same(step, errors, ignore_not_empty=False)
        aside = _rename_aside(step) if errors else None
        for d in reversed(self._above):
            if d.created:
                _rmdir_if_same(d, errors, ignore_not_empty=True)
        self._removed = True
        self.close()
        if errors:
            more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
            where = f"; what is left was renamed to {aside}, so that the step can be launched again" if aside else ""
            raise SpoolError(f"could not fully remove spool dir {self.layout.step_dir}: {errors[0]}{more}{where}")

    def close(self) -> None:
        """Close every fd held; idempotent. Leaves the tree on disk."""
        if self._closed:
            return
        self._closed = True
        all_dirs = [*self._above, *([self._step] if self._step is not None else []), *self._inner.values()]
        for d in all_dirs:
            if d.fd >= 0:
                os.close(d.fd)
                d.fd = -1

    def __enter__(self) -> StepSpool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


TRASH_PREFIX = ".nodestepd-trash-"


def _rename_aside(d: _Dir) -> str | None:
    """Rename d, if its name still refers to it, to a fresh TRASH_PREFIX name in the same
    parent; the new path, or None. The parent is root's alone (checked or made so at
    create), so no one else can have put anything at the new name."""
    assert d.parent is not None
    try:
        here = os.lstat(d.name, dir_fd=d.parent.fd)
        mine = os.fstat(d.fd)
    except OSError:
        return None
    if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
        return None
    trash = f"{TRASH_PREFIX}{d.name}-{secrets.token_hex(6)}"
    try:
        os.rename(d.name, trash, src_dir_fd=d.parent.fd, dst_dir_fd=d.parent.fd)
    except OSError:
        return None
    return join(d.parent.path, trash)


def _rmdir_if_same(d: _Dir, errors: list[str], *, ignore_not_empty: bool) -> None:
    """rmdir d by name in its parent, but only if the name still refers to d itself."""
    assert d.parent is not None
    try:
        here = os.lstat(d.name, dir_fd=d.parent.fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        errors.append(f"cannot inspect {d.path}: {exc.strerror}")
        return
    mine = os.fstat(d.fd)
    if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
        # The owner renamed it away and put something else there: not ours to delete.
        errors.append(f"{d.path} was replaced by something else, which was left alone")
        return
    try:
        os.rmdir(d.name, dir_fd=d.parent.fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if ignore_not_empty and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return
        errors.append(f"cannot remove {d.path}: {exc.strerror}")
