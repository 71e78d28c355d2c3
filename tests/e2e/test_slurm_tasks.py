"""Slurm's identity: SLURM_* ids for %j %s %t, per-task launches (srun -n 2 on one node), and the
task variables the container sees. Through the real daemon and client, with the recording
runtime (what exactly the runtime sees) and with real runc (the containers' names).
Job ids 3000-3999 belong to this file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from conftest import read_line_from, runc_containers, spool_entries
from test_recording_runtime import load, oci_conf, replacements, slurm_vars

from nodestepd.step.layout import SpoolError, spool_layout
from nodestepd.step.env import SlurmTask, slurm_task_env


@pytest.fixture
def out(user_dir) -> Path:
    return user_dir("records-")


def srun_env(user, job: int, step: int, procid: int | None = None, localid: int | None = None,
             **extra: str) -> dict[str, str]:
    """The variables srun sets for one task (the ones nodestepctl reads)."""
    env = {**user.env, "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step), **extra}
    if procid is not None:
        env["SLURM_PROCID"] = str(procid)
    if localid is not None:
        env["SLURM_LOCALID"] = str(localid)
    return env


def container_env(record: dict) -> dict[str, str]:
    return dict(e.split("=", 1) for e in record["bundle_config"]["content"]["process"]["env"])


# ---- pure parts ------------------------------------------------------------------------------


def test_slurm_task_env():
    task = SlurmTask(job_id=7, step_id=2, task_id=5, local_id=1, node_id=3, container="/b", container_id="c1")
    assert slurm_task_env(task) == {
        "SLURM_JOB_ID": "7", "SLURM_JOBID": "7", "SLURM_STEP_ID": "2", "SLURM_STEPID": "2", "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1", "SLURM_CONTAINER": "/b", "SLURM_NODEID": "3", "SLURM_CONTAINER_ID": "c1",
    }
    unknown = slurm_task_env(SlurmTask(7, 2, 5, 1, None, "/b", None))
    assert "SLURM_NODEID" not in unknown and "SLURM_CONTAINER_ID" not in unknown


def test_per_task_spool_layout():
    def layout(**kw):
        return spool_layout(container_path=kw.pop("container_path", None), spool_dir="/spool",
                            expand=lambda p, t: p.replace("%t", str(t)).replace("%u", "alice"), job_id=9, step_id=1,
                            uid=1000, **kw)

    assert layout(ntasks=2).task_dirs == ("/spool/oci-job9-1-uid1000/task-0", "/spool/oci-job9-1-uid1000/task-1")
    part = layout(ntasks=1, task_offset=3)
    assert (part.step_dir, part.task_dirs) == ("/spool/oci-job9-1-task3-uid1000",
                                               ("/spool/oci-job9-1-task3-uid1000/task-3",))
    assert layout(ntasks=1, task_offset=3, container_path="/scratch").step_dir == "/scratch/oci-job9-1-task3-uid1000"
    assert layout(ntasks=1, task_offset=3, container_path="/scratch/%u").step_dir == "/scratch/alice/oci-job9-1-task3"
    with pytest.raises(SpoolError, match="cannot be launched task by task"):
        layout(ntasks=1, task_offset=3, container_path="/scratch/%t")


# ---- through the daemon ------------------------------------------------------------------------


def test_slurm_ids_reach_the_runtime_and_the_container(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out))
    env = srun_env(user, 3001, 4, procid=5, localid=1, SLURM_NODEID="2", SLURM_CONTAINER_ID="my-ctr")
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "true", env=env)
    assert result.returncode == 0, result.stderr
    record = load(out / "run-5.json")
    values = replacements(record)[0]
    assert (values["j"], values["s"], values["t"]) == ("3001", "4", "5")
    step_dir = os.path.join(os.path.realpath(daemon.spool_dir), f"oci-job3001-4-task5-uid{user.uid}")
    assert values["m"] == step_dir and record["cwd"] == f"{step_dir}/task-5"
    seen = container_env(record)
    assert {k: seen[k] for k in seen if k.startswith("SLURM_")} == {
        "SLURM_JOB_ID": "3001", "SLURM_JOBID": "3001", "SLURM_STEP_ID": "4", "SLURM_STEPID": "4",
        "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_CONTAINER": str(bundle),
        "SLURM_CONTAINER_ID": "my-ctr",
    }


def test_slurm_variables_are_set_before_env_exclude(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, extra='EnvExclude="^SLURM_(NODEID|CONTAINER_ID)="'))
    env = srun_env(user, 3002, 0, procid=0, localid=0, SLURM_NODEID="2", SLURM_CONTAINER_ID="x")
    assert daemon.ctl(user, "run", "--bundle", str(bundle), "--", "true", env=env).returncode == 0
    seen = container_env(load(out / "run-0.json"))
    assert "SLURM_NODEID" not in seen and "SLURM_CONTAINER_ID" not in seen
    assert seen["SLURM_PROCID"] == "0"


def test_the_daemons_ids_override_a_stale_outer_step(start_daemon, user, bundle, out):
    """A step launched with --job-id from inside another step: the container sees the ids of its own step."""
    daemon = start_daemon(oci_conf(out))
    env = {**user.env, "SLURM_JOB_ID": "1", "SLURM_STEP_ID": "1", "SLURM_PROCID": "1"}
    result = daemon.ctl(user, "run", "--job-id", "3003", "--step-id", "2", "--ntasks", "2", "--bundle", str(bundle),
                        "--", "true", env=env)
    assert result.returncode == 0, result.stderr
    for task in (0, 1):
        record = load(out / f"run-{task}.json")
        assert replacements(record)[0]["t"] == str(task)
        assert sorted(e for e in record["bundle_config"]["content"]["process"]["env"] if e.startswith("SLURM_")) == \
            sorted(slurm_vars(3003, bundle, step=2, task=task))


def test_two_per_task_launches_of_one_step_share_the_node(start_daemon, user, bundle, out):
    """srun -n 2 on one node: two nodestepctl, one job.step, SLURM_PROCID 0 and 1."""
    daemon = start_daemon(oci_conf(out, run="--say started-%t --block"))
    clients = [
        daemon.ctl_popen(user, "run", "--bundle", str(bundle), "--", "app",
                         env=srun_env(user, 3010, 0, procid=task, localid=task))
        for task in (0, 1)
    ]
    for task, client in enumerate(clients):
        read_line_from(client.stdout, f"started-{task}".encode())
    assert spool_entries(daemon) == [f"oci-job3010-0-task0-uid{user.uid}", f"oci-job3010-0-task1-uid{user.uid}"]
    for task in (0, 1):
        record = load(out / f"run-{task}.json")
        assert replacements(record)[0]["t"] == str(task)
        assert container_env(record)["SLURM_LOCALID"] == str(task)

    # The same task again is refused; it changes nothing.
    again = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "app", env=srun_env(user, 3010, 0, procid=1))
    assert again.returncode == 125
    assert "task 1 of step 3010.0 is already running on this node" in again.stderr.decode()
    # So is a whole-step launch that would take task 0 or 1.
    whole = daemon.ctl(user, "run", "--job-id", "3010", "--ntasks", "2", "--bundle", str(bundle), "--", "app")
    assert whole.returncode == 125 and b"task 0 of step 3010.0 is already running" in whole.stderr

    ps = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    assert sorted((s["job_id"], s["step_id"], [t["task_id"] for t in s["tasks"]]) for s in ps) == [
        (3010, 0, [0]), (3010, 0, [1])]

    # One cancel ends the whole step: both parts.
    cancel = daemon.ctl(user, "cancel", "3010.0")
    assert cancel.returncode == 0, cancel.stderr
    for client in clients:
        client.communicate(timeout=30)
    assert sorted(r for r in os.listdir(out) if r.startswith("kill-")) == ["kill-0.json", "kill-1.json"]
    assert spool_entries(daemon) == []


def test_wait_for_a_step_launched_task_by_task(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, run="--exit 0,3 --task %t --say started-%t --block"))
    clients = [
        daemon.ctl_popen(user, "run", "--bundle", str(bundle), "--", "app", env=srun_env(user, 3011, 1, procid=task))
        for task in (0, 1)
    ]
    for task, client in enumerate(clients):
        read_line_from(client.stdout, f"started-{task}".encode())
    waiter = daemon.ctl_popen(user, "wait", "3011.1")
    signal_result = daemon.ctl(user, "signal", "3011.1", "TERM")  # record.py ends on SIGTERM, with its --exit code
    assert signal_result.returncode == 0, signal_result.stderr
    assert [c.wait(timeout=30) for c in clients] == [0, 3]
    assert waiter.wait(timeout=30) == 3  # the first non-zero task status over both parts


def test_per_task_launch_is_refused_with_a_shared_container_path(start_daemon, user, bundle, out, workdir):
    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=workdir))
    scratch.chmod(0o755)
    daemon = start_daemon(oci_conf(out, extra=f"ContainerPath={scratch}/%j/%t"))
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "app", env=srun_env(user, 3012, 0, procid=0))
    assert result.returncode == 125
    assert "cannot be launched task by task; launch it once with --ntasks instead" in result.stderr.decode()


def test_explicit_ntasks_under_srun_is_a_whole_step(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out))
    env = srun_env(user, 3013, 0, procid=4, localid=2)
    assert daemon.ctl(user, "run", "--ntasks", "2", "--bundle", str(bundle), "--", "x", env=env).returncode == 0
    assert sorted(r for r in os.listdir(out) if r.startswith("run-")) == ["run-0.json", "run-1.json"]


def test_task_id_option_outside_srun(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out))
    result = daemon.ctl(user, "run", "--job-id", "3014", "--task-id", "7", "--local-id", "3", "--bundle", str(bundle),
                        "--", "x")
    assert result.returncode == 0, result.stderr
    seen = container_env(load(out / "run-7.json"))
    assert (seen["SLURM_PROCID"], seen["SLURM_LOCALID"]) == ("7", "3")
    usage = daemon.ctl(user, "run", "--local-id", "3", "--bundle", str(bundle), "--", "x")
    assert usage.returncode == 2 and b"--local-id goes with a per-task launch" in usage.stderr


# ---- with real runc: the containers' names ---------------------------------------------------------


def test_per_task_launches_run_real_containers_named_by_slurms_task_ids(start_daemon, user, bundle):
    daemon = start_daemon()
    clients = [
        daemon.ctl_popen(user, "run", "--bundle", str(bundle), "--",
                         "sh", "-c", 'echo "task $SLURM_PROCID local $SLURM_LOCALID"; exec sleep 1000',
                         env=srun_env(user, 3020, 2, procid=procid, localid=local))
        for procid, local in ((4, 0), (5, 1))
    ]
    read_line_from(clients[0].stdout, b"task 4 local 0")
    read_line_from(clients[1].stdout, b"task 5 local 1")
    assert sorted(runc_containers(user)) == [f"testnode.{user.name}.3020.2.{t}" for t in (4, 5)]
    assert daemon.ctl(user, "cancel", "3020.2").returncode == 0
    for client in clients:
        client.communicate(timeout=30)
    assert runc_containers(user) == []
