"""Attacks on the spool dirs' parents and on the shell the RunTime* commands run in, with a
real daemon, real nodestepctl, real rootless runc and a real attacker: another test user
watching with inotify and swapping the victim's step dir the moment root hands it over.

Issue 19.1 (one user could make another's step run their commands), 19.5 (a deep tree
defeated cleanup and blocked the job.step), 14.5 (%b reached the shell unquoted).
Job ids 6700-6799 (of test_security.py's range) belong to this file.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, NODESTEPD, RUNC_RUN_CONF, make_bundle, read_line_from, runc_containers

LAUNCH_FAILED = 125

# The attacker's watcher, run as the attacker: inotify (through ctypes, no package needed)
# on the directory the victim's step dir will appear in; when root changes the owner of
# the step dir (the hand-over, IN_ATTRIB), rename it away and put a link to the attacker's
# own tree in its place. Prints "ready" once watching, then what happened. If the attacker
# owns the watched dir, they first let the victim through it (it would be 0700).
WATCHER = r"""
import ctypes, os, select, struct, sys
watched, target, tree, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
try:
    os.chmod(watched, 0o755)
except PermissionError:
    pass
libc = ctypes.CDLL(None, use_errno=True)
IN_ATTRIB, IN_CLOEXEC = 0x4, 0o2000000
ifd = libc.inotify_init1(IN_CLOEXEC)
if ifd < 0 or libc.inotify_add_watch(ifd, watched.encode(), IN_ATTRIB) < 0:
    print("cannot watch:", os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
print("ready", flush=True)
while True:
    if not select.select([ifd], [], [], timeout)[0]:
        print("nothing to swap", flush=True)
        sys.exit(0)
    data = os.read(ifd, 65536)
    offset = 0
    while offset < len(data):
        wd, mask, cookie, length = struct.unpack_from("iIII", data, offset)
        name = data[offset + 16:offset + 16 + length].rstrip(b"\0").decode()
        offset += 16 + length
        if name != target:
            continue
        path = os.path.join(watched, target)
        try:
            os.rename(path, path + ".stolen")
            os.symlink(tree, path)
        except OSError as e:
            print("swap refused:", e.strerror, flush=True)
        else:
            print("swapped", flush=True)
        sys.exit(0)
"""


def attacker_tree(root: Path, attacker, victim_bundle: Path) -> Path:
    """What the attacker links in: task-0/config.json that runs the attacker's command (with
    the victim's uid mapping, which anyone can write: uids are no secret)."""
    tree = root / "evil"
    (tree / "task-0").mkdir(parents=True)
    config = json.loads((victim_bundle / "config.json").read_text())
    config["root"]["path"] = str(victim_bundle / "rootfs")
    config["process"]["args"] = ["/bin/echo", "ATTACKER"]
    (tree / "task-0" / "config.json").write_text(json.dumps(config))
    for p in (root, tree, tree / "task-0", tree / "task-0" / "config.json"):
        os.chown(p, attacker.uid, attacker.gid)
        p.chmod(0o755)
    return tree


def start_watcher(attacker, watched: Path, target: str, tree: Path) -> subprocess.Popen:
    watcher = subprocess.Popen(
        attacker.command(["/usr/bin/python3", "-I", "-c", WATCHER, str(watched), target, str(tree), "60"]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=attacker.env, cwd="/")
    read_line_from(watcher.stdout, b"ready")
    return watcher


def watcher_said(watcher: subprocess.Popen) -> str:
    if watcher.poll() is None:
        watcher.kill()
    out, _ = watcher.communicate(timeout=30)
    return out.decode()


@pytest.fixture
def scratch(new_dir) -> Path:
    """A world-writable sticky dir where ContainerPath points, like /var/tmp or a scratch fs."""
    return new_dir("scratch-", 0o1777)


def test_a_parent_made_by_one_users_step_cannot_be_used_to_swap_anothers_step_dir(
    start_daemon, user, other_user, bundle, scratch, new_dir
):
    """19.1 as reported: ContainerPath=/var/tmp/x/oci. The attacker's step makes .../oci;
    the attacker watches it and swaps the victim's oci-job6701-0-uidU when root hands it over."""
    victim, attacker = user, other_user
    daemon = start_daemon(RUNC_RUN_CONF + f"ContainerPath={scratch}/oci\n")
    oci = scratch / "oci"
    own = make_bundle(attacker, new_dir("attacker-bundle-") / "bundle")
    first = daemon.ctl(attacker, "run", "--detach", "--job-id", "6700", "--bundle", str(own), "--", "sleep", "1000")
    assert first.returncode == 0, first.stderr
    tree = attacker_tree(new_dir("attacker-"), attacker, bundle)
    # Without %u in ContainerPath the daemon names the step dir per user (issue 14.2).
    watcher = start_watcher(attacker, oci, f"oci-job6701-0-uid{victim.uid}", tree)

    result = daemon.ctl(victim, "run", "--job-id", "6701", "--bundle", str(bundle), "--", "/bin/echo", "VICTIM")
    said = watcher_said(watcher)
    assert b"ATTACKER" not in result.stdout, (said, result)
    assert (result.returncode, result.stdout) == (0, b"VICTIM\n"), (said, result.stderr)
    assert said == "swap refused: Permission denied\n"
    st = os.lstat(oci)
    assert (st.st_uid, st.st_mode & 0o7777) == (0, 0o755)  # root's, not the attacker's
    assert daemon.ctl(attacker, "cancel", "6700.0").returncode == 0
    assert runc_containers(victim) == runc_containers(attacker) == []


def test_a_parent_planted_by_another_user_is_refused(start_daemon, user, other_user, bundle, scratch, new_dir):
    """19.1, the ContainerPath=/tmp/%u variant: the attacker made /tmp/VICTIM first."""
    victim, attacker = user, other_user
    daemon = start_daemon(RUNC_RUN_CONF + f"ContainerPath={scratch}/%u\n")
    planted = scratch / victim.name
    subprocess.run(attacker.command(["mkdir", "-m", "0755", str(planted)]), check=True)
    tree = attacker_tree(new_dir("attacker-"), attacker, bundle)
    watcher = start_watcher(attacker, planted, "oci-job6702-0", tree)

    result = daemon.ctl(victim, "run", "--job-id", "6702", "--bundle", str(bundle), "--", "/bin/echo", "VICTIM")
    said = watcher_said(watcher)
    assert b"ATTACKER" not in result.stdout, (said, result)
    assert result.returncode == LAUNCH_FAILED, (said, result)
    assert result.stderr == (
        f"nodestepctl: {planted} is owned by uid {attacker.uid}, not root, so the spool dir {planted}/oci-job6702-0"
        " cannot be made safely under it: every existing parent of a step spool dir must be root's and not writable"
        " by others (see ContainerPath in oci-conf.md)\n").encode()
    assert os.listdir(planted) == []
    assert runc_containers(victim) == []


def test_a_container_path_under_the_working_directory_is_refused_at_load(start_daemon, workdir):
    """19.1, the %Z variant: ContainerPath=%Z/.oci with --chdir into a root-only directory
    made root create a directory there and hand it to the user."""
    conf = workdir / "zoci.conf"
    conf.write_text(RUNC_RUN_CONF + "ContainerPath=%Z/.oci\n")
    conf.chmod(0o644)
    expected = (f"{conf}:7: ContainerPath: uses %Z (the working directory (--chdir)), which the user chooses: the daemon"
                " creates the spool dirs there as root, and the user could point it at a directory that only root may"
                " write; use letters the user cannot choose (such as %u, %U, %j, %s, %t, %n) and fixed text")
    checked = subprocess.run([str(NODESTEPCTL), "check-config", str(conf)], capture_output=True, timeout=30)
    assert (checked.returncode, checked.stderr.decode()) == (1, f"{conf}: invalid\n  {expected}\n")
    daemon = subprocess.run([str(NODESTEPD), "--oci-conf", str(conf), "--socket", str(workdir / "zsock"),
                             "--spool-dir", str(workdir / "zspool"), "--state-dir", str(workdir / "zstate")],
                            capture_output=True, timeout=30)
    assert daemon.returncode == 78
    assert expected.encode() in daemon.stderr
    conf.unlink()


# ---- 19.5: a deep tree --------------------------------------------------------------------------

BUILD_DEEP_TREE = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
for _ in range(int(sys.argv[2])):
    os.mkdir("d", dir_fd=fd)
    new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = new
"""


def test_a_30000_deep_tree_in_a_task_dir_is_removed_and_does_not_block_the_step(start_daemon, user, bundle):
    daemon = start_daemon(RUNC_RUN_CONF)
    step_dir = daemon.spool_dir / f"oci-job6710-0-uid{user.uid}"
    started = daemon.ctl(user, "run", "--detach", "--job-id", "6710", "--bundle", str(bundle), "--", "sleep", "1000")
    assert started.returncode == 0, started.stderr
    subprocess.run(user.command(["/usr/bin/python3", "-I", "-c", BUILD_DEEP_TREE, str(step_dir / "task-0"), "30000"]),
                   check=True, timeout=120, env=user.env)
    try:
        removed_and_relaunched(daemon, user, bundle, step_dir)
    finally:
        # Left over (when this fails), it would break the fixtures' recursive clean-up:
        # GNU rm has no depth limit.
        left = [str(daemon.spool_dir / n) for n in os.listdir(daemon.spool_dir)]
        subprocess.run(["rm", "-rf", "--one-file-system", *left], check=True)


def removed_and_relaunched(daemon, user, bundle, step_dir: Path) -> None:
    # The cancel's reply comes once the step is released, its spool dir removed or not.
    cancelled = daemon.ctl(user, "cancel", "6710.0", timeout=120)
    assert cancelled.returncode == 0, cancelled.stderr
    assert not step_dir.exists(), daemon.log()[-3000:]
    again = daemon.ctl(user, "run", "--job-id", "6710", "--bundle", str(bundle), "--", "/bin/echo", "again", timeout=120)
    assert (again.returncode, again.stdout) == (0, b"again\n"), (again.stderr, daemon.log()[-3000:])
    assert [e for e in os.listdir(daemon.spool_dir) if e.startswith(".nodestepd-trash-")] == []
    assert "Too many open files" not in daemon.log()


# ---- 14.5: %b reaching the shell ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["b$(cd;touch pwned)", "b`cd;touch pwned`", "b;cd;touch pwned;"])
def test_a_bundle_path_the_shell_would_act_on_is_refused(start_daemon, user, new_dir, name):
    """IgnoreFileConfigJson=true: %b is the user's bundle, put into RunTimeRun unquoted."""
    marker = Path(user.home) / "pwned"
    if marker.exists():
        marker.unlink()
    daemon = start_daemon('IgnoreFileConfigJson=true\nRunTimeRun="echo bundle=%b"\n')
    base = new_dir("bundles-")
    bad = base / name
    bad.mkdir()
    os.chown(bad, user.uid, user.gid)
    result = daemon.ctl(user, "run", "--job-id", "6720", "--bundle", str(bad), "--", "true")
    if marker.exists():
        marker.unlink()
        raise AssertionError("a command in the bundle path ran outside the container")
    assert result.returncode == LAUNCH_FAILED, result
    char = next(c for c in name[1:] if c in "$`;")
    assert result.stderr == (
        f"nodestepctl: RunTimeRun of {daemon.oci_conf} cannot be run: the bundle path {str(bad)!r} holds {char!r},"
        " which the shell would act on: %b goes into the runtime command unquoted (as in Slurm), so paths there may"
        " hold only letters, digits and / . _ + , : @ % = -\n").encode()
    assert os.listdir(daemon.spool_dir) == []

    good = base / "plain-bundle_1.0"
    good.mkdir()
    ok = daemon.ctl(user, "run", "--job-id", "6721", "--bundle", str(good), "--", "true")
    assert (ok.returncode, ok.stdout) == (0, f"bundle={good}\n".encode()), ok.stderr
