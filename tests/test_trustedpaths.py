"""trustedpaths.py: the daemon's own paths must be root's alone (like sshd's StrictModes)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from nodestepd.trustedpaths import untrusted_reason


@pytest.fixture
def base() -> Path:
    path = Path(tempfile.mkdtemp(prefix="trusted-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for p in sorted(path.rglob("*"), reverse=True):
        p.unlink() if p.is_symlink() or not p.is_dir() else p.rmdir()
    path.rmdir()


def test_root_owned_paths_under_a_sticky_tmp_are_trusted(base):
    (base / "spool").mkdir(mode=0o755)
    (base / "oci.conf").write_text("")
    (base / "oci.conf").chmod(0o644)
    assert untrusted_reason(str(base / "spool")) is None
    assert untrusted_reason(str(base / "oci.conf")) is None
    assert untrusted_reason("/") is None


@pytest.mark.parametrize("mode, who", [(0o777, "others"), (0o775, "its group"), (0o1777, "others")])
def test_writable_by_others_is_untrusted(base, mode, who):
    d = base / "spool"
    d.mkdir()
    d.chmod(mode)
    assert untrusted_reason(str(d)) == f"{d} is writable by {who} (mode {mode:04o})"


def test_a_writable_non_sticky_ancestor_is_untrusted(base):
    (base / "open").mkdir()
    (base / "open").chmod(0o777)
    (base / "open" / "spool").mkdir(mode=0o755)
    assert untrusted_reason(str(base / "open" / "spool")) == f"{base}/open is writable by others (mode 0777)"


def test_user_owned_dirs_and_links_are_untrusted(base):
    (base / "mine").mkdir()
    os.chown(base / "mine", 4242, 4242)
    assert untrusted_reason(str(base / "mine")) == f"{base}/mine is owned by uid 4242, not root"
    (base / "real").mkdir(mode=0o755)
    (base / "link").symlink_to(base / "real")
    assert untrusted_reason(str(base / "link")) is None  # root's own link to a root dir
    os.lchown(base / "link", 4242, 4242)
    assert untrusted_reason(str(base / "link")) == f"{base}/link is a symbolic link owned by uid 4242"
