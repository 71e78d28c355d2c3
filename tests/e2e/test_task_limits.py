"""Tasks get the users' resource limits, not the daemon's (issue 19.8, docs/security.md "Resource limits of
tasks"). Real daemon, real nodestepctl. Job ids 19800-19899 belong to this file."""

from __future__ import annotations

import contextlib
import resource

SHELL_ONLY_CONF = 'IgnoreFileConfigJson=true\nRunTimeRun="%@"\n'
# RunTimeQuery is run by run_helper: it reports the limits through its output in the launch error
QUERY_CONF = ('RunTimeCreate="true"\nRunTimeStart="true"\n'
              'RunTimeQuery="echo limits $(ulimit -S -n):$(ulimit -H -n); exit 1"\n'
              'RunTimeKill="true"\nRunTimeDelete="true"\n')


def daemon_nofile(daemon) -> tuple[int, int]:
    with open(f"/proc/{daemon.proc.pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


@contextlib.contextmanager
def low_fd_limit():
    """The daemon started with a soft limit of 1024 (as under the shipped unit), which it raises."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, before[1]))
    try:
        yield 1024, before[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_a_task_sees_the_users_nofile_limit_not_the_daemons_raised_one(start_daemon, user, bundle):
    """The daemon raises its own RLIMIT_NOFILE soft limit to max_connections + 4096; under the old
    unit file (LimitNOFILE=1048576) tasks inherited a million. They get the limit the daemon
    started with (the service's LimitNOFILE=, 1024:524288 in the shipped unit)."""
    with low_fd_limit() as start:  # the daemon inherits ours
        daemon = start_daemon(SHELL_ONLY_CONF)
    result = daemon.ctl(user, "run", "--job-id", "19800", "--bundle", str(bundle), "--",
                        "grep", "^Max open files", "/proc/self/limits")
    assert result.returncode == 0, result.stderr
    assert [int(n) for n in result.stdout.split()[3:5]] == list(start)
    assert daemon_nofile(daemon)[0] > start[0]  # the daemon's own stays raised


def test_a_runtime_helper_sees_the_users_nofile_limit(start_daemon, user, bundle):
    with low_fd_limit() as start:
        daemon = start_daemon(QUERY_CONF)
    assert daemon_nofile(daemon)[0] > start[0]
    result = daemon.ctl(user, "run", "--job-id", "19801", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 125
    assert f"limits {start[0]}:{start[1]}" in result.stderr.decode()
