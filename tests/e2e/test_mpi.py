"""MPI in nodestepd's containers on one node: `srun -n 2 --mpi=pmix nodestepctl run --bundle B
-- mpi_hello` (Open MPI through Slurm's PMIx server, the ranks running as the user's own
uid) and `srun --mpi=pmi2` (MPICH through the PMI2 fd the client passes along), with real
Slurm 22.05 (the private single-node cluster of test_slurm_srun.py), real runc and the
host's Open MPI 4.1 and MPICH 4.0 in a bundle built offline (scripts/make-mpi-bundle.sh).

Job ids: Slurm's, of this module's own cluster. Every srun is bounded in time; after each
test no step daemon (slurmstepd) of the cluster, no container and no spool dir is left,
and any that is left is killed by pid and fails the test.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, REPO, runc_containers, spool_entries
from test_slurm_srun import cluster  # noqa: F401  (the module's private Slurm, a fixture)

SRUN_TIMEOUT = 120.0  # one srun, however slow this machine is
GONE_TIMEOUT = 30.0  # for Slurm's step daemons to end after srun returned
OPENMPI_HELLO = "/mpi/openmpi/mpi_hello"
MPICH_HELLO = "/mpi/mpich/mpi_hello"
CREATE_START_CONF = (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text()


@pytest.fixture(scope="module")
def mpi_bundle(workdir, user) -> Path:
    path = workdir / "mpi-bundle"
    subprocess.run(["sh", str(REPO / "scripts" / "make-mpi-bundle.sh"), user.name, str(path)], check=True,
                   capture_output=True, timeout=300)
    return path


def cluster_stepds(base: Path) -> list[int]:
    """The pids of the cluster's slurmstepd processes: reparented to init, they are known
    by the slurmd log file of this cluster they hold open."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if not f.read().startswith(b"slurmstepd"):
                    continue
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(str(base)) for fd in fds):
                pids.append(int(entry))
        except OSError:
            continue  # gone meanwhile
    return pids


@pytest.fixture
def mpi_cluster(cluster):  # noqa: F811
    """The cluster, with a check after the test that its step daemons are gone (killed by
    pid, and the test failed, if any is still there GONE_TIMEOUT after the test)."""
    yield cluster
    deadline = time.monotonic() + GONE_TIMEOUT
    while (left := cluster_stepds(cluster.base)) and time.monotonic() < deadline:
        time.sleep(0.2)  # Slurm gives no event for a step daemon's end: polled, with a deadline
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"slurmstepd processes left behind (killed): {left}"


def srun(cluster, daemon, user, bundle: Path, mpi: str, *command: str, ntasks: int = 2,  # noqa: F811
         direct: bool = False) -> subprocess.CompletedProcess:
    """`srun -n N --mpi=MPI nodestepctl run --bundle B -- COMMAND` as the user (direct: the
    command itself, on the host). Bounded by SRUN_TIMEOUT (srun is killed past it)."""
    launched = list(command) if direct else [str(NODESTEPCTL), "--socket", str(daemon.socket), "run",
                                             "--bundle", str(bundle), "--", *command]
    return subprocess.run(
        user.command(["srun", "-n", str(ntasks), f"--mpi={mpi}", *launched]),
        env=cluster.env(user), cwd="/", capture_output=True, text=True, timeout=SRUN_TIMEOUT,
    )


def ranks(stdout: str) -> list[str]:
    return sorted(line for line in stdout.splitlines() if line.startswith(("rank ", "sum ")))


def assert_nothing_left(daemon, user) -> None:
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    ps = daemon.ctl(user, "ps")
    assert ps.returncode == 0 and "running" not in ps.stdout.decode(), ps.stdout


@pytest.mark.parametrize("mode", ["run", "create-start"])
def test_pmix_ranks_find_each_other_as_the_users_own_uid(mpi_cluster, start_daemon, user, mpi_bundle, mode):
    daemon = start_daemon() if mode == "run" else start_daemon(CREATE_START_CONF)
    result = srun(mpi_cluster, daemon, user, mpi_bundle, "pmix", OPENMPI_HELLO)
    if mode == "create-start":
        # runc start, run as the user outside the task's user namespace, cannot open the
        # exec.fifo runc create left to the container's root there: refused up front.
        assert result.returncode == 125, result.stderr
        assert "a PMIx step runs its ranks as the user's own uid, which takes RunTimeRun" in result.stderr
        assert_nothing_left(daemon, user)
        return
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{daemon.log()[-5000:]}"
    host = os.uname().nodename
    assert ranks(result.stdout) == [f"rank 0 of 2 on {host} uid {user.uid}", f"rank 1 of 2 on {host} uid {user.uid}",
                                    "sum 1 expected 1 ok"], result.stderr
    assert_nothing_left(daemon, user)


def test_pmi2_ranks_reach_slurm_through_the_passed_fd(mpi_cluster, start_daemon, user, mpi_bundle):
    daemon = start_daemon()
    try:
        result = srun(mpi_cluster, daemon, user, mpi_bundle, "pmi2", MPICH_HELLO)
    except subprocess.TimeoutExpired as e:
        # pmodels/mpich#6596: MPICH may hang in MPI_Finalize after every rank has reported.
        # Only that exact symptom (both ranks and the sum printed, then no exit) is tolerated;
        # the cleanup check of mpi_cluster still runs.
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        if len(ranks(out)) == 3 and "sum 1 expected 1 ok" in out:
            pytest.xfail("MPICH hung in MPI_Finalize after the allreduce (pmodels/mpich#6596)")
        raise
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{daemon.log()[-5000:]}"
    host = os.uname().nodename
    # The plain rootless mapping: no uid check on the PMI2 path, the ranks are container root.
    assert ranks(result.stdout) == [f"rank 0 of 2 on {host} uid 0", f"rank 1 of 2 on {host} uid 0",
                                    "sum 1 expected 1 ok"], result.stderr
    assert_nothing_left(daemon, user)


def test_a_rank_exiting_3_makes_the_step_exit_3_and_leaves_nothing(mpi_cluster, start_daemon, user, mpi_bundle):
    daemon = start_daemon()
    result = srun(mpi_cluster, daemon, user, mpi_bundle, "pmix", OPENMPI_HELLO, "--exit-rank", "1",
                  "--exit-code", "3")
    assert result.returncode == 3, f"{result.stdout}\n{result.stderr}\n{daemon.log()[-5000:]}"
    assert "sum 1 expected 1 ok" in result.stdout
    assert "task 1: Exited with exit code 3" in result.stderr
    assert_nothing_left(daemon, user)


def test_a_bundle_with_its_own_network_namespace_is_refused(mpi_cluster, start_daemon, user, mpi_bundle, workdir):
    daemon = start_daemon()
    netns = workdir / "mpi-bundle-netns"
    if not netns.exists():
        import json
        netns.mkdir()
        config = json.loads((mpi_bundle / "config.json").read_text())
        config["root"]["path"] = str(mpi_bundle / "rootfs")
        config["linux"]["namespaces"].append({"type": "network"})
        (netns / "config.json").write_text(json.dumps(config))
        os.chown(netns, user.uid, user.gid)
        os.chown(netns / "config.json", user.uid, user.gid)
    result = srun(mpi_cluster, daemon, user, netns, "pmix", OPENMPI_HELLO, ntasks=1)
    assert result.returncode == 125, result.stderr
    assert "own network namespace" in result.stderr and 'remove the "network" namespace' in result.stderr
    assert_nothing_left(daemon, user)


def test_wall_time_through_nodestepd_against_the_host(mpi_cluster, start_daemon, user, mpi_bundle):
    """The 2-rank PMIx job through nodestepd and directly on the host, alternately, in the
    same run: the medians are printed (pytest -s), and both must succeed every time."""
    daemon = start_daemon()
    runs = int(os.environ.get("NODESTEPD_MPI_TIMING_RUNS", "5"))
    timings: dict[str, list[float]] = {"host": [], "nodestepd": []}
    for _ in range(runs):
        for where in ("host", "nodestepd"):
            began = time.monotonic()
            result = srun(mpi_cluster, daemon, user, mpi_bundle, "pmix",
                          str(mpi_bundle / "rootfs" / "mpi" / "openmpi" / "mpi_hello") if where == "host"
                          else OPENMPI_HELLO, direct=where == "host")
            timings[where].append(time.monotonic() - began)
            assert result.returncode == 0 and "sum 1 expected 1 ok" in result.stdout, result.stderr
    host, ours = statistics.median(timings["host"]), statistics.median(timings["nodestepd"])
    print(f"\nsrun -n 2 --mpi=pmix mpi_hello, median of {runs}: host {host:.3f} s, through nodestepd {ours:.3f} s "
          f"(+{ours - host:.3f} s); host {sorted(round(t, 3) for t in timings['host'])}, "
          f"nodestepd {sorted(round(t, 3) for t in timings['nodestepd'])}")
    assert_nothing_left(daemon, user)
