"""nodestepctl against a real daemon: the ps table and the launch progress line.

What needs no daemon (the parser, the man pages, the completion, run's request and the
exit statuses) is tested in tests/unit/ctl/."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import read_line_from
from test_recording_runtime import oci_conf


@pytest.fixture
def out(user_dir) -> Path:
    return user_dir("records-")


# ---- ps --------------------------------------------------------------------------------------


def test_ps_is_an_aligned_table_and_json(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, run="--block"))
    for job, args in ((4001, ["short"]), (4002, ["a-much-longer-command", "with", "arguments"])):
        result = daemon.ctl(user, "run", "--detach", "--job-id", str(job), "--ntasks", "2" if job == 4002 else "1",
                            "--bundle", str(bundle), "--", *args)
        assert result.returncode == 0, result.stderr
    table = daemon.ctl(user, "ps").stdout.decode().splitlines()
    header, rows = table[0], table[1:]
    assert header.split() == ["STEP", "USER", "STATE", "TASKS", "STATUS", "AGE", "COMMAND"]
    assert len(rows) == 2
    # Every column starts where its heading starts.
    for heading in ("USER", "STATE", "TASKS", "STATUS", "AGE", "COMMAND"):
        column = header.index(heading)
        for row in rows:
            assert row[column - 2:column] == "  " and row[column] != " ", (heading, row)
    assert rows[1].endswith("a-much-longer-command with arguments")
    steps = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    assert [(s["job_id"], len(s["tasks"]), s["state"]) for s in steps] == [(4001, 1, "running"), (4002, 2, "running")]
    for job in (4001, 4002):
        assert daemon.ctl(user, "cancel", f"{job}.0").returncode == 0


# ---- the launch progress line ------------------------------------------------------------------

PROGRESS = b"nodestepctl: still launching after 1 s: nodestepd is preparing the step"


def test_a_slow_launch_shows_progress_after_one_second(start_daemon, user, bundle, out):
    """The daemon is held (SIGSTOP) while the launch waits: after 1 s the client says so, once."""
    daemon = start_daemon(oci_conf(out, run="--say ran"))
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        client = daemon.ctl_popen(user, "run", "--job-id", "4010", "--bundle", str(bundle), "--", "x")
        read_line_from(client.stderr, PROGRESS + b" (spool, stage-in, runtime create)", timeout=30)
        assert time.monotonic() - began >= 1.0
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0 and stdout == b"ran\n"
    assert re.search(rb"nodestepctl: step 4010\.0 started after \d+\.\d s\n$", stderr), stderr


def test_a_fast_launch_shows_no_progress(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, run="--say ran"))
    # A launch here takes well under a second; on a machine so loaded that it does not,
    # the line would be right to appear, so only a run that finished in time is judged.
    for attempt in range(5):
        began = time.monotonic()
        result = daemon.ctl(user, "run", "--job-id", str(4020 + attempt), "--bundle", str(bundle), "--", "x")
        elapsed = time.monotonic() - began
        assert result.returncode == 0, result.stderr
        if elapsed < 1.0:
            assert result.stderr == b""
            return
    pytest.fail("no launch finished within a second in five attempts")
