"""The site's stage hooks (nodestepd.toml stage_in, stage_out) with the real daemon, the
real client and real runc, in both of the guide's modes: run as the user with the
step's environment, stage_in pointing the step at another bundle, failing and hanging
(status 125, nothing left), stage_out after the containers are gone and its failure
shown; untrusted hooks refused at start. Job ids 10000-10099 belong to this file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, runc_containers, settle, spool_entries, wait_gone

LAUNCH_FAILED = 125
EX_CONFIG = 78
MODES = {
    "run": (REPO / "tests" / "oci-conf-examples" / "runc-run.conf").read_text(),
    "create-start": (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text(),
}


@pytest.fixture(params=sorted(MODES))
def oci(request) -> str:
    return MODES[request.param]


@pytest.fixture
def hooks(new_dir) -> Path:
    """A root-owned directory for the hooks (trusted like the daemon's other paths)."""
    return new_dir("hooks-")


@pytest.fixture
def out(user_dir) -> Path:
    """Where the hooks (running as the user) leave what the test reads."""
    return user_dir("hook-out-")


def hook(hooks: Path, name: str, body: str) -> Path:
    path = hooks / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def settings(hooks: Path, **values: str) -> str:
    path = hooks / "nodestepd.toml"
    path.write_text("".join(f'{key} = "{value}"\n' for key, value in values.items()))
    return str(path)


def env_of(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def step_records(daemon) -> list[str]:
    """The state dir's records once every step whose exit was told is released (settle)."""
    settle(daemon)
    steps = daemon.state_dir / "steps"
    return sorted(os.listdir(steps)) if steps.exists() else []


def test_hooks_run_as_the_user_with_the_steps_environment(start_daemon, oci, user, bundle, hooks, out):
    stage_in = hook(hooks, "stage-in", f"""
env > {out}/in.env
id -u > {out}/in.uid
pwd -P > {out}/in.cwd
ls "$NODESTEPD_SPOOL_DIR" > {out}/in.spool
""")
    stage_out = hook(hooks, "stage-out", f"""
env > {out}/out.env
id -u > {out}/out.uid
runc --root /run/user/$(id -u)/ list -q > {out}/out.containers
ls "$NODESTEPD_SPOOL_DIR" > {out}/out.spool
""")
    daemon = start_daemon(oci, "--config", settings(hooks, stage_in=stage_in, stage_out=stage_out))
    result = daemon.ctl(user, "run", "--job-id", "10000", "--step-id", "3", "--ntasks", "2", "--bundle", str(bundle),
                        "--", "sh", "-c", "echo in-container")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"in-container\nin-container\n"

    for which in ("in", "out"):
        assert (out / f"{which}.uid").read_text() == f"{user.uid}\n"  # never root
        env = env_of(out / f"{which}.env")
        spool_dir = env["NODESTEPD_SPOOL_DIR"]
        assert spool_dir == f"{daemon.spool_dir}/oci-job10000-3-uid{user.uid}"
        assert {k: v for k, v in env.items() if k.startswith("NODESTEPD_") and k != "NODESTEPD_SPOOL_DIR"} == {
            "NODESTEPD_STAGE": which,
            "NODESTEPD_JOB_ID": "10000",
            "NODESTEPD_STEP_ID": "3",
            "NODESTEPD_TASK_IDS": "0,1",
            "NODESTEPD_BUNDLE": str(bundle),
            "NODESTEPD_ORIG_BUNDLE": str(bundle),
            "NODESTEPD_ROOTFS": f"{bundle}/rootfs",
            "NODESTEPD_CONFIG_JSON": f"{bundle}/config.json",
            "NODESTEPD_UID": str(user.uid),
            "NODESTEPD_GID": str(user.gid),
            "NODESTEPD_USER": user.name,
            **({"NODESTEPD_STEP_STATUS": "0"} if which == "out" else {}),
        }
        assert (env["USER"], env["HOME"]) == (user.name, user.home)
        # The task dirs with their config.json are there for both.
        assert (out / f"{which}.spool").read_text() == "task-0\ntask-1\n"
    assert (out / "in.cwd").read_text() == f"{spool_dir}\n"
    # stage_out runs once the containers are deleted, before the spool dir is removed.
    assert (out / "out.containers").read_text() == ""
    assert spool_entries(daemon) == []
    assert step_records(daemon) == []


def other_bundle(workdir: Path, bundle: Path, user, name: str) -> Path:
    path = workdir / name
    shutil.copytree(bundle, path, symlinks=True)
    (path / "rootfs" / "marker").write_text("the other bundle\n")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(path)], check=True)
    return path


def test_stage_in_points_the_step_at_another_bundle(start_daemon, oci, user, bundle, hooks, out, workdir, request):
    other = other_bundle(workdir, bundle, user, f"other-{request.node.name}")
    try:
        stage_in = hook(hooks, "stage-in", f"echo staging; echo bundle={other}/; echo done\n")
        stage_out = hook(hooks, "stage-out", f"env > {out}/out.env\n")
        daemon = start_daemon(oci, "--config", settings(hooks, stage_in=stage_in, stage_out=stage_out))
        result = daemon.ctl(user, "run", "--job-id", "10001", "--ntasks", "2", "--bundle", str(bundle), "--",
                            "sh", "-c", "cat /marker 2>&1")
        # Every task's config.json was written again from the other bundle's.
        assert (result.returncode, result.stdout) == (0, b"the other bundle\n" * 2), result.stderr
        env = env_of(out / "out.env")
        assert (env["NODESTEPD_BUNDLE"], env["NODESTEPD_ORIG_BUNDLE"]) == (str(other), str(bundle))
        assert env["NODESTEPD_ROOTFS"] == f"{other}/rootfs"
        [step] = json.loads(daemon.ctl(user, "ps", "--json").stdout)
        assert step["bundle"] == str(other)
        assert "stage_in points the step at another bundle" in daemon.log()
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_a_redirected_bundle_is_read_as_the_user(start_daemon, user, bundle, hooks, new_dir):
    """The new bundle is treated like one the user gave: root never reads it for them."""
    secret = new_dir("root-only-bundle-", mode=0o700)
    shutil.copy(bundle / "config.json", secret / "config.json")
    daemon = start_daemon(MODES["run"], "--config",
                          settings(hooks, stage_in=hook(hooks, "stage-in", f"echo bundle={secret}\n")))
    result = daemon.ctl(user, "run", "--job-id", "10002", "--bundle", str(bundle), "--", "true")
    assert result.returncode == LAUNCH_FAILED
    assert f"cannot read {secret}/config.json: Permission denied" in result.stderr.decode(), result.stderr
    assert (spool_entries(daemon), step_records(daemon), runc_containers(user)) == ([], [], [])


def test_a_failing_stage_in_fails_the_launch_leaving_nothing(start_daemon, oci, user, bundle, hooks, out):
    stage_in = hook(hooks, "stage-in", "echo progress; echo 'scratch quota exceeded' >&2; exit 3\n")
    stage_out = hook(hooks, "stage-out", f"touch {out}/stage-out-ran\n")
    daemon = start_daemon(oci, "--config", settings(hooks, stage_in=stage_in, stage_out=stage_out))
    result = daemon.ctl(user, "run", "--job-id", "10003", "--bundle", str(bundle), "--", "echo", "never")
    assert result.returncode == LAUNCH_FAILED
    assert result.stdout == b""
    assert result.stderr.decode() == (f"nodestepctl: stage_in {stage_in} failed with exit status 3: "
                                      "scratch quota exceeded\n")
    assert (spool_entries(daemon), step_records(daemon), runc_containers(user)) == ([], [], [])
    assert json.loads(daemon.ctl(user, "ps", "--json").stdout) == []
    assert not (out / "stage-out-ran").exists()  # nothing was staged in to stage out


def test_a_hanging_stage_in_is_killed_at_runtime_timeout(start_daemon, oci, user, bundle, hooks, out):
    stage_in = hook(hooks, "stage-in", f"sleep 1000 & echo $! > {out}/pid; wait\n")
    daemon = start_daemon(oci, "--runtime-timeout", "2", "--config", settings(hooks, stage_in=stage_in))
    began = time.monotonic()
    result = daemon.ctl(user, "run", "--job-id", "10004", "--bundle", str(bundle), "--", "echo", "never")
    took = time.monotonic() - began
    assert result.returncode == LAUNCH_FAILED
    assert (f"stage_in {stage_in} did not finish within 2 s (runtime_timeout) and was killed"
            in result.stderr.decode()), result.stderr
    assert 2 <= took < 20
    wait_gone([int((out / "pid").read_text())], timeout=10)  # its whole process group was killed
    assert (spool_entries(daemon), step_records(daemon), runc_containers(user)) == ([], [], [])


def test_a_failing_stage_out_is_logged_and_shown(start_daemon, oci, user, bundle, hooks):
    stage_out = hook(hooks, "stage-out", "echo 'cannot copy results back' >&2; exit 4\n")
    daemon = start_daemon(oci, "--config", settings(hooks, stage_out=stage_out))
    result = daemon.ctl(user, "run", "--job-id", "10005", "--bundle", str(bundle), "--", "sh", "-c", "exit 7")
    assert result.returncode == 7  # the step's own status
    message = f"stage_out {stage_out} failed with exit status 4: cannot copy results back"
    assert f"nodestepctl: warning: {message}\n" in result.stderr.decode()
    assert "stage_out failed" in daemon.log()
    [step] = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    assert step["stage_out_failed"] is True
    assert "finished (stage_out failed)" in daemon.ctl(user, "ps").stdout.decode()
    waited = daemon.ctl(user, "wait", "10005.0")
    assert waited.returncode == 7 and message in waited.stderr.decode()
    assert (spool_entries(daemon), step_records(daemon), runc_containers(user)) == ([], [], [])


@pytest.mark.parametrize("setting", ["stage_in", "stage_out"])
def test_untrusted_hooks_are_refused_at_start(start_daemon, user, new_dir, hooks, setting):
    shared = new_dir("shared-", mode=0o777)
    writable = hook(shared, "hook", "exit 0\n")
    with pytest.raises(AssertionError, match="exited with status 1") as e:
        start_daemon(MODES["run"], "--config", settings(hooks, **{setting: str(writable)}))
    assert (f"{setting} {writable} (run as the user at every launch) cannot be used: "
            f"{shared} is writable by others (mode 0777)") in str(e.value)

    missing = hooks / "no-such-hook"
    with pytest.raises(AssertionError, match="exited with status 1") as e:
        start_daemon(MODES["run"], "--config", settings(hooks, **{setting: str(missing)}))
    assert f"{setting} {missing} (run as the user at every launch) cannot be used: {missing}: No such file" \
        in str(e.value)

    with pytest.raises(AssertionError, match=f"exited with status {EX_CONFIG}") as e:
        start_daemon(MODES["run"], "--config", settings(hooks, **{setting: "hooks/stage"}))
    assert f"{setting}: must be the absolute path of a program" in str(e.value)


def test_stage_out_runs_for_a_step_a_restarted_daemon_took_over(start_daemon, user, bundle, hooks, out, workdir,
                                                                 request):
    """The record keeps the hooks, the bundle the user gave and that stage_out is due."""
    other = other_bundle(workdir, bundle, user, f"other-{request.node.name}")
    try:
        stage_in = hook(hooks, "stage-in", f"echo bundle={other}\n")
        stage_out = hook(hooks, "stage-out", f"env > {out}/out.env\n")
        config = settings(hooks, stage_in=stage_in, stage_out=stage_out)
        daemon = start_daemon(MODES["run"], "--config", config, "--steps-on-stop", "leave")
        started = daemon.ctl(user, "run", "--detach", "--job-id", "10006", "--bundle", str(bundle), "--",
                             "sleep", "1000")
        assert started.returncode == 0, started.stderr
        assert daemon.stop() == 0
        assert not (out / "out.env").exists()  # left running: not released
        second = start_daemon("", "--config", config, after=daemon)
        cancelled = second.ctl(user, "cancel", "10006.0")
        assert cancelled.returncode == 0, cancelled.stderr
        env = env_of(out / "out.env")
        assert (env["NODESTEPD_BUNDLE"], env["NODESTEPD_ORIG_BUNDLE"]) == (str(other), str(bundle))
        assert env["NODESTEPD_STEP_STATUS"] == str(128 + 9)  # cancelled: RunTimeKill, then SIGKILL
        assert (spool_entries(second), step_records(second), runc_containers(user)) == ([], [], [])
    finally:
        shutil.rmtree(other, ignore_errors=True)
