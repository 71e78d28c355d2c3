"""/etc/subuid: which user owns which subordinate uids (pure parsing).

A user's subordinate uids are the ids newuidmap lets that user map into a user namespace
of their own (`unshare --map-auto`, rootless podman): each of them reaches the daemon as
its own peer uid. The daemon counts them as their owner's (daemon/accounts.py).
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_SUBUID = "/etc/subuid"


class SubidRange(NamedTuple):
    owner: str  # a user name or a decimal uid, as the file says
    start: int
    count: int


def parse_subids(text: str) -> list[SubidRange]:
    """Every `owner:start:count` line with a usable range; other lines (comments, blank,
    malformed: newuidmap ignores them too) are skipped."""
    ranges = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or not fields[0] or fields[0].startswith("#"):
            continue
        owner, start, count = fields
        if not (start.isascii() and start.isdigit() and count.isascii() and count.isdigit()):
            continue
        if int(count) > 0 and int(start) + int(count) <= 1 << 32:
            ranges.append(SubidRange(owner, int(start), int(count)))
    return ranges
