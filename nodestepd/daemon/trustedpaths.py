"""Start-up checks that the daemon's own paths cannot be redirected by an unprivileged user.

The daemon works in its spool, state and socket directories by name as root (the socket
is bound and chmod-ed by path, the state file replaced by rename), and reads oci.conf,
whose commands it runs as every user. That is only safe when no one but root can change
what those names refer to: every directory on the way must be root-owned and not
writable by group or others (a sticky directory like /tmp is fine: others cannot rename
or replace root's entries in it), every symlink on the way root-owned, and the object
itself root-owned and not writable by group or others. Like sshd's StrictModes.
"""

from __future__ import annotations

import os
import stat

from nodestepd.config.trust import untrusted_dir_reason


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
