"""While steps just run, the daemon sleeps: no timers, no polling, no wake-ups."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import REPO, read_line_from

CREATE_START_CONF = (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text()


def _switches(pid: int) -> int:
    """Context switches of every thread of pid: each wake-up costs at least one."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


@pytest.mark.parametrize("mode", ["run", "create-start"])
def test_running_steps_cost_the_daemon_no_wakeups(start_daemon, user, bundle, mode):
    # create/start: Slurm would run RunTimeQuery about once a second per step here.
    daemon = start_daemon() if mode == "run" else start_daemon(CREATE_START_CONF)
    clients = [
        daemon.ctl_popen(user, "run", "--job-id", str(90 + i), "--bundle", str(bundle), "--",
                         "sh", "-c", "echo ready; exec sleep 1000")
        for i in range(3)
    ]
    for client in clients:
        read_line_from(client.stdout, b"ready")
    # In create/start mode "ready" can come before RunTimeStart has returned: let every
    # launch finish (ps says running), then let the last request's connection close.
    deadline = time.monotonic() + 30
    while not all(s["state"] == "running" for s in json.loads(daemon.ctl(user, "ps", "--json").stdout)):
        assert time.monotonic() < deadline, "the steps never all reached running"
    time.sleep(0.5)
    before = _switches(daemon.proc.pid)
    time.sleep(2.0)  # the measuring window, not a wait for an event
    woke = _switches(daemon.proc.pid) - before
    # A 1 s poller would show 2 or more here per step; an idle event loop shows none.
    assert woke == 0, f"the daemon woke up {woke} times in 2 s with 3 idle steps"
    for i in range(3):
        assert daemon.ctl(user, "cancel", f"{90 + i}.0").returncode == 0
