"""sd_notify client and watchdog settings, against real datagram sockets."""

from __future__ import annotations

import os
import socket

import pytest

from nodestepd.systemd.notify import Notifier, WatchdogSettingError, notify_address, status_line, watchdog_interval


@pytest.fixture
def receiver(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_addresses():
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@/org/freedesktop/systemd1/notify/42") == "\0/org/freedesktop/systemd1/notify/42"
    with pytest.raises(ValueError, match="neither an absolute path nor an abstract"):
        notify_address("relative/notify")


def test_assignments_travel_together_in_one_datagram(receiver, tmp_path):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    notifier.notify("READY=1")
    notifier.notify("RELOADING=1", "MONOTONIC_USEC=123")
    assert receiver.recv(4096) == b"READY=1"
    assert receiver.recv(4096) == b"RELOADING=1\nMONOTONIC_USEC=123"
    notifier.close()


def test_abstract_socket(receiver):
    name = f"nodestepd-test-{os.getpid()}"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind("\0" + name)
    abstract.settimeout(5)
    try:
        Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}).notify("STATUS=hello")
        assert abstract.recv(4096) == b"STATUS=hello"
    finally:
        abstract.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    notifier.notify("READY=1")  # no socket, no error


def test_a_newline_cannot_smuggle_an_assignment(receiver, tmp_path):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    with pytest.raises(ValueError):
        notifier.notify("STATUS=x\nREADY=1")


def test_a_gone_manager_does_not_stop_the_daemon(tmp_path):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    notifier.notify("READY=1")  # logged once, not raised
    notifier.notify("STATUS=still fine")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # inherited: not ours
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, 0.1),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_us_only(env, expected):
    assert watchdog_interval(env, 4242) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WATCHDOG_USEC": "soon"}, "WATCHDOG_USEC='soon' is not a number"),
        ({"WATCHDOG_USEC": "0"}, "must be positive"),
        ({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "me"}, "WATCHDOG_PID='me' is not a process id"),
    ],
)
def test_unusable_watchdog_settings_are_errors(env, message):
    with pytest.raises(WatchdogSettingError, match=message):
        watchdog_interval(env, 4242)


def test_status_line_is_one_bounded_line():
    assert status_line("a\nb   c") == "a b c"
    long = status_line("x" * 500)
    assert len(long) == 200 and long.endswith("...")
