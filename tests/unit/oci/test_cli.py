"""nodestep-oci's command line: every flag podman and docker pass, signals, the state
JSON, the error lines the engines read, the create request made of a bundle."""

from __future__ import annotations

import json
import signal

import pytest

from nodestepd.oci import anchor, cli, errors
from nodestepd.ctl import run


@pytest.mark.parametrize("argv, command", [
    # podman (conmon) with runtime_supports_json
    (["--log-format=json", "--log", "/x/oci-log", "create", "--bundle", "/b", "--pid-file", "/p", "cid"], "create"),
    (["--log-format=json", "--log", "/x/oci-log", "create", "--bundle", "/b", "--pid-file", "/p",
      "--console-socket", "/tmp/conmon-term.X", "--preserve-fds", "0", "--no-pivot", "--no-new-keyring", "cid"],
     "create"),
    (["--systemd-cgroup", "--debug", "start", "cid"], "start"),
    (["kill", "cid", "10"], "kill"),
    (["kill", "--all", "cid", "KILL"], "kill"),
    (["delete", "--force", "cid"], "delete"),
    (["state", "cid"], "state"),
    # docker's containerd-shim-runc-v2
    (["--root", "/run/user/1000/docker/runtime-runc/moby", "--log", "/t/log.json", "--log-format", "json",
      "create", "-b", "/t/cid", "--pid-file", "/t/cid/init.pid", "cid"], "create"),
    (["--root", "/r", "--log", "/t/log.json", "--log-format", "json", "delete", "cid"], "delete"),
    (["features"], "features"),
])
def test_every_flag_the_engines_pass_is_accepted(argv, command):
    args = cli.build_parser().parse_args(argv)
    assert args.command == command
    assert args.id == "cid" if command != "features" else True


def test_create_options_are_read():
    args = cli.build_parser().parse_args(["create", "-b", "/b", "--pid-file", "/p", "--console-socket", "/s",
                                          "--preserve-fds", "2", "c1"])
    assert (args.bundle, args.pid_file, args.console_socket, args.preserve_fds, args.id) == ("/b", "/p", "/s", 2, "c1")


@pytest.mark.parametrize("text, signum", [
    ("9", 9), ("KILL", 9), ("SIGKILL", 9), ("sigterm", 15), ("usr1", 10), ("10", 10),
])
def test_signals_by_number_or_name(text, signum):
    assert cli.parse_signal(text) == signum


@pytest.mark.parametrize("text", ["BOGUS", "999", "", "-1"])
def test_unknown_signals_are_errors(text):
    with pytest.raises(errors.OciError, match="unknown signal"):
        cli.parse_signal(text)


def test_json_log_line_is_what_runc_writes():
    line = errors.log_line("json", 'container "x" does not exist', now=0)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == {"level": "error", "msg": 'container "x" does not exist',
                                "time": "1970-01-01T00:00:00Z"}


def test_text_log_line():
    assert errors.log_line("text", "bad", now=0) == 'time="1970-01-01T00:00:00Z" level=error msg="bad"\n'


def test_errors_go_to_the_log_file_as_json_lines(tmp_path, capsys):
    log = tmp_path / "oci-log"
    status = cli.run(["--log-format=json", "--log", str(log), "--socket", str(tmp_path / "none"), "state", "c"])
    assert status == 1
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["level"] for e in entries] == ["error"] and "nodestepd is not running" in entries[0]["msg"]
    assert capsys.readouterr().err == ""


def test_errors_go_to_stderr_without_json(tmp_path, capsys):
    assert cli.run(["--socket", str(tmp_path / "none"), "kill", "c", "NOPE"]) == 1
    assert "unknown signal 'NOPE'" in capsys.readouterr().err


def test_a_bad_command_line_still_reaches_the_log(tmp_path):
    log = tmp_path / "log"
    assert cli.run(["--log", str(log), "--log-format", "json", "exec", "c"]) == 1
    assert "invalid choice: 'exec'" in json.loads(log.read_text())["msg"]


def test_version_and_features(capsys):
    assert cli.run(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nodestep-oci version ") and "spec: 1.0.2" in out
    assert cli.run(["features"]) == 0
    assert json.loads(capsys.readouterr().out)["ociVersionMax"] == "1.0.2"


def test_state_json_has_the_oci_fields():
    reply = {"type": "oci-state", "id": "c", "status": "created", "pid": 42, "bundle": "/b",
             "annotations": {"a": "1"}}
    assert cli.state_json(reply) == {"ociVersion": "1.0.2", "id": "c", "status": "created", "pid": 42,
                                     "bundle": "/b", "annotations": {"a": "1"}}


def test_preserve_fds_out_of_range_or_not_open_is_refused_clearly(tmp_path, capsys):
    assert cli.run(["create", "-b", str(tmp_path), "--preserve-fds", "9", "c"]) == 1
    assert "--preserve-fds 9: must be between 0 and 8" in capsys.readouterr().err


def test_preserve_fds_names_the_fd_that_is_not_open(tmp_path, monkeypatch, capsys):
    real = run.posix.fstat

    def fstat(fd):  # fd 3 open, fd 4 not; any other fd (pytest's own) as it is
        if fd == 4:
            raise OSError(9, "Bad file descriptor")
        return real(0 if fd == 3 else fd)
    monkeypatch.setattr(run.posix, "fstat", fstat)
    assert cli.run(["create", "-b", str(tmp_path), "--preserve-fds", "2", "c"]) == 1
    assert "--preserve-fds 2: fd 4 is not open" in capsys.readouterr().err


CONFIG = {"process": {"args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b=c", "junk"], "cwd": "/w",
                      "terminal": True}, "annotations": {"k": "v"}, "root": {"path": "rootfs"}}


def test_bundle_request_outside_slurm():
    message = anchor.bundle_request("/b", CONFIG, "cid", {})
    assert message["args"] == ["sh", "-c", "echo hi"]
    assert message["env"] == {"PATH": "/bin", "A": "b=c"}
    assert (message["chdir"], message["pty"], message["job_id"], message["step_id"]) == ("/w", True, None, None)
    assert message["oci"] == {"id": "cid", "bundle": "/b", "annotations": {"k": "v"}, "slurm_step_id": None}


def test_bundle_request_in_a_slurm_job():
    message = anchor.bundle_request("/b", CONFIG, "cid", {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3"})
    assert message["job_id"] == 77 and message["step_id"] is None  # the daemon numbers it within the job
    assert message["oci"]["slurm_step_id"] == 3


def test_bundle_without_process_args_is_an_error():
    with pytest.raises(errors.OciError, match="no process.args"):
        anchor.bundle_request("/b", {"process": {}}, "cid", {})


@pytest.mark.parametrize("status, sig", [
    (0, None), (3, None), (128, None), (137, signal.SIGKILL), (138, signal.SIGUSR1), (143, signal.SIGTERM),
    (128 + signal.SIGCHLD, None), (128 + signal.SIGSTOP, None), (255, None),
])
def test_exit_signal(status, sig):
    assert anchor.exit_signal(status) == sig


@pytest.mark.parametrize("env, cgroup, container_env, expected", [
    ({}, "", {}, (None, None)),
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "1"}, "0::/slurm/uid_1/job_9/step_2", {}, (5, 1)),  # ours first
    ({}, "4:memory:/slurm/uid_1000/job_9/step_2\n0::/\n", {"SLURM_JOB_ID": "7"}, (9, 2)),  # then the cgroup
    ({}, "0::/system.slice/slurmstepd.scope/job_12/step_batch/user/task_0", {}, (12, None)),
    ({}, "0::/user.slice", {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "3"}, (7, 3)),  # then the container's env
    ({"SLURM_JOB_ID": "x"}, "", {}, (None, None)),
])
def test_the_slurm_job_of_a_create(env, cgroup, container_env, expected):
    assert anchor.slurm_job(env, cgroup, container_env) == expected
