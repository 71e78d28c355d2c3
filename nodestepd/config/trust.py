"""The trusted-path rule for directories root works in by name: pure, over stat values.

A directory on the way to something root works in must be root-owned and not writable
by group or others, or else whoever can write it can rename or replace what root finds
there. A sticky directory (like /tmp) is fine on the way, since others cannot rename or
replace root's entries in it, but not as the last one: there anyone may still create the
name root is about to use. Like sshd's StrictModes.

Used for the daemon's own paths at start (daemon/trustedpaths.py), for every existing
parent of a step spool dir (step/spool.py), and by the doctor.
"""

from __future__ import annotations

import stat

__all__ = ["untrusted_dir_reason"]


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
