"""End to end with the real daemon, the real client and real runc.

Every test that takes `daemon` runs twice: with the guide's run-mode oci.conf and with its
create/start oci.conf, which must behave the same to the caller. `run_daemon` is run mode only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import REPO, RUNC_RUN_CONF, read_line_from, runc_containers, spool_entries

MODES = {
    "run": None,  # conftest's default: the guide's runc run-mode config
    "create-start": (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text(),
}


@pytest.fixture(params=sorted(MODES))
def mode(request) -> str:
    return request.param


@pytest.fixture
def daemon(start_daemon, mode):
    return start_daemon() if MODES[mode] is None else start_daemon(MODES[mode])


@pytest.fixture
def run_daemon(start_daemon):
    return start_daemon()


def test_exit_status_and_output_reach_the_caller(daemon, user, bundle):
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"out\n"
    assert b"err\n" in result.stderr
    assert spool_entries(daemon) == []
    assert runc_containers(user) == []


def test_success_is_zero_and_stdin_is_the_callers(daemon, user, bundle):
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "sh", "-c", "read line; echo got:$line",
                        input=b"hello\n")
    assert (result.returncode, result.stdout) == (0, b"got:hello\n"), result.stderr


def test_container_killed_by_signal_reports_128_plus_n(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "50", "--bundle", str(bundle), "--", "sh", "-c", "echo ready; exec sleep 1000",
    )
    read_line_from(client.stdout, b"ready")
    state = subprocess.run(
        user.command(["runc", "--root", f"/run/user/{user.uid}/", "state", f"testnode.{user.name}.50.0.0"]),
        capture_output=True, env=user.env, check=True,
    )
    # As the kernel's OOM killer would: the container's own process dies by SIGKILL.
    os.kill(json.loads(state.stdout)["pid"], signal.SIGKILL)
    client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGKILL


def test_arguments_reach_the_container_byte_for_byte(daemon, user, bundle):
    nasty = ["a b", "it's", 'say "hi"', "$HOME", "`id`", "back\\slash", "line1\nline2", "", "*", "-n", "é"]
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "printf", "[%s]", *nasty)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == "".join(f"[{a}]" for a in nasty)


def test_command_is_resolved_inside_the_container_not_on_the_host(daemon, user, bundle):
    assert not os.path.exists("/bin/only-in-image")
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "only-in-image", "x")
    assert (result.returncode, result.stdout) == (0, b"only-in-image x\n"), result.stderr


def test_environment_export_all_none_and_env(daemon, user, bundle):
    env = {**user.env, "FROM_CALLER": "yes"}
    probe = ["--", "sh", "-c", 'echo "${FROM_CALLER:-unset} ${EXTRA:-unset}"']
    all_ = daemon.ctl(user, "run", "--bundle", str(bundle), "--env", "EXTRA=a b", *probe, env=env)
    assert all_.stdout == b"yes a b\n", all_.stderr
    none = daemon.ctl(user, "run", "--bundle", str(bundle), "--export", "NONE", "--env", "EXTRA=1", *probe, env=env)
    assert none.stdout == b"unset 1\n", none.stderr


def test_signal_sent_to_the_client_reaches_the_container(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--bundle", str(bundle), "--",
        "sh", "-c", 'trap "echo got-usr1; exit 7" USR1; echo ready; while :; do sleep 1; done',
    )
    read_line_from(client.stdout, b"ready")
    client.send_signal(signal.SIGUSR1)
    out, err = client.communicate(timeout=30)
    assert client.returncode == 7, err
    assert b"got-usr1" in out


def test_nodestepctl_signal_reaches_the_container(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "4242", "--bundle", str(bundle), "--",
        "sh", "-c", 'trap "exit 9" USR2; echo ready; while :; do sleep 1; done',
    )
    read_line_from(client.stdout, b"ready")
    sent = daemon.ctl(user, "signal", "4242.0", "USR2")
    assert sent.returncode == 0, sent.stderr
    client.communicate(timeout=30)
    assert client.returncode == 9


def test_cancel_kills_deletes_and_cleans_up(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "51", "--step-id", "2", "--bundle", str(bundle), "--",
        "sh", "-c", "echo ready; exec sleep 1000",
    )
    read_line_from(client.stdout, b"ready")
    assert runc_containers(user) == [f"testnode.{user.name}.51.2.0"]
    assert spool_entries(daemon) == [f"oci-job51-2-uid{user.uid}"]
    cancelled = daemon.ctl(user, "cancel", "51.2")
    assert cancelled.returncode == 0, cancelled.stderr
    # The guide's `runc kill -a` fails on these hosts (no cgroup freezer): we escalate at once.
    assert b"RunTimeKill failed" in daemon.log().encode()
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGKILL


def test_client_killed_with_sigkill_cancels_the_step(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "52", "--bundle", str(bundle), "--", "sh", "-c", "echo ready; exec sleep 1000",
    )
    read_line_from(client.stdout, b"ready")
    client.kill()
    client.wait()
    waited = daemon.ctl(user, "wait", "52.0")  # returns once the step has ended
    assert waited.returncode == 128 + signal.SIGKILL, waited.stderr
    ps = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    (step,) = [s for s in ps if s["job_id"] == 52]
    assert step["state"] == "finished"
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    assert "attached client went away" in daemon.log()


def test_several_tasks_each_with_own_container_and_task_id(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "53", "--ntasks", "3", "--bundle", str(bundle), "--",
        "sh", "-c", "echo ready; exec sleep 1000",
    )
    # Three lines from three containers; one read may bring several of them.
    seen = b""
    while seen.count(b"ready\n") < 3:
        seen += read_line_from(client.stdout, b"ready")
    assert sorted(runc_containers(user)) == [f"testnode.{user.name}.53.0.{t}" for t in range(3)]
    assert sorted(os.listdir(daemon.spool_dir / f"oci-job53-0-uid{user.uid}")) == ["task-0", "task-1", "task-2"]
    daemon.ctl(user, "cancel", "53.0")
    client.communicate(timeout=30)
    assert runc_containers(user) == []


def test_step_status_is_the_first_nonzero_task_status(daemon, user, bundle, tmp_path):
    result = daemon.ctl(user, "run", "--ntasks", "2", "--bundle", str(bundle), "--", "sh", "-c", "exit 4")
    assert result.returncode == 4, result.stderr


def test_detach_prints_the_step_and_wait_returns_its_status(daemon, mode, user, bundle, workdir):
    outdir = workdir / f"detached-{mode}"
    outdir.mkdir()
    os.chown(outdir, user.uid, user.gid)
    out, err = outdir / "out", outdir / "err"
    result = daemon.ctl(user, "run", "--detach", "--output", str(out), "--error", str(err), "--bundle", str(bundle),
                        "--", "sh", "-c", "echo to-file; echo err-too >&2; exit 5")
    assert result.returncode == 0, result.stderr
    job, step = result.stdout.decode().strip().split(".")
    assert int(job) >= 100_000_000 and step == "0"
    waited = daemon.ctl(user, "wait", f"{job}.{step}")
    assert waited.returncode == 5
    assert (out.read_bytes(), err.read_bytes()) == (b"to-file\n", b"err-too\n")
    # Opened by the client, with the user's rights: the files are the user's.
    assert (out.stat().st_uid, err.stat().st_uid) == (user.uid, user.uid)


def test_slurm_ids_are_used_when_set(daemon, user, bundle):
    env = {**user.env, "SLURM_JOB_ID": "777", "SLURM_STEP_ID": "3"}
    result = daemon.ctl(user, "run", "--detach", "--bundle", str(bundle), "--", "true", env=env)
    assert result.stdout == b"777.3\n", result.stderr
    assert daemon.ctl(user, "wait", "777.3").returncode == 0


def test_ps_and_status(daemon, mode, user, other_user, bundle):
    daemon.ctl(user, "run", "--job-id", "60", "--bundle", str(bundle), "--", "true")
    table = daemon.ctl(user, "ps").stdout.decode().splitlines()
    assert table[0].split() == ["STEP", "USER", "STATE", "TASKS", "STATUS", "AGE", "COMMAND"]
    assert table[1].split()[:5] == ["60.0", user.name, "finished", "1", "0"]
    # Another user does not see it.
    assert len(daemon.ctl(other_user, "ps").stdout.decode().splitlines()) == 1
    status = daemon.ctl(user, "status")
    assert status.returncode == 0
    text = status.stdout.decode()
    assert f"{mode} mode" in text and str(daemon.oci_conf) in text and "0 running, 1 finished" in text


def test_other_users_cannot_touch_a_step(daemon, user, other_user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "61", "--bundle", str(bundle), "--", "sh", "-c", "echo ready; exec sleep 1000",
    )
    read_line_from(client.stdout, b"ready")
    for args in (("signal", "61.0", "KILL"), ("cancel", "61.0"), ("wait", "61.0")):
        refused = daemon.ctl(other_user, *args)
        assert refused.returncode == 1
        assert b"no step 61.0 of yours" in refused.stderr
    assert runc_containers(user) == [f"testnode.{user.name}.61.0.0"]
    daemon.ctl(user, "cancel", "61.0")
    client.communicate(timeout=30)


def test_same_step_twice_is_refused(daemon, user, bundle):
    client = daemon.ctl_popen(
        user, "run", "--job-id", "62", "--bundle", str(bundle), "--", "sh", "-c", "echo ready; exec sleep 1000",
    )
    read_line_from(client.stdout, b"ready")
    again = daemon.ctl(user, "run", "--job-id", "62", "--bundle", str(bundle), "--", "true")
    assert again.returncode == 125
    assert b"already running" in again.stderr
    daemon.ctl(user, "cancel", "62.0")
    client.communicate(timeout=30)


def test_daemon_log_lines_carry_step_fields(daemon, user, bundle):
    daemon.ctl(user, "run", "--job-id", "63", "--bundle", str(bundle), "--", "true")
    lines = [l for l in daemon.log().splitlines() if "task exited" in l]
    assert lines and all(f in lines[0] for f in ("job_id=63", "step_id=0", "task_id=0", f"user={user.name}"))


def test_sigterm_with_steps_on_stop_cancel_cancels_running_steps(start_daemon, user, bundle):
    daemon = start_daemon(RUNC_RUN_CONF, "--steps-on-stop", "cancel")
    client = daemon.ctl_popen(
        user, "run", "--job-id", "64", "--bundle", str(bundle), "--", "sh", "-c", "echo ready; exec sleep 1000",
    )
    read_line_from(client.stdout, b"ready")
    assert daemon.stop() == 0, daemon.log()
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    assert not daemon.socket.exists()


def test_pty_gives_the_container_a_terminal(run_daemon, user, bundle):
    daemon = run_daemon
    master, slave = os.openpty()
    client = subprocess.Popen(
        user.command(daemon.ctl_argv("run", "--pty", "--bundle", str(bundle), "--",
                                     "sh", "-c", "tty; [ -t 0 ] && echo stdin-is-a-tty; exit 4")),
        stdin=slave, stdout=slave, stderr=slave, env=user.env, cwd="/", start_new_session=True,
    )
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every holder of the terminal is gone
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert client.wait(timeout=30) == 4, output
    assert b"/dev/pts/" in output and b"stdin-is-a-tty" in output


def test_pty_without_a_terminal_is_refused(run_daemon, user, bundle):
    daemon = run_daemon
    result = daemon.ctl(user, "run", "--pty", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 2
    assert b"--pty needs a terminal on standard input" in result.stderr


def test_runtime_runs_without_capabilities_or_root_fds(start_daemon, user, bundle):
    # The runtime command itself reports its credentials: effective/permitted/inheritable/
    # ambient capabilities all empty, the user's ids, and no descriptors beyond stdio.
    daemon = start_daemon(
        'RunTimeRun="grep -E \'^(Uid|Gid|CapInh|CapPrm|CapEff|CapAmb):\' /proc/self/status; echo Fds: $(ls /proc/self/fd)"\n'
        'RunTimeKill="kill -s SIGTERM %p"\nRunTimeDelete="kill -s SIGKILL %p"\nIgnoreFileConfigJson=true\n'
    )
    result = daemon.ctl(user, "run", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.decode().splitlines() if ":" in line)
    assert fields["Uid"].split() == [str(user.uid)] * 4
    assert fields["Gid"].split() == [str(user.gid)] * 4
    for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["Fds"].split() == ["0", "1", "2", "3"]  # stdio, plus the directory `ls` itself opens
