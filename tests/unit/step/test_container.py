"""container.py: the OCI state JSON, the wait for `created`, and the polling fallback (no runtime needed)."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest

from nodestepd.step.container import (
    POLL_MAX_DELAY,
    ContainerError,
    ContainerState,
    PolledContainer,
    backoff,
    parse_state,
    query,
    wait_until_created,
)
from nodestepd.process.spawn import HelperResult

RUNC_STATE = {
    "ociVersion": "1.0.2-dev", "id": "n.u.1.0.0", "pid": 4321, "status": "created", "bundle": "/spool/task-0",
    "rootfs": "/b/rootfs", "created": "2026-11-23T08:00:00Z", "owner": "",
}


def state_json(**changes) -> str:
    return json.dumps({**RUNC_STATE, **changes}, indent=2)


def test_parse_state_of_runc():
    assert parse_state(state_json()) == ContainerState("created", 4321)


@pytest.mark.parametrize("pid", [0, -1, None, "4321", True, 1.5])
def test_a_pid_that_is_not_a_positive_integer_is_no_pid(pid):
    assert parse_state(state_json(status="stopped", pid=pid)).pid is None


def test_a_state_without_pid_has_no_pid():
    state = dict(RUNC_STATE)
    del state["pid"]
    assert parse_state(json.dumps(state)) == ContainerState("created", None)


@pytest.mark.parametrize("output, problem", [
    ("", "printed no OCI state JSON"),
    ("container does not exist", "printed no OCI state JSON"),
    ("[1, 2]", "no 'status' string"),
    ('{"pid": 3}', "no 'status' string"),
    ('{"status": 7}', "no 'status' string"),
])
def test_output_that_is_not_a_state_is_an_error_quoting_it(output, problem):
    with pytest.raises(ContainerError, match=problem):
        parse_state(output)


def test_backoff_doubles_from_a_few_ms_and_caps_at_one_second():
    delays = list(itertools.islice(backoff(), 12))
    assert delays[0] == pytest.approx(0.004)
    assert all(b == min(a * 2, POLL_MAX_DELAY) for a, b in zip(delays, delays[1:]))
    assert delays[-1] == POLL_MAX_DELAY == 1.0


class ScriptedQuery:
    """A RunTimeQuery that answers from a list (the last answer repeats), counting calls."""

    def __init__(self, *answers: HelperResult) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self) -> HelperResult:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def ok(**changes) -> HelperResult:
    return HelperResult(0, state_json(**changes))


async def test_created_at_once_costs_one_query():
    q = ScriptedQuery(ok(status="created"))
    assert await wait_until_created(q, timeout=5) == ContainerState("created", 4321)
    assert q.calls == 1


async def test_creating_is_waited_out():
    q = ScriptedQuery(ok(status="creating"), ok(status="creating"), ok(status="created"))
    assert (await wait_until_created(q, timeout=5)).status == "created"
    assert q.calls == 3


async def test_creating_forever_ends_at_the_timeout():
    q = ScriptedQuery(ok(status="creating"))
    with pytest.raises(ContainerError, match="still 'creating' after 0.1 s"):
        await wait_until_created(q, timeout=0.1)
    assert 3 <= q.calls <= 6  # 4, 8, 16, 32 ms ... within 0.1 s


@pytest.mark.parametrize("status", ["running", "stopped", "paused"])
async def test_any_other_state_than_created_is_an_error(status):
    with pytest.raises(ContainerError, match=f"reports the container '{status}', expected 'created'"):
        await wait_until_created(ScriptedQuery(ok(status=status)), timeout=5)


async def test_a_failing_query_is_an_error_with_its_output():
    q = ScriptedQuery(HelperResult(1, "container x does not exist"))
    with pytest.raises(ContainerError, match="RunTimeQuery failed with exit status 1: container x does not exist"):
        await query(q)


async def test_polled_container_ends_when_the_runtime_says_stopped():
    q = ScriptedQuery(ok(status="running"), ok(status="running"), ok(status="stopped"))
    polled = PolledContainer(q)
    assert polled.running and polled.pid is None and not polled.status_known
    assert await asyncio.wait_for(polled.wait(), 5) == 0
    assert (q.calls, polled.running) == (3, False)
    assert not polled.send_signal(9)


async def test_polled_container_ends_when_the_runtime_no_longer_knows_it():
    q = ScriptedQuery(ok(status="running"), HelperResult(1, "container does not exist"))
    polled = PolledContainer(q)
    assert await asyncio.wait_for(polled.wait(), 5) == 0
    assert q.calls == 2


def test_a_state_nested_too_deep_is_refused_before_parsing():
    with pytest.raises(ContainerError, match="^RunTimeQuery's JSON nests more than 64 levels deep: "):
        parse_state('{"status":' + "[" * 100_000)
