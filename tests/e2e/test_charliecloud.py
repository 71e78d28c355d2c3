"""End to end with real Charliecloud (ch-run 0.31) through the guide's Charliecloud oci.conf.

tests/oci-conf-examples/charliecloud.conf as published (IgnoreFileConfigJson,
CreateEnvFile=newline, `env -i ... ch-run ... --set-env=%e --no-passwd %r -- %@`, kill
with `kill -s SIGTERM %p` / `kill -s SIGKILL %p`), with the binds adapted to this host:
ch-run 0.31 binds directories only (`--bind /etc/passwd:/etc/passwd` fails with "Not a
directory"), so the /etc/group and /etc/passwd binds are dropped and /etc/slurm and
/var/run/munge/ come from directories made here. The bundle is a Charliecloud image
directory: a rootfs owned by the user. Job ids 2000-2099 belong to this file.

Where /bin/sh is dash (Debian), `kill -s SIGTERM` is an error ("invalid signal number or
name": dash wants `TERM`), so both published commands fail and it is the daemon's fallback,
SIGKILL to the task's process group, that ends the step; the cancel test checks whichever
applies on this host.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, make_bundle, read_line_from, spool_entries

CH_RUN = "/usr/bin/ch-run"
PUBLISHED = (REPO / "tests" / "oci-conf-examples" / "charliecloud.conf").read_text()

pytestmark = pytest.mark.skipif(not os.access(CH_RUN, os.X_OK), reason="charliecloud-runtime (ch-run) is not installed")


def adapted_conf(etc_slurm: Path, munge: Path) -> str:
    replacements = [
        ("--bind /etc/group:/etc/group ", ""),
        ("--bind /etc/passwd:/etc/passwd ", ""),
        ("--bind /etc/slurm:/etc/slurm ", f"--bind {etc_slurm}:/etc/slurm "),
        ("--bind /var/run/munge/:/var/run/munge/ ", f"--bind {munge}/:/var/run/munge/ "),
    ]
    text = PUBLISHED
    for old, new in replacements:
        assert text.count(old) == 1, f"the published Charliecloud example changed: no {old!r}"
        text = text.replace(old, new)
    # Everything else stays as published.
    for kept in ("IgnoreFileConfigJson=true", "CreateEnvFile=newline", 'EnvExclude="^(SLURM_CONF|SLURM_CONF_SERVER)="',
                 "env -i PATH=/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin/:/sbin/ USER=$(whoami) "
                 "HOME=/home/$(whoami)/ ch-run -w ", "--bind %m:/var/run/slurm/ ", "--set-env=%e --no-passwd %r -- %@",
                 'RunTimeKill="kill -s SIGTERM %p"', 'RunTimeDelete="kill -s SIGKILL %p"'):
        assert kept in text
    return text


@pytest.fixture(scope="module")
def host_dirs(workdir) -> tuple[Path, Path]:
    """Stand-ins for the host's /etc/slurm and /var/run/munge/, each with a file to find inside."""
    etc_slurm, munge = workdir / "ch-host-etc-slurm", workdir / "ch-host-munge"
    for path, content in ((etc_slurm, "etc-slurm-from-host\n"), (munge, "munge-from-host\n")):
        path.mkdir(mode=0o755)
        (path / "marker").write_text(content)
        (path / "marker").chmod(0o644)
    return etc_slurm, munge


@pytest.fixture(scope="module")
def image(workdir, user) -> Path:
    """A Charliecloud image directory owned by the user, with the binds' mount points."""
    rootfs = make_bundle(user, workdir / "ch-bundle") / "rootfs"
    for mount_point in ("etc/slurm", "var/run/slurm", "var/run/munge"):
        (rootfs / mount_point).mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(rootfs)], check=True)
    return rootfs


@pytest.fixture
def daemon(start_daemon, host_dirs):
    return start_daemon(adapted_conf(*host_dirs), "--log-format", "json")


def sh_kill_takes_sig_prefixed_names() -> bool:
    """Whether this host's /bin/sh understands `kill -s SIGTERM` (bash does; dash wants `TERM`)."""
    probe = subprocess.run(["/bin/sh", "-c", "kill -s SIGTERM $$"], capture_output=True)
    return probe.returncode == -signal.SIGTERM


def log_records(daemon) -> list[dict]:
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


def user_processes_with(user, marker: str) -> dict[int, str]:
    """pid -> cmdline of the user's live processes whose command line contains marker."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != user.uid:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()  # empty for a zombie
        except (FileNotFoundError, ProcessLookupError):
            continue
        if marker.encode() in cmdline:
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def wait_gone(pids, timeout: float = 10) -> list[int]:
    """Wait (on pidfds, no polling) until each pid has exited; returns the ones still running after timeout."""
    left = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                left.append(pid)
        finally:
            os.close(fd)
    return left


def test_output_exit_code_and_the_environment_file(daemon, user, image):
    script = (
        'if [ -e /etc/os-release ]; then echo host-root; else echo image-root; fi; '
        'echo "FROM_ENV=$FROM_ENV"; echo "SLURM_CONF=${SLURM_CONF-unset}"; echo "SLURM_CONFX=${SLURM_CONFX-unset}"; '
        'cat /etc/slurm/marker /var/run/munge/marker; ls /var/run/slurm; '
        'grep -c "^FROM_ENV=two words$" /var/run/slurm/task-0/environment; echo "args:$*"; exit 7'
    )
    env = {**user.env, "SLURM_CONF": "/etc/slurm/slurm.conf", "SLURM_CONFX": "not-excluded"}
    result = daemon.ctl(user, "run", "--job-id", "2001", "--env", "FROM_ENV=two words", "--bundle", str(image),
                        "--", "sh", "-c", script, "sh", "it's", "a b", env=env)
    assert result.returncode == 7, result.stderr
    assert result.stdout.decode().splitlines() == [
        "image-root",  # the host has /etc/os-release, the busybox image does not
        "FROM_ENV=two words",  # through the environment file (%e, newline format) and --set-env
        "SLURM_CONF=unset",  # EnvExclude'd: not in the file, and `env -i` drops the rest
        "SLURM_CONFX=not-excluded",
        "etc-slurm-from-host",
        "munge-from-host",
        "task-0",  # %m, the step's spool dir, is bound at /var/run/slurm
        "1",
        "args:it's a b",
    ]
    assert spool_entries(daemon) == []


def test_arguments_reach_the_container_byte_for_byte(daemon, user, image):
    nasty = ["a b", "it's", 'say "hi"', "$HOME", "`id`", "back\\slash", "line1\nline2", "", "*", "-n", "é"]
    result = daemon.ctl(user, "run", "--job-id", "2002", "--bundle", str(image), "--", "printf", "[%s]", *nasty)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "".join(f"[{a}]" for a in nasty)


def test_cancel_kills_with_the_published_commands_and_leaves_nothing(daemon, user, image):
    marker = f"nsd-ch-marker-{os.getpid()}-2003"
    # The container writes into its /var/run/slurm, says who it is, then blocks reading the
    # client's stdin (a pipe this test holds open, so it never ends by itself).
    script = 'echo probe > /var/run/slurm/probe; echo "pids $$ $PPID"; echo ready; read line; echo "never $line"'
    client = daemon.ctl_popen(user, "run", "--job-id", "2003", "--bundle", str(image), "--", "sh", "-c", script, marker,
                              stdin=subprocess.PIPE)
    seen = read_line_from(client.stdout, b"ready").decode()
    container_pid, shell_pid = (int(p) for p in seen.split("pids ", 1)[1].splitlines()[0].split())

    step_dir = Path(os.path.realpath(daemon.spool_dir)) / f"oci-job2003-0-uid{user.uid}"
    assert (step_dir / "probe").read_text() == "probe\n"  # the container's /var/run/slurm is the step dir
    running = user_processes_with(user, marker)
    # ch-run execs (no pid namespace): the container's shell is a child of the task's /bin/sh.
    assert {container_pid, shell_pid} <= set(running), running
    assert os.getpgid(container_pid) == shell_pid

    cancelled = daemon.ctl(user, "cancel", "2003.0")
    assert cancelled.returncode == 0, cancelled.stderr
    client.wait(timeout=30)  # the step has ended, so the client has its exit reply

    commands = {(r.get("key"), r.get("command")) for r in log_records(daemon) if r.get("event") == "running runtime command"}
    assert commands == {("RunTimeKill", f"kill -s SIGTERM {shell_pid}"), ("RunTimeDelete", f"kill -s SIGKILL {shell_pid}")}
    kill_failed = [r for r in log_records(daemon) if r.get("event", "").startswith("RunTimeKill failed")]
    if sh_kill_takes_sig_prefixed_names():
        # SIGTERM ends the task's shell (%p); the step's status says so.
        assert (kill_failed, client.returncode) == ([], 128 + signal.SIGTERM)
    else:
        # dash: "kill: invalid signal number or name: SIGTERM" (exit 2). The published
        # commands cannot work here; the daemon falls back to SIGKILL on the task's group.
        assert [(r["status"], "SIGTERM" in r["output"]) for r in kill_failed] == [(2, True)], kill_failed
        assert client.returncode == 128 + signal.SIGKILL
    assert not step_dir.exists()
    assert spool_entries(daemon) == []
    # Checked while the container's stdin is still open: a survivor would still be reading it.
    survivors = user_processes_with(user, marker)
    assert wait_gone(survivors) == [], survivors
    assert wait_gone([container_pid, shell_pid]) == []
    out, _ = client.communicate(timeout=30)
    assert b"never" not in out
