"""While steps just run, the daemon sleeps: no timers, no polling, no wake-ups."""

from __future__ import annotations

import os
import time

from conftest import read_line_from


def _switches(pid: int) -> int:
    """Context switches of every thread of pid: each wake-up costs at least one."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def test_running_steps_cost_the_daemon_no_wakeups(start_daemon, user, bundle):
    daemon = start_daemon()
    clients = [
        daemon.ctl_popen(user, "run", "--job-id", str(90 + i), "--bundle", str(bundle), "--",
                         "sh", "-c", "echo ready; exec sleep 1000")
        for i in range(3)
    ]
    for client in clients:
        read_line_from(client.stdout, b"ready")
    before = _switches(daemon.proc.pid)
    time.sleep(2.0)  # the measuring window, not a wait for an event
    woke = _switches(daemon.proc.pid) - before
    # A 1 s poller would show 2 or more here per step; an idle event loop shows none.
    assert woke == 0, f"the daemon woke up {woke} times in 2 s with 3 idle steps"
    for i in range(3):
        assert daemon.ctl(user, "cancel", f"{90 + i}.0").returncode == 0
