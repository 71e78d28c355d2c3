"""A detached step's stdout and stderr as journal records carrying the step's fields.

For a detached step without --output, each task writes into its own pair of pipes; the
daemon reads them on the event loop (add_reader, no polling) and sends each line as a
journal record: MESSAGE=the line, PRIORITY=6 for stdout and 3 for stderr (as Podman's
journald log driver does), NODESTEPD_JOB_ID, NODESTEPD_STEP_ID, NODESTEPD_TASK_ID,
NODESTEPD_USER and NODESTEPD_STREAM. journald's own stdout streams cannot carry fields of
ours, hence the pipes through the daemon.

Lines go through the daemon's JournalQueue (journalqueue.py), the step being one source
of it: while journald is slow they wait, up to the step's share, and beyond it they are
dropped, counted and reported; the pipes are read on regardless, so the step never
blocks on its output and the daemon never blocks on journald.

The read ends live as long as the daemon: a step left running when the daemon stops
loses its reader (its next write gets EPIPE). Steps survive a restart, this output path
does not (yet): steps meant to outlive the daemon need --output (docs/restart.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Mapping, Sequence

from nodestepd.logs import get_logger
from nodestepd.systemd.journal import encode_record
from nodestepd.systemd.journalqueue import JournalQueue

MAX_LINE = 48 * 1024  # journald's default LineMax: longer lines are split, as journald splits them
_READ_SIZE = 64 * 1024
STREAMS = (("stdout", "6"), ("stderr", "3"))


class StepOutputToJournal:
    """Owns the pipes of one step: the write ends until release_write_ends(), the read ends until end of file."""

    def __init__(self, queue: JournalQueue, *, job_id: int, step_id: int, user: str, task_ids: Sequence[int]) -> None:
        self._source = queue.source({"job_id": job_id, "step_id": step_id, "user": user})
        self._base = [
            ("SYSLOG_IDENTIFIER", "nodestepd-step"),
            ("NODESTEPD_JOB_ID", str(job_id)),
            ("NODESTEPD_STEP_ID", str(step_id)),
            ("NODESTEPD_USER", user),
        ]
        self._write_ends: list[int] = []
        self._readers: dict[int, _LineReader] = {}
        loop = asyncio.get_running_loop()
        outputs: dict[int, tuple[int, int]] = {}
        try:
            for task_id in task_ids:
                pair = []
                for stream, priority in STREAMS:
                    r, w = os.pipe2(os.O_CLOEXEC)
                    self._write_ends.append(w)
                    os.set_blocking(r, False)
                    self._readers[r] = _LineReader(r, self._emitter(task_id, stream, priority))
                    loop.add_reader(r, self._on_readable, r)
                    pair.append(w)
                outputs[task_id] = (pair[0], pair[1])
        except BaseException:
            self.release_write_ends()
            for r in list(self._readers):
                self._close_reader(r)
            self._source.close()
            raise
        self.task_outputs: Mapping[int, tuple[int, int]] = outputs

    def release_write_ends(self) -> None:
        """After the tasks were spawned (they hold their own copies): end of file comes when they are gone."""
        for w in self._write_ends:
            with contextlib.suppress(OSError):
                os.close(w)
        self._write_ends = []

    def _emitter(self, task_id: int, stream: str, priority: str):
        fields = [*self._base, ("NODESTEPD_TASK_ID", str(task_id)), ("NODESTEPD_STREAM", stream), ("PRIORITY", priority)]

        def emit(line: bytes) -> None:
            try:
                self._source.submit(encode_record([("MESSAGE", line), *fields]))
            except OSError as e:  # no journal at all: counted, and said in the drop warning
                self._source.count_drop(f"cannot send to the journal: {e.strerror or e}")

        return emit

    def _on_readable(self, r: int) -> None:
        reader = self._readers[r]
        try:
            data = os.read(r, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            get_logger().error("cannot read step output", error=str(e))
            data = b""
        if data:
            reader.feed(data)
        else:
            reader.flush()
            self._close_reader(r)

    def _close_reader(self, r: int) -> None:
        asyncio.get_running_loop().remove_reader(r)
        del self._readers[r]
        os.close(r)
        if not self._readers:
            self._source.close()  # its queued lines still go


class _LineReader:
    """Splits a byte stream into lines (without the newline) of at most MAX_LINE bytes."""

    def __init__(self, fd: int, emit) -> None:
        self.fd = fd
        self._emit = emit
        self._partial = bytearray()

    def feed(self, data: bytes) -> None:
        self._partial += data
        while True:
            end = self._partial.find(b"\n", 0, MAX_LINE + 1)
            if end != -1:
                line = bytes(self._partial[:end])
                del self._partial[: end + 1]
            elif len(self._partial) >= MAX_LINE:
                line = bytes(self._partial[:MAX_LINE])
                del self._partial[:MAX_LINE]
            else:
                return
            self._emit(line)

    def flush(self) -> None:
        if self._partial:
            line, self._partial = bytes(self._partial), bytearray()
            self._emit(line)
