"""A RunTimeDelete that hangs is killed at runtime_timeout and run again; a container it
never deleted is marked in `ps` and `status` and logged with the command that deletes it
by hand (finding 14.5).

The runtime is a fake one, shell commands in oci.conf: RunTimeRun kills itself with
SIGKILL, after which run mode deletes the container; RunTimeDelete records each run in a
directory of the user's and hangs as the test says. Job ids 2100-2199 belong to this file.
"""

from __future__ import annotations

import json
import shlex
import subprocess

from conftest import SYSTEM_PATH

# The runtime dies by a signal: it may not have removed its container, so the daemon deletes it.
RUN = 'RunTimeRun="kill -9 $$"\nRunTimeKill="true"\nIgnoreFileConfigJson=true\n'
KILLED = 137


def fake_daemon(start_daemon, delete: str):
    return start_daemon(RUN + f'RunTimeDelete="{delete}"\n', "--runtime-timeout", "1", "--log-format", "json")


def log_events(daemon, event: str) -> list[dict]:
    return [r for r in map(json.loads, daemon.log().splitlines()) if r.get("event", "").startswith(event)]


def status_lines(daemon, user) -> list[str]:
    result = daemon.ctl(user, "status")
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().splitlines()


def test_a_delete_that_hangs_once_is_run_again_and_deletes(start_daemon, user, user_dir, bundle):
    out = user_dir("delete-")
    # The first run hangs (and is killed after 1 s); the next deletes.
    daemon = fake_daemon(start_daemon, f"echo run >> {out}/runs-%j; mkdir {out}/hung-%j 2>/dev/null && sleep 1000; "
                                       f"echo deleted >> {out}/deleted-%j")
    run = daemon.ctl(user, "run", "--job-id", "2101", "--bundle", str(bundle), "--", "true")
    assert run.returncode == KILLED, run.stderr
    assert (out / "runs-2101").read_text() == "run\nrun\n"
    assert (out / "deleted-2101").read_text() == "deleted\n"
    (step,) = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    assert step["tasks"][0]["not_deleted"] is False
    (retry,) = log_events(daemon, "RunTimeDelete hung; running it again")
    assert retry["job_id"] == 2101 and retry["attempt"] == 1
    assert log_events(daemon, "container not deleted") == []
    assert not any(line.startswith("containers:") for line in status_lines(daemon, user))


def test_a_delete_that_always_hangs_leaves_a_mark_and_the_command(start_daemon, user, other_user, user_dir, bundle):
    out = user_dir("delete-")
    delete = f"echo run >> {out}/runs-%j; sleep 1000"
    daemon = fake_daemon(start_daemon, delete)
    run = daemon.ctl(user, "run", "--job-id", "2102", "--bundle", str(bundle), "--", "true")
    assert run.returncode == KILLED, run.stderr
    assert (out / "runs-2102").read_text() == "run\n" * 3  # the first, and two more
    (step,) = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    assert step["tasks"][0]["not_deleted"] is True
    ps = daemon.ctl(user, "ps").stdout.decode().splitlines()
    assert "finished (1 not deleted)" in ps[1], ps
    # status counts it for anyone (no step named); ps shows it to its owner only.
    assert "containers:   1 not deleted (RunTimeDelete hung; the log has the command)" in status_lines(daemon, other_user)
    assert json.loads(daemon.ctl(other_user, "ps", "--json").stdout) == []
    (error,) = log_events(daemon, "container not deleted")
    assert error["level"] == "error" and error["job_id"] == 2102 and error["task_id"] == 0 and error["attempts"] == 3
    expanded = f"echo run >> {out}/runs-2102; sleep 1000"
    assert error["command"] == shlex.join(["runuser", "-u", user.name, "--", "env",
                                           f"XDG_RUNTIME_DIR=/run/user/{user.uid}", "/bin/sh", "-c", expanded])
    # Its prefix runs the command as the user, with the user's runtime dir.
    argv = shlex.split(error["command"])[:-1] + ['echo "$(id -un) $XDG_RUNTIME_DIR"']
    ran = subprocess.run(argv, env={"PATH": SYSTEM_PATH}, capture_output=True, text=True, timeout=30)
    assert ran.stdout == f"{user.name} /run/user/{user.uid}\n", ran.stderr
