"""Records on their way to journald, without ever blocking the event loop.

journald reads its socket at its own pace; a blocking send to a journal that fell behind
would put the whole daemon to sleep in the kernel, and with it every user's requests. So
every record, the daemon's own log records and detached steps' output lines alike, goes
through one JournalQueue per daemon:

- sent at once when nothing waits and journald takes it (the usual case);
- else queued, and sent from the event loop when the socket polls writable again
  (loop.add_writer on the connected socket: no polling, no sleeping);
- bounded: each Source (one step's output; the daemon's own log) may hold SOURCE_RECORDS
  records or SOURCE_BYTES, all of them together QUEUE_RECORDS or QUEUE_BYTES. A record
  beyond its source's share is dropped; one beyond the total evicts the oldest record of
  the source holding the most, so a newcomer always gets its share;
- fair: the queue is drained round-robin, one record per source per turn, so one step
  flooding a slow journal delays the others' lines (and the daemon's log) by at most one
  of its records each;
- counted: every dropped record is counted, per source and in total (`nodestepctl
  status`), and logged as a warning with the source's fields (a step's job, step and
  user) at most once per DROP_REPORT_INTERVAL.

Before the event loop runs and after it stopped, records that journald cannot take wait
in the queue; flush() sends them at exit, waiting a bounded time.
"""

from __future__ import annotations

import asyncio
import collections
import select
import sys
import time
from typing import Callable, Sequence

from nodestepd.systemd.journal import Field, JournalSender, encode_record

QUEUE_RECORDS = 8192  # records waiting for journald, all sources together
QUEUE_BYTES = 8 << 20
SOURCE_RECORDS = 1024  # one source's share: a step's output, or the daemon's own log
SOURCE_BYTES = 1 << 20
DROP_REPORT_INTERVAL = 5.0  # seconds between two warnings about dropped records
_DRAIN_BATCH = 256  # records sent per writable callback: one turn of the loop stays short
_RECORD_OVERHEAD = 64  # bytes counted per queued record besides its data


class Source:
    """One producer's share of the queue. fields: what its drop warnings carry (job_id, ...)."""

    def __init__(self, queue: JournalQueue, fields: dict[str, object]) -> None:
        self._queue = queue
        self.fields = fields
        self.records: collections.deque[bytes] = collections.deque()
        self.bytes = 0
        self.dropped = 0  # since the source began
        self.reported = 0  # of those, already in a warning
        self.error: str | None = None  # the last error that cost a record, for the warning
        self.closed = False

    def submit(self, data: bytes) -> None:
        """One encoded record: sent, queued or dropped (counted). Raises OSError when there
        is no journal at all (nothing to queue for)."""
        self._queue.submit(self, data)

    def count_drop(self, error: str | None = None) -> None:
        self._queue.dropped_from(self, error)

    def close(self) -> None:
        """No more records from this source: forgotten once its queue is empty and its drops reported."""
        self.closed = True
        self._queue.forget_if_done(self)


# How the drop warnings are logged: warn(event, **fields) (logs.py passes the daemon's logger).
Warn = Callable[..., None]


class JournalQueue:
    def __init__(self, sender: JournalSender, warn: Warn, *, source_records: int = SOURCE_RECORDS,
                 source_bytes: int = SOURCE_BYTES, queue_records: int = QUEUE_RECORDS,
                 queue_bytes: int = QUEUE_BYTES, report_interval: float = DROP_REPORT_INTERVAL) -> None:
        self.sender = sender
        self._warn = warn
        self._source_records, self._source_bytes = source_records, source_bytes
        self._queue_records, self._queue_bytes = queue_records, queue_bytes
        self._report_interval = report_interval
        self._sources: set[Source] = set()
        self._turns: collections.deque[Source] = collections.deque()  # sources with records, in drain order
        self.queued = 0  # records waiting
        self._queued_bytes = 0
        self.dropped = 0  # records dropped since the daemon started
        self._writer: asyncio.AbstractEventLoop | None = None  # the loop watching the socket for room
        self._report: asyncio.TimerHandle | None = None
        self._last_report = float("-inf")
        self.daemon = self.source({})  # the daemon's own log records

    def source(self, fields: dict[str, object]) -> Source:
        source = Source(self, fields)
        self._sources.add(source)
        return source

    # ---- in ------------------------------------------------------------------------

    def submit(self, source: Source, data: bytes) -> None:
        if not self.queued and self.sender.try_send(data):
            return
        size = len(data) + _RECORD_OVERHEAD
        if len(source.records) >= self._source_records or source.bytes + size > self._source_bytes:
            self.dropped_from(source)
            return
        while self.queued >= self._queue_records or self._queued_bytes + size > self._queue_bytes:
            largest = max(self._turns, key=lambda s: s.bytes, default=None)
            if largest is None or largest is source or largest.bytes <= source.bytes:
                self.dropped_from(source)
                return
            self._take(largest)
            self.dropped_from(largest)
        source.records.append(data)
        source.bytes += size
        self.queued += 1
        self._queued_bytes += size
        if len(source.records) == 1:
            self._turns.append(source)
        self._watch()

    def _take(self, source: Source) -> bytes:
        """The source's oldest record, out of the queue."""
        data = source.records.popleft()
        size = len(data) + _RECORD_OVERHEAD
        source.bytes -= size
        self.queued -= 1
        self._queued_bytes -= size
        if not source.records:
            self._turns.remove(source)
        return data

    def dropped_from(self, source: Source, error: str | None = None) -> None:
        source.dropped += 1
        source.error = error or source.error
        self.dropped += 1
        self._schedule_report()

    # ---- out -----------------------------------------------------------------------

    def start(self) -> None:
        """On the event loop, once it runs: what waits from before is sent as journald takes it."""
        if self.queued:
            self._watch()
        if any(s.dropped > s.reported for s in self._sources):
            self._schedule_report()

    def _watch(self) -> None:
        if self._writer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop yet (start() watches) or any more (flush() sends)
        loop.add_writer(self.sender.fileno(), self._drain)
        self._writer = loop

    def _unwatch(self) -> None:
        if self._writer is not None:
            if not self._writer.is_closed():
                self._writer.remove_writer(self.sender.fileno())
            self._writer = None

    def _drain(self, batch: int = _DRAIN_BATCH) -> None:
        """Send round-robin until journald is full again, the queue is empty, or one batch went."""
        for _ in range(batch):
            if not self._turns:
                break
            source = self._turns[0]
            data = source.records[0]
            try:
                if not self.sender.try_send(data):
                    return  # full again: the writer stays armed
            except OSError as e:
                self._take(source)
                self.dropped_from(source, f"cannot send to {self.sender.path}: {e.strerror or e}")
                self.forget_if_done(source)
                continue
            self._take(source)
            if source.records:
                self._turns.rotate(-1)  # the next source's turn
            self.forget_if_done(source)
        if not self._turns:
            self._unwatch()

    def flush(self, timeout: float) -> None:
        """Send what waits, blocking up to timeout seconds in all: only when no event loop runs
        (at exit). What journald did not take by then is counted as dropped and said on stderr."""
        self._unwatch()
        if self._report is not None:
            self._report.cancel()
            self._report = None
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.sender.fileno(), select.POLLOUT)
        while self._turns:
            self._drain(batch=self.queued + 1)
            remaining = deadline - time.monotonic()
            if not self._turns or remaining <= 0 or not poller.poll(remaining * 1000):
                break
        unreported = sum(s.dropped - s.reported for s in self._sources)
        if self.queued or unreported:
            print(f"nodestepd: journal {self.sender.path} too slow: {self.queued} records not sent at exit, "
                  f"{unreported} dropped since the last warning ({self.dropped + self.queued} lost since the start)",
                  file=sys.stderr, flush=True)

    def forget_if_done(self, source: Source) -> None:
        if source.closed and not source.records and source.dropped == source.reported:
            self._sources.discard(source)

    # ---- drop warnings -------------------------------------------------------------

    def _schedule_report(self) -> None:
        if self._report is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # start() schedules it
        delay = max(0.0, self._last_report + self._report_interval - time.monotonic())
        self._report = loop.call_later(delay, self._warn_of_drops)

    def _warn_of_drops(self) -> None:
        """One warning per source that lost records since the last one (they go through this queue too)."""
        self._report = None
        self._last_report = time.monotonic()
        for source in list(self._sources):
            if source.dropped == source.reported:
                continue
            since, source.reported = source.dropped - source.reported, source.dropped
            fields = {**source.fields, "dropped": since, "dropped_total": source.dropped}
            if source.error is not None:
                fields["error"] = source.error
            if source is self.daemon:
                self._warn("journal too slow: log records of nodestepd dropped", **fields)
            else:
                self._warn("journal too slow: step output lines dropped", **fields)
            self.forget_if_done(source)


# ---- structlog ------------------------------------------------------------------------


class JournalLogger:
    """structlog's logger for journal records, through the daemon's queue. When there is no
    journal at all, the record goes to stderr with the reason instead: never silently."""

    def __init__(self, queue: JournalQueue) -> None:
        self._queue = queue

    def msg(self, fields: Sequence[Field]) -> None:
        try:
            self._queue.daemon.submit(encode_record(fields))
        except OSError as e:
            message = next((v for k, v in fields if k == "MESSAGE"), "")
            text = message if isinstance(message, str) else message.decode(errors="replace")
            print(f"nodestepd: journal {self._queue.sender.path} unavailable ({e.strerror or e}): {text}",
                  file=sys.stderr, flush=True)

    debug = info = warning = warn = error = err = critical = fatal = exception = failure = msg


class JournalLoggerFactory:
    def __init__(self, queue: JournalQueue) -> None:
        self._logger = JournalLogger(queue)

    def __call__(self, *args: object) -> JournalLogger:
        return self._logger
