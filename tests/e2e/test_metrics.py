"""debug_timings: the daemon's own launch and exit latency (nodestepd/metrics.py), unit and end to end."""

from __future__ import annotations

import json

from nodestepd.daemon import metrics
from nodestepd.config.settings import load_config

from conftest import settle

# A runtime that is the shell alone: the step is `/bin/sh -c true`.
SHELL_ONLY_CONF = 'IgnoreFileConfigJson=true\nRunTimeRun="%@"\n'


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def info(self, event: str, **fields) -> None:
        self.lines.append((event, fields))


def test_intervals_are_from_the_marks_in_milliseconds(monkeypatch):
    clock = iter([1_002_500_000, 1_004_000_000, 7_000_000_000, 7_000_750_000])  # ns
    monkeypatch.setattr(metrics.time, "monotonic_ns", lambda: next(clock))
    timings = metrics.for_step(True, 1.0)  # received at 1 s on the monotonic clock
    log = Recorder()
    timings.spawned()
    timings.started(log)
    timings.exited()
    timings.sent(log)
    assert log.lines == [
        ("launch timing", {"request_to_spawn_ms": 2.5, "request_to_started_ms": 4.0}),
        ("exit timing", {"exit_to_event_ms": 0.75}),
    ]


def test_the_last_task_counts(monkeypatch):
    clock = iter([10, 20, 30, 40])
    monkeypatch.setattr(metrics.time, "monotonic_ns", lambda: next(clock))
    timings = metrics.StepTimings(0.0)
    timings.spawned()
    timings.spawned()
    timings.exited()
    timings.exited()
    assert (timings.spawned_ns, timings.exited_ns) == (20, 40)


def test_off_logs_nothing():
    log = Recorder()
    timings = metrics.for_step(False, 1.0)
    assert timings is metrics.OFF
    timings.spawned()
    timings.started(log)
    timings.exited()
    timings.sent(log)
    assert log.lines == []


def test_the_setting_from_toml(tmp_path):
    on, off = tmp_path / "on.toml", tmp_path / "off.toml"
    on.write_text("debug_timings = true\n")
    off.write_text("")
    assert load_config(str(on), {"node_name": "n"}).debug_timings is True
    assert load_config(str(off), {"node_name": "n"}).debug_timings is False


def _records(daemon, event: str) -> list[dict]:
    records = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [r for r in records if r.get("event") == event]


def test_a_daemon_with_debug_timings_logs_both_intervals(start_daemon, user, bundle):
    daemon = start_daemon(SHELL_ONLY_CONF, "--debug-timings", "--log-format", "json")
    for job in (71, 72):
        result = daemon.ctl(user, "run", "--job-id", str(job), "--bundle", str(bundle), "--", "true")
        assert result.returncode == 0, result.stderr
    launches, exits = _records(daemon, "launch timing"), _records(daemon, "exit timing")
    assert [r["job_id"] for r in launches] == [71, 72]
    assert [r["job_id"] for r in exits] == [71, 72]
    for launch, exit_ in zip(launches, exits):
        # Positive and bounded: a mark never taken (None) or taken on another clock fails here.
        assert 0 < launch["request_to_spawn_ms"] <= launch["request_to_started_ms"] < 10_000, launch
        assert 0 < exit_["exit_to_event_ms"] < 10_000, exit_


def test_a_detached_step_logs_its_launch_only(start_daemon, user, bundle):
    daemon = start_daemon(SHELL_ONLY_CONF, "--debug-timings", "--log-format", "json")
    assert daemon.ctl(user, "run", "--detach", "--job-id", "73", "--bundle", str(bundle), "--", "true").returncode == 0
    assert daemon.ctl(user, "wait", "73.0").returncode == 0
    assert [r["job_id"] for r in _records(daemon, "launch timing")] == [73]
    assert _records(daemon, "exit timing") == []


def test_without_the_setting_no_timings_are_logged(start_daemon, user, bundle):
    daemon = start_daemon(SHELL_ONLY_CONF, "--log-format", "json")
    assert daemon.ctl(user, "run", "--job-id", "74", "--bundle", str(bundle), "--", "true").returncode == 0
    settle(daemon)  # "step finished" is logged at the end of the release, after the exit event
    assert _records(daemon, "step finished")  # the log is read at all
    assert _records(daemon, "launch timing") == [] and _records(daemon, "exit timing") == []
