import os
import re
import resource
import shutil
import stat
import subprocess

import pytest

from nodestepd.step.layout import SpoolError, SpoolLayout, spool_layout
from nodestepd.step.spool import StepSpool

USER_UID = 65534
USER_GID = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="spool tests chown and need root")


def fake_expand(pattern: str, task_id: int) -> str:
    values = {"%": "%", "t": str(task_id), "j": "12", "s": "3", "u": "alice"}
    return re.sub(r"%(.)", lambda m: values[m[1]], pattern)


def layout(container_path, spool_dir="/var/spool/nodestepd", ntasks=2, expand=fake_expand):
    return spool_layout(
        container_path=container_path, spool_dir=spool_dir, expand=expand, job_id=12, step_id=3, ntasks=ntasks,
        uid=1000,
    )


def owner_mode(path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def tree(path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(root, name), path))
    return sorted(out)


# --- spool_layout ---


def test_layout_default():
    assert layout(None) == SpoolLayout(
        step_dir="/var/spool/nodestepd/oci-job12-3-uid1000",
        task_dirs=("/var/spool/nodestepd/oci-job12-3-uid1000/task-0", "/var/spool/nodestepd/oci-job12-3-uid1000/task-1"),
        create_parents=False,
    )


def test_layout_default_trailing_slash_and_empty_container_path():
    assert layout("", spool_dir="/spool/").step_dir == "/spool/oci-job12-3-uid1000"


def test_layout_container_path_without_task():
    assert layout("/scratch/%u/oci/") == SpoolLayout(
        step_dir="/scratch/alice/oci/oci-job12-3",
        task_dirs=("/scratch/alice/oci/oci-job12-3/task-0", "/scratch/alice/oci/oci-job12-3/task-1"),
        create_parents=True,
    )


def test_layout_escaped_percent_t_is_not_a_task_component():
    assert layout("/scratch/%%t", ntasks=1).task_dirs == ("/scratch/%t/oci-job12-3-uid1000/task-0",)


def test_layout_container_path_with_task():
    assert layout("/scratch/%u/oci-%j.%s/task%t/x", ntasks=3) == SpoolLayout(
        step_dir="/scratch/alice/oci-12.3",
        task_dirs=(
            "/scratch/alice/oci-12.3/task0/x",
            "/scratch/alice/oci-12.3/task1/x",
            "/scratch/alice/oci-12.3/task2/x",
        ),
        create_parents=True,
    )


def test_layout_zero_tasks():
    assert layout(None, ntasks=0).task_dirs == ()


@pytest.mark.parametrize(
    "container_path,spool_dir,message",
    [
        (None, "spool", "not an absolute path"),
        ("scratch/%u", "/s", "not an absolute path"),
        ("/scratch/../etc", "/s", "not normalised"),
        ("/scratch//x", "/s", "not normalised"),
        ("/scratch/./x/%t", "/s", "not normalised"),
        ("/%t", "/s", "would be / itself"),
        ("%t/x", "/s", "not an absolute path"),
        ("/a/%t/../../etc", "/s", "not normalised"),
        ("/a\0b", "/s", "NUL"),
    ],
)
def test_layout_rejects(container_path, spool_dir, message):
    with pytest.raises(SpoolError, match=message):
        layout(container_path, spool_dir=spool_dir)


def test_layout_rejects_duplicate_task_dirs():
    def same_for_all(pattern, task_id):
        return pattern.replace("%t", "x")

    with pytest.raises(SpoolError, match="not distinct"):
        layout("/s/j/%t", expand=same_for_all)


def test_layout_rejects_nested_task_dirs():
    def nested(pattern, task_id):
        return pattern.replace("%t", "a/b" if task_id else "a")

    with pytest.raises(SpoolError, match="/s/j/a/b is nested inside task spool dir /s/j/a"):
        layout("/s/j/%t", expand=nested)


def test_layout_rejects_task_dir_outside_step_dir():
    def escape(pattern, task_id):
        return "/elsewhere/x" if "%t" in pattern else pattern

    with pytest.raises(SpoolError, match="/elsewhere/x is not inside the step spool dir /s/j"):
        layout("/s/j/%t", expand=escape)


# --- StepSpool ---


@pytest.fixture
def spool_dir(tmp_path):
    d = tmp_path / "spool"
    d.mkdir(mode=0o755)
    return d


def test_create_write_hand_over_remove(spool_dir):
    fds = open_fds()
    lay = layout(None, spool_dir=str(spool_dir))
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    step = spool_dir / "oci-job12-3-uid1000"
    assert spool.layout is lay
    assert owner_mode(step) == (0, 0, 0o700)
    assert owner_mode(step / "task-0") == (0, 0, 0o700)
    assert owner_mode(step / "task-1") == (0, 0, 0o700)

    path = spool.write_task_file(1, "config.json", b"{}\n", 0o750)
    assert path == str(step / "task-1" / "config.json")
    assert (step / "task-1" / "config.json").read_bytes() == b"{}\n"
    assert owner_mode(path) == (USER_UID, USER_GID, 0o750)

    spool.hand_over()
    for d in (step, step / "task-0", step / "task-1"):
        assert owner_mode(d) == (USER_UID, USER_GID, 0o700)
    # The daemon's spool dir is not the user's.
    assert owner_mode(spool_dir) == (0, 0, 0o755)

    spool.remove()
    assert os.listdir(spool_dir) == []
    assert open_fds() == fds
    spool.remove()  # idempotent
    spool.close()


def test_task_dir_pinned_stays_on_the_directory_when_its_name_is_swapped(spool_dir, tmp_path):
    """The user owns the step dir after hand-over and may rename task-0 and plant a link in
    its place: the pinned path (where runtime commands start, as root) still leads to the
    real task dir, never to the link's target."""
    spool = StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID)
    spool.write_task_file(0, "marker", b"", 0o600)
    spool.hand_over()
    pinned = spool.task_dir_pinned(0)
    assert pinned.startswith(f"/proc/{os.getpid()}/fd/")
    step = spool_dir / "oci-job12-3-uid1000"
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir(mode=0o700)
    os.rename(step / "task-0", step / "moved")
    os.symlink(elsewhere, step / "task-0")
    assert os.path.samefile(pinned, step / "moved")
    assert os.listdir(pinned) == ["marker"]
    os.unlink(step / "task-0")
    os.rename(step / "moved", step / "task-0")
    spool.remove()


def test_large_file_written_completely(spool_dir):
    data = os.urandom(3 * 1024 * 1024 + 7)
    with StepSpool.create(layout(None, spool_dir=str(spool_dir), ntasks=1), USER_UID, USER_GID) as spool:
        path = spool.write_task_file(0, "environment", data, 0o600)
        with open(path, "rb") as f:
            assert f.read() == data
        spool.remove()
    assert not os.path.exists(path)


def test_step_dir_mode_exact_despite_umask_and_setgid_parent(spool_dir):
    os.chmod(spool_dir, 0o2755)
    old = os.umask(0o077)
    try:
        spool = StepSpool.create(layout(None, spool_dir=str(spool_dir), ntasks=1), USER_UID, USER_GID)
    finally:
        os.umask(old)
    try:
        assert owner_mode(spool_dir / "oci-job12-3-uid1000") == (0, 0, 0o700)
        assert owner_mode(spool_dir / "oci-job12-3-uid1000" / "task-0") == (0, 0, 0o700)
    finally:
        spool.remove()


def test_container_path_parents_created_stay_roots_and_only_the_step_dir_is_handed_over(tmp_path):
    """Issue 19.1: a parent handed to the user whose step created it let that user rename
    other users' step dirs inside it. Parents stay root's 0755; the step dir and what is
    inside it are the user's."""
    lay = layout(str(tmp_path / "scratch" / "%u" / "oci-%j.%s" / "t%t" / "x"), ntasks=2)
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    scratch = tmp_path / "scratch"
    step = scratch / "alice" / "oci-12.3"
    for d in (scratch, scratch / "alice"):
        assert owner_mode(d) == (0, 0, 0o755), d
    for d in (step, step / "t0", step / "t0" / "x", step / "t1" / "x"):
        assert owner_mode(d) == (0, 0, 0o700), d
    spool.write_task_file(0, "environment", b"A=1\0", 0o600)
    spool.hand_over()
    for d in (scratch, scratch / "alice"):
        assert owner_mode(d) == (0, 0, 0o755), d
    for d in (step, step / "t0", step / "t0" / "x", step / "t1", step / "t1" / "x"):
        assert owner_mode(d) == (USER_UID, USER_GID, 0o700), d
    assert owner_mode(tmp_path)[0] == 0
    spool.remove()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("owner,mode,last,message", [
    (USER_UID, 0o755, True, "is owned by uid 65534, not root"),
    (USER_UID, 0o755, False, "is owned by uid 65534, not root"),
    (0, 0o777, True, "is writable by others (mode 0777)"),
    (0, 0o1777, True, "is writable by others (mode 1777)"),  # anyone may plant the step dir's name
    (0, 0o775, False, "is writable by its group (mode 0775)"),
    (0, 0o777, False, "is writable by others (mode 0777)"),
])
def test_untrusted_existing_parent_refused(tmp_path, owner, mode, last, message):
    """Issue 19.1: an existing parent someone else could write is refused, with why."""
    base = tmp_path / "base"
    base.mkdir()
    os.chown(base, owner, owner)
    base.chmod(mode)
    lay = layout(str(base) if last else str(base / "%u"), ntasks=1)
    with pytest.raises(SpoolError) as e:
        StepSpool.create(lay, USER_UID, USER_GID)
    assert str(e.value) == (
        f"{base} {message}, so the spool dir {lay.step_dir} cannot be made safely under it: every existing parent"
        " of a step spool dir must be root's and not writable by others (see ContainerPath in oci-conf.md)"
    )
    assert os.listdir(base) == []


def test_sticky_world_writable_dir_is_fine_above_the_last_parent(tmp_path):
    """/tmp/%u: others cannot rename or replace root's %u dir in sticky /tmp."""
    base = tmp_path / "tmp"
    base.mkdir()
    base.chmod(0o1777)
    spool = StepSpool.create(layout(str(base / "%u"), ntasks=1), USER_UID, USER_GID)
    spool.hand_over()
    assert owner_mode(base / "alice") == (0, 0, 0o755)
    spool.remove()
    assert os.listdir(base) == []


def test_existing_parents_are_not_touched_and_nonempty_created_parents_stay(tmp_path):
    base = tmp_path / "base"
    base.mkdir(mode=0o755)
    lay = layout(str(base / "new" / "deeper"), ntasks=1)
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    spool.hand_over()
    assert owner_mode(base) == (0, 0, 0o755)
    # The user put something of their own next to the step dir.
    (base / "new" / "mine").write_text("keep")
    spool.remove()
    assert tree(base) == ["new", "new/mine"]


def test_symlink_parent_component_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "scratch").mkdir()
    os.symlink(outside, tmp_path / "scratch" / "alice")
    lay = layout(str(tmp_path / "scratch" / "%u" / "oci"))
    with pytest.raises(SpoolError, match=f"{tmp_path}/scratch/alice is a symbolic link; refusing to follow it"):
        StepSpool.create(lay, USER_UID, USER_GID)
    assert os.listdir(outside) == []


def test_symlink_to_file_parent_component_refused(tmp_path):
    (tmp_path / "f").write_text("")
    os.symlink(tmp_path / "f", tmp_path / "l")
    with pytest.raises(SpoolError, match="/l is a symbolic link"):
        StepSpool.create(layout(str(tmp_path / "l")), USER_UID, USER_GID)


def test_file_parent_component_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(SpoolError, match=f"{tmp_path}/f is not a directory"):
        StepSpool.create(layout(str(tmp_path / "f" / "x")), USER_UID, USER_GID)
    assert tree(tmp_path) == ["f"]


def test_symlink_at_step_dir_refused(spool_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, spool_dir / "oci-job12-3-uid1000")
    with pytest.raises(SpoolError, match=r"oci-job12-3-uid1000 already exists: is step 12\.3 already running"):
        StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID)
    assert os.listdir(outside) == []
    assert os.readlink(spool_dir / "oci-job12-3-uid1000") == str(outside)


def test_existing_step_dir_refused_and_left_alone(spool_dir):
    step = spool_dir / "oci-job12-3-uid1000"
    step.mkdir()
    (step / "leftover").write_text("x")
    with pytest.raises(SpoolError) as e:
        StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID)
    assert str(e.value) == (
        f"spool dir {step} already exists: is step 12.3 already running, or left over by DisableCleanup?"
    )
    assert tree(spool_dir) == ["oci-job12-3-uid1000", "oci-job12-3-uid1000/leftover"]


def test_existing_step_dir_from_task_pattern(tmp_path):
    # ContainerPath=/tmp/%t would make /tmp itself the step dir: refused, never removed later.
    with pytest.raises(SpoolError, match=f"spool dir {tmp_path} already exists: is this step already running"):
        StepSpool.create(layout(str(tmp_path / "%t")), USER_UID, USER_GID)


def test_missing_daemon_spool_dir_is_not_created(tmp_path):
    with pytest.raises(SpoolError, match="does not exist; the daemon's spool dir must be created at startup"):
        StepSpool.create(layout(None, spool_dir=str(tmp_path / "spool")), USER_UID, USER_GID)
    assert os.listdir(tmp_path) == []


def test_failed_create_leaves_nothing_behind(tmp_path):
    fds = open_fds()
    step = f"{tmp_path}/a/b/oci-job12-3-uid1000"
    # The second task dir's name is too long for the file system: fails after the
    # parents, the step dir and the first task dir were created.
    lay = SpoolLayout(step_dir=step, task_dirs=(f"{step}/task-0/x", f"{step}/{'n' * 300}"), create_parents=True)
    with pytest.raises(SpoolError, match="cannot create .*nnnn: File name too long"):
        StepSpool.create(lay, USER_UID, USER_GID)
    assert os.listdir(tmp_path) == []
    assert open_fds() == fds


def test_failed_create_keeps_preexisting_parents(tmp_path):
    (tmp_path / "a").mkdir()
    step = f"{tmp_path}/a/b/s"
    lay = SpoolLayout(step_dir=step, task_dirs=(f"{step}/{'n' * 300}",))
    with pytest.raises(SpoolError):
        StepSpool.create(lay, USER_UID, USER_GID)
    assert tree(tmp_path) == ["a"]


def test_remove_does_not_follow_planted_symlinks(spool_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("alive")
    (outside / "sub").mkdir()
    (outside / "sub" / "canary2").write_text("alive")

    spool = StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID)
    spool.write_task_file(0, "config.json", b"{}", 0o750)
    spool.hand_over()
    step = spool_dir / "oci-job12-3-uid1000"
    # What the user (now owner of the tree) might leave behind.
    os.symlink(outside, step / "task-0" / "link-to-dir")
    os.symlink(outside / "canary", step / "task-0" / "link-to-file")
    os.symlink(outside, step / "link-at-top")
    os.rename(step / "task-1", step / "renamed")
    (step / "renamed" / "deep" / "er").mkdir(parents=True)
    os.symlink(outside / "sub", step / "renamed" / "deep" / "er" / "l")
    (step / "renamed" / "locked").mkdir(mode=0)
    (step / "renamed" / "locked" / "f").write_text("x")
    os.chmod(step / "renamed" / "locked", 0)
    os.mkfifo(step / "fifo")
    os.link(outside / "canary", step / "hardlink")

    spool.remove()
    assert not os.path.lexists(step)
    assert os.listdir(spool_dir) == []
    assert (outside / "canary").read_text() == "alive"
    assert (outside / "sub" / "canary2").read_text() == "alive"
    assert tree(outside) == ["canary", "sub", "sub/canary2"]


def test_remove_after_step_dir_swapped_for_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_text("alive")
    home = tmp_path / "home"
    lay = layout(str(home), ntasks=1)
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    spool.hand_over()
    step = home / "oci-job12-3-uid1000"
    (step / "task-0" / "result").write_text("x")
    # The parent stays root's, so only root can do this now; remove() must cope anyway.
    os.rename(step, home / "moved")
    os.symlink(outside, step)

    with pytest.raises(SpoolError, match="was replaced by something else, which was left alone"):
        spool.remove()
    assert tree(outside) == ["canary"]
    assert (outside / "canary").read_text() == "alive"
    assert os.path.islink(step)
    # Emptied through the fd held, wherever it went.
    assert tree(home / "moved") == []
    spool.remove()  # already removed as far as it could: no second attempt, no error


def test_remove_does_not_descend_into_mount_points_and_renames_the_rest_aside(spool_dir):
    """Issue 19.5: a step dir that cannot be removed must not block its job.step for good:
    it is renamed aside in its (root-owned) parent, and the error says where."""
    lay = layout(None, spool_dir=str(spool_dir), ntasks=1)
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    spool.hand_over()
    mnt = spool_dir / "oci-job12-3-uid1000" / "task-0" / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], capture_output=True).returncode != 0:
        spool.remove()
        pytest.skip("cannot mount a tmpfs here")
    mounted = str(mnt)
    try:
        (mnt / "canary").write_text("alive")
        with pytest.raises(SpoolError) as e:
            spool.remove()
        (trash,) = [name for name in os.listdir(spool_dir) if name.startswith(".nodestepd-trash-oci-job12-3-")]
        mounted = str(spool_dir / trash / "task-0" / "mnt")
        assert str(e.value) == (
            f"could not fully remove spool dir {lay.step_dir}: {lay.step_dir}/task-0/mnt is a mount point, which was"
            f" left alone (and 2 more problem(s)); what is left was renamed to {spool_dir}/{trash}, so that the step"
            " can be launched again"
        )
        assert open(f"{mounted}/canary").read() == "alive"
        assert owner_mode(spool_dir / trash) == (USER_UID, USER_GID, 0o700)
        # The same job.step can be launched again.
        again = StepSpool.create(lay, USER_UID, USER_GID)
        again.remove()
        assert os.listdir(spool_dir) == [trash]
    finally:
        subprocess.run(["umount", mounted], check=True)


def test_remove_tolerates_already_removed_tree(tmp_path):
    lay = layout(str(tmp_path / "c"), ntasks=1)
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    shutil.rmtree(tmp_path / "c")
    spool.remove()
    assert os.listdir(tmp_path) == []


DEPTH = 30_000

# Run as the step's user (handed an fd on the task dir: pytest's tmp dirs are root's
# alone): what a task can do in its own spool dir, with fds so that the path never has to
# fit PATH_MAX.
BUILD_DEEP_TREE = """
import os, sys
fd = int(sys.argv[1])
for _ in range(int(sys.argv[2])):
    os.mkdir("d", dir_fd=fd)
    open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w").close()
    new = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    fd = new
os.symlink("/etc", "l", dir_fd=fd)
"""


class _CountingOs:
    """os for cleardir.py, counting the fds it holds at once (os.listdir's own dup aside,
    which the lowered RLIMIT_NOFILE below covers)."""

    def __init__(self):
        self.held = self.peak = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, *args, **kwargs):
        fd = os.open(*args, **kwargs)
        self.held += 1
        self.peak = max(self.peak, self.held)
        return fd

    def close(self, fd):
        os.close(fd)
        self.held -= 1


def test_remove_a_30000_deep_tree_with_bounded_fds(spool_dir, monkeypatch):
    """Issue 19.5: cleanup held an fd per level, so a task that built a deep tree made it
    fail with "Too many open files" and the step dir blocked its job.step for good."""
    from nodestepd.step import cleardir

    lay = layout(None, spool_dir=str(spool_dir), ntasks=1)
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    spool.hand_over()
    task = os.open(lay.task_dirs[0], os.O_RDONLY | os.O_DIRECTORY)
    try:
        subprocess.run(["setpriv", f"--reuid={USER_UID}", f"--regid={USER_GID}", "--clear-groups", "--",
                        "/usr/bin/python3", "-I", "-c", BUILD_DEEP_TREE, str(task), str(DEPTH)],
                       check=True, timeout=120, pass_fds=[task])
    finally:
        os.close(task)
    counting = _CountingOs()
    monkeypatch.setattr(cleardir, "os", counting)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for 8 more fds than are open now, a thousandth of the tree's depth.
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(n) for n in open_fds()) + 9, hard))
    try:
        spool.remove()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        # Whatever is left (when this fails) must not break pytest's recursive clean-up of its
        # tmp dirs, shared by every run on the machine: GNU rm has no depth limit.
        leftover = os.listdir(spool_dir)
        subprocess.run(["rm", "-rf", "--one-file-system", *(str(spool_dir / n) for n in leftover)], check=True)
    assert leftover == []
    print(f"peak fds held by clear_dir for a {DEPTH}-deep tree: {counting.peak}")
    assert counting.peak <= 2
    assert counting.held == 0


def test_clear_dir_starts_again_when_a_directory_it_is_in_is_moved(tmp_path, monkeypatch):
    """Going up through '..' is checked: a directory its owner moved meanwhile is not
    mistaken for the one the walk came from; the walk starts again from the top."""
    from nodestepd.step import cleardir

    top = tmp_path / "top"
    (top / "a" / "b" / "c").mkdir(parents=True)
    (top / "elsewhere").mkdir()
    (top / "a" / "b" / "c" / "f").write_text("x")
    real_listdir = os.listdir
    moved = []

    def listdir(fd):
        names = real_listdir(fd)
        # Once the walk is in c, move b (and c with it) under another directory.
        if not moved and names == ["f"]:
            os.rename(top / "a" / "b", top / "elsewhere" / "b")
            moved.append(True)
        return names

    counting = _CountingOs()
    counting.listdir = listdir
    monkeypatch.setattr(cleardir, "os", counting)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    errors: list[str] = []
    try:
        cleardir.clear_dir(fd, str(top), errors)
    finally:
        os.close(fd)
    assert moved and errors == []
    assert os.listdir(top) == []
    assert counting.held == 0


@pytest.mark.parametrize("with_spares", [False, True], ids=["created", "spares"])
def test_write_task_file_is_exclusive_and_does_not_follow_symlinks(spool_dir, tmp_path, request, with_spares):
    # With spares, a task file is written in the spare directory and moved in: never over
    # an existing one, never through a link planted in its place.
    spares = request.getfixturevalue("spares") if with_spares else None
    target = tmp_path / "target"
    target.write_text("original")
    spool = StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID, spares)
    try:
        spool.write_task_file(0, "config.json", b"1", 0o750)
        with pytest.raises(SpoolError, match="cannot create .*task-0/config.json: File exists"):
            spool.write_task_file(0, "config.json", b"2", 0o750)
        os.symlink(target, spool_dir / "oci-job12-3-uid1000" / "task-1" / "environment")
        with pytest.raises(SpoolError, match="task-1/environment"):
            spool.write_task_file(1, "environment", b"evil", 0o600)
        assert target.read_text() == "original"
        assert owner_mode(target)[0] == 0
        assert (spool_dir / "oci-job12-3-uid1000" / "task-0" / "config.json").read_bytes() == b"1"
        assert os.path.islink(spool_dir / "oci-job12-3-uid1000" / "task-1" / "environment")
    finally:
        spool.remove()
    if with_spares:
        assert len(os.listdir(tmp_path / "spare")) == 1  # 3 directories and 3 files taken, none left behind


@pytest.mark.parametrize("name", ["", "a/b", "..", ".", "/x", "a\0"])
def test_write_task_file_rejects_non_plain_names(spool_dir, name):
    with StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID) as spool:
        with pytest.raises(ValueError):
            spool.write_task_file(0, name, b"", 0o600)
        spool.remove()


def test_write_task_file_bad_index(spool_dir):
    with StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID) as spool:
        with pytest.raises(IndexError):
            spool.write_task_file(2, "x", b"", 0o600)
        spool.remove()


def test_close_keeps_tree_and_is_idempotent(spool_dir):
    fds = open_fds()
    with StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID) as spool:
        spool.write_task_file(0, "config.json", b"{}", 0o750)
        spool.hand_over()
    assert open_fds() == fds
    spool.close()
    assert tree(spool_dir) == ["oci-job12-3-uid1000", "oci-job12-3-uid1000/task-0", "oci-job12-3-uid1000/task-0/config.json", "oci-job12-3-uid1000/task-1"]
    with pytest.raises(SpoolError, match="closed without removal"):
        spool.remove()
    with pytest.raises(SpoolError, match="already closed"):
        spool.write_task_file(1, "x", b"", 0o600)
    with pytest.raises(SpoolError, match="already closed"):
        spool.hand_over()
    assert tree(spool_dir)[0] == "oci-job12-3-uid1000"


# --- reopen (after a daemon restart) ---


def _created_and_closed(lay):
    spool = StepSpool.create(lay, USER_UID, USER_GID)
    spool.write_task_file(0, "config.json", b"{}", 0o600)
    spool.hand_over()
    created = spool.created_dirs()
    spool.close()  # the daemon died: its fds are gone, the tree stays
    return created


def test_reopen_and_remove_after_restart(spool_dir):
    lay = layout(None, spool_dir=str(spool_dir))
    created = _created_and_closed(lay)
    assert [p for p, _, _ in created] == [lay.step_dir, *lay.task_dirs]
    fds = open_fds()
    spool = StepSpool.reopen(lay, created, USER_UID, USER_GID)
    assert spool is not None
    assert os.path.samefile(spool.task_dir_pinned(1), lay.task_dirs[1])
    spool.remove()
    assert os.listdir(spool_dir) == []
    assert open_fds() == fds


def test_reopen_removes_created_parents_too(tmp_path):
    lay = layout(str(tmp_path / "scratch/%u/%j.%s/%t"), ntasks=2)
    created = _created_and_closed(lay)
    assert [p for p, _, _ in created][0] == str(tmp_path / "scratch")
    spool = StepSpool.reopen(lay, created, USER_UID, USER_GID)
    spool.remove()
    assert os.listdir(tmp_path) == []


def test_reopen_of_a_removed_step_dir_is_none(spool_dir):
    lay = layout(None, spool_dir=str(spool_dir))
    created = _created_and_closed(lay)
    shutil.rmtree(lay.step_dir)
    assert StepSpool.reopen(lay, created, USER_UID, USER_GID) is None


def test_reopen_leaves_a_replaced_step_dir_alone(spool_dir, tmp_path):
    """The user owns the step dir and may put another directory (or a link) in its place
    while the daemon is down: the restarted daemon must not remove that."""
    lay = layout(None, spool_dir=str(spool_dir))
    created = _created_and_closed(lay)
    os.rename(lay.step_dir, str(tmp_path / "moved"))
    os.mkdir(lay.step_dir)
    (spool_dir / "oci-job12-3-uid1000" / "keep").write_text("mine")
    with pytest.raises(SpoolError, match="no longer the directory the step created"):
        StepSpool.reopen(lay, created, USER_UID, USER_GID)
    assert (spool_dir / "oci-job12-3-uid1000" / "keep").read_text() == "mine"
    shutil.rmtree(lay.step_dir)
    os.symlink(tmp_path / "moved", lay.step_dir)
    with pytest.raises(SpoolError, match="symbolic link"):
        StepSpool.reopen(lay, created, USER_UID, USER_GID)
    assert (tmp_path / "moved" / "task-0" / "config.json").exists()


def test_reopen_refuses_a_swapped_task_dir(spool_dir, tmp_path):
    lay = layout(None, spool_dir=str(spool_dir))
    created = _created_and_closed(lay)
    os.rename(lay.task_dirs[0], str(tmp_path / "moved"))
    os.symlink(tmp_path / "moved", lay.task_dirs[0])
    fds = open_fds()
    with pytest.raises(SpoolError, match="symbolic link"):
        StepSpool.reopen(lay, created, USER_UID, USER_GID)
    assert open_fds() == fds


# --- a spool recorded as pending: the daemon died while creating it ---


def test_remove_pending_removes_the_step_dir_and_what_is_in_it_but_not_the_parents(tmp_path):
    lay = layout(str(tmp_path / "scratch/%u"), ntasks=2)
    _created_and_closed(lay)  # as far as create got, handed over, files written
    os.symlink("/etc", os.path.join(lay.task_dirs[0], "link"))  # the user's: never followed
    fds = open_fds()
    assert StepSpool.remove_pending(lay) is True
    assert os.listdir(tmp_path / "scratch/alice") == []  # the parents the launch made stay
    assert os.path.isdir("/etc") and open_fds() == fds
    assert StepSpool.remove_pending(lay) is False  # gone: nothing to do
    shutil.rmtree(tmp_path / "scratch")
    assert StepSpool.remove_pending(lay) is False  # never created, not even its parents


def test_remove_pending_leaves_the_step_dir_alone_under_an_untrusted_parent(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    lay = layout(str(base), ntasks=1)
    _created_and_closed(lay)
    os.chown(base, USER_UID, USER_GID)  # a user could have renamed anything into it
    fds = open_fds()
    with pytest.raises(SpoolError, match=f"{base} is owned by uid 65534, not root"):
        StepSpool.remove_pending(lay)
    assert os.listdir(lay.step_dir) == ["task-0"] and open_fds() == fds
    os.chown(base, 0, 0)
    base.chmod(0o777)
    with pytest.raises(SpoolError, match="is writable by others"):
        StepSpool.remove_pending(lay)
    assert os.path.isdir(lay.task_dirs[0])


def test_remove_pending_refuses_a_symlink_at_the_step_dir(spool_dir, tmp_path):
    lay = layout(None, spool_dir=str(spool_dir))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep").write_text("x")
    os.symlink(tmp_path / "elsewhere", lay.step_dir)
    with pytest.raises(SpoolError, match="symbolic link"):
        StepSpool.remove_pending(lay)
    assert (tmp_path / "elsewhere" / "keep").exists()


# --- spares: directories and files made ahead (statefiles.SpareFiles), moved into place ---


@pytest.fixture
def spares(tmp_path):
    """The state dir's spares, on the spool's filesystem (tmp_path)."""
    from nodestepd.step.statefiles import SpareFiles

    target = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    made = SpareFiles(str(tmp_path / "spare"), target, keep=4, keep_dirs=3)
    os.close(target)
    made.top_up()
    yield made
    made.close()


def inode(path) -> int:
    return os.lstat(path).st_ino


def test_a_spool_is_made_of_spares_until_it_is_handed_over(spool_dir, spares, tmp_path):
    spare = tmp_path / "spare"
    before = {inode(spare / n) for n in os.listdir(spare)}
    fds = open_fds()
    spool = StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID, spares)
    step = spool_dir / "oci-job12-3-uid1000"
    assert {inode(step), inode(step / "task-0"), inode(step / "task-1")} <= before
    assert [owner_mode(d) for d in (step, step / "task-0", step / "task-1")] == [(0, 0, 0o700)] * 3
    spool.write_task_file(1, "config.json", b"{}\n", 0o750)
    assert inode(step / "task-1" / "config.json") in before
    assert (step / "task-1" / "config.json").read_bytes() == b"{}\n"
    assert owner_mode(step / "task-1" / "config.json") == (USER_UID, USER_GID, 0o750)
    assert len(os.listdir(spare)) == 7 - 4  # three directories and a file taken
    spool.hand_over()
    spool.write_task_file(0, "environment", b"A=1\n", 0o600)  # the user's dir now: created in place
    assert inode(step / "task-0" / "environment") not in before
    assert owner_mode(step / "task-0" / "environment") == (USER_UID, USER_GID, 0o600)
    assert len(os.listdir(spare)) == 3
    spool.remove()
    assert os.listdir(spool_dir) == []
    # Nothing left open, and the fds of the four spares taken closed with them.
    assert open_fds() <= fds and len(fds - open_fds()) == 4


def test_a_spare_is_never_moved_over_an_existing_step_dir_and_is_not_left(spool_dir, spares, tmp_path):
    step = spool_dir / "oci-job12-3-uid1000"
    step.mkdir()  # empty: a plain rename would have replaced it
    with pytest.raises(SpoolError, match="already exists"):
        StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID, spares)
    assert tree(spool_dir) == ["oci-job12-3-uid1000"]
    assert len(os.listdir(tmp_path / "spare")) == 7 - 1  # the spare taken is gone, not left behind


def test_spares_on_another_filesystem_are_not_taken(spool_dir, spares, tmp_path):
    spares.device = -1  # as if the state dir were on another filesystem than the spool's
    spool = StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID, spares)
    spool.write_task_file(0, "config.json", b"{}", 0o750)
    assert len(os.listdir(tmp_path / "spare")) == 7
    spool.remove()


def test_when_the_spares_run_out_the_spool_makes_its_own(spool_dir, spares, tmp_path):
    lay = layout(None, spool_dir=str(spool_dir), ntasks=4)  # 5 directories, 3 spares
    spool = StepSpool.create(lay, USER_UID, USER_GID, spares)
    for i in range(4):
        for name in ("config.json", "environment"):  # 8 files, 4 spares
            spool.write_task_file(i, name, name.encode(), 0o640)
    step = spool_dir / "oci-job12-3-uid1000"
    assert [(step / f"task-{i}" / "environment").read_bytes() for i in range(4)] == [b"environment"] * 4
    assert os.listdir(tmp_path / "spare") == []
    spool.remove()
    assert os.listdir(spool_dir) == []


def test_under_selinux_the_spool_takes_no_spares(spool_dir, tmp_path, monkeypatch):
    """A moved file keeps the label of the directory it was made in (the state dir's)."""
    from nodestepd.step import statefiles

    monkeypatch.setattr(statefiles, "SELINUX_ENFORCE", str(tmp_path))  # a path that exists
    target = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    made = statefiles.SpareFiles(str(tmp_path / "spare"), target, keep=2, keep_dirs=3)
    os.close(target)
    made.top_up()
    spool = StepSpool.create(layout(None, spool_dir=str(spool_dir)), USER_UID, USER_GID, made)
    spool.write_task_file(0, "config.json", b"{}", 0o750)
    assert made.device is None and len(os.listdir(tmp_path / "spare")) == 2 + 3
    taken = made.take()  # the records' files are still taken
    assert taken is not None
    os.close(taken.fd)
    spool.remove()
    made.close()
