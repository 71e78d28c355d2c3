"""stage.py: the `bundle=` line root takes from a stage_in's stdout, the hook's environment
and the sentence a failed hook gives."""

from __future__ import annotations

import pytest

from nodestepd.process.identity import Identity
from nodestepd.process.spawn import ProgramResult
from nodestepd.step import stage
from nodestepd.step.stage import STDOUT_CAP, StageOutputError, failure, hook_env, requested_bundle
from nodestepd.step.spec import StepSpec


@pytest.mark.parametrize("stdout, bundle", [
    (b"", None),
    (b"copying...\ndone\n", None),
    (b"bundle=/scratch/alice/b\n", "/scratch/alice/b"),
    (b"bundle=/scratch/alice/b", "/scratch/alice/b"),  # no final newline
    (b"bundle=/scratch//x/./b/\r\n", "/scratch/x/b"),  # normalised, CR dropped
    (b"bundle=/first\nstatus\nbundle=/second\n", "/second"),  # the last one counts
    (b" bundle=/not/at/the/start\n", None),
    (b"BUNDLE=/other/case\n", None),
])
def test_requested_bundle(stdout, bundle):
    assert requested_bundle(stdout) == bundle


@pytest.mark.parametrize("stdout, reason", [
    (b"bundle=relative/b\n", "is not an absolute path"),
    (b"bundle=\n", "is not an absolute path"),
    (b"bundle=/a\0b\n", "is not an absolute path"),
    (b"bundle=/caf\xe9\n", "is not UTF-8"),
    (b"bundle=/" + b"x" * 4096 + b"\n", "its bundle= line is cut at the first 4096 bytes of its output"),
])
def test_requested_bundle_refuses_what_a_user_could_not_give(stdout, reason):
    with pytest.raises(StageOutputError, match=reason):
        requested_bundle(stdout)


def test_only_whole_lines_within_the_cap_are_read():
    """Root reads STDOUT_CAP bytes at most; a line cut at the cap is never taken for a path."""
    padding = b"x" * (STDOUT_CAP - len(b"bundle=/a/b")) + b"\n"
    assert requested_bundle(b"bundle=/a/b\n" + b"y" * (STDOUT_CAP * 2)) == "/a/b"
    cut = padding[:-20] + b"\nbundle=/a/bcdefghijklmnop/more"  # longer than the cap
    assert len(cut) > STDOUT_CAP
    with pytest.raises(StageOutputError, match="cut at the first 4096 bytes"):
        requested_bundle(cut)
    beyond = b"y" * STDOUT_CAP + b"\nbundle=/late\n"
    assert requested_bundle(beyond) is None


def test_failure_sentences():
    assert failure("stage_in", "/h", ProgramResult(0, b"", "noise"), 60) is None
    assert failure("stage_in", "/h", ProgramResult(3, b"", "no quota"), 60) == \
        "stage_in /h failed with exit status 3: no quota"
    assert failure("stage_in", "/h", ProgramResult(1, b"", "cp: a: denied\n\n  cp: b: denied"), 60) == \
        "stage_in /h failed with exit status 1: cp: a: denied / cp: b: denied"
    assert failure("stage_out", "/h", ProgramResult(1, b"", ""), 60) == \
        "stage_out /h failed with exit status 1 (it wrote nothing on stderr)"
    assert failure("stage_in", "/h", ProgramResult(137, b"", "", timed_out=True), 2.5) == \
        "stage_in /h did not finish within 2.5 s (runtime_timeout) and was killed (it wrote nothing on stderr)"


def test_hook_env_adds_the_steps_values_to_the_runtime_environment():
    spec = StepSpec(job_id=5, step_id=2, ntasks=3, identity=Identity("alice", 1000, 100, (100,), "/home/alice"),
                    bundle="/b2", args=("true",), workdir="/", attached=True, task_offset=4)
    env = hook_env({"PATH": "/usr/bin", "NODESTEPD_JOB_ID": "spoofed"}, stage="out", spec=spec, orig_bundle="/b1",
                   rootfs="/b2/rootfs", spool_dir="/s/oci-job5-2", config_json="/b2/config.json", status="unknown")
    assert env == {
        "PATH": "/usr/bin", "NODESTEPD_STAGE": "out", "NODESTEPD_JOB_ID": "5", "NODESTEPD_STEP_ID": "2",
        "NODESTEPD_TASK_IDS": "4,5,6", "NODESTEPD_BUNDLE": "/b2", "NODESTEPD_ORIG_BUNDLE": "/b1",
        "NODESTEPD_ROOTFS": "/b2/rootfs", "NODESTEPD_SPOOL_DIR": "/s/oci-job5-2",
        "NODESTEPD_CONFIG_JSON": "/b2/config.json", "NODESTEPD_UID": "1000", "NODESTEPD_GID": "100",
        "NODESTEPD_USER": "alice", "NODESTEPD_STEP_STATUS": "unknown",
    }
    assert stage.MESSAGE_CAP <= 1000
