"""Two Slurm nodes on one machine (tests/e2e/slurm_cluster.py): `srun -N 2` through each
node's own nodestepd with real runc containers; every task on its node, each node's daemon
knowing only its own tasks, failures and cancels ending everything on both nodes.
"""

from __future__ import annotations

import os
import select
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, RUNC_RUN_CONF
from slurm_cluster import NODE_NAMES, Cluster

pytestmark = pytest.mark.skipif(not shutil.which("slurmd"), reason="Slurm is not installed (scripts/setup.sh)")


@pytest.fixture(scope="module")
def cluster(workdir, user, other_user):
    base = Path(tempfile.mkdtemp(prefix="slurm2-", dir=workdir))
    base.chmod(0o755)
    cluster = Cluster(base)
    try:
        cluster.start([user, other_user], RUNC_RUN_CONF)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def ctl_run(bundle: Path, *command: str) -> list[str]:
    """The task's command: nodestepctl at its default socket, which is the node's own daemon."""
    return [str(NODESTEPCTL), "run", "--bundle", str(bundle), "--", *command]


def fail(result, cluster) -> str:
    return f"status {result.returncode}\n{result.stdout}\n{result.stderr}\n{cluster.logs()}"


def task_lines(stdout: str) -> dict[int, dict[str, str]]:
    """Lines of 'key value ...' pairs, by their task (SLURM_PROCID)."""
    tasks = {}
    for line in stdout.splitlines():
        words = line.split()
        fields = dict(zip(words[::2], words[1::2]))
        tasks[int(fields["task"])] = fields
    return tasks


def daemon_tasks(node, user, job: int) -> list[int]:
    """The task ids of the job's step 0 that this node's daemon ran (`ps` lists each task's
    own launch, as srun runs one client per task)."""
    steps = [s for s in node.ps(user) if s["job_id"] == job]
    assert all(s["step_id"] == 0 for s in steps), steps
    return sorted(t["task_id"] for s in steps for t in s["tasks"])


def test_tasks_run_two_per_node_each_through_its_own_daemon(cluster, user, bundle):
    script = 'echo "task $SLURM_PROCID node $SLURMD_NODENAME nodeid $SLURM_NODEID job $SLURM_JOB_ID step $SLURM_STEP_ID"'
    result = cluster.srun(user, ["-N", "2", "-n", "4", *ctl_run(bundle, "sh", "-c", script)])
    assert result.returncode == 0, fail(result, cluster)
    tasks = task_lines(result.stdout)
    assert sorted(tasks) == [0, 1, 2, 3], result.stdout
    job = int(tasks[0]["job"])
    assert {t["step"] for t in tasks.values()} == {"0"}
    # Two tasks per node, both nodes.
    assert Counter(t["node"] for t in tasks.values()) == {name: 2 for name in NODE_NAMES}, result.stdout
    # Each node's daemon ran only its own tasks, under Slurm's ids.
    for node_id, node in enumerate(cluster.nodes):
        mine = sorted(t for t, fields in tasks.items() if fields["node"] == node.name)
        assert all(tasks[t]["nodeid"] == str(node_id) for t in mine)
        assert daemon_tasks(node, user, job) == mine
        log = (node.base / "nodestepd.out").read_text()
        for t in range(4):  # the runc containers were named after the node and Slurm's ids
            assert (f"{node.name}.{user.name}.{job}.0.{t}" in log) == (t in mine), (node.name, t)
    cluster.wait_clean(user)


def test_a_task_exiting_3_ends_the_step_on_both_nodes_with_3(cluster, user, bundle):
    # Task 2 (on the second node) fails at once; the others would run for 10 minutes unless
    # srun's --kill-on-bad-exit ends them: Slurm's SIGTERM reaches each container through its
    # client and daemon, and they end with 0 on it (sh as the container's pid 1 would ignore
    # it without a trap), so that 3 is the step's highest status.
    script = 'if [ "$SLURM_PROCID" = 2 ]; then exit 3; fi; trap "exit 0" TERM; sleep 600 & wait'
    started = time.monotonic()
    result = cluster.srun(user, ["-N", "2", "-n", "4", "--kill-on-bad-exit=1", *ctl_run(bundle, "sh", "-c", script)],
                          timeout=180)
    assert result.returncode == 3, fail(result, cluster)
    assert time.monotonic() - started < 150
    cluster.wait_clean(user)


def test_scancel_ends_every_container_on_both_nodes(cluster, user, bundle):
    script = 'echo "started $SLURM_PROCID $SLURM_JOB_ID"; exec sleep 600'
    srun = cluster.srun_popen(user, ["-N", "2", "-n", "4", *ctl_run(bundle, "sh", "-c", script)])
    try:
        lines = read_lines(srun.stdout, 4, timeout=120)
        job = lines[0].split()[2]
        # Every task's container runs, two on each node.
        assert [len(node.runc_containers(user)) for node in cluster.nodes] == [2, 2]
        out = cluster.login.run(["scancel", job], env={"PATH": os.environ["PATH"], "SLURM_CONF": str(cluster.conf)})
        assert out.returncode == 0, out.stderr
        srun.wait(timeout=120)
        assert srun.returncode != 0
        cluster.wait_clean(user)
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
        srun.stdout.close()
        srun.stderr.close()


def read_lines(stream, count: int, timeout: float) -> list[str]:
    """The first `count` lines of a text pipe, awaited with one deadline for all."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while len(lines) < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream], [], [], max(left, 0))
        assert ready, f"only {lines} within {timeout:g} s"
        line = stream.readline()
        assert line, f"the output ended after {lines}"
        lines.append(line)
    return lines
