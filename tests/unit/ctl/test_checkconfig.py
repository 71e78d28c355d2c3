"""`nodestepctl check-config` validates an oci.conf without a daemon."""

from __future__ import annotations

import getpass
import os
import subprocess
from pathlib import Path

from conftest import NODESTEPCTL

EXAMPLES = Path(__file__).resolve().parents[2] / "oci-conf-examples"


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(NODESTEPCTL), "check-config", *args], capture_output=True, text=True)


def test_valid_file_prints_mode_and_expanded_commands():
    result = check(str(EXAMPLES / "runc-run.conf"), "--node-name", "n01")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{EXAMPLES / 'runc-run.conf'}: valid, run mode"
    run = [l for l in lines if l.strip().startswith("RunTimeRun:")]
    me, uid = getpass.getuser(), os.getuid()  # the sample step is the caller's
    assert run == [
        f"  RunTimeRun:    runc --rootless=true --root=/run/user/{uid}/ run n01.{me}.1234.0.0 "
        f"-b /var/spool/nodestepd/oci-job1234-0-uid{uid}/task-0"
    ]
    assert any(l.strip().startswith("RunTimeDelete:") and f"delete --force n01.{me}.1234.0.0" in l for l in lines)


def test_create_start_mode_is_named():
    result = check(str(EXAMPLES / "runc-create-start.conf"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith("valid, create-start mode")


def test_charliecloud_sample_quotes_the_command():
    result = check(str(EXAMPLES / "charliecloud.conf"))
    assert result.returncode == 0, result.stderr
    assert "--no-passwd /path/to/bundle -- '/bin/echo' 'hello world'" in result.stdout
    assert "kill -s SIGTERM 4242" in result.stdout


def test_invalid_file_lists_every_problem_and_exits_1():
    path = EXAMPLES / "invalid-singularity-3.8-as-published.conf"
    result = check(str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{path}: invalid" in result.stderr
    assert f"{path}:3: OCIRunTimeQuery:" in result.stderr and "RunTimeQuery" in result.stderr
    assert f"{path}:7: OCIRunTimeDelete: missing closing" in result.stderr


def test_missing_file():
    result = check("/nonexistent/oci.conf")
    assert result.returncode == 1
    assert "/nonexistent/oci.conf" in result.stderr and "No such file" in result.stderr


def test_sig_prefixed_kill_is_flagged_when_sh_is_dash():
    import os

    result = check(str(EXAMPLES / "charliecloud.conf"))
    warnings = [l for l in result.stdout.splitlines() if l.startswith("warning:")]
    if os.path.basename(os.path.realpath("/bin/sh")) == "dash":
        assert warnings == [
            "warning: RunTimeDelete: /bin/sh is dash here, whose kill rejects 'kill -s SIGKILL': "
            "the command will fail (write 'kill -s KILL')",
            "warning: RunTimeKill: /bin/sh is dash here, whose kill rejects 'kill -s SIGTERM': "
            "the command will fail (write 'kill -s TERM')",
        ]
    else:
        assert warnings == []


def test_shell_warnings_only_for_dash(tmp_path):
    from nodestepd.step.runtime import shell_warnings

    dash = tmp_path / "sh"
    dash.symlink_to("/usr/bin/dash")
    bash = tmp_path / "bash-sh"
    bash.symlink_to("/bin/bash")
    patterns = {"RunTimeKill": "kill -SIGTERM %p", "RunTimeDelete": "kill -s KILL %p"}
    assert shell_warnings(patterns, shell=str(dash)) == [
        f"RunTimeKill: {dash} is dash here, whose kill rejects 'kill -SIGTERM': the command will fail "
        "(write 'kill -TERM')"
    ]
    assert shell_warnings(patterns, shell=str(bash)) == []


def test_a_container_path_that_would_put_two_users_steps_in_one_dir_is_warned_of(tmp_path):
    conf = tmp_path / "oci.conf"
    conf.write_text((EXAMPLES / "runc-run.conf").read_text() + "ContainerPath=/scratch/%j/%t\n")
    result = check(str(conf))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "warning: ContainerPath '/scratch/%j/%t' gives the step dir '/scratch/%j', which names no user (%u or %U): "
        "two users' steps with the same job and step ids would need the same step dir, and the second launch "
        "would fail; put %u or %U before the %t component")
    conf.write_text((EXAMPLES / "runc-run.conf").read_text() + "ContainerPath=/scratch/%u/%j/%t\n")
    assert "warning" not in check(str(conf)).stdout
