"""`nodestepctl run` without a daemon (nodestepd/ctl/run.py): the request made from the
command line and Slurm's environment, and the launch against a fake daemon: the fds
passed, `started`, the progress line, signals forwarded, the exit status."""

from __future__ import annotations

import os
import re
import signal
import stat
import threading
import time

import pytest

from fakedaemon import fake_daemon  # noqa: F401 - a fixture
from nodestepd.ctl import run
from nodestepd.ctl.exits import ClientError
from nodestepd.ctl.main import main
from nodestepd.ctl.parser import build_parser
from nodestepd.protocol import wire


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)


@pytest.fixture
def bundle(tmp_path):
    path = tmp_path / "bundle"
    path.mkdir()
    (path / "config.json").write_text('{"ociVersion": "1.0.2"}')
    return path


def parse(*argv: str):
    return build_parser(only="run").parse_args(["run", *argv])


def request_for(*argv: str) -> dict:
    return run.run_request(parse(*argv))


def refused(*argv: str) -> ClientError:
    with pytest.raises(ClientError) as e:
        request_for(*argv)
    return e.value


# ---- the request --------------------------------------------------------------------------------


def test_a_plain_request(bundle, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MODE", "slow")
    message = request_for("--bundle", str(bundle), "--env", "MODE=fast", "--", "/app/run", "-v")
    assert message.pop("env")["MODE"] == "fast"  # the caller's environment, --env over it
    assert message == {
        "op": "run", "bundle": str(bundle), "args": ["/app/run", "-v"], "job_id": None, "step_id": None,
        "ntasks": 1, "chdir": str(tmp_path), "pty": False, "detach": False,
        "config_json": '{"ociVersion": "1.0.2"}', "config_json_error": None, "output_to_journal": False,
        "preserve_fds": 0, "task_offset": None, "local_offset": None, "node_id": None, "container_id": None,
    }


def test_preserve_fds_counts_the_fds_and_pmi_fd_comes_after_them(bundle, monkeypatch):
    r, w = os.pipe()
    saved = {}  # pytest's own fds at 3, 4 (its capture), put back after
    for fd in (3, 4, 20):
        try:
            saved[fd] = os.dup(fd)
        except OSError:
            pass
    try:
        moved = [os.dup2(r, 3 + i) for i in range(2)] + [os.dup2(w, 20)]
        monkeypatch.delenv("PMI_FD", raising=False)
        assert request_for("--bundle", str(bundle), "--preserve-fds", "2", "--", "true")["preserve_fds"] == 2
        monkeypatch.setenv("PMI_FD", "20")  # srun --mpi=pmi2's channel: sent after the others, renumbered
        message = request_for("--bundle", str(bundle), "--preserve-fds", "2", "--", "true")
        assert (message["preserve_fds"], message["env"]["PMI_FD"]) == (3, "5")
        assert run.preserved_fds(parse("--bundle", str(bundle), "--preserve-fds", "2", "--", "true"),
                                 {"PMI_FD": "20"}) == [3, 4, 20]
        message = request_for("--bundle", str(bundle), "--", "true")
        assert (message["preserve_fds"], message["env"]["PMI_FD"]) == (1, "3")
        monkeypatch.setenv("PMI_FD", "4")  # already among the preserved: kept at its number
        message = request_for("--bundle", str(bundle), "--preserve-fds", "2", "--", "true")
        assert (message["preserve_fds"], message["env"]["PMI_FD"]) == (2, "4")
        monkeypatch.setenv("PMI_FD", "77")  # not open: not ours to pass
        assert request_for("--bundle", str(bundle), "--", "true")["preserve_fds"] == 0
        for fd in moved:
            os.close(fd)
        assert "fd 3 is not open" in str(refused("--bundle", str(bundle), "--preserve-fds", "1", "--", "true"))
        assert "between 0 and 8" in str(refused("--bundle", str(bundle), "--preserve-fds", "9", "--", "true"))
    finally:
        os.close(r)
        os.close(w)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


def test_after_the_double_dash_every_word_is_the_containers(bundle):
    assert request_for("--bundle", str(bundle), "--", "true", "--output", "x")["args"] == ["true", "--output", "x"]


def test_export_none_passes_only_the_env_options(bundle):
    message = request_for("--bundle", str(bundle), "--export", "NONE", "--env", "A=1", "--env", "B=x=y", "--", "true")
    assert message["env"] == {"A": "1", "B": "x=y"}


def test_paths_are_made_absolute(bundle, monkeypatch):
    monkeypatch.chdir(bundle.parent)
    message = request_for("--bundle", "bundle", "--chdir", "bundle/..", "--", "true")
    assert (message["bundle"], message["chdir"]) == (str(bundle), str(bundle.parent))


@pytest.mark.parametrize("argv, job_step, detached_output_to_journal", [
    (["--detach"], (None, None), True),
    (["--detach", "--output", "out"], (None, None), False),
    (["--detach", "--error", "err"], (None, None), False),
    (["--job-id", "42", "--step-id", "3"], (42, 3), False),
])
def test_ids_and_where_a_detached_steps_output_goes(bundle, argv, job_step, detached_output_to_journal):
    message = request_for("--bundle", str(bundle), *argv, "--", "true")
    assert (message["job_id"], message["step_id"]) == job_step
    assert message["output_to_journal"] is detached_output_to_journal
    assert "output" not in message and "error" not in message  # opened here, passed as fds


def test_with_user_the_daemon_reads_config_json_and_opens_the_output_as_that_user(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "alices-bundle"  # we may not even see it; the daemon checks as alice
    message = request_for("--user", "alice", "--detach", "--output", "job.log", "--error", "job.err",
                          "--bundle", str(missing), "--", "true")
    assert message["user"] == "alice"
    assert (message["config_json"], message["config_json_error"]) == (None, None)
    assert (message["output"], message["error"]) == (str(tmp_path / "job.log"), str(tmp_path / "job.err"))


def setenv(monkeypatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_slurm_ids_come_from_the_environment(bundle, monkeypatch):
    setenv(monkeypatch, SLURM_JOB_ID="77", SLURM_STEP_ID="2", SLURM_NODEID="5", SLURM_CONTAINER_ID="c-1")
    message = request_for("--bundle", str(bundle), "--", "true")
    assert (message["job_id"], message["step_id"], message["node_id"], message["container_id"]) == (77, 2, 5, "c-1")
    message = request_for("--bundle", str(bundle), "--job-id", "8", "--step-id", "0", "--container-id", "mine",
                          "--", "true")
    assert (message["job_id"], message["step_id"], message["container_id"]) == (8, 0, "mine")


def test_under_srun_the_launch_is_this_task(bundle, monkeypatch):
    setenv(monkeypatch, SLURM_JOB_ID="77", SLURM_STEP_ID="0", SLURM_PROCID="4", SLURM_LOCALID="2")
    message = request_for("--bundle", str(bundle), "--", "true")
    assert (message["task_offset"], message["local_offset"], message["ntasks"]) == (4, 2, 1)
    # --ntasks: a whole-step launch from here, srun's task or not.
    message = request_for("--bundle", str(bundle), "--ntasks", "3", "--", "true")
    assert (message["task_offset"], message["local_offset"], message["ntasks"]) == (None, None, 3)
    # --task-id and --local-id win over srun's.
    message = request_for("--bundle", str(bundle), "--task-id", "9", "--local-id", "1", "--", "true")
    assert (message["task_offset"], message["local_offset"]) == (9, 1)


def test_procid_without_a_step_is_not_srun(bundle, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "4")  # e.g. inside sbatch's batch script
    assert request_for("--bundle", str(bundle), "--", "true")["task_offset"] is None


def test_a_per_task_launch_outside_srun(bundle):
    message = request_for("--bundle", str(bundle), "--task-id", "7", "--local-id", "3", "--", "true")
    assert (message["task_offset"], message["local_offset"]) == (7, 3)


@pytest.mark.parametrize("argv, message, status", [
    ([], "no command given: nodestepctl run --bundle DIR -- COMMAND [ARG...]", 2),
    (["--output", "x", "--", "true"], "--output and --error go with --detach", 2),
    (["--error", "x", "--", "true"], "--output and --error go with --detach", 2),
    (["--env", "FOO", "--", "true"], "--env 'FOO': expected NAME=VALUE", 2),
    (["--env", "=x", "--", "true"], "--env '=x': expected NAME=VALUE", 2),
    (["--local-id", "3", "--", "true"], "--local-id goes with a per-task launch (--task-id, or srun's SLURM_PROCID)", 2),
    (["--export", "NONE", "--env", "A=x\0y", "--", "true"], "environment variable 'A' contains a NUL byte", 125),
    (["--", "echo", "caf\udce9"], "command argument 1 is not valid UTF-8 (b'caf\\xe9'); nodestepd passes text only",
     125),
    (["--export", "NONE", "--env", "A=caf\udce9", "--", "true"],
     "environment variable 'A' is not valid UTF-8 (b'Acaf\\xe9'); nodestepd passes text only", 125),
])
def test_what_is_refused_before_connecting(bundle, argv, message, status):
    error = refused("--bundle", str(bundle), *argv)
    assert (str(error), error.status) == (message, status)


def test_a_bundle_that_is_not_a_directory_is_refused(tmp_path):
    error = refused("--bundle", str(tmp_path / "nowhere"), "--", "true")
    assert (str(error), error.status) == (f"bundle {tmp_path / 'nowhere'} does not exist or is not a directory", 125)


def test_pty_needs_a_terminal_unless_detached(bundle):
    assert not os.isatty(0)  # pytest gives the tests /dev/null
    error = refused("--bundle", str(bundle), "--pty", "--", "true")
    assert (str(error), error.status) == ("--pty needs a terminal on standard input", 2)
    assert request_for("--bundle", str(bundle), "--pty", "--detach", "--", "true")["pty"] is True


@pytest.mark.parametrize("name", ["SLURM_JOB_ID", "SLURM_NODEID"])
def test_a_slurm_variable_that_is_not_a_number_fails_the_launch(bundle, monkeypatch, name):
    monkeypatch.setenv(name, "12a")
    error = refused("--bundle", str(bundle), "--", "true")
    assert (str(error), error.status) == (f"{name}='12a' is not a number", 125)


@pytest.mark.parametrize("content, text, error", [
    (b'{"ociVersion": "1.0.2"}', '{"ociVersion": "1.0.2"}', None),
    (None, None, "No such file or directory"),
    (b"\xff{}", None, "not UTF-8 (invalid start byte at byte 0)"),
    (b" " * (wire.MAX_MESSAGE // 2 + 1), None, f"larger than {wire.MAX_MESSAGE // 2} bytes"),
])
def test_config_json_is_sent_as_text_or_with_why_it_could_not_be(tmp_path, content, text, error):
    if content is not None:
        (tmp_path / "config.json").write_bytes(content)
    message = request_for("--bundle", str(tmp_path), "--", "true")
    assert (message["config_json"], message["config_json_error"]) == (text, error)


# ---- the launch, against a fake daemon -----------------------------------------------------------


@pytest.fixture
def attached(monkeypatch):
    """An attached run catches signals into a wakeup pipe: undone after the test."""
    saved = {sig: signal.getsignal(sig) for sig in run.FORWARDED_SIGNALS}
    pipes = []

    def catch_signals() -> int:
        pipes.append(catch())
        return pipes[-1]

    catch = run.catch_signals
    monkeypatch.setattr(run, "catch_signals", catch_signals)
    yield
    write_end = signal.set_wakeup_fd(-1)
    for fd in [write_end, *pipes]:
        if fd != -1:
            os.close(fd)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_dev_null(fd: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev


def exit_reply(status: int | None, job_id: int = 5) -> dict:
    return {"type": "exit", "job_id": job_id, "step_id": 0, "status": status,
            "tasks": [{"task_id": 0, "status": status}]}


def test_detached_prints_the_step_and_passes_dev_null_and_the_output_file(fake_daemon, bundle, tmp_path, capsys):
    output = tmp_path / "job.log"
    seen = {}

    def serve(peer):
        message, fds = peer.read()
        seen["message"] = message
        seen["devnull_stdin"] = is_dev_null(fds[0])
        seen["same_out_and_err"] = same_file(fds[1], fds[2])
        os.write(fds[2], b"written by the step\n")
        peer.write({"type": "started", "job_id": 100000001, "step_id": 0})

    daemon = fake_daemon(serve)
    status = main(["--socket", daemon.path, "run", "--detach", "--output", str(output), "--bundle", str(bundle),
                   "--", "true"])
    daemon.stop()
    assert status == 0
    assert capsys.readouterr() == ("100000001.0\n", "")
    assert seen["message"]["op"] == "run" and seen["message"]["detach"] is True
    assert seen["devnull_stdin"] and seen["same_out_and_err"]
    assert output.read_text() == "written by the step\n"


def test_detached_with_an_error_file_passes_two_files(fake_daemon, bundle, tmp_path):
    seen = {}

    def serve(peer):
        _, fds = peer.read()
        os.write(fds[1], b"out\n")
        os.write(fds[2], b"err\n")
        seen["devnull_stdin"] = is_dev_null(fds[0])
        peer.write({"type": "started", "job_id": 5, "step_id": 0})

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--detach", "--output", str(tmp_path / "o"), "--error",
                 str(tmp_path / "e"), "--bundle", str(bundle), "--", "true"]) == 0
    daemon.stop()
    assert seen["devnull_stdin"]
    assert ((tmp_path / "o").read_text(), (tmp_path / "e").read_text()) == ("out\n", "err\n")


def test_detached_with_user_passes_dev_null_only(fake_daemon, tmp_path):
    seen = {}

    def serve(peer):
        message, fds = peer.read()
        seen["output"] = message["output"]
        seen["all_dev_null"] = all(is_dev_null(fd) for fd in fds)
        peer.write({"type": "started", "job_id": 5, "step_id": 0})

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--user", "alice", "--detach", "--output", str(tmp_path / "o"),
                 "--bundle", str(tmp_path), "--", "true"]) == 0
    daemon.stop()
    assert seen == {"output": str(tmp_path / "o"), "all_dev_null": True}
    assert not (tmp_path / "o").exists()  # the daemon opens it, as alice


def test_an_output_file_that_cannot_be_opened_fails_the_launch(bundle, tmp_path, capsys):
    status = main(["--socket", str(tmp_path / "unused.sock"), "run", "--detach", "--output",
                   str(tmp_path / "no" / "dir"), "--bundle", str(bundle), "--", "true"])
    assert status == 125
    assert capsys.readouterr().err == (f"nodestepctl: cannot open output file {tmp_path / 'no' / 'dir'}: "
                                       "No such file or directory\n")


def test_attached_passes_our_own_stdio_and_exits_with_the_steps_status(fake_daemon, bundle, attached):
    seen = {}

    def serve(peer):
        message, fds = peer.read()
        seen["detach"] = message["detach"]
        seen["our_stdio"] = [same_file(mine, passed) for mine, passed in zip((0, 1, 2), fds)]
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        peer.write(exit_reply(7))

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "false"]) == 7
    daemon.stop()
    assert seen == {"detach": False, "our_stdio": [True, True, True]}


def test_attached_forwards_the_signals_it_receives_to_the_step(fake_daemon, bundle, attached):
    forwarded = []

    def serve(peer):
        peer.read()
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(os.getpid(), sig)
            message, _ = peer.read()
            forwarded.append(message)
        peer.write(exit_reply(128 + signal.SIGTERM))

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "sleep", "60"]) == 143
    daemon.stop()
    assert forwarded == [{"v": wire.VERSION, "op": "signal", "signal": "SIGUSR1"},
                         {"v": wire.VERSION, "op": "signal", "signal": "SIGTERM"}]


def test_errors_while_attached_are_printed_and_the_wait_goes_on(fake_daemon, bundle, attached, capsys):
    def serve(peer):
        peer.read()
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        peer.write({"type": "error", "error": "cannot deliver SIGUSR1: no such process"})
        peer.write(exit_reply(0))

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "true"]) == 0
    daemon.stop()
    assert capsys.readouterr().err == "nodestepctl: cannot deliver SIGUSR1: no such process\n"


def test_a_step_whose_status_is_not_known_exits_255_and_says_so(fake_daemon, bundle, attached, capsys):
    def serve(peer):
        peer.read()
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        peer.write(exit_reply(None))

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "true"]) == 255
    daemon.stop()
    assert "step 5.0 ended, but the exit status of task(s) 0 is not known" in capsys.readouterr().err


def test_a_launch_refused_by_the_daemon_exits_with_its_status(fake_daemon, bundle, attached, capsys):
    def serve(peer):
        peer.read()
        peer.write({"type": "error", "error": "RunTimeRun failed", "status": 125})

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "true"]) == 125
    daemon.stop()
    assert capsys.readouterr().err == "nodestepctl: RunTimeRun failed\n"


@pytest.mark.parametrize("argv, said", [
    (["--detach", "--job-id", "12"], "step 12.0 may be running (nodestepctl wait 12.0 tells)"),
    ([], "the step may be running (nodestepctl ps tells)"),  # attached, but nothing to attach to: no job id
])
def test_a_daemon_gone_before_started_leaves_the_step_unknown(fake_daemon, bundle, attached, capsys, argv, said):
    daemon = fake_daemon(lambda peer: peer.read())  # reads the request, then hangs up
    assert main(["--socket", daemon.path, "run", *argv, "--bundle", str(bundle), "--", "true"]) == 255
    daemon.stop()
    assert capsys.readouterr().err == \
        f"nodestepctl: lost the connection to nodestepd before it acknowledged the launch; {said}\n"


def test_a_daemon_that_does_not_come_back_within_the_timeout_exits_255(fake_daemon, bundle, attached, capsys):
    def serve(peer):
        peer.read()
        peer.write({"type": "started", "job_id": 5, "step_id": 0})

    daemon = fake_daemon(serve)  # one connection: the next ones wait in its backlog, never answered
    began = time.monotonic()
    assert main(["--socket", daemon.path, "run", "--reattach-timeout", "0.3", "--bundle", str(bundle), "--",
                 "true"]) == 255
    assert time.monotonic() - began >= 0.3
    daemon.stop()
    assert capsys.readouterr().err == (
        "nodestepctl: lost the connection to nodestepd; reconnecting (step 5.0 runs on; giving up after 0.3 s)\n"
        "nodestepctl: nodestepd did not come back within 0.3 s; step 5.0 may still be running "
        "(nodestepctl wait 5.0 tells its status once nodestepd is back)\n")


def test_a_socket_gone_is_retried_until_the_timeout(bundle, attached, capsys, tmp_path, monkeypatch):
    """No socket at the path (a daemon restarting binds it anew): retried with backoff, then 255."""
    attempts = []
    monkeypatch.setattr(run, "try_connect", lambda path: attempts.append(path))
    attachment = run.Attachment(str(tmp_path / "gone.sock"), run.catch_signals(), (5, 0, 0), 0.5)
    with pytest.raises(ClientError) as e:
        attachment.ride(None)
    assert e.value.status == 255 and "did not come back within 0.5 s" in str(e.value)
    assert 3 <= len(attempts) <= 6  # after 0.05, 0.1, 0.2, then what is left of 0.5 s: backoff, not a busy loop


def _restarting(after_run, attach):
    """A fake daemon's script: the run gets `started` and then the connection ends (the
    daemon dies); each later connection is handed to attach(peer, message)."""
    def serve(peer):
        message, _ = peer.read()
        if message["op"] == "run":
            peer.write({"type": "started", "job_id": 5, "step_id": 0})
            after_run(peer)
            return
        attach(peer, message)
    return serve


def test_attached_rides_through_a_daemon_restart(fake_daemon, bundle, attached, capsys):
    seen = []

    def attach(peer, message):
        seen.append(message)
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        peer.write(exit_reply(3))

    daemon = fake_daemon(_restarting(lambda peer: None, attach), connections=2)
    assert main(["--socket", daemon.path, "run", "--task-id", "2", "--bundle", str(bundle), "--", "true"]) == 3
    daemon.stop()
    assert seen == [{"v": wire.VERSION, "op": "attach", "job_id": 5, "step_id": 0, "first_task": 2}]
    assert capsys.readouterr().err == (
        "nodestepctl: lost the connection to nodestepd; reconnecting (step 5.0 runs on; giving up after 60 s)\n"
        "nodestepctl: re-attached to step 5.0\n")


def test_signals_caught_while_the_daemon_is_away_are_forwarded_after_re_attaching(fake_daemon, bundle, attached,
                                                                                   capsys, monkeypatch):
    held = threading.Event()
    hold = run.Attachment._hold

    def hold_and_tell(self, signums):
        hold(self, signums)
        held.set()

    monkeypatch.setattr(run.Attachment, "_hold", hold_and_tell)
    forwarded = []

    def attach(peer, message):
        os.kill(os.getpid(), signal.SIGUSR1)  # before the client is attached again
        assert held.wait(10)
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        forwarded.append(peer.read()[0])
        peer.write(exit_reply(42))

    daemon = fake_daemon(_restarting(lambda peer: None, attach), connections=2)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "true"]) == 42
    daemon.stop()
    assert forwarded == [{"v": wire.VERSION, "op": "signal", "signal": "SIGUSR1"}]
    assert "nodestepctl: signal SIGUSR1 held until nodestepd is back\n" in capsys.readouterr().err


def test_a_step_that_ended_during_the_restart_gives_its_status_at_once(fake_daemon, bundle, attached):
    def attach(peer, message):
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        peer.write(exit_reply(9))

    daemon = fake_daemon(_restarting(lambda peer: None, attach), connections=2)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "true"]) == 9
    daemon.stop()


def test_a_busy_daemon_is_asked_again(fake_daemon, bundle, attached):
    attaches = []

    def attach(peer, message):
        attaches.append(message)
        if len(attaches) == 1:
            peer.write({"type": "error", "code": "busy", "error": "too many connections"})
            return
        peer.write({"type": "started", "job_id": 5, "step_id": 0})
        peer.write(exit_reply(0))

    daemon = fake_daemon(_restarting(lambda peer: None, attach), connections=3)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "true"]) == 0
    daemon.stop()
    assert len(attaches) == 2


def test_a_step_the_next_daemon_does_not_know_has_an_unknown_status(fake_daemon, bundle, attached, capsys):
    def attach(peer, message):
        peer.write({"type": "error", "code": "not-found", "error": "no step 5.0 of yours on this node"})

    daemon = fake_daemon(_restarting(lambda peer: None, attach), connections=2)
    assert main(["--socket", daemon.path, "run", "--bundle", str(bundle), "--", "true"]) == 255
    daemon.stop()
    assert capsys.readouterr().err.endswith(
        "nodestepctl: step 5.0 ended while nodestepd restarted, and the next nodestepd does not know its status\n")


def test_a_launch_never_acknowledged_and_unknown_to_the_next_daemon_did_not_start(fake_daemon, bundle, attached,
                                                                                  capsys):
    seen = []

    def serve(peer):
        message, _ = peer.read()
        seen.append(message["op"])
        if message["op"] == "attach":
            peer.write({"type": "error", "code": "not-found", "error": "no step 12.0 of yours on this node"})

    daemon = fake_daemon(serve, connections=2)
    assert main(["--socket", daemon.path, "run", "--job-id", "12", "--bundle", str(bundle), "--", "true"]) == 125
    daemon.stop()
    assert seen == ["run", "attach"]
    assert capsys.readouterr().err == (
        "nodestepctl: lost the connection to nodestepd before it acknowledged the launch; reconnecting "
        "(giving up after 60 s)\n"
        "nodestepctl: nodestepd went away while launching step 12.0, and the step did not start\n")


def test_the_reattach_timeout_comes_from_the_option_else_the_environment(monkeypatch):
    monkeypatch.delenv(run.REATTACH_TIMEOUT_ENV, raising=False)
    assert run.reattach_timeout(parse("--bundle", "b")) == 60
    monkeypatch.setenv(run.REATTACH_TIMEOUT_ENV, "5")
    assert run.reattach_timeout(parse("--bundle", "b")) == 5
    assert run.reattach_timeout(parse("--reattach-timeout", "0", "--bundle", "b")) == 0
    for bad in ("-1", "nan", "1e9"):
        with pytest.raises(ClientError) as e:
            run.reattach_timeout(parse("--reattach-timeout", bad, "--bundle", "b"))
        assert e.value.status == 2
    monkeypatch.setenv(run.REATTACH_TIMEOUT_ENV, "soon")
    with pytest.raises(ClientError) as e:
        run.reattach_timeout(parse("--bundle", "b"))
    assert str(e.value) == "NODESTEPCTL_REATTACH_TIMEOUT='soon' is not a number of seconds" and e.value.status == 2


def test_a_daemon_gone_before_the_request_was_sent_fails_the_launch(fake_daemon, bundle, monkeypatch, capsys):
    hung_up = threading.Event()
    connect = run.connect

    def connect_then_wait(path):  # the daemon hangs up between our connect and our send
        sock = connect(path)
        assert hung_up.wait(10)
        return sock

    def serve(peer):
        peer.sock.close()
        hung_up.set()

    monkeypatch.setattr(run, "connect", connect_then_wait)
    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--detach", "--bundle", str(bundle), "--", "true"]) == 125
    daemon.stop()
    assert capsys.readouterr().err == "nodestepctl: nodestepd closed the connection before the request was sent\n"


# ---- the progress line --------------------------------------------------------------------------


def test_a_slow_launch_says_so_after_progress_after(fake_daemon, bundle, monkeypatch, capsys):
    monkeypatch.setattr(run, "PROGRESS_AFTER", 0.1)

    def serve(peer):
        peer.read()
        time.sleep(0.5)
        peer.write({"type": "started", "job_id": 5, "step_id": 0})

    daemon = fake_daemon(serve)
    began = time.monotonic()
    assert main(["--socket", daemon.path, "run", "--detach", "--bundle", str(bundle), "--", "true"]) == 0
    daemon.stop()
    assert time.monotonic() - began >= 0.5
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("nodestepctl: still launching after 0 s: nodestepd is preparing the step "
                        "(spool, stage-in, runtime create)")
    waited = re.fullmatch(r"nodestepctl: step 5\.0 started after (\d+\.\d) s", lines[1])
    assert waited and float(waited[1]) >= 0.5, lines
    assert len(lines) == 2


def test_a_fast_launch_says_nothing(fake_daemon, bundle, capsys):
    def serve(peer):
        peer.read()
        peer.write({"type": "started", "job_id": 5, "step_id": 0})

    daemon = fake_daemon(serve)
    assert main(["--socket", daemon.path, "run", "--detach", "--bundle", str(bundle), "--", "true"]) == 0
    daemon.stop()
    assert capsys.readouterr() == ("5.0\n", "")
