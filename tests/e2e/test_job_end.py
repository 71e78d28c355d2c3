"""`nodestepctl job-end JOB` against a real daemon with real runc: every step of the job on
the node ends, whoever's, and is cleaned up before the reply; other jobs run on; only root
may ask."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import make_bundle, runc_containers, spool_entries, wait_gone

CONF_NAMES = ("runc-run.conf", "runc-create-start.conf")


@pytest.fixture(scope="module")
def other_bundle(workdir, other_user):
    return make_bundle(other_user, workdir / "other-bundle")


def root_ctl(daemon, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    from conftest import SYSTEM_PATH
    return subprocess.run(daemon.ctl_argv(*args), env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}, cwd="/",
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def running_steps(daemon, who) -> list[dict]:
    r = daemon.ctl(who, "ps", "--json")
    assert r.returncode == 0, r.stderr
    return [s for s in json.loads(r.stdout) if s["state"] != "finished"]


def detached(daemon, who, bundle, job: int, step: int, *command: str) -> None:
    r = daemon.ctl(who, "run", "--detach", "--job-id", str(job), "--step-id", str(step), "--bundle", str(bundle),
                   "--", *command)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("conf_name", CONF_NAMES)
def test_job_end_ends_every_users_steps_of_the_job(start_daemon, user, other_user, bundle, other_bundle, conf_name):
    from conftest import REPO
    daemon = start_daemon((REPO / "tests" / "oci-conf-examples" / conf_name).read_text())
    detached(daemon, user, bundle, 8101, 0, "sleep", "1000")
    detached(daemon, user, bundle, 8101, 1, "sleep", "1000")
    detached(daemon, other_user, other_bundle, 8101, 0, "sleep", "1000")
    detached(daemon, user, bundle, 8102, 0, "sleep", "1000")  # another job: runs on
    pids = [t["pid"] for who in (user, other_user) for s in running_steps(daemon, who) if s["job_id"] == 8101
            for t in s["tasks"]]
    assert len(pids) == 3 and all(pids), pids

    r = root_ctl(daemon, "job-end", "8101")
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.decode().splitlines())
    assert len(lines) == 3, lines
    assert all(line.startswith("job 8101: ended step 8101.") for line in lines), lines
    assert sum(f"of {other_user.name} (status" in line for line in lines) == 1, lines
    # Ended and cleaned before the reply: no task, container, spool dir or record left of the job.
    wait_gone(pids, timeout=5)  # already gone: the reply came after the end
    for who in (user, other_user):
        assert [s["job_id"] for s in running_steps(daemon, who)] == ([8102] if who is user else [])
        assert not [c for c in runc_containers(who) if ".8101." in c], runc_containers(who)
    assert [e for e in spool_entries(daemon) if "8101" in e] == []
    assert [p.name for p in (daemon.state_dir / "steps").iterdir() if ".8101." in p.name] == []

    r = root_ctl(daemon, "job-end", "8101", "--json")  # again: nothing left to end
    assert (r.returncode, json.loads(r.stdout)) == (0, []), r.stderr
    r = root_ctl(daemon, "job-end", "8102")
    assert r.returncode == 0 and r.stdout.decode().startswith("job 8102: ended step 8102.0 of "), r
    assert running_steps(daemon, user) == []


def test_job_end_of_a_job_without_steps(start_daemon):
    daemon = start_daemon()
    r = root_ctl(daemon, "job-end", "8201")
    assert (r.returncode, r.stdout) == (0, b"job 8201: no steps on this node\n"), r


def test_job_end_is_root_only(start_daemon, user, bundle):
    daemon = start_daemon()
    detached(daemon, user, bundle, 8301, 0, "sleep", "1000")
    r = daemon.ctl(user, "job-end", "8301")
    assert r.returncode != 0
    assert b"only root may end a job on this node" in r.stderr, r.stderr
    assert [s["job_id"] for s in running_steps(daemon, user)] == [8301]  # untouched
    r = daemon.ctl(user, "job-end", "x1")
    assert r.returncode == 2 and b"'x1' is not a job id" in r.stderr, r
    assert daemon.ctl(user, "cancel", "8301.0").returncode == 0
