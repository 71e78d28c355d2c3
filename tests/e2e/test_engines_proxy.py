"""podman through nodestep-oci: what only the proxy adds, seen from the daemon's side. Each
container is a step (in `nodestepctl ps` with its engine id and job ids), `rm -f` leaves
nothing behind, a container made inside a Slurm job ends with `job-end`, and a container
outlives a daemon killed and restarted under it with its real status.

test_engines.py runs the engines' own scenarios through the proxy as well."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, RUNC_RUN_CONF, SYSTEM_PATH, runc_containers, spool_entries, wait_gone
from engines import IMAGE, busybox_tar, make_podman, proxy_missing, proxy_runtime, wait_output  # noqa: F401

CREATE_START_CONF = (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text()
SLEEPS = 'echo ready; while :; do sleep 0.2; done'


@pytest.fixture(params=["proxy-run", "proxy-create-start"])
def proxied(request, start_daemon, workdir, user):
    """(daemon, runtime): a daemon with a runc oci.conf in one of its modes, and nodestep-oci in front of it."""
    why = proxy_missing()
    if why:
        pytest.skip(why)
    daemon = start_daemon(RUNC_RUN_CONF if request.param == "proxy-run" else CREATE_START_CONF)
    return daemon, proxy_runtime(daemon, request.param, workdir, user)


def steps(daemon, user, *, running: bool = True) -> list[dict]:
    r = daemon.ctl(user, "ps", "--json")
    assert r.returncode == 0, r.stderr
    return [s for s in json.loads(r.stdout) if not running or s["state"] != "finished"]


def the_step(daemon, user, cid: str) -> dict:
    mine = [s for s in steps(daemon, user) if s.get("container_id") == cid]
    assert len(mine) == 1, (cid, steps(daemon, user, running=False))
    return mine[0]


def root_ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(daemon.ctl_argv(*args), env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}, cwd="/",
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)


def test_a_container_is_a_step_in_ps_with_its_engine_id(make_podman, user, other_user, proxied):
    daemon, runtime = proxied
    podman = make_podman(user, runtime)
    cid = podman.ok("run", "-d", IMAGE, "sh", "-c", SLEEPS).strip()
    wait_output(podman, cid)
    step = the_step(daemon, user, cid)
    assert (step["user"], step["state"], step["tasks"][0]["pid"] > 0) == (user.name, "running", True), step
    table = daemon.ctl(user, "ps").stdout.decode()
    assert cid[:12] in table and f"{step['job_id']}.{step['step_id']}" in table, table
    assert [s for s in steps(daemon, other_user) if s.get("container_id") == cid] == []  # not someone else's
    podman.ok("rm", "--force", "--time", "0", cid)


def test_rm_force_leaves_nothing(make_podman, user, proxied):
    daemon, runtime = proxied
    podman = make_podman(user, runtime)
    cid = podman.ok("run", "-d", IMAGE, "sh", "-c", SLEEPS).strip()
    wait_output(podman, cid)
    step = the_step(daemon, user, cid)
    anchor = int(podman.inspect(cid, "{{.State.Pid}}"))
    conmon = int(podman.inspect(cid, "{{.State.ConmonPid}}"))
    task = step["tasks"][0]["pid"]
    job = f".{step['job_id']}.{step['step_id']}."
    assert [c for c in runc_containers(user) if job in c], runc_containers(user)

    podman.ok("rm", "--force", "--time", "2", cid)
    assert podman.ok("ps", "--all", "--quiet") == ""
    wait_gone([anchor, conmon, task])
    assert steps(daemon, user) == []
    assert [c for c in runc_containers(user) if job in c] == []
    assert spool_entries(daemon) == []
    assert [p.name for p in (daemon.state_dir / "steps").iterdir()] == []


def test_job_end_ends_the_containers_of_the_job(make_podman, user, proxied):
    """Whatever job a container belongs to (here a daemon-assigned one), job-end of that job
    ends it: the engine sees it exit as cancelled, and the other containers run on."""
    daemon, runtime = proxied
    podman = make_podman(user, runtime)
    ended, other = (podman.ok("run", "-d", IMAGE, "sh", "-c", SLEEPS).strip() for _ in range(2))
    for cid in (ended, other):
        wait_output(podman, cid)
    job = the_step(daemon, user, ended)["job_id"]
    assert the_step(daemon, user, other)["job_id"] != job
    r = root_ctl(daemon, "job-end", str(job))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith(f"job {job}: ended step {job}."), r.stdout
    status = podman.ok("wait", ended).strip()
    assert status in ("137", "143"), status  # cancelled: RunTimeKill's SIGTERM, or SIGKILL after kill_wait
    assert [s["container_id"] for s in steps(daemon, user)] == [other]
    podman.ok("rm", "--force", "--time", "0", ended, other)


def test_a_container_made_inside_a_slurm_job_ends_with_job_end(make_podman, user, proxied):
    daemon, runtime = proxied
    podman = make_podman(user, runtime)
    slurm = {"SLURM_JOB_ID": "8501", "SLURM_STEP_ID": "3"}
    # podman gives its runtime an environment of its own (conmon's, without SLURM_*): the job
    # reaches nodestep-oci through the container's environment (-e NAME takes podman's value).
    inside = podman.ok("run", "-d", "-e", "SLURM_JOB_ID", "-e", "SLURM_STEP_ID", IMAGE, "sh", "-c", SLEEPS,
                       env=slurm).strip()
    outside = podman.ok("run", "-d", IMAGE, "sh", "-c", SLEEPS).strip()
    for cid in (inside, outside):
        wait_output(podman, cid)
    assert the_step(daemon, user, inside)["job_id"] == 8501
    assert the_step(daemon, user, outside)["job_id"] != 8501

    r = root_ctl(daemon, "job-end", "8501")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().startswith(f"job 8501: ended step 8501."), r.stdout
    status = podman.ok("wait", inside).strip()
    assert status in ("137", "143"), status  # cancelled: RunTimeKill's SIGTERM, or SIGKILL after kill_wait
    assert [s["container_id"] for s in steps(daemon, user)] == [outside]
    podman.ok("rm", "--force", "--time", "0", inside, outside)


def test_a_container_survives_a_daemon_killed_and_restarted(make_podman, user, user_dir, proxied, start_daemon):
    daemon, runtime = proxied
    podman = make_podman(user, runtime)
    shared = user_dir("engines-go-")
    cid = podman.ok("run", "-d", "-v", f"{shared}:/x", IMAGE, "sh", "-c",
                    "echo ready; while [ ! -e /x/go ]; do sleep 0.1; done; exit 5").strip()
    wait_output(podman, cid)
    anchor = int(podman.inspect(cid, "{{.State.Pid}}"))
    daemon.proc.kill()
    daemon.proc.wait(timeout=60)
    assert os.path.exists(f"/proc/{anchor}")  # the anchor rides through
    again = start_daemon(after=daemon)
    assert the_step(again, user, cid)["state"] == "running"
    (shared / "go").touch()
    assert podman.ok("wait", cid).strip() == "5"
    assert podman.inspect(cid, "{{.State.ExitCode}}") == "5"
    podman.ok("rm", cid)
