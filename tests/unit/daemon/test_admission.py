"""daemon/admission.py: a run request becomes a StepSpec and LaunchInput, or a refusal that
says why (no root needed: the caller here is whoever runs the tests)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest

from nodestepd.config.ociconf import OciConf
from nodestepd.config.settings import DaemonConfig
from nodestepd.daemon import admission
from nodestepd.daemon.admission import Admission, parse_signal
from nodestepd.daemon.authz import Policy
from nodestepd.daemon.closer import FdCloser
from nodestepd.daemon.errors import Refused
from nodestepd.protocol.messages import RunRequest
from nodestepd.step.spec import LaunchInput

ME = os.getuid()


@dataclass
class FakeConfiguration:
    config: DaemonConfig
    oci: OciConf
    policy: Policy


class FakeJobIds:
    def __init__(self) -> None:
        self.next = 100_000_000

    def allocate(self) -> int:
        self.next += 1
        return self.next - 1


def make_admission(operators: frozenset[int] = frozenset(), **settings) -> Admission:
    config = DaemonConfig(node_name="n1", **settings)
    return Admission(FakeConfiguration(config, OciConf(path="/etc/slurm/oci.conf"), Policy(operators)),
                     FakeJobIds(), FdCloser())  # type: ignore[arg-type]


def request(**fields) -> RunRequest:
    return RunRequest(**{"v": 1, "bundle": "/home/alice/b", "args": ["app", "--x"], **fields})


@pytest.fixture
def fds():
    opened = [os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC) for _ in range(3)]
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


async def test_a_plain_request_is_the_callers_step(fds):
    spec, given = await make_admission().admit(ME, request(bundle="/home/alice/./b/", env={"A": "1"}, job_id=42,
                                                            config_json="{}", chdir="/tmp"), fds)
    assert (spec.job_id, spec.step_id, spec.ntasks, spec.identity.uid) == (42, 0, 1, ME)
    assert (spec.bundle, spec.args, spec.workdir, spec.attached) == ("/home/alice/b", ("app", "--x"), "/tmp", True)
    assert given == LaunchInput({"A": "1"}, False, "{}", None)


async def test_without_a_job_id_the_daemon_assigns_one(fds):
    adm = make_admission()
    first, _ = await adm.admit(ME, request(), fds)
    second, _ = await adm.admit(ME, request(detach=True), fds)
    assert (first.job_id, second.job_id) == (100_000_000, 100_000_001)
    assert second.attached is False


@pytest.mark.parametrize("fields, code, message", [
    ({"bundle": "b"}, "bad-request", "bundle must be an absolute path, got 'b'"),
    ({"chdir": "/a\0b"}, "bad-request", "chdir contains a NUL byte"),
    ({"bundle": "/" + "x" * 4096}, "bad-request", "bundle is longer than 4096 bytes"),
    ({"output": "rel"}, "bad-request", "output must be an absolute path, got 'rel'"),
    ({"args": []}, "bad-request", "no command given: args must not be empty"),
    ({"args": ["a\0"]}, "bad-request", "command arguments cannot contain NUL bytes"),
    ({"args": ["x" * 70000]}, "limit", "the command is 70001 bytes, more than max_args_bytes (65536)"),
    ({"env": {"A": "x" * 300000}}, "limit", "the environment is 300003 bytes, more than max_env_bytes (262144)"),
    ({"env": {"A=B": "1"}}, "bad-request", "environment variable name 'A=B' must not contain '='"),
    ({"env": {"A": "1\0"}}, "bad-request", "environment variable A contains a NUL byte"),
    ({"ntasks": 0}, "bad-request", "ntasks must be between 1 and 1024, got 0"),
    ({"ntasks": 1025}, "bad-request", "ntasks must be between 1 and 1024, got 1025"),
    ({"task_offset": -1}, "bad-request", "task_offset must be between 0 and 4294967280, got -1"),
    ({"container_id": ""}, "bad-request", "container_id must be a non-empty string without NUL bytes"),
    ({"job_id": 0}, "bad-request", "job id must be between 1 and 4294967279, got 0"),
    ({"step_id": 0xFFFFFFF0}, "bad-request", "step id must be between 0 and 4294967279, got 4294967280"),
])
async def test_what_a_request_may_not_ask_for(fds, fields, code, message):
    with pytest.raises(Refused) as e:
        await make_admission().admit(ME, request(**fields), fds)
    assert (e.value.code, str(e.value)) == (code, message)


async def test_a_run_request_carries_three_fds_plus_those_it_preserves(fds):
    with pytest.raises(Refused, match=r"3 \+ preserve_fds file descriptors \(stdin, stdout, stderr, then 0 to "
                       r"preserve\), got 2"):
        await make_admission().admit(ME, request(), fds[:2])
    with pytest.raises(Refused, match=r"then 1 to preserve\), got 3"):
        await make_admission().admit(ME, request(preserve_fds=1), fds)
    with pytest.raises(Refused, match=r"preserve_fds must be between 0 and 8, got 9"):
        await make_admission().admit(ME, request(preserve_fds=9), fds)


async def test_only_operators_launch_as_another_user(fds):
    other = ME + 1 if ME != 0 else 1
    with pytest.raises(Refused) as e:
        await make_admission(operators=frozenset({0}) - {ME}).admit(ME, request(user=str(other)), fds)
    assert e.value.code == "permission-denied"
    assert str(e.value) == (f"only operators may launch steps as another user (uid {ME} is not one; "
                            "see `operators` in nodestepd.toml)")
    assert e.value.detail == {"target_uid": other}


async def test_a_run_as_another_user_must_not_bring_config_json(fds):
    with pytest.raises(Refused, match="a run with user must not carry config_json: the daemon reads it as that user"):
        await make_admission(operators=frozenset({ME})).admit(ME, request(user="root", config_json="{}"), fds)


async def test_a_uid_without_a_passwd_entry_is_refused(fds):
    with pytest.raises(Refused, match="uid 3999999 has no passwd entry on this node"):
        await make_admission(operators=frozenset({ME})).admit(ME, request(user="3999999"), fds)


def test_sizes_count_bytes_as_the_kernel_does():
    assert admission.args_size(["ab", "é"]) == 3 + 3
    assert admission.env_size({"A": "1", "B": ""}) == 4 + 3


@pytest.mark.parametrize("text, number", [("USR1", signal.SIGUSR1), ("sigterm", signal.SIGTERM), ("9", 9),
                                          (" HUP ", signal.SIGHUP)])
def test_signals_by_name_or_number(text, number):
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["NOPE", "99", "SIGUSR1X", "x" * 40, "ＵＳＲ１"])
def test_unknown_signals_are_bad_requests(text):
    with pytest.raises(Refused, match="unknown signal") as e:
        parse_signal(text)
    assert e.value.code == "bad-request"


@pytest.mark.parametrize("depth", [65, 100_000])
async def test_config_json_nested_too_deep_is_a_bad_request(fds, depth):
    """Issue 14.5: refused before anything parses it (json.loads recursed once per level)."""
    deep = '{"a":' * depth + "1" + "}" * depth
    with pytest.raises(Refused) as e:
        await make_admission().admit(ME, request(config_json=deep), fds)
    assert (e.value.code, str(e.value)) == ("bad-request", "config_json nests arrays and objects more than 64 levels deep")
