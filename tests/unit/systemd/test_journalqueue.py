"""The journal queue: a journald that stops reading never blocks the loop; records wait
within bounds, beyond them are dropped and counted, and are sent round-robin once journald
reads again. A real datagram socket plays journald; the queue runs on uvloop."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from journal_records import decode_record
from uvloop_fixtures import OVERRIDE_WARNING, event_loop_policy, on_uvloop  # noqa: F401 (fixtures)

from nodestepd.systemd.journal import JournalSender, encode_record
from nodestepd.systemd.journalqueue import JournalQueue

pytestmark = pytest.mark.filterwarnings(OVERRIDE_WARNING)


@pytest.fixture
def stalled(tmp_path):
    """journald that does not read (until the test reads it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal"))
    yield sock
    sock.close()


class Warnings:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []
        self.event = asyncio.Event()

    def __call__(self, event: str, **fields: object) -> None:
        self.seen.append((event, fields))
        self.event.set()

    async def next(self) -> tuple[str, dict]:
        await asyncio.wait_for(self.event.wait(), 10)
        self.event.clear()
        return self.seen[-1]


def record(text: str) -> bytes:
    return encode_record([("MESSAGE", text)])


async def receive(sock: socket.socket, count: int) -> list[str]:
    """count records, read without blocking the loop that sends them."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    out = []
    for _ in range(count):
        data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10)
        out.append(dict(decode_record(data))["MESSAGE"].decode())
    return out


def queue_for(tmp_path, warn, **limits) -> JournalQueue:
    return JournalQueue(JournalSender(str(tmp_path / "journal")), warn, **limits)


async def test_a_stalled_journal_costs_queued_then_dropped_records_never_a_blocked_loop(stalled, tmp_path):
    warnings = Warnings()
    queue = queue_for(tmp_path, warnings, source_records=50)
    step = queue.source({"job_id": 7, "step_id": 0, "user": "alice"})
    for i in range(1000):  # would sleep in sendto after the receiver's few datagrams
        step.submit(record(f"line {i}"))
    assert queue.queued == 50
    sent = 1000 - 50 - step.dropped
    assert 0 < sent < 50 and queue.dropped == step.dropped
    event, fields = await warnings.next()  # the first drop is said at once
    assert event == "journal too slow: step output lines dropped"
    assert fields["job_id"] == 7 and fields["user"] == "alice" and fields["dropped_total"] == step.dropped
    # journald reads again: what waited goes, in order, and the queue is empty.
    # The first ones beyond the receiver's queue waited; the ones after them were dropped.
    assert await receive(stalled, sent + 50) == [f"line {i}" for i in range(sent + 50)]
    assert queue.queued == 0


async def test_sources_take_turns_so_a_flood_does_not_starve_the_others(stalled, tmp_path):
    queue = queue_for(tmp_path, Warnings())
    flood, quiet = queue.source({"job_id": 1}), queue.source({"job_id": 2})
    for i in range(500):
        flood.submit(record(f"flood {i}"))
    for i in range(3):
        quiet.submit(record(f"quiet {i}"))
    sent = 503 - queue.queued  # before the receiver's queue was full
    lines = await receive(stalled, 503)
    # Once journald reads again, the quiet step's lines go one per turn, not after the flood's ~500.
    assert [i for i, line in enumerate(lines) if line.startswith("quiet")] == [sent + 1, sent + 3, sent + 5]


async def test_the_total_bound_evicts_from_the_largest_source(stalled, tmp_path):
    warnings = Warnings()
    queue = queue_for(tmp_path, warnings, source_records=100, queue_records=100)
    flood, late = queue.source({"job_id": 1}), queue.source({"job_id": 2})
    for i in range(300):
        flood.submit(record(f"flood {i}"))
    assert queue.queued == 100
    before = flood.dropped
    late.submit(record("late"))  # the queue is full: the flood's oldest waiting record gives way
    assert queue.queued == 100 and late.dropped == 0 and flood.dropped == before + 1
    lines = await receive(stalled, 300 - flood.dropped + 1)
    assert "late" in lines


async def test_drops_are_said_at_most_once_per_interval_with_the_running_total(stalled, tmp_path):
    warnings = Warnings()
    queue = queue_for(tmp_path, warnings, source_records=10, report_interval=0.2)
    step = queue.source({"job_id": 3})
    for i in range(40):
        step.submit(record(f"a {i}"))
    _, first = await warnings.next()
    for i in range(40):
        step.submit(record(f"b {i}"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, second = await warnings.next()
    assert loop.time() - started > 0.1  # not at once: the interval since the first
    assert second["dropped_total"] == step.dropped and second["dropped"] == step.dropped - first["dropped_total"]
    assert len(warnings.seen) == 2


async def test_no_journal_at_all_is_an_error_for_the_caller(tmp_path):
    queue = queue_for(tmp_path, Warnings())
    with pytest.raises(FileNotFoundError):
        queue.daemon.submit(record("nobody listens"))
    assert queue.queued == 0


async def test_flush_at_exit_waits_a_bounded_time_and_says_what_was_lost(stalled, tmp_path, capsys):
    queue = queue_for(tmp_path, Warnings(), source_records=50)
    for i in range(100):
        queue.daemon.submit(record(f"r {i}"))
    assert queue.queued == 50
    lost = queue.queued + queue.dropped
    started = time.monotonic()
    queue.flush(0.2)  # nobody reads: it gives up
    assert time.monotonic() - started < 2
    assert capsys.readouterr().err == (
        f"nodestepd: journal {tmp_path}/journal too slow: 50 records not sent at exit, "
        f"{queue.dropped} dropped since the last warning ({lost} lost since the start)\n")
