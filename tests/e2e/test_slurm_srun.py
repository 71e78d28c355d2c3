"""A real single-node Slurm (Debian's munge, slurmctld, slurmd; scripts/setup.sh installs them):
`srun -n 2 nodestepctl run` starts one real runc container per Slurm task, each with Slurm's ids.

The cluster is private to this module: its own munge socket and key, slurm.conf, ports,
state and spool dirs under a temporary directory; the daemons are started here in the
foreground and stopped by pid. Nothing under /etc is touched (srun finds the config
through SLURM_CONF).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, runc_containers
from slurm_cluster import SLURM_PLUGINS

HOST = socket.gethostname().split(".", 1)[0]
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(base: Path) -> str:
    return f"""\
ClusterName=nsdtest
SlurmctldHost={HOST}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.sock
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
{SLURM_PLUGINS}PlugStackConfig=/dev/null
NodeName={HOST} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={HOST} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    def env(self, user) -> dict[str, str]:
        return {**user.env, "SLURM_CONF": str(self.conf)}

    def start(self, argv: list[str], name: str) -> None:
        log = open(self.base / f"{name}.out", "wb")
        with log:
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.base.glob("*.out")) + sorted(self.base.glob("*.log")))

    def wait_idle(self) -> None:
        """Until sinfo reports the node idle: slurmctld is up and slurmd has registered."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for proc in self.procs:
                assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}:\n{self.logs()}"
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                   env={"PATH": os.environ["PATH"], "SLURM_CONF": str(self.conf)}, timeout=30)
            if state.stdout.strip() == "idle":
                return
            time.sleep(0.2)  # polling a condition with a deadline: Slurm offers no readiness event
        raise AssertionError(f"the Slurm node did not become idle within {START_TIMEOUT:g} s:\n{self.logs()}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def cluster():
    for program in ("munged", "slurmctld", "slurmd", "srun", "sinfo"):
        assert shutil.which(program), f"{program} is missing: scripts/setup.sh installs munge, slurmctld, slurmd"
    base = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    base.chmod(0o755)
    cluster = Cluster(base)
    try:
        munge = base / "munge"
        munge.mkdir(mode=0o711)  # users' srun reaches the socket; the key stays root's
        (munge / "munge.key").write_bytes(secrets.token_bytes(1024))
        (munge / "munge.key").chmod(0o600)
        for d in ("state", "spool"):
            (base / d).mkdir(mode=0o755)
        cluster.conf.write_text(slurm_conf(base))
        cluster.start(["munged", "--foreground", "--force", f"--socket={munge}/munge.sock",
                       f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                       f"--seed-file={munge}/seed", f"--log-file={base}/munged.log"], "munged")
        cluster.start(["slurmctld", "-D", "-i", "-f", str(cluster.conf)], "slurmctld")
        cluster.start(["slurmd", "-D", "-f", str(cluster.conf)], "slurmd")
        cluster.wait_idle()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_srun_runs_one_container_per_task_with_slurms_ids(cluster, start_daemon, user, bundle):
    daemon = start_daemon()
    script = 'echo "task $SLURM_PROCID local $SLURM_LOCALID node $SLURM_NODEID job $SLURM_JOB_ID step $SLURM_STEP_ID"'
    result = subprocess.run(
        user.command(["srun", "-n", "2", str(NODESTEPCTL), "--socket", str(daemon.socket), "run",
                      "--bundle", str(bundle), "--", "sh", "-c", script]),
        env=cluster.env(user), cwd="/", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{daemon.log()}\n{cluster.logs()}"
    lines = sorted(result.stdout.splitlines())
    job = lines[0].split(" job ")[1].split()[0]
    assert lines == [f"task {t} local {t} node 0 job {job} step 0" for t in (0, 1)]
    # Both tasks were one step of the daemon, launched task by task, with runc containers named by them.
    log = daemon.log()
    for t in (0, 1):
        assert f"testnode.{user.name}.{job}.0.{t}" in log
    assert runc_containers(user) == []


def test_srun_status_is_the_containers(cluster, start_daemon, user, bundle):
    daemon = start_daemon()
    result = subprocess.run(
        user.command(["srun", "-n", "2", str(NODESTEPCTL), "--socket", str(daemon.socket), "run",
                      "--bundle", str(bundle), "--", "sh", "-c", 'exit $((SLURM_PROCID + 3))']),
        env=cluster.env(user), cwd="/", capture_output=True, text=True, timeout=120,
    )
    # srun exits with the highest task exit code; each nodestepctl exits with its container's.
    assert result.returncode == 4, f"{result.stdout}\n{result.stderr}"
