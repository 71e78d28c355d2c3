"""The trusted-path rule for what root works in by name, and its walk over a path.

A directory on the way to something root works in must be root-owned and not writable
by group or others, or else whoever can write it can rename or replace what root finds
there. A sticky directory (like /tmp) is fine on the way, since others cannot rename or
replace root's entries in it, but not as the last one: there anyone may still create the
name root is about to use. Like sshd's StrictModes.

untrusted_dir_reason is the rule, pure over stat values; untrusted_reason walks a path
with it (it only reads: stat and lstat) and hook_problem adds what a stage hook must be.
Used for the daemon's own paths at start (daemon/configuration.py), for every existing
parent of a step spool dir (step/spool.py), for the stage hooks, and by the doctor.
"""

from __future__ import annotations

import os
import stat

__all__ = ["hook_problem", "untrusted_dir_reason", "untrusted_reason"]


def untrusted_dir_reason(path: str, uid: int, mode: int, *, last: bool) -> str | None:
    """Why the directory at `path` (owner `uid`, `st_mode` `mode`) could be changed by someone
    other than root, or None. `last`: it is the directory root creates or uses names in."""
    if uid != 0:
        return f"{path} is owned by uid {uid}, not root"
    writable_by_others = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and (last or not (mode & stat.S_ISVTX)):
        who = "others" if mode & stat.S_IWOTH else "its group"
        return f"{path} is writable by {who} (mode {stat.S_IMODE(mode):04o})"
    return None


def untrusted_reason(path: str) -> str | None:
    """Why `path` (which must exist) could be changed by someone other than root, or None."""
    parts = [p for p in os.path.normpath(path).split("/") if p]
    prefix = ""
    for part in parts:
        prefix += "/" + part
        st = os.lstat(prefix)
        if stat.S_ISLNK(st.st_mode) and st.st_uid != 0:
            return f"{prefix} is a symbolic link owned by uid {st.st_uid}"
    real_parts = [p for p in os.path.realpath(path).split("/") if p]
    chain = ["/"] + ["/" + "/".join(real_parts[:i]) for i in range(1, len(real_parts) + 1)]
    for i, directory in enumerate(chain):
        st = os.stat(directory)
        reason = untrusted_dir_reason(directory, st.st_uid, st.st_mode, last=i == len(chain) - 1)
        if reason is not None:
            return reason
    return None


def hook_problem(path: str, *, check_owner: bool = True) -> str | None:
    """Why a stage hook (run at every launch, as that launch's user) cannot be used, or None.

    It must be an executable regular file; with check_owner, also root's alone, like oci.conf:
    anyone who could change it would run their code as every user who launches a step."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"{path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if not st.st_mode & 0o111:
        return f"{path} is not executable (mode {stat.S_IMODE(st.st_mode):04o})"
    return untrusted_reason(path) if check_owner else None
