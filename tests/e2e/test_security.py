"""Who may do what, and the filesystem attacks: real daemon, real nodestepctl, real rootless runc.

Each attack leaves the protected file or directory exactly as it was (content, owner,
mode) and still unreadable to the attacker. Job ids 6000-6999 belong to this file, but for
6700-6799, test_spool_attacks.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import NODESTEPD, RUNC_RUN_CONF, make_bundle, runc_containers, spool_entries
from nodestepd.config.settings import resolve_operators
from test_server_protocol import as_user

LONG = ["sleep", "1000"]


def log_records(daemon) -> list[dict]:
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


def settings(workdir: Path, text: str) -> str:
    path = Path(tempfile.mkstemp(prefix="settings-", suffix=".toml", dir=workdir)[1])
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def ps(daemon, who) -> list[dict]:
    result = daemon.ctl(who, "ps", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def root_ctl(daemon, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(daemon.ctl_argv(*args), capture_output=True, timeout=timeout, cwd="/",
                          env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"})


def fingerprint(path: Path) -> dict:
    """Everything an attack could change about a file or a directory tree, without following links."""
    result = {}
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in paths:
        st = os.lstat(p)
        entry = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), stat.S_IFMT(st.st_mode), st.st_mtime_ns)
        if stat.S_ISREG(st.st_mode):
            entry += (hashlib.sha256(p.read_bytes()).hexdigest(),)
        result[str(p)] = entry
    return result


def readable_by(user, path: Path) -> bool:
    def attempt(p: str) -> bool:
        try:
            if os.path.isdir(p):
                os.listdir(p)
            else:
                with open(p, "rb") as f:
                    f.read(1)
            return True
        except PermissionError:
            return False
    return as_user(user, attempt, str(path))


@pytest.fixture
def protected(workdir) -> Path:
    """A root-only directory with a root-only JSON secret in it (valid config.json text, so that
    a daemon reading it as root would carry it on: the attack tests can fail)."""
    path = Path(tempfile.mkdtemp(prefix="protected-", dir=workdir))
    path.chmod(0o700)
    secret = path / "secret.json"
    secret.write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                                  "process": {"args": ["sh"], "env": ["SECRET=root-only-value"], "cwd": "/"}}))
    secret.chmod(0o600)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- who may do what --------------------------------------------------------------------------


def test_a_second_user_cannot_see_signal_wait_cancel_or_launch_as_the_first(start_daemon, user, other_user, bundle):
    daemon = start_daemon(RUNC_RUN_CONF, "--log-format", "json")
    started = daemon.ctl(user, "run", "--detach", "--job-id", "6001", "--bundle", str(bundle), "--", *LONG)
    assert started.returncode == 0, started.stderr
    assert started.stdout == b"6001.0\n"

    assert ps(daemon, other_user) == []
    not_found = b"nodestepctl: no step 6001.0 of yours on this node\n"
    for args in (("signal", "6001.0", "KILL"), ("wait", "6001.0"), ("cancel", "6001.0")):
        result = daemon.ctl(other_user, *args, timeout=30)
        assert (result.returncode, result.stderr) == (1, not_found), args
    for target in (user.name, str(user.uid)):
        result = daemon.ctl(other_user, "run", "--user", target, "--job-id", "6002", "--bundle", str(bundle),
                            "--", "true")
        assert result.returncode == 125, result.stderr
        assert result.stderr == (f"nodestepctl: only operators may launch steps as another user (uid "
                                 f"{other_user.uid} is not one; see `operators` in nodestepd.toml)\n").encode()

    # Untouched: still running, still the first user's.
    (step,) = ps(daemon, user)
    assert (step["job_id"], step["state"], step["uid"]) == (6001, "running", user.uid)
    # Every refusal is logged with the caller's uid (and, for the log only, the user asked for).
    # A user's lookups see their own steps only: nothing links the refusal to the other's step.
    refusals = [r for r in log_records(daemon) if r["event"] in ("request refused", "launch refused")]
    assert [(r["peer_uid"], r["code"]) for r in refusals] == [(other_user.uid, "not-found")] * 3 + [
        (other_user.uid, "permission-denied")] * 2
    assert {r.get("owner_uid") for r in refusals[:3]} == {None}
    assert {r.get("target_uid") for r in refusals[3:]} == {user.uid}

    # root is an operator by default: it sees and cancels anyone's step.
    assert [s["job_id"] for s in json.loads(root_ctl(daemon, "ps", "--json").stdout)] == [6001]
    cancelled = root_ctl(daemon, "cancel", "6001.0")
    assert cancelled.returncode == 0, cancelled.stderr
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []


def test_an_operator_can_see_signal_wait_cancel_and_launch_as_another_user(
    start_daemon, user, other_user, workdir
):
    """other_user is made an operator; the bundle and its config.json are readable by `user` only."""
    private = Path(tempfile.mkdtemp(prefix="private-", dir=workdir))
    os.chown(private, user.uid, user.gid)
    private.chmod(0o700)
    bundle = make_bundle(user, private / "bundle")
    (bundle / "config.json").chmod(0o600)
    assert not readable_by(other_user, bundle / "config.json")
    conf = settings(workdir, f'operators = ["root", "{other_user.name}"]\n')
    daemon = start_daemon(RUNC_RUN_CONF, "--config", conf, "--log-format", "json")

    # Signal and wait: a step of the user's own, seen by the operator.
    started = daemon.ctl(user, "run", "--detach", "--job-id", "6010", "--bundle", str(bundle), "--",
                         "sh", "-c", "trap 'exit 42' USR1; while :; do sleep 1; done")
    assert started.returncode == 0, started.stderr
    assert [(s["job_id"], s["uid"]) for s in ps(daemon, other_user)] == [(6010, user.uid)]
    assert daemon.ctl(other_user, "signal", "6010.0", "USR1").returncode == 0
    assert daemon.ctl(other_user, "wait", "6010.0").returncode == 42

    # Launch as the user: config.json and the output file are opened by the daemon as the user,
    # so a file only the user can read is fine and the output lands in a dir only the user can write.
    output = private / "out.log"
    launched = daemon.ctl(other_user, "run", "--user", user.name, "--detach", "--job-id", "6011",
                          "--output", str(output), "--bundle", str(bundle), "--", "sh", "-c", "echo written; exit 3")
    assert launched.returncode == 0, launched.stderr
    assert daemon.ctl(other_user, "wait", "6011.0").returncode == 3
    assert output.read_bytes() == b"written\n"
    st = output.stat()
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    (step,) = [s for s in ps(daemon, user) if s["job_id"] == 6011]
    assert (step["user"], step["uid"]) == (user.name, user.uid)

    # Cancel, attached launch by uid.
    client = daemon.ctl_popen(other_user, "run", "--user", str(user.uid), "--job-id", "6012", "--bundle", str(bundle),
                              "--", "sh", "-c", "echo ready; exec sleep 1000")
    assert client.stdout.readline() == b"ready\n"
    assert daemon.ctl(other_user, "cancel", "6012.0").returncode == 0
    client.communicate(timeout=30)
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    events = [r["event"] for r in log_records(daemon)]
    assert "request refused" not in events and "launch refused" not in events
    shutil.rmtree(private)


def test_operators_are_root_and_slurm_by_default_and_unknown_names_stop_the_daemon(start_daemon, workdir):
    try:
        slurm = {pwd.getpwnam("slurm").pw_uid}
    except KeyError:
        slurm = set()
    daemon = start_daemon(RUNC_RUN_CONF, "--log-format", "json")
    (security,) = [r for r in log_records(daemon) if r["event"] == "security settings"]
    assert security["operators"] == sorted({0} | slurm) == sorted(resolve_operators(None))

    conf = settings(workdir, 'operators = ["root", "no-such-user-here"]\n')
    result = subprocess.run([str(NODESTEPD), "--config", conf, "--oci-conf", str(daemon.oci_conf)],
                            capture_output=True, timeout=30)
    assert result.returncode == 78
    assert f"{conf}: operators: no user 'no-such-user-here' on this node".encode() in result.stderr


# ---- filesystem attacks -----------------------------------------------------------------------


@pytest.fixture
def scratch(new_dir) -> Path:
    """A world-writable sticky dir, like /tmp or a scratch file system, where ContainerPath points."""
    return new_dir("scratch-", 0o1777)


@pytest.mark.parametrize("planted", ["symlink by the step's user", "symlink by another user", "file by another user",
                                     "dir by another user", "symlink as a parent"])
def test_something_planted_at_a_future_step_dir_gains_nothing(
    start_daemon, user, other_user, bundle, scratch, protected, planted
):
    daemon = start_daemon(RUNC_RUN_CONF + f"ContainerPath={scratch}/%u\n")
    before = fingerprint(protected)
    attacker = user if planted == "symlink by the step's user" else other_user
    parent = scratch / user.name
    if planted == "symlink as a parent":
        target = parent  # the whole %u dir is a link into the protected dir
    else:
        os.makedirs(parent)  # the step user's container dir, left from an earlier step
        parent.chmod(0o1777)
        target = parent / "oci-job6020-0"

    def plant(kind: str, where: str, to: str) -> None:
        if kind == "file":
            with open(where, "w") as f:
                f.write("planted")
        elif kind == "dir":
            os.mkdir(where, 0o777)
        else:
            os.symlink(to, where)

    as_user(attacker, plant, planted.split()[0], str(target), str(protected))
    result = daemon.ctl(user, "run", "--job-id", "6020", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 125, result.stderr
    # A parent others may write is refused before the step dir is looked at (issue 19.1).
    expected = {
        "symlink as a parent": f"{parent} is a symbolic link; refusing to follow it",
    }.get(planted, f"{parent} is writable by others (mode 1777), so the spool dir {target} cannot be made safely")
    assert result.stderr.startswith(f"nodestepctl: {expected}".encode()), result.stderr
    assert fingerprint(protected) == before
    assert not readable_by(attacker, protected)
    assert not readable_by(attacker, protected / "secret.json")
    assert os.path.lexists(target)  # left alone, not removed by the daemon either
    assert runc_containers(user) == []


def test_config_json_symlinked_to_a_root_only_file_gains_nothing(start_daemon, user, bundle, workdir, protected):
    """Both ways in: the user's own launch (the client reads it), and an operator's launch for
    the user (the daemon reads it, as the user). The secret is valid config.json text."""
    evil = make_bundle(user, Path(tempfile.mkdtemp(prefix="evil-", dir=workdir)) / "bundle")
    evil.parent.chmod(0o755)
    (evil / "config.json").unlink()
    as_user(user, os.symlink, str(protected / "secret.json"), str(evil / "config.json"))
    before = fingerprint(protected)
    daemon = start_daemon(RUNC_RUN_CONF)
    message = f"nodestepctl: cannot read {evil}/config.json: Permission denied\n".encode()

    own = daemon.ctl(user, "run", "--job-id", "6030", "--bundle", str(evil), "--", "env")
    assert (own.returncode, own.stderr, own.stdout) == (125, message, b"")
    operator = root_ctl(daemon, "run", "--user", user.name, "--job-id", "6031", "--bundle", str(evil), "--", "env")
    assert (operator.returncode, operator.stderr, operator.stdout) == (125, message, b"")

    assert fingerprint(protected) == before
    assert not readable_by(user, protected / "secret.json")
    assert b"root-only-value" not in daemon.log().encode()
    assert spool_entries(daemon) == []
    shutil.rmtree(evil.parent)


@pytest.fixture
def shadow():
    """/etc/shadow: checked unchanged after each attack; restored (and the test failed) if not."""
    path = Path("/etc/shadow")
    data, before = path.read_bytes(), fingerprint(path)
    yield path
    if fingerprint(path) != before:
        path.write_bytes(data)
        raise AssertionError("/etc/shadow was changed by the attack (restored)")


def test_output_pointing_at_etc_shadow_gains_nothing(start_daemon, user, bundle, workdir, shadow):
    daemon = start_daemon(RUNC_RUN_CONF)
    before = fingerprint(shadow)
    home = Path(tempfile.mkdtemp(prefix="home-", dir=workdir))
    os.chown(home, user.uid, user.gid)
    link = home / "job.log"
    as_user(user, os.symlink, str(shadow), str(link))

    # The user's own launch: the client opens the file with the user's rights.
    for path in (shadow, link):
        result = daemon.ctl(user, "run", "--detach", "--output", str(path), "--job-id", "6040", "--bundle", str(bundle),
                            "--", "echo", "pwned")
        assert result.returncode == 125
        assert result.stderr == f"nodestepctl: cannot open output file {path}: Permission denied\n".encode()
    # An operator (root) launching for the user, into a path the user controls: the daemon
    # opens it as the user, never as root.
    for option in ("--output", "--error"):
        result = root_ctl(daemon, "run", "--user", user.name, "--detach", option, str(link), "--job-id", "6041",
                          "--bundle", str(bundle), "--", "echo", "pwned")
        assert result.returncode == 125, result.stderr
        assert result.stderr == f"nodestepctl: cannot open {link} as {user.name}: Permission denied\n".encode()

    assert fingerprint(shadow) == before
    assert not readable_by(user, shadow)
    assert spool_entries(daemon) == []
    assert ps(daemon, user) == []
    shutil.rmtree(home)


def test_state_file_is_never_written_through_a_symlink(start_daemon, user, bundle, protected):
    """Even a planted next-job-id link (only root could plant it: the state dir is root's 0700)
    is refused, not followed."""
    daemon = start_daemon(RUNC_RUN_CONF)
    before = fingerprint(protected)
    (daemon.state_dir / "next-job-id.tmp").symlink_to(protected / "secret.json")
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr  # the stale tmp link is removed, not written through
    assert fingerprint(protected) == before
    assert not (daemon.state_dir / "next-job-id").is_symlink()
    assert (daemon.state_dir / "next-job-id").read_text() == "100000001\n"


# ---- step names are per user (issue 14.2) ------------------------------------------------------


def test_two_users_steps_with_the_same_ids_never_meet(start_daemon, user, other_user, bundle, workdir):
    """Same job and step ids, two users: neither learns of, blocks or changes the other's step;
    an operator names the user when J.S is ambiguous."""
    daemon = start_daemon(RUNC_RUN_CONF, "--log-format", "json")
    other_dir = Path(tempfile.mkdtemp(prefix="other-", dir=workdir))
    other_dir.chmod(0o755)
    other_bundle = str(make_bundle(other_user, other_dir / "bundle"))

    def run(who, b, job, *command, detach=False):
        extra = ("--detach",) if detach else ()
        return daemon.ctl(who, "run", *extra, "--job-id", str(job), "--bundle", b, "--", *command, timeout=60)

    # The first user's 6020.0 runs; the other user's 6020.0 starts beside it, unaware of it.
    assert run(user, str(bundle), 6020, *LONG, detach=True).returncode == 0
    other = run(other_user, other_bundle, 6020, "sh", "-c", "exit 7")
    assert (other.returncode, other.stderr) == (7, b"")
    assert [(s["job_id"], s["state"]) for s in ps(daemon, user)] == [(6020, "running")]
    assert [(s["job_id"], s["state"], s["status"]) for s in ps(daemon, other_user)] == [(6020, "finished", 7)]
    assert daemon.ctl(other_user, "wait", "6020.0").returncode == 7

    # Squatting: the other user takes 6021 first; the first user's launch of 6021 is not blocked.
    assert run(other_user, other_bundle, 6021, *LONG, detach=True).returncode == 0
    mine = run(user, str(bundle), 6021, "sh", "-c", "exit 5")
    assert (mine.returncode, mine.stderr) == (5, b"")

    # A launch with ids whose other owner's step finished leaves that owner's result alone.
    assert run(user, str(bundle), 6022, "sh", "-c", "exit 3").returncode == 3
    assert run(other_user, other_bundle, 6022, "sh", "-c", "exit 4").returncode == 4
    assert daemon.ctl(user, "wait", "6022.0").returncode == 3
    assert daemon.ctl(other_user, "wait", "6022.0").returncode == 4

    # An operator addressing J.S of several users is told whose they are, and names one.
    ambiguous = root_ctl(daemon, "wait", "6022.0")
    assert ambiguous.returncode == 1
    assert ambiguous.stderr == (f"nodestepctl: step 6022.0 is several users' on this node ({user.name}, "
                                f"{other_user.name}); name one with --user\n").encode()
    assert root_ctl(daemon, "wait", "--user", user.name, "6022.0").returncode == 3
    assert root_ctl(daemon, "wait", "--user", str(other_user.uid), "6022.0").returncode == 4
    # A user naming someone else gets the usual "no step of yours".
    named = daemon.ctl(other_user, "wait", "--user", user.name, "6020.0")
    assert (named.returncode, named.stderr) == (1, b"nodestepctl: no step 6020.0 of yours on this node\n")

    for who, job in ((user, "6020.0"), (other_user, "6021.0")):
        cancelled = root_ctl(daemon, "cancel", "--user", who.name, job)
        assert cancelled.returncode == 0, cancelled.stderr
    assert runc_containers(user) == [] and runc_containers(other_user) == []
    assert spool_entries(daemon) == []
    # Nothing the other user did was refused: no probing by error messages.
    assert [r for r in log_records(daemon) if r["event"] in ("launch refused", "launch failed")] == []
    shutil.rmtree(other_dir)
