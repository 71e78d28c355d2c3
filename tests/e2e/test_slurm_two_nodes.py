"""Two Slurm nodes on one machine (tests/e2e/slurm_cluster.py): `srun -N 2` through each
node's own nodestepd with real runc containers; every task on its node, each node's daemon
knowing only its own tasks, failures and cancels ending everything on both nodes; then MPI
across the nodes (Open MPI over pmix, MPICH over pmi2) and the harness itself.

Job ids: Slurm's, of this module's own cluster. The containers are named after their node
(nsd-n1, nsd-n2) and live in each node's own runc root (its private /run), so their names
collide with no other test file's.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, REPO, RUNC_RUN_CONF
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


def test_the_epilog_ends_what_a_job_left_running_on_both_nodes(cluster, user, bundle):
    # Detached steps outlive their srun tasks (their containers are the daemon's, not the
    # step's processes): only the nodes' Epilog, `nodestepctl job-end`, ends them.
    result = cluster.srun(user, ["-N", "2", "-n", "2", str(NODESTEPCTL), "run", "--detach", "--bundle", str(bundle),
                                 "--", "sleep", "600"])
    assert result.returncode == 0, fail(result, cluster)
    (job,) = {int(line.split(".")[0]) for line in result.stdout.split()}
    cluster.wait_clean(user)
    for node in cluster.nodes:
        log = (node.base / "nodestepd.out").read_text()
        ended = [line for line in log.splitlines() if "job ended" in line and f"job_id={job} " in line + " "]
        assert ended and "steps_ended=1" in ended[-1], (node.name, ended, log[-3000:])


@pytest.fixture
def gate(workdir, user, bundle):
    """(bundle, gate dir): the test bundle's rootfs with a dir of the test's bound at /gate
    in the container, where the test can tell a task to go on."""
    gate = Path(tempfile.mkdtemp(prefix="gate-", dir=workdir))
    gate.chmod(0o755)
    gated = Path(tempfile.mkdtemp(prefix="gated-bundle-", dir=workdir))
    config = json.loads((bundle / "config.json").read_text())
    config["root"]["path"] = str(bundle / "rootfs")
    config["mounts"].append({"destination": "/gate", "type": "bind", "source": str(gate), "options": ["rbind", "ro"]})
    (gated / "config.json").write_text(json.dumps(config))
    for path in (gated, gated / "config.json"):
        os.chown(path, user.uid, user.gid)
    gated.chmod(0o755)
    yield gated, gate
    shutil.rmtree(gate, ignore_errors=True)
    shutil.rmtree(gated, ignore_errors=True)


def test_a_task_exiting_3_ends_the_step_on_both_nodes_with_3(cluster, user, gate):
    # Task 2 (on the second node) fails once every task is ready (the test says go); the others
    # would run for 10 minutes unless srun's --kill-on-bad-exit ends them: Slurm's SIGTERM
    # reaches each container through its client and daemon, and they end with 0 on it (sh as
    # the container's pid 1 ignores it without a trap, hence ready only once it is set), so
    # that 3 is the step's highest status.
    gated, go = gate
    script = ('trap "exit 0" TERM; echo "ready $SLURM_PROCID"; if [ "$SLURM_PROCID" = 2 ]; then '
              'while [ ! -e /gate/go ]; do sleep 0.05; done; exit 3; fi; sleep 600 & wait')
    srun = cluster.srun_popen(user, ["-N", "2", "-n", "4", "--kill-on-bad-exit=1", *ctl_run(gated, "sh", "-c", script)])
    try:
        read_lines(srun.stdout, 4, timeout=120)
        (go / "go").touch()
        stdout, stderr = srun.communicate(timeout=120)
        assert srun.returncode == 3, f"{srun.returncode}\n{stdout}\n{stderr}\n{cluster.logs()}"
        cluster.wait_clean(user)
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
        srun.stdout.close()
        srun.stderr.close()


def test_scancel_ends_every_container_on_both_nodes(cluster, user, bundle):
    # Each task ends on Slurm's SIGTERM as a program killed by it would (sh as the container's
    # pid 1 would ignore it without a trap, until Slurm's SIGKILL KillWait later).
    script = 'trap "exit 143" TERM; echo "started $SLURM_PROCID $SLURM_JOB_ID"; sleep 600 & wait'
    srun = cluster.srun_popen(user, ["-N", "2", "-n", "4", *ctl_run(bundle, "sh", "-c", script)])
    try:
        lines = read_lines(srun.stdout, 4, timeout=120)
        job = lines[0].split()[2]
        # Every task's container runs, two on each node.
        assert [len(node.runc_containers(user)) for node in cluster.nodes] == [2, 2]
        out = cluster.login.run(["scancel", job], env={"PATH": os.environ["PATH"], "SLURM_CONF": str(cluster.conf)})
        assert out.returncode == 0, out.stderr
        _, stderr = srun.communicate(timeout=120)
        assert srun.returncode == 143 and f"STEP {job}.0 ON {NODE_NAMES[0]} CANCELLED" in stderr, (srun.returncode, stderr)
        cluster.wait_clean(user)
    finally:
        if srun.poll() is None:
            srun.kill()
            srun.wait()
        srun.stdout.close()
        srun.stderr.close()


def read_lines(stream, count: int, timeout: float) -> list[str]:
    """The first `count` lines of a text pipe, awaited with one deadline for all.

    Read from the pipe's fd, not through the stream: select() knows nothing of lines a
    buffered readline() already pulled in with an earlier one (two tasks' lines arriving
    in one read left the second there, unseen, until the deadline)."""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    data = b""
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        assert ready, f"only {data.decode(errors='replace').splitlines(keepends=True)} within {timeout:g} s"
        chunk = os.read(fd, 65536)
        assert chunk, f"the output ended after {data.decode(errors='replace').splitlines(keepends=True)}"
        data += chunk
    return [line + "\n" for line in data.decode(errors="replace").split("\n")[:count]]


# ---- MPI across the two nodes --------------------------------------------------------------
# The bundle (scripts/make-mpi-bundle.sh) holds tests/mpi/mpi_hello.c built against the host's
# Open MPI and MPICH; each rank prints "rank R of N on HOST uid U", rank 0 "sum S expected E ok".

OPENMPI_HELLO = "/mpi/openmpi/mpi_hello"
MPICH_HELLO = "/mpi/mpich/mpi_hello"
# UCX (under MPICH) takes the two simulated nodes for one machine (they share the boot and
# machine ids). Measured in these containers: with UCX's defaults 1 run in 5 hung in
# MPI_Finalize, with tcp,self most did; with tcp,self,sm (TCP between nodes, shared memory
# between the ranks of a node) 13 of 13 ran. A real cluster needs none of this.
MPICH_ENV = {"UCX_TLS": "tcp,self,sm"}
# Open MPI's shared-memory transport cannot use CMA between ranks in different user
# namespaces (each rank's container has its own) and falls back; with that fallback left to
# it, 1 run in 25 here had a rank die of SIGSEGV in MPI_Init, with "none" 0 in 60.
OPENMPI_ENV = {"OMPI_MCA_btl_vader_single_copy_mechanism": "none"}
needs_mpi_bundle = pytest.mark.skipif(not (REPO / "scripts" / "make-mpi-bundle.sh").exists(),
                                      reason="scripts/make-mpi-bundle.sh is missing")


@pytest.fixture(scope="module")
def mpi_bundle(workdir, user) -> Path:
    script = REPO / "scripts" / "make-mpi-bundle.sh"
    path = workdir / "mpi-bundle-two-nodes"  # test_mpi.py has its own, unchanged
    subprocess.run(["sh", str(script), user.name, str(path)], check=True, timeout=300)
    # The ranks report their host name: the containers keep their node's (no UTS namespace of
    # their own, no "hostname" in config.json), as the bundle's other namespaces keep the host's.
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("hostname", None)
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "uts"]
    config_path.write_text(json.dumps(config, indent=2))
    return path


def mpi_ranks(stdout: str) -> dict[int, str]:
    """{rank: host} from mpi_hello's lines; every rank's size must be 4."""
    return {rank: host for rank, (host, _) in mpi_rank_lines(stdout).items()}


def mpi_rank_lines(stdout: str) -> dict[int, tuple[str, int]]:
    """{rank: (host, uid)} from mpi_hello's "rank R of N on HOST uid U" lines; every N must be 4."""
    ranks = {}
    for line in stdout.splitlines():
        if line.startswith("rank "):
            words = line.split()
            assert words[3] == "4", line
            ranks[int(words[1])] = (words[5], int(words[7]))
    return ranks


def assert_four_ranks_two_per_node(stdout: str) -> dict[int, str]:
    ranks = mpi_ranks(stdout)
    assert sorted(ranks) == [0, 1, 2, 3], stdout
    assert Counter(ranks.values()) == {name: 2 for name in NODE_NAMES}, stdout
    assert "sum 6 expected 6 ok" in stdout.splitlines(), stdout
    return ranks


def last_job(cluster, user) -> int:
    return max(s["job_id"] for s in cluster.login.ps(user))


@needs_mpi_bundle
def test_mpi_pmix_four_ranks_two_per_node(cluster, user, mpi_bundle):
    result = cluster.srun(user, ["-N", "2", "-n", "4", "--mpi=pmix", *ctl_run(mpi_bundle, OPENMPI_HELLO)], timeout=180,
                          env=cluster.env(user, **OPENMPI_ENV))
    assert result.returncode == 0, fail(result, cluster)
    ranks = assert_four_ranks_two_per_node(result.stdout)
    # PMIx accepted each rank because it runs as the user's own uid inside its container.
    assert {uid for _, uid in mpi_rank_lines(result.stdout).values()} == {user.uid}, result.stdout
    job = last_job(cluster, user)
    for node in cluster.nodes:  # each node's daemon ran its own two ranks, under Slurm's ids
        assert daemon_tasks(node, user, job) == sorted(r for r, host in ranks.items() if host == node.name)
    cluster.wait_clean(user)


@needs_mpi_bundle
def test_mpi_pmi2_mpich_four_ranks_two_per_node(cluster, user, mpi_bundle):
    args = ["-N", "2", "-n", "4", "--mpi=pmi2", *ctl_run(mpi_bundle, MPICH_HELLO)]
    srun = cluster.srun_popen(user, args, env=cluster.env(user, **MPICH_ENV))
    try:
        stdout, stderr = srun.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # MPICH's finalize can hang (pmodels/mpich#6596): only that exact symptom, every rank
        # done with its allreduce and the step still running after 60 s where a run takes 2, is an expected failure; the
        # job is then cancelled and must still leave nothing behind.
        cancel_all(cluster)
        stdout, stderr = srun.communicate(timeout=120)
        cluster.wait_clean(user)
        ranks = mpi_ranks(stdout)
        if sorted(ranks) == [0, 1, 2, 3] and "sum 6 expected 6 ok" in stdout.splitlines():
            pytest.xfail("MPICH hung in MPI_Finalize after a correct run (pmodels/mpich#6596)")
        raise AssertionError(f"the MPICH step did not end within 120 s:\n{stdout}\n{stderr}\n{cluster.logs()}")
    assert srun.returncode == 0, f"{stdout}\n{stderr}\n{cluster.logs()}"
    assert_four_ranks_two_per_node(stdout)
    cluster.wait_clean(user)


@needs_mpi_bundle
def test_mpi_rank_exiting_3_ends_the_step_on_both_nodes_with_3(cluster, user, mpi_bundle):
    command = ctl_run(mpi_bundle, OPENMPI_HELLO, "--exit-rank", "2", "--exit-code", "3")
    result = cluster.srun(user, ["-N", "2", "-n", "4", "--mpi=pmix", *command], timeout=180,
                          env=cluster.env(user, **OPENMPI_ENV))
    assert result.returncode == 3, fail(result, cluster)
    cluster.wait_clean(user)


@needs_mpi_bundle
def test_mpi_scancel_ends_every_rank_on_both_nodes(cluster, user, mpi_bundle):
    # Ranks 0-2 wait in MPI_Init for rank 3, which never comes: a step busy in MPI until cancelled.
    script = f'if [ "$SLURM_PROCID" = 3 ]; then echo "started $SLURM_JOB_ID"; exec sleep 600; fi; exec {OPENMPI_HELLO}'
    srun = cluster.srun_popen(user, ["-N", "2", "-n", "4", "--mpi=pmix", *ctl_run(mpi_bundle, "sh", "-c", script)],
                              env=cluster.env(user, **OPENMPI_ENV))
    try:
        job = read_lines(srun.stdout, 1, timeout=120)[0].split()[1]
        wait_containers(cluster, user, [2, 2])
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


def wait_containers(cluster, user, counts: list[int], timeout: float = 60) -> None:
    """Until each node's runc lists that many containers: runc offers no event for it."""
    deadline = time.monotonic() + timeout
    while (seen := [len(node.runc_containers(user)) for node in cluster.nodes]) != counts:
        assert time.monotonic() < deadline, f"containers per node {seen}, not {counts}, after {timeout:g} s"
        time.sleep(0.1)


def cancel_all(cluster) -> None:
    env = {"PATH": os.environ["PATH"], "SLURM_CONF": str(cluster.conf)}
    for line in cluster.squeue():
        cluster.login.run(["scancel", line.split()[0]], env=env)


@needs_mpi_bundle
def test_mpi_wall_time_through_nodestepd_and_direct(cluster, user, mpi_bundle):
    """Report only (pytest -s shows it): the 2-node, 4-rank pmix job's wall time through
    nodestepd and the same program run directly under srun, alternated, 5 of each, same cluster."""
    args = ["-N", "2", "-n", "4", "--mpi=pmix"]
    ways = {"nodestepd": [*args, *ctl_run(mpi_bundle, OPENMPI_HELLO)],
            "direct": [*args, str(mpi_bundle / "rootfs" / OPENMPI_HELLO.lstrip("/"))]}
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(5):
        for way, argv in ways.items():
            started = time.monotonic()
            result = cluster.srun(user, argv, timeout=180, env=cluster.env(user, **OPENMPI_ENV))
            times[way].append(time.monotonic() - started)
            assert result.returncode == 0, fail(result, cluster)
            assert_four_ranks_two_per_node(result.stdout)
    cluster.wait_clean(user)
    medians = {way: statistics.median(t) for way, t in times.items()}
    print(f"\nsrun -N 2 -n 4 --mpi=pmix mpi_hello, wall time, median of 5: "
          f"through nodestepd {medians['nodestepd']:.3f} s, direct {medians['direct']:.3f} s, "
          f"+{medians['nodestepd'] - medians['direct']:.3f} s; all: "
          + "; ".join(f"{way} " + " ".join(f"{t:.3f}" for t in ts) for way, ts in times.items()))


# ---- the harness itself --------------------------------------------------------------------

HARNESS_SCRIPT = """
import sys, time
from pathlib import Path
sys.path[:0] = sys.argv[1:3]
from conftest import RUNC_RUN_CONF, _ensure_user
from slurm_cluster import Cluster
users = [_ensure_user(name) for name in sys.argv[4].split(",")]
cluster = Cluster(Path(sys.argv[3]))
cluster.start(users, RUNC_RUN_CONF)
pids = [p.pid for p in cluster.host_procs]
for node in cluster.nodes:
    pids += [node.init.pid, node.init_pid] + [p.pid for p in node.procs] + [p.popen.pid for p in node.procs]
print(" ".join(map(str, pids)), flush=True)
time.sleep(600)
"""


def test_a_killed_test_process_leaves_nothing_running(workdir, user, other_user):
    """SIGKILL of the process that started a cluster (no teardown runs) still ends every
    process of it: PR_SET_PDEATHSIG, and the nodes' pid namespaces die with their inits."""
    base = Path(tempfile.mkdtemp(prefix="slurm2-killed-", dir=workdir))
    base.chmod(0o755)
    here = Path(__file__).resolve().parent
    proc = subprocess.Popen([sys.executable, "-c", HARNESS_SCRIPT, str(here.parent), str(here), str(base),
                             f"{user.name},{other_user.name}"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True)
    pidfds = []
    try:
        line = read_lines(proc.stdout, 1, timeout=120)[0]
        pids = [int(p) for p in line.split()]
        assert len(pids) >= 12, line  # munged, 2 x (unshare, init, slurmd, nodestepd and their nsenters), slurmctld
        pidfds = [os.pidfd_open(pid) for pid in pids]  # before the kill: no pid reuse can fool the wait
        proc.kill()
        proc.wait(timeout=30)
        for fd, pid in zip(pidfds, pids):
            assert select.select([fd], [], [], 30)[0], f"process {pid} outlived the test process by 30 s"
    finally:
        for fd in pidfds:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        shutil.rmtree(base, ignore_errors=True)
