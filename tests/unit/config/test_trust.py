"""The trusted-path rule shared by the daemon's own dirs, the spool parents and the doctor."""

from __future__ import annotations

import os

import pytest

from nodestepd.config.trust import hook_problem, untrusted_dir_reason

DIR = 0o040000


@pytest.mark.parametrize("uid,mode,last,reason", [
    (0, 0o755, False, None),
    (0, 0o755, True, None),
    (0, 0o1777, False, None),  # sticky on the way: others cannot rename root's entries
    (0, 0o1777, True, "/d is writable by others (mode 1777)"),  # but anyone may take a name in it
    (0, 0o777, False, "/d is writable by others (mode 0777)"),
    (0, 0o775, True, "/d is writable by its group (mode 0775)"),
    (0, 0o2755, True, None),
    (1000, 0o755, False, "/d is owned by uid 1000, not root"),
    (1000, 0o700, True, "/d is owned by uid 1000, not root"),
])
def test_rule(uid, mode, last, reason):
    assert untrusted_dir_reason("/d", uid, DIR | mode, last=last) == reason


def test_hooks_that_cannot_run_at_all(tmp_path):
    hook = tmp_path / "hook"
    assert hook_problem(str(hook)) == f"{hook}: No such file or directory"
    hook.mkdir()
    assert hook_problem(str(hook)) == f"{hook} is not a regular file"
    hook.rmdir()
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    assert hook_problem(str(hook)) == f"{hook} is not executable (mode 0644)"
    hook.chmod(0o755)
    if os.geteuid() != 0:
        assert "not root" in hook_problem(str(hook))  # a user's own file
