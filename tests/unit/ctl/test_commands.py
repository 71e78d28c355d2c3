"""nodestepctl's one-request subcommands (nodestepd/ctl/commands.py) against a fake daemon,
and the ps table."""

from __future__ import annotations

import json

import pytest

from fakedaemon import fake_daemon  # noqa: F401 - a fixture
from nodestepd.ctl import commands
from nodestepd.ctl.main import main
from nodestepd.protocol import wire


def replying(reply: dict, seen: list):
    """A fake daemon's script: note the request, send `reply`."""
    def serve(peer):
        message, _ = peer.read()
        seen.append(message)
        peer.write(reply)
    return serve


def step(job_id: int, args: list[str], *, state: str = "running", status: int | None = None, tasks: int = 1,
         started_at: float = 1000.0, user: str = "alice") -> dict:
    return {"job_id": job_id, "step_id": 0, "user": user, "state": state, "status": status, "args": args,
            "started_at": started_at, "tasks": [{"task_id": i, "status": status} for i in range(tasks)]}


# ---- ps -----------------------------------------------------------------------------------------


def test_ps_is_an_aligned_table():
    """Each column as wide as its widest cell, two spaces apart; the command last, as given."""
    table = commands.ps_table([step(4001, ["short"]),
                               step(4002, ["a-much-longer-command", "with", "arguments"], tasks=2, user="bob")], 1005)
    assert table == [
        "STEP    USER   STATE    TASKS  STATUS  AGE  COMMAND",
        "4001.0  alice  running  1      -       5s   short",
        "4002.0  bob    running  2      -       5s   a-much-longer-command with arguments",
    ]


def test_ps_shows_an_oci_containers_engine_id_shortened():
    """nodestep-oci's containers carry the engine's id: its first 12 digits, as `podman ps` shows them;
    the column is there only when some step has one."""
    oci = step(4003, ["sh"])
    oci["container_id"] = "0123456789abcdef" * 4
    table = commands.ps_table([oci, step(4004, ["other"])], 1000)
    assert table[0].split() == ["STEP", "USER", "STATE", "TASKS", "STATUS", "AGE", "CONTAINER", "COMMAND"]
    assert table[1].split()[6] == "0123456789ab" and table[2].split()[6] == "-"


def test_ps_of_no_steps_is_the_heading_alone():
    assert commands.ps_table([], 0) == ["STEP  USER  STATE  TASKS  STATUS  AGE  COMMAND"]


@pytest.mark.parametrize("state, status, shown", [
    ("running", None, "-"),
    ("finished", 0, "0"),
    ("finished", 137, "137"),
    ("finished", None, "unknown"),  # ended, and nobody could tell how: never a made-up 0
])
def test_ps_status_column(state, status, shown):
    row = commands.ps_table([step(1, ["x"], state=state, status=status)], 1000)[1]
    assert row.split()[4] == shown


def test_ps_marks_a_step_with_containers_not_deleted():
    finished = step(7, ["x"], state="finished", status=137, tasks=2)
    finished["tasks"][1]["not_deleted"] = True
    table = commands.ps_table([finished], 1000)
    assert table[1].startswith("7.0   alice  finished (1 not deleted)  2      137")


@pytest.mark.parametrize("seconds, shown", [
    (0, "0s"), (119.9, "119s"), (120, "2m"), (7199, "119m"), (7200, "2h"), (10 * 86400, "240h"),
])
def test_ps_age_column(seconds, shown):
    row = commands.ps_table([step(1, ["x"], started_at=1000)], 1000 + seconds)[1]
    assert row.split()[5] == shown


def test_ps_prints_the_table_or_the_json(fake_daemon, capsys):
    steps = [step(4001, ["short"])]
    seen = []
    daemon = fake_daemon(replying({"type": "steps", "steps": steps}, seen), connections=2)
    assert main(["--socket", daemon.path, "ps"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[0] == "STEP" and table[1].startswith("4001.0  alice  running")
    assert main(["--socket", daemon.path, "ps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == steps
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "ps"}] * 2


# ---- signal, cancel, wait -----------------------------------------------------------------------


def test_signal_names_the_step_and_the_signal(fake_daemon, capsys):
    seen = []
    daemon = fake_daemon(replying({"type": "ok"}, seen))
    assert main(["--socket", daemon.path, "signal", "42", "USR1"]) == 0
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "signal", "signal": "USR1", "job_id": 42, "step_id": 0}]
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("status, said", [(0, "status 0"), (None, "status unknown")])
def test_cancel_says_how_the_step_ended(fake_daemon, capsys, status, said):
    seen = []
    daemon = fake_daemon(replying({"type": "exit", "job_id": 42, "step_id": 1, "status": status, "tasks": []}, seen))
    assert main(["--socket", daemon.path, "cancel", "42.1"]) == 0
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "cancel", "job_id": 42, "step_id": 1}]
    assert capsys.readouterr().out == f"step 42.1 cancelled ({said})\n"


def test_job_end_lists_what_it_ended(fake_daemon, capsys):
    seen = []
    ended = [step(42, ["sleep"], state="finished", status=143, user="alice"),
             step(42, ["x"], state="finished", status=None, user="bob")]
    daemon = fake_daemon(replying({"type": "job-end", "job_id": 42, "ended": ended}, seen))
    assert main(["--socket", daemon.path, "job-end", "42"]) == 0
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "job-end", "job_id": 42}]
    assert capsys.readouterr().out == ("job 42: ended step 42.0 of alice (status 143)\n"
                                       "job 42: ended step 42.0 of bob (status unknown)\n")


@pytest.mark.parametrize("job", ["x", "-1", "4.2", "1" * 11, "٣"])
def test_job_end_takes_a_job_id(job, capsys):
    assert main(["--socket", "/nonexistent", "job-end", "--", job]) == 2
    assert "is not a job id" in capsys.readouterr().err


def test_wait_exits_with_the_steps_status(fake_daemon):
    seen = []
    daemon = fake_daemon(replying({"type": "exit", "job_id": 42, "step_id": 0, "status": 3, "tasks": []}, seen))
    assert main(["--socket", daemon.path, "wait", "42.0"]) == 3
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "wait", "job_id": 42, "step_id": 0}]


def test_wait_for_a_step_whose_status_is_not_known_exits_255_naming_the_tasks(fake_daemon, capsys):
    reply = {"type": "exit", "job_id": 42, "step_id": 0, "status": None,
             "tasks": [{"task_id": 0, "status": 0}, {"task_id": 1, "status": None}, {"task_id": 2, "status": None}]}
    daemon = fake_daemon(replying(reply, []))
    assert main(["--socket", daemon.path, "wait", "42.0"]) == 255
    daemon.stop()
    assert capsys.readouterr().err == (
        "nodestepctl: step 42.0 ended, but the exit status of task(s) 1, 2 is not known (nodestepd could not "
        "watch their process: the daemon's log says why); exiting with 255\n")


def test_the_daemons_error_is_printed_with_its_status(fake_daemon, capsys):
    daemon = fake_daemon(replying({"type": "error", "error": "no step 42.0", "status": 3}, []))
    assert main(["--socket", daemon.path, "wait", "42.0"]) == 3
    daemon.stop()
    assert capsys.readouterr().err == "nodestepctl: no step 42.0\n"


@pytest.mark.parametrize("subcommand, extra", [("signal", ["USR1"]), ("cancel", []), ("wait", [])])
@pytest.mark.parametrize("ref", ["x", "4.", "-1.0", "4.0.1"])
def test_a_step_reference_that_is_not_job_dot_step_is_a_usage_error(tmp_path, capsys, subcommand, extra, ref):
    # Refused before connecting: the socket is not even there.
    assert main(["--socket", str(tmp_path / "unused.sock"), subcommand, ref, *extra]) == 2
    assert capsys.readouterr().err == f"nodestepctl: {ref!r} is not a step reference: expected JOB.STEP, e.g. 42.0\n"


# ---- status, reload -----------------------------------------------------------------------------


def test_status_prints_the_daemons_state(fake_daemon, capsys):
    reply = {"type": "status", "version": "0.1.0", "node_name": "n01", "uptime": 7300, "config_file": None,
             "oci_conf": "/etc/slurm/oci.conf", "oci_mode": "run", "socket": "/run/nodestepd/nodestepd.sock",
             "spool_dir": "/var/spool/nodestepd", "state_dir": "/var/lib/nodestepd", "steps_running": 2,
             "steps_finished": 5, "journal_queued": 3, "journal_dropped": 1967, "containers_not_deleted": 0}
    seen = []
    daemon = fake_daemon(replying(reply, seen))
    assert main(["--socket", daemon.path, "status"]) == 0
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "status"}]
    assert capsys.readouterr().out == (
        "nodestepd 0.1.0 on n01, up 2h\n"
        "config file:  (none, built-in defaults)\n"
        "oci.conf:     /etc/slurm/oci.conf (run mode)\n"
        "socket:       /run/nodestepd/nodestepd.sock\n"
        "spool dir:    /var/spool/nodestepd\n"
        "state dir:    /var/lib/nodestepd\n"
        "steps:        2 running, 5 finished\n"
        "journal:      3 records waiting, 1967 dropped\n")


def test_status_counts_containers_not_deleted(fake_daemon, capsys):
    reply = {"type": "status", "version": "0.1.0", "node_name": "n01", "uptime": 7300, "config_file": None,
             "oci_conf": "/etc/slurm/oci.conf", "oci_mode": "run", "socket": "/run/nodestepd/nodestepd.sock",
             "spool_dir": "/var/spool/nodestepd", "state_dir": "/var/lib/nodestepd", "steps_running": 0,
             "steps_finished": 1, "journal_queued": 0, "journal_dropped": 0, "containers_not_deleted": 2}
    daemon = fake_daemon(replying(reply, []))
    assert main(["--socket", daemon.path, "status"]) == 0
    daemon.stop()
    assert capsys.readouterr().out.endswith(
        "containers:   2 not deleted (RunTimeDelete hung; the log has the command)\n")


def test_reload_says_it_is_done(fake_daemon, capsys):
    seen = []
    daemon = fake_daemon(replying({"type": "ok"}, seen))
    assert main(["--socket", daemon.path, "reload"]) == 0
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "reload"}]
    assert capsys.readouterr().out == "nodestepd reloaded its settings file and oci.conf\n"


def test_a_rejected_reload_exits_1_with_every_problem(fake_daemon, capsys):
    problems = "configuration not reloaded, the old one stays in use:\n  oci.conf line 3: unknown key RunTimeFoo"
    daemon = fake_daemon(replying({"type": "error", "error": problems}, []))
    assert main(["--socket", daemon.path, "reload"]) == 1
    daemon.stop()
    assert capsys.readouterr() == ("", f"nodestepctl: {problems}\n")
