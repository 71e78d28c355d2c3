"""Restart survival (issue 5) with real runc in both modes: steps outlive the daemon, and
their statuses are never lost or made up.

The containers here wait for a "go" file the test creates in the bundle's rootfs, so
the test, not a sleep, decides whether a task ends before or after the restart.
"""

import json
import os
import select
import signal
import subprocess
import time

import pytest

from conftest import REPO, read_line_from, runc_containers, spool_entries, wait_gone

MODES = {
    "run": (REPO / "tests" / "oci-conf-examples" / "runc-run.conf").read_text(),
    "create-start": (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text(),
}


@pytest.fixture(params=sorted(MODES))
def conf(request) -> str:
    return MODES[request.param]


@pytest.fixture
def gate(bundle):
    """gate(name) -> (container command that waits for the go file, then exits 4; open the gate)."""
    made = []

    def make(name: str, status: int = 4):
        path = bundle / "rootfs" / "tmp" / f"go-{name}"
        made.append(path)
        script = f"echo ready; while [ ! -e /tmp/go-{name} ]; do sleep 0.1; done; exit {status}"
        return ["sh", "-c", script], lambda: path.touch()

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def records(daemon) -> dict[str, dict]:
    steps = daemon.state_dir / "steps"
    return {p.name: json.loads(p.read_bytes()) for p in steps.glob("*.json")} if steps.exists() else {}


def task_pids(daemon, job: int) -> list[int]:
    (record,) = [r for r in records(daemon).values() if r["job_id"] == job]
    return [t["process"]["pid"] for t in record["tasks"]]


def launch_detached(daemon, user, bundle, job: int, command: list[str], *extra: str) -> None:
    """Launch and return once runc reports the container running (run mode acknowledges
    the launch as soon as `runc run` is started)."""
    result = daemon.ctl(user, "run", "--detach", "--job-id", str(job), *extra, "--bundle", str(bundle), "--", *command)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{job}.0\n".encode()
    wait_running(user, [job])


def wait_running(user, jobs: list[int], timeout: float = 60) -> None:
    """Until runc reports each job's container running: runc offers no event for it."""
    names = {f"testnode.{user.name}.{job}.0.0" for job in jobs}
    deadline = time.monotonic() + timeout
    while True:
        listing = subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "list", "-f", "json"]),
                                 capture_output=True, env=user.env, check=True).stdout
        running = {c["id"] for c in json.loads(listing or b"[]") or [] if c["status"] == "running"}
        if names <= running:
            return
        assert time.monotonic() < deadline, f"not running after {timeout} s: {sorted(names - running)}"
        time.sleep(0.05)


def wait_recorded_running(daemon, job: int, timeout: float = 30) -> None:
    """Until the step's record says running (the daemon writes it right before its reply)."""
    deadline = time.monotonic() + timeout
    while not any(r["job_id"] == job and r["state"] == "running" for r in records(daemon).values()):
        assert time.monotonic() < deadline, f"step {job} not recorded running within {timeout} s"
        time.sleep(0.01)


def held_start(daemon, gate_dir) -> list[int]:
    """The daemon's children running the gated RunTimeStart (a runtime command's parent is
    the daemon thread that started it: any of its threads)."""
    pid = daemon.proc.pid
    children = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(k) for k in f.read().split()]
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    held = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline") as f:
                if str(gate_dir) in f.read():
                    held.append(child)
        except FileNotFoundError:
            pass
    return held


def kill_daemon(daemon) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()


def assert_nothing_left(daemon, user) -> None:
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    assert records(daemon) == {}
    assert list((daemon.state_dir / "steps").iterdir()) == []  # no exit file either


def test_steps_outlive_a_killed_daemon_and_report_their_status(start_daemon, conf, user, bundle, gate):
    daemon = start_daemon(conf)
    opens = []
    for job in (7001, 7002, 7003):
        command, open_gate = gate(str(job))
        launch_detached(daemon, user, bundle, job, command)
        opens.append(open_gate)
    kill_daemon(daemon)
    assert len(runc_containers(user)) == 3  # the containers did not notice
    second = start_daemon(after=daemon)
    log = second.log()
    assert log.count("recovering step") == 3
    ps = json.loads(second.ctl(user, "ps", "--json").stdout)
    assert sorted((s["job_id"], s["state"]) for s in ps) == [(7001, "running"), (7002, "running"), (7003, "running")]
    waits = [second.ctl_popen(user, "wait", f"{job}.0") for job in (7001, 7002, 7003)]
    for open_gate in opens:
        open_gate()
    for w in waits:
        w.communicate(timeout=60)
        assert w.returncode == 4
    assert_nothing_left(second, user)


def test_tasks_that_end_while_the_daemon_is_down_keep_their_status(start_daemon, conf, user, bundle, gate):
    daemon = start_daemon(conf)
    statuses = {7101: 4, 7102: 0, 7103: 9}
    pids, opens = [], []
    for job, status in statuses.items():
        command, open_gate = gate(str(job), status)
        launch_detached(daemon, user, bundle, job, command)
        opens.append(open_gate)
        pids += task_pids(daemon, job)
    kill_daemon(daemon)
    for open_gate in opens:
        open_gate()
    wait_gone(pids)  # all ended while no daemon ran
    second = start_daemon(after=daemon)
    for job, status in statuses.items():
        result = second.ctl(user, "wait", f"{job}.0")
        assert result.returncode == status, result.stderr
    assert "task ended while the daemon was down" in second.log()
    assert_nothing_left(second, user)


def test_attached_client_is_told_and_wait_gives_the_real_status(start_daemon, conf, user, bundle, gate, new_dir):
    """A daemon that does not come back within the client's --reattach-timeout (clients that
    it does come back for: test_ridethrough.py)."""
    daemon = start_daemon(conf)
    command, open_gate = gate("attached")
    # stderr to a file: the container holds the client's stdio, so a pipe would not end with the client.
    err_path = new_dir("client-") / "stderr"
    with open(err_path, "wb") as err_file:
        client = daemon.ctl_popen(user, "run", "--job-id", "7201", "--reattach-timeout", "1", "--bundle",
                                  str(bundle), "--", *command, stderr=err_file)
    read_line_from(client.stdout, b"ready")
    wait_recorded_running(daemon, 7201)  # else the restart undoes the launch (see the next test)
    kill_daemon(daemon)
    assert client.wait(timeout=30) == 255
    err = err_path.read_bytes()
    # The daemon may die just before or just after its `started` reply: both are said.
    assert b"lost the connection to nodestepd" in err and b"nodestepd did not come back within 1 s" in err
    assert b"step 7201.0 may" in err and b"nodestepctl wait 7201.0 tells" in err
    second = start_daemon(after=daemon)
    waiting = second.ctl_popen(user, "wait", "7201.0")
    open_gate()
    waiting.communicate(timeout=60)
    assert waiting.returncode == 4
    assert_nothing_left(second, user)


def test_signal_and_cancel_reach_recovered_steps(start_daemon, conf, user, bundle):
    daemon = start_daemon(conf)
    launch_detached(daemon, user, bundle, 7301, ["sh", "-c", "trap 'exit 12' HUP; while :; do sleep 0.05; done"])
    launch_detached(daemon, user, bundle, 7302, ["sleep", "1000"])
    kill_daemon(daemon)
    second = start_daemon(after=daemon)
    assert second.ctl(user, "signal", "7301.0", "HUP").returncode == 0
    assert second.ctl(user, "wait", "7301.0").returncode == 12
    cancel = second.ctl(user, "cancel", "7302.0")
    assert cancel.returncode == 0, cancel.stderr
    assert b"cancelled" in cancel.stdout
    # RunTimeKill's SIGTERM, or SIGKILL where `runc kill -a` fails (no cgroup freezer here).
    assert second.ctl(user, "wait", "7302.0").returncode in (128 + signal.SIGTERM, 128 + signal.SIGKILL)
    assert_nothing_left(second, user)


def test_a_restart_under_50_running_steps_loses_and_duplicates_none(start_daemon, conf, user, bundle, gate):
    daemon = start_daemon(conf, "--steps-on-stop", "leave")
    jobs = list(range(7400, 7450))
    opens = {}
    launches = []
    for job in jobs:
        command, opens[job] = gate(str(job), job % 7)
        launches.append(daemon.ctl_popen(user, "run", "--detach", "--job-id", str(job), "--bundle", str(bundle),
                                         "--", *command))
    for p in launches:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    wait_running(user, jobs, timeout=120)
    assert daemon.terminate() == 0
    assert "leaving running steps alone for the next daemon" in daemon.log()
    assert len(records(daemon)) == 50
    second = start_daemon(after=daemon, ready_timeout=120)
    assert second.log().count("recovering step") == 50
    ps = json.loads(second.ctl(user, "ps", "--json").stdout)
    assert sorted(s["job_id"] for s in ps) == jobs
    assert {s["state"] for s in ps} == {"running"}
    assert len(runc_containers(user)) == 50
    for job in jobs:
        opens[job]()
    for job in jobs:
        assert second.ctl(user, "wait", f"{job}.0").returncode == job % 7
    assert_nothing_left(second, user)


def test_a_recycled_pid_is_not_adopted(start_daemon, user, bundle, gate):
    """The record names the task by pid and start time: a live process with that pid but
    another start time is someone else's, and is neither watched nor signalled."""
    daemon = start_daemon(MODES["run"])
    command, open_gate = gate("recycled")
    launch_detached(daemon, user, bundle, 7501, command)
    (real,) = task_pids(daemon, 7501)
    kill_daemon(daemon)
    open_gate()
    wait_gone([real])
    # Stand-in for the recycled pid: a process of the same user, now at the recorded pid's place.
    stranger = subprocess.Popen(user.command(["sleep", "1000"]), env=user.env)
    try:
        path = daemon.state_dir / "steps" / f"{user.uid}.7501.0.0.json"
        record = json.loads(path.read_bytes())
        record["tasks"][0]["process"]["pid"] = stranger.pid
        path.write_text(json.dumps(record))
        second = start_daemon(after=daemon)
        result = second.ctl(user, "wait", "7501.0")
        assert result.returncode == 255 and b"is not known" in result.stderr  # never a made-up 0
        assert f"pid {stranger.pid} is another process now" in second.log()
        assert stranger.poll() is None  # not signalled by the cleanup
        assert_nothing_left(second, user)
    finally:
        stranger.kill()
        stranger.wait()


def test_a_truncated_record_is_quarantined_and_the_others_recover(start_daemon, user, bundle, gate):
    daemon = start_daemon(MODES["run"])
    good_command, open_good = gate("good")
    bad_command, open_bad = gate("bad")
    launch_detached(daemon, user, bundle, 7601, good_command)
    launch_detached(daemon, user, bundle, 7602, bad_command)
    kill_daemon(daemon)
    bad = daemon.state_dir / "steps" / f"{user.uid}.7602.0.0.json"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    second = start_daemon(after=daemon)
    try:
        log = second.log()
        assert "step record unreadable; quarantined" in log and f"{user.uid}.7602.0.0.json" in log
        quarantined = list((second.state_dir / "quarantine").iterdir())
        assert any(q.name.startswith(f"{user.uid}.7602.0.0.json.") and q.read_bytes() == data[: len(data) // 3]
                   for q in quarantined)
        assert second.ctl(user, "wait", "7602.0").returncode == 1  # not known: it was quarantined
        waiting = second.ctl_popen(user, "wait", "7601.0")
        open_good()
        waiting.communicate(timeout=60)
        assert waiting.returncode == 4
    finally:
        open_bad()
        # The quarantined step is nobody's now: its container and spool dir are left for a human.
        deadline = time.monotonic() + 30
        name = f"testnode.{user.name}.7602.0.0"
        while name in runc_containers(user) and time.monotonic() < deadline:
            subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "delete", "--force", name]),
                           env=user.env, capture_output=True)
    assert runc_containers(user) == []
    assert spool_entries(second) == [f"oci-job7602-0-uid{user.uid}"]


def test_a_launch_cut_short_by_the_restart_is_undone(start_daemon, user, bundle, new_dir):
    """The daemon dies before the launch is acknowledged: the next daemon removes the
    created container and the spool dir, and the step's status is 125 (it never ran)."""
    gate_dir = new_dir("gate-")
    start = 'RunTimeStart="runc --rootless=true --root=/run/user/%U/ start %n.%u.%j.%s.%t"'
    held = f'RunTimeStart="while [ ! -e {gate_dir}/go ]; do sleep 0.05; done; runc --rootless=true --root=/run/user/%U/ start %n.%u.%j.%s.%t"'
    assert start in MODES["create-start"]
    daemon = start_daemon(MODES["create-start"].replace(start, held))
    name = f"testnode.{user.name}.7701.0.0"
    held_starts: list[int] = []
    try:
        client = daemon.ctl_popen(user, "run", "--detach", "--job-id", "7701", "--bundle", str(bundle), "--", "true")
        deadline = time.monotonic() + 30
        while not (held := held_start(daemon, gate_dir)):  # created, and RunTimeStart held at the gate
            assert time.monotonic() < deadline, "RunTimeStart did not start"
            time.sleep(0.02)
        # The held RunTimeStart is the daemon's child; pinned now, it is waited for at the end.
        held_starts = [os.pidfd_open(pid) for pid in held]
        assert name in runc_containers(user)
        assert [r["state"] for r in records(daemon).values()] == ["launching"]
        kill_daemon(daemon)
        client.communicate(timeout=30)
        assert client.returncode == 255
        second = start_daemon(after=daemon)
        assert "step was still launching when the daemon stopped; undoing the launch" in second.log()
        result = second.ctl(user, "wait", "7701.0")
        assert result.returncode == 125, result.stderr
        assert_nothing_left(second, user)
    finally:
        (gate_dir / "go").touch()  # the old daemon's RunTimeStart, orphaned, finishes (and fails)
        for fd in held_starts:
            ended = select.select([fd], [], [], 30)[0]
            os.close(fd)
            assert ended, "the held RunTimeStart did not end"
        # After a failure above, nothing of this test may stay for the next ones to trip on.
        if name in runc_containers(user):
            subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "delete", "--force", name]),
                           env=user.env, capture_output=True)


def test_a_spool_dir_cut_short_by_the_restart_is_removed(start_daemon, user, bundle):
    """The daemon dies while it creates the spool (chaos seed 3893603137): the launch was
    recorded first, so the next daemon removes the step dir, and the same step launches again.

    strace holds the daemon's first fchown (the spool's first task file, written right after
    its directories are made) until the daemon is killed: the test decides where it dies."""
    daemon = start_daemon(MODES["run"])
    step_dir = daemon.spool_dir / f"oci-job7702-0-uid{user.uid}"
    tracer = subprocess.Popen(
        ["strace", "-f", "-o", "/dev/null", "-e", "trace=fchown", "-e", "inject=fchown:delay_enter=300s",
         "-p", str(daemon.proc.pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = b""
        while f"strace: Process {daemon.proc.pid} attached".encode() not in seen:  # every thread, then this line
            assert select.select([tracer.stderr], [], [], 30)[0], f"strace did not attach: {seen!r}"
            chunk = os.read(tracer.stderr.fileno(), 4096)
            assert chunk, f"strace did not attach: {seen!r}"
            seen += chunk
        client = daemon.ctl_popen(user, "run", "--detach", "--job-id", "7702", "--bundle", str(bundle), "--", "true")
        deadline = time.monotonic() + 30
        while not (step_dir / "task-0").exists():  # the daemon is held inside the creation from here on
            assert time.monotonic() < deadline, "the spool dir was not created"
            time.sleep(0.02)
        [rec] = records(daemon).values()
        assert rec["state"] == "launching" and rec["spool"]["pending"] and rec["spool"]["step_dir"] == str(step_dir)
        daemon.proc.send_signal(signal.SIGKILL)
    finally:
        # The held thread dies only once strace lets it go (the kernel then skips the held
        # fchown: a fatal signal is pending), and the daemon is reaped only after that.
        tracer.kill()
        tracer.communicate(timeout=30)
    daemon.proc.wait(timeout=30)
    client.communicate(timeout=30)
    assert client.returncode == 255
    assert spool_entries(daemon) == [step_dir.name]
    second = start_daemon(after=daemon)
    assert "removed the spool dir of a launch that was still creating it" in second.log()
    assert second.ctl(user, "wait", "7702.0").returncode == 125
    assert_nothing_left(second, user)
    result = second.ctl(user, "run", "--job-id", "7702", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    assert_nothing_left(second, user)


def cancel_cut_short(start_daemon, conf, user, bundle, job: int):
    """A step cancelled while its container ignores RunTimeKill's SIGTERM, and the daemon
    SIGKILLed during kill_wait (the record says `terminating`). Returns the dead daemon."""
    # Plain `runc kill` (SIGTERM), not the guide's `kill -a`, which fails here at once.
    daemon = start_daemon(conf.replace(" kill -a ", " kill "), "--kill-wait", "3")
    launch_detached(daemon, user, bundle, job, ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"])
    cancel = daemon.ctl_popen(user, "cancel", f"{job}.0")
    deadline = time.monotonic() + 30
    while [r["state"] for r in records(daemon).values()] != ["terminating"]:
        assert time.monotonic() < deadline, "the cancellation was not recorded"
        time.sleep(0.01)
    pids = task_pids(daemon, job)
    kill_daemon(daemon)
    cancel.communicate(timeout=30)
    assert cancel.returncode != 0  # its daemon died under it
    return daemon, pids


def test_a_cancel_cut_short_by_the_restart_goes_on(start_daemon, conf, user, bundle):
    """The next daemon goes on cancelling the step (with the step's own kill_wait)."""
    daemon, _ = cancel_cut_short(start_daemon, conf, user, bundle, 7801)
    second = start_daemon(after=daemon)
    assert "going on cancelling the step" in second.log()
    result = second.ctl(user, "wait", "7801.0")
    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    assert "task still running after kill_wait" in second.log()
    assert_nothing_left(second, user)


def test_a_cancel_whose_tasks_end_while_the_daemon_is_down_is_finished(start_daemon, conf, user, bundle):
    """The container dies while no daemon runs: the next one has nothing left to kill, but
    still deletes the container (create/start leaves a stopped one registered) and cleans up."""
    daemon, pids = cancel_cut_short(start_daemon, conf, user, bundle, 7802)
    subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "kill",
                                 f"testnode.{user.name}.7802.0.0", "KILL"]), env=user.env, check=True)
    wait_gone(pids)
    second = start_daemon(after=daemon)
    result = second.ctl(user, "wait", "7802.0")
    assert result.returncode == 128 + signal.SIGKILL, result.stderr
    assert "task still running after kill_wait" not in second.log()
    assert_nothing_left(second, user)


# ---- finished results are durable (issue 14.3) -------------------------------------------------


def finished_view(daemon, user, jobs) -> tuple[dict[int, int], list[dict]]:
    """Each job's `wait` exit status, and `ps` as JSON."""
    waits = {job: daemon.ctl(user, "wait", f"{job}.0").returncode for job in jobs}
    ps = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    return waits, sorted(ps, key=lambda s: s["job_id"])


def test_finished_results_survive_any_number_of_restarts(start_daemon, user, bundle):
    """60 steps end (exit codes, a death by signal, a cancel); after a SIGKILL and a SIGTERM
    restart, `wait` gives each one's exact status and `ps` lists them exactly as before."""
    daemon = start_daemon(MODES["run"], "--steps-on-stop", "leave")
    jobs = list(range(7900, 7960))
    commands = {job: ["sh", "-c", f"exit {job % 7}"] for job in jobs}
    commands[7958] = ["sh", "-c", "sleep 1000 & kill -KILL $!; wait $!; exit $?"]
    commands[7959] = ["sleep", "1000"]
    launches = [daemon.ctl_popen(user, "run", "--detach", "--job-id", str(job), "--bundle", str(bundle), "--",
                                 *commands[job]) for job in jobs]
    for p in launches:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cancelled = daemon.ctl(user, "cancel", "7959.0")
    assert cancelled.returncode == 0, cancelled.stderr
    waits, ps = finished_view(daemon, user, jobs)
    assert {job: status for job, status in waits.items() if job < 7958} == {job: job % 7 for job in jobs[:-2]}
    assert waits[7958] == 137 and waits[7959] != 0
    assert [s["state"] for s in ps] == ["finished"] * 60
    assert len(list((daemon.state_dir / "results").glob("*.json"))) == 60

    kill_daemon(daemon)
    second = start_daemon(after=daemon)
    assert finished_view(second, user, jobs) == (waits, ps)
    assert second.proc.send_signal(signal.SIGTERM) is None and second.proc.wait(timeout=60) == 0
    third = start_daemon(after=second)
    assert finished_view(third, user, jobs) == (waits, ps)
    assert_nothing_left(third, user)


def test_kept_results_are_bounded_and_a_corrupt_one_is_quarantined(start_daemon, user, bundle, workdir):
    settings = workdir / "results-settings.toml"
    settings.write_text("results_max = 10\nresults_max_per_user = 3\n")
    settings.chmod(0o644)
    daemon = start_daemon(MODES["run"], "--config", str(settings))
    jobs = list(range(7970, 7975))
    for job in jobs:
        assert daemon.ctl(user, "run", "--job-id", str(job), "--bundle", str(bundle), "--", "sh", "-c",
                          f"exit {job % 7}").returncode == job % 7
    results = daemon.state_dir / "results"
    deadline = time.monotonic() + 30  # the evicted results' files go in a worker thread
    while sorted(p.name for p in results.iterdir()) != [f"{user.uid}.{job}.0.0.json" for job in jobs[2:]]:
        assert time.monotonic() < deadline, sorted(p.name for p in results.iterdir())
        time.sleep(0.01)
    assert [s["job_id"] for s in json.loads(daemon.ctl(user, "ps", "--json").stdout)] == jobs[2:]
    kill_daemon(daemon)

    # While no daemon runs: one result gets old, one file is garbage.
    old = results / f"{user.uid}.7972.0.0.json"
    aged = json.loads(old.read_bytes())
    aged["ended_at"] -= 2 * 86400
    old.write_text(json.dumps(aged))
    (results / f"{user.uid}.7979.0.0.json").write_bytes(b"\x00 not a result")
    second = start_daemon(after=daemon)
    assert "step result unreadable; quarantined" in second.log()
    assert [s["job_id"] for s in json.loads(second.ctl(user, "ps", "--json").stdout)] == [7973, 7974]
    gone = second.ctl(user, "wait", "7972.0")
    assert (gone.returncode, gone.stderr) == (1, b"nodestepctl: no step 7972.0 of yours on this node\n")
    assert second.ctl(user, "wait", "7974.0").returncode == 7974 % 7
    deadline = time.monotonic() + 30
    while sorted(p.name for p in results.iterdir()) != [f"{user.uid}.{job}.0.0.json" for job in (7973, 7974)]:
        assert time.monotonic() < deadline, sorted(p.name for p in results.iterdir())
        time.sleep(0.01)
    assert [p.name.startswith(f"result.{user.uid}.7979.0.0.json.") for p in (daemon.state_dir / "quarantine").iterdir()] == [True]
