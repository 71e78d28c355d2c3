"""A launch that cannot start fails with one clear sentence, status 125, and leaves nothing behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess

import pytest

from conftest import RUNC_RUN_CONF, runc_containers, spool_entries

LAUNCH_FAILED = 125


def _nothing_left(daemon, user) -> None:
    assert spool_entries(daemon) == []
    assert runc_containers(user) == []
    steps = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    assert steps == []


def _one_sentence(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.startswith("nodestepctl: ") and text.count("\n") == 1, text
    return text


@pytest.fixture
def bundle_copy(workdir, user, bundle, request):
    """A private copy of the test bundle whose config.json a test may break."""
    path = workdir / f"bundle-{request.node.name}"
    shutil.copytree(bundle, path, symlinks=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_missing_bundle(start_daemon, user, workdir):
    daemon = start_daemon()
    result = daemon.ctl(user, "run", "--bundle", str(workdir / "no-such-bundle"), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    assert "no-such-bundle does not exist or is not a directory" in _one_sentence(result.stderr)
    _nothing_left(daemon, user)


def test_config_json_the_user_cannot_read(start_daemon, user, bundle_copy):
    daemon = start_daemon()
    config = bundle_copy / "config.json"
    os.chown(config, 0, 0)
    config.chmod(0o600)  # root can read it; the user cannot, so neither may the launch
    result = daemon.ctl(user, "run", "--bundle", str(bundle_copy), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    assert f"cannot read {config}: Permission denied" in _one_sentence(result.stderr)
    _nothing_left(daemon, user)


def test_config_json_that_is_not_json(start_daemon, user, bundle_copy):
    daemon = start_daemon()
    (bundle_copy / "config.json").write_text('{"process": {"args": ["sh"]},\n  oops\n}')
    result = daemon.ctl(user, "run", "--bundle", str(bundle_copy), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    message = _one_sentence(result.stderr)
    assert str(bundle_copy / "config.json") in message and "line 2" in message
    _nothing_left(daemon, user)


def test_config_json_symlink_to_a_root_only_file_gains_nothing(start_daemon, user, bundle_copy):
    daemon = start_daemon()
    (bundle_copy / "config.json").unlink()
    (bundle_copy / "config.json").symlink_to("/etc/shadow")
    result = daemon.ctl(user, "run", "--bundle", str(bundle_copy), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    assert "Permission denied" in _one_sentence(result.stderr)
    _nothing_left(daemon, user)


@pytest.mark.parametrize("runtime, message", [
    ("runc-not-installed", "runtime program 'runc-not-installed' is not found in PATH="),
    ("/opt/nowhere/runc", "runtime program /opt/nowhere/runc does not exist"),
])
def test_runtime_not_found(start_daemon, user, bundle, runtime, message):
    daemon = start_daemon(RUNC_RUN_CONF.replace('RunTimeRun="runc ', f'RunTimeRun="{runtime} '))
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    assert message in _one_sentence(result.stderr)
    _nothing_left(daemon, user)


def test_spool_dir_not_creatable(start_daemon, user, bundle, workdir):
    blocker = workdir / "a-file"
    blocker.write_text("not a directory\n")
    daemon = start_daemon(f'ContainerPath="{blocker}/%u"\n' + RUNC_RUN_CONF)
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    assert str(blocker) in _one_sentence(result.stderr)
    assert blocker.read_text() == "not a directory\n"
    _nothing_left(daemon, user)


def test_spool_dir_left_over_is_not_reused(start_daemon, user, bundle):
    daemon = start_daemon()
    leftover = daemon.spool_dir / f"oci-job70-0-uid{user.uid}"
    leftover.mkdir()
    (leftover / "keep").write_text("from an earlier step\n")
    result = daemon.ctl(user, "run", "--job-id", "70", "--bundle", str(bundle), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    assert "already exists" in _one_sentence(result.stderr)
    assert (leftover / "keep").read_text() == "from an earlier step\n"
    assert runc_containers(user) == []


def test_no_command(start_daemon, user, bundle):
    daemon = start_daemon()
    result = daemon.ctl(user, "run", "--bundle", str(bundle))
    assert result.returncode == 2
    assert b"no command given" in result.stderr


def test_daemon_not_running(user, workdir, bundle):
    from conftest import NODESTEPCTL
    import subprocess

    result = subprocess.run(
        user.command([str(NODESTEPCTL), "--socket", str(workdir / "nobody-here.sock"), "run", "--bundle", str(bundle),
                      "--", "true"]),
        capture_output=True, env=user.env,
    )
    assert result.returncode == 1
    assert b"nodestepd is not running: no socket at" in result.stderr


def test_pty_in_create_start_mode_is_refused_clearly(start_daemon, user, bundle):
    from conftest import REPO

    daemon = start_daemon((REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text())
    master, slave = os.openpty()
    try:
        result = daemon.ctl_popen(user, "run", "--pty", "--bundle", str(bundle), "--", "true", stdin=slave)
        _, err = result.communicate(timeout=60)
    finally:
        os.close(master)
        os.close(slave)
    assert result.returncode == LAUNCH_FAILED
    assert "--pty needs RunTimeRun" in _one_sentence(err)
    _nothing_left(daemon, user)


# ---- a full disk (issue 14.5) ----------------------------------------------------------------


@pytest.fixture
def small_tmpfs(workdir):
    """small_tmpfs(name) -> a 1 MiB tmpfs, root's, unmounted after the test."""
    mounted = []

    def mount(name: str):
        path = workdir / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


def fill(path) -> None:
    """Fill the file system at path to its last byte."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = 1 << 16
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                chunk //= 2
    finally:
        os.close(fd)


def _no_traceback(daemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log and "unexpectedly" not in log, log


def _temporary_files(path) -> list[str]:
    return [p.name for p in path.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_state_disk_fails_launches_cleanly(small_tmpfs, start_daemon, user, bundle):
    state = small_tmpfs("full-state")
    daemon = start_daemon(RUNC_RUN_CONF, "--state-dir", str(state))
    running = daemon.ctl(user, "run", "--detach", "--job-id", "80", "--bundle", str(bundle), "--", "sleep", "1000")
    assert running.returncode == 0, running.stderr
    fill(state)
    # A daemon-assigned job id, then a given one (the step's record cannot be written).
    for ids in ((), ("--job-id", "81")):
        result = daemon.ctl(user, "run", *ids, "--bundle", str(bundle), "--", "true")
        assert result.returncode == LAUNCH_FAILED, (result.stderr, daemon.log())
        assert _one_sentence(result.stderr).endswith(": No space left on device\n")
    # A step that ends now: its result cannot be kept on disk, and `wait` still has it.
    cancelled = daemon.ctl(user, "cancel", "80.0")
    assert cancelled.returncode == 0, cancelled.stderr
    assert daemon.ctl(user, "wait", "80.0").returncode != 0
    assert "cannot keep the step's result" in daemon.log()
    _no_traceback(daemon)
    assert _temporary_files(state) == []
    assert [s["job_id"] for s in json.loads(daemon.ctl(user, "ps", "--json").stdout)] == [80]
    assert spool_entries(daemon) == [] and runc_containers(user) == []
    (state / "filler").unlink()
    assert daemon.ctl(user, "run", "--job-id", "82", "--bundle", str(bundle), "--", "true").returncode == 0


def test_a_full_spool_disk_fails_the_launch_cleanly(small_tmpfs, start_daemon, user, bundle):
    spool = small_tmpfs("full-spool")
    daemon = start_daemon(RUNC_RUN_CONF, "--spool-dir", str(spool))
    fill(spool)
    result = daemon.ctl(user, "run", "--job-id", "83", "--bundle", str(bundle), "--", "true")
    assert result.returncode == LAUNCH_FAILED, result.stderr
    assert "No space left on device" in _one_sentence(result.stderr)
    _no_traceback(daemon)
    assert os.listdir(spool) == ["filler"]
    assert runc_containers(user) == []
