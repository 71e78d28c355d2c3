"""daemon/accounts.py: subordinate uids count as their owner's (issue 19.4)."""

from __future__ import annotations

import os
import pwd

from nodestepd.daemon.accounts import Accounts


def test_subordinate_uids_count_as_their_owner(tmp_path):
    me = pwd.getpwuid(os.getuid()).pw_name
    path = tmp_path / "subuid"
    path.write_text(f"{me}:100000:65536\n4242:200000:10\nno-such-user-here:300000:10\n")
    accounts = Accounts(str(path))
    accounts.load()
    assert [accounts.account(uid) for uid in (99999, 100000, 165535, 165536, 200009, 200010, 300000, 4242)] == [
        99999, os.getuid(), os.getuid(), 165536, 4242, 200010, 300000, 4242]


def test_the_file_is_read_again_when_it_changes(tmp_path):
    path = tmp_path / "subuid"
    accounts = Accounts(str(path))
    accounts.load()  # no file: every uid is its own
    assert accounts.account(100000) == 100000
    path.write_text("4242:100000:10\n")
    accounts.load()
    assert accounts.account(100000) == 4242
    path.unlink()
    accounts.load()
    assert accounts.account(100000) == 100000
