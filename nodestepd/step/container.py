"""Create/start mode: the OCI state a runtime reports, and the polling fallback.

After RunTimeCreate, RunTimeQuery prints the OCI state JSON; its `pid` is the
container's init on the host. RunTimeCreate ran under the task's monitor, a child
subreaper (docs/monitor.md), so the init it leaves behind is re-parented to the monitor,
which reports its real exit status (modes.py watches it through the monitor). Only when
there is no pid to watch (the runtime does not report one, or it cannot be pinned) do we
fall back to what Slurm does, polling RunTimeQuery with backoff (PolledContainer), and
say so in the log.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

from nodestepd.process.spawn import HelperResult
from nodestepd.protocol.wire import MAX_JSON_DEPTH, json_too_deep

# Slurm's backoff, which the fallback keeps: a few ms, doubling, capped at one second.
POLL_FIRST_DELAY = 0.004
POLL_MAX_DELAY = 1.0

Query = Callable[[], Awaitable[HelperResult]]


class ContainerError(Exception):
    """A create/start stage failed; the message is one sentence for the user."""


@dataclass(frozen=True)
class ContainerState:
    status: str  # creating, created, running, stopped (or whatever the runtime says)
    pid: int | None  # the container's init on the host, when the runtime reports one


def parse_state(output: str) -> ContainerState:
    """The OCI state JSON a RunTimeQuery printed. Raises ContainerError when it is not one."""
    if json_too_deep(output):  # the runtime runs as the user: its output is the user's
        raise ContainerError(f"RunTimeQuery's JSON nests more than {MAX_JSON_DEPTH} levels deep: {_excerpt(output)}")
    try:
        state = json.loads(output)
    except json.JSONDecodeError as e:
        raise ContainerError(f"RunTimeQuery printed no OCI state JSON ({e.msg}): {_excerpt(output)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("status"), str):
        raise ContainerError(f"RunTimeQuery's JSON has no 'status' string: {_excerpt(output)}")
    pid = state.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        pid = None  # absent, 0 (stopped containers), or nonsense: nothing to watch
    return ContainerState(state["status"], pid)


def _excerpt(text: str, limit: int = 200) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def backoff(first: float = POLL_FIRST_DELAY, cap: float = POLL_MAX_DELAY) -> Iterator[float]:
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


async def query(run_query: Query) -> ContainerState:
    result = await run_query()
    if result.status != 0:
        raise ContainerError(f"RunTimeQuery failed with exit status {result.status}: {result.output or '(no output)'}")
    return parse_state(result.output)


async def wait_until_created(run_query: Query, timeout: float) -> ContainerState:
    """Query until the state is `created` (runc reports that at once after its create returns).

    `creating` is waited out with backoff, up to timeout; any other state is an error.
    """
    deadline = time.monotonic() + timeout
    for delay in backoff():
        state = await query(run_query)
        if state.status == "created":
            return state
        if state.status != "creating":
            raise ContainerError(f"RunTimeQuery reports the container {state.status!r}, expected 'created'")
        if time.monotonic() + delay > deadline:
            raise ContainerError(f"the container was still 'creating' after {timeout:g} s")
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class PolledContainer:
    """The fallback when the container's pid cannot be watched: RunTimeQuery with backoff until
    `stopped` (an ExitWatch). The exit status is not known this way (the runtime's state has
    none): status_known is False, and the step reports it as unknown. With no pid, nothing
    can be signalled or killed: RunTimeKill and RunTimeDelete are all there is.
    """

    pid = None
    status_known = False

    def __init__(self, run_query: Query) -> None:
        self._run_query = run_query
        self._status: int | None = None
        self._poller: asyncio.Task[int] | None = None

    @property
    def status(self) -> int | None:
        return self._status

    @property
    def running(self) -> bool:
        return self._status is None

    def poll(self) -> int | None:
        return self._status

    async def wait(self) -> int:
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll())
        return await asyncio.shield(self._poller)

    async def _poll(self) -> int:
        for delay in backoff():
            await asyncio.sleep(delay)
            try:
                state = await query(self._run_query)
            except ContainerError:
                break  # the runtime no longer knows it (deleted): it has stopped
            if state.status == "stopped":
                break
        self._status = 0
        return 0

    def send_signal(self, sig: int) -> bool:
        return False  # no pid to signal: only RunTimeKill can reach it

    def kill_group(self, sig: int) -> None:
        pass

    def reap(self) -> None:
        pass
