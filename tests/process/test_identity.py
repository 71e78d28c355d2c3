"""kernel.grouplist: glibc's getgrouplist through ctypes (the GIL let go), against Python's own."""

from __future__ import annotations

import grp
import os

from nodestepd.process.identity import Identity
from nodestepd.process.kernel import grouplist


def test_the_groups_are_python_getgrouplist_s(user):
    assert grouplist(user.name, user.gid) == tuple(os.getgrouplist(user.name, user.gid))
    assert grouplist("root", 0) == tuple(os.getgrouplist("root", 0))
    assert Identity.for_uid(user.uid).groups == tuple(os.getgrouplist(user.name, user.gid))


def test_more_groups_than_the_first_room_are_all_found():
    # Any member of a group on this node, with another base gid: at least two groups for room for one.
    member, gid = next((g.gr_mem[0], g.gr_gid) for g in grp.getgrall() if g.gr_mem)
    base = max(g.gr_gid for g in grp.getgrall()) + 1
    found = grouplist(member, base, size=1)
    assert found == tuple(os.getgrouplist(member, base))
    assert base in found and gid in found


def test_an_unknown_user_has_the_base_gid_alone():
    assert grouplist("no-such-user-nodestepd", 4242) == (4242,)
