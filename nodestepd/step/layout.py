"""Where a step's spool dirs go: the step dir (`oci-job%j-%s`, or ContainerPath's) and a
dir per task, computed from oci.conf and the step's ids. Pure: nothing is touched here.

Step names are per user (docs/security.md): where the path would not otherwise tell two
users' steps with the same ids apart (the daemon's own spool dir, or a ContainerPath
without %u or %U), the step dir name the daemon composes carries the uid:
`oci-job%j-%s-uid%U`. docs/oci-conf.md ("Spool dirs") describes the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from nodestepd.config.patterns import cut_before_task_component, pattern_letters

__all__ = ["SpoolError", "SpoolLayout", "spool_layout", "join", "components", "shared_step_dir_warning"]


class SpoolError(Exception):
    """A spool directory could not be laid out, created, written or removed."""


@dataclass(frozen=True)
class SpoolLayout:
    step_dir: str  # absolute and normalised
    task_dirs: tuple[str, ...]  # absolute, one per task, each strictly inside step_dir
    # False when the parent of step_dir is the daemon's own spool dir: the daemon creates
    # that at startup, root-owned, shared by all users, so it must never be created here
    # (it would end up owned by whichever user's step came first).
    create_parents: bool = True


def spool_layout(
    *,
    container_path: str | None,
    spool_dir: str,
    expand: Callable[[str, int], str],
    job_id: int,
    step_id: int,
    ntasks: int,
    uid: int,
    task_offset: int | None = None,
) -> SpoolLayout:
    """Compute where a step's spool dir and its task dirs go.

    task_offset: a per-task launch (docs/protocol.md) of tasks task_offset... Several such
    launches of one step share a node, and each owns its spool dir, so theirs is named
    oci-job%j-%s-task%t after their first task.
    uid: the step's user, in the step dir's name when nothing else in the path names the user.
    """
    if ntasks < 0:
        raise ValueError(f"ntasks must not be negative, got {ntasks}")
    step_name = f"oci-job{job_id}-{step_id}"
    first = 0
    if task_offset is not None:
        first = task_offset
        step_name += f"-task{task_offset}"
        if container_path and cut_before_task_component(container_path) is not None:
            raise SpoolError(
                f"ContainerPath {container_path!r} puts every task of a step under one step dir (the part before %t),"
                " so the step cannot be launched task by task; launch it once with --ntasks instead"
            )
    if not (container_path and pattern_letters(container_path) & {"u", "U"}):
        step_name += f"-uid{uid}"
    ids = range(first, first + ntasks)
    if not container_path:
        base = _normalised(spool_dir, "the spool dir is")
        step_dir = join(base, step_name)
        task_dirs = [join(step_dir, f"task-{t}") for t in ids]
        create_parents = False
    else:
        prefix = cut_before_task_component(container_path)
        if prefix is None:
            base = _normalised(expand(container_path, 0), f"ContainerPath {container_path!r} expands to")
            step_dir = join(base, step_name)
            task_dirs = [join(step_dir, f"task-{t}") for t in ids]
        else:
            what = f"ContainerPath {container_path!r} expands to"
            step_dir = _normalised(expand(prefix, 0), what)
            task_dirs = [_normalised(expand(container_path, t), what) for t in ids]
        create_parents = True

    _normalised(step_dir, "the step spool dir is")
    if step_dir == "/":
        raise SpoolError("the step spool dir would be / itself; ContainerPath needs a directory before its %t component")
    for task_dir in task_dirs:
        if not task_dir.startswith(step_dir + "/"):
            raise SpoolError(f"task spool dir {task_dir} is not inside the step spool dir {step_dir}")
    if len(set(task_dirs)) != len(task_dirs):
        raise SpoolError(f"task spool dirs under {step_dir} are not distinct: ContainerPath must give each task its own dir")
    # Sorting by component lists puts every directory right before its descendants.
    ordered = sorted(task_dirs, key=lambda p: p.split("/"))
    for outer, inner in zip(ordered, ordered[1:]):
        if inner.startswith(outer + "/"):
            raise SpoolError(f"task spool dir {inner} is nested inside task spool dir {outer}")
    return SpoolLayout(step_dir=step_dir, task_dirs=tuple(task_dirs), create_parents=create_parents)


def shared_step_dir_warning(container_path: str | None) -> str | None:
    """Why two users' steps with the same ids could meet in one step dir, or None.

    A ContainerPath with %t gives the whole step dir path (the part before %t): when that
    part names no user, the daemon cannot keep two users' steps apart there."""
    prefix = cut_before_task_component(container_path) if container_path else None
    if prefix is None or pattern_letters(prefix) & {"u", "U"}:
        return None
    return (f"ContainerPath {container_path!r} gives the step dir {prefix!r}, which names no user (%u or %U): "
            "two users' steps with the same job and step ids would need the same step dir, and the second "
            "launch would fail; put %u or %U before the %t component")


def join(base: str, name: str) -> str:
    return "/" + name if base == "/" else f"{base}/{name}"


def _normalised(path: str, what: str) -> str:
    """Return path without trailing slashes, or raise unless it is absolute and plain."""
    if "\0" in path:
        raise SpoolError(f"{what} {path!r}, which contains a NUL byte")
    if not path.startswith("/"):
        raise SpoolError(f"{what} {path!r}, which is not an absolute path")
    # A trailing slash (ContainerPath=/scratch/) is harmless; anything else irregular is
    # refused rather than silently fixed, because '..' would let a path escape its parent.
    path = path.rstrip("/") or "/"
    if path != "/" and any(part in ("", ".", "..") for part in path.split("/")[1:]):
        raise SpoolError(f"{what} {path!r}, which is not normalised (it has an empty, '.' or '..' component)")
    return path


def components(path: str) -> list[str]:
    return [part for part in path.split("/") if part]
