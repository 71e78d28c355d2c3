"""Daemon-side latency of each step, taken inside the daemon (`debug_timings`, off by default).

Two intervals matter for what nodestepd adds on top of the runtime, and only the
daemon can see where they begin and end:

- launch: from the run request read off the socket to the runtime process forked
  (RunTimeRun, or RunTimeCreate in create/start mode; with several tasks, the last one);
- exit: from a task's end noticed (its pidfd became readable and its watch returned; with
  several tasks, the last one) to the exit event written to the attached client.

When the setting is on, the session gives each step a StepTimings; the step marks the
spawn and the exit (step/spec.py Timings), the session the replies, and two log lines
carry the intervals in milliseconds: "launch timing"
(`request_to_spawn_ms`, and `request_to_started_ms` when the `started` reply went out)
and, for attached runs, "exit timing" (`exit_to_event_ms`). When it is off, each step has
OFF, whose marks do nothing, so the hot path pays one method call per mark.

The clock is the monotonic one, the session's receive time included.
"""

from __future__ import annotations

import time

from nodestepd.step.spec import NoTimings


def _ms(start_ns: int | None, end_ns: int | None) -> float | None:
    if start_ns is None or end_ns is None:
        return None
    return round((end_ns - start_ns) / 1e6, 3)


class StepTimings:
    """The moments of one step. spawned() may be called from a worker thread (spawning runs off the loop)."""

    def __init__(self, received_at: float) -> None:
        self.received_ns = round(received_at * 1e9)  # the session's time.monotonic() at the request
        self.spawned_ns: int | None = None
        self.exited_ns: int | None = None

    def spawned(self) -> None:
        self.spawned_ns = time.monotonic_ns()  # the last task's wins: the launch is done when all are

    def started(self, log) -> None:
        """The `started` reply was sent: log the launch interval."""
        now = time.monotonic_ns()
        log.info("launch timing", request_to_spawn_ms=_ms(self.received_ns, self.spawned_ns),
                 request_to_started_ms=_ms(self.received_ns, now))

    def exited(self) -> None:
        self.exited_ns = time.monotonic_ns()  # the last task's end is the step's end

    def sent(self, log) -> None:
        """The exit event was sent to the attached client: log the exit interval."""
        log.info("exit timing", exit_to_event_ms=_ms(self.exited_ns, time.monotonic_ns()))


class Off(NoTimings):
    """debug_timings off: every mark is a no-op (the step's own, and the session's)."""

    def started(self, log) -> None:
        pass

    def sent(self, log) -> None:
        pass


OFF = Off()


def for_step(enabled: bool, received_at: float) -> StepTimings | Off:
    """received_at: time.monotonic() when the run request was read."""
    return StepTimings(received_at) if enabled else OFF
