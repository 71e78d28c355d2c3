"""config/trust.py over real paths: what root works in by name must be root's alone (like sshd's StrictModes)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from nodestepd.config.trust import untrusted_reason

# What is checked is ownership by root: the paths under test must be made by root.
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes root-owned paths: needs root")


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


def test_the_daemon_refuses_a_monitor_program_others_can_replace(base, monkeypatch):
    """nodestepd-monitor runs as root for every task: a copy in a directory anyone may
    write (a venv made by a user, say) is refused, like a writable oci.conf; and without
    the program, no task could start, so the daemon refuses to start at all."""
    from nodestepd.process import monitor
    from nodestepd.daemon.configuration import check_trusted
    from nodestepd.config.settings import DaemonConfig
    from nodestepd.config.ociconf import OciConf

    for d in ("spool", "state", "run"):
        (base / d).mkdir(mode=0o755)
    (base / "oci.conf").write_text("")
    config = DaemonConfig(spool_dir=str(base / "spool"), state_dir=str(base / "state"), socket=str(base / "run/s"))
    oci = OciConf(path=str(base / "oci.conf"))
    check_trusted(config, oci)  # the installed program is root's

    shared = base / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    (shared / monitor.PROGRAM_NAME).write_bytes(b"")
    (shared / monitor.PROGRAM_NAME).chmod(0o755)
    monkeypatch.setattr(monitor, "LIBEXEC_DIR", str(shared))
    with pytest.raises(OSError, match="nodestepd-monitor .run as root for every task. .* is not safe"):
        check_trusted(config, oci)
    (shared / monitor.PROGRAM_NAME).unlink()
    with pytest.raises(OSError, match="is missing or not executable: reinstall nodestepd"):
        check_trusted(config, oci)


def test_a_stage_hook_must_be_a_root_owned_executable(base):
    """A stage hook runs as every user who launches a step: like oci.conf, only root may
    change it (test_trust.py has what any hook must be)."""
    from nodestepd.config.trust import hook_problem

    hook = base / "stage-in"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    assert hook_problem(str(hook)) is None
    hook.chmod(0o757)
    assert hook_problem(str(hook)) == f"{hook} is writable by others (mode 0757)"
    hook.chmod(0o755)
    os.chown(hook, 4242, 4242)
    assert hook_problem(str(hook)) == f"{hook} is owned by uid 4242, not root"
    assert hook_problem(str(hook), check_owner=False) is None  # a daemon run by a user for itself


def test_the_daemon_refuses_an_untrusted_stage_hook(base):
    from nodestepd.config.ociconf import OciConf
    from nodestepd.config.settings import DaemonConfig
    from nodestepd.daemon.configuration import check_trusted

    for d in ("spool", "state", "run"):
        (base / d).mkdir(mode=0o755)
    (base / "oci.conf").write_text("")
    (base / "hook").write_text("#!/bin/sh\n")
    (base / "hook").chmod(0o775)
    oci = OciConf(path=str(base / "oci.conf"))
    for name in ("stage_in", "stage_out"):
        config = DaemonConfig(spool_dir=str(base / "spool"), state_dir=str(base / "state"),
                              socket=str(base / "run/s"), **{name: str(base / "hook")})
        with pytest.raises(OSError) as e:
            check_trusted(config, oci)
        assert str(e.value) == (f"{name} {base}/hook (run as the user at every launch) cannot be used: "
                                f"{base}/hook is writable by its group (mode 0775)")
    (base / "hook").chmod(0o755)
    check_trusted(config, oci)
