"""Exit files: the `PID STATUS` lines each task's monitor appends for every child that ends
(docs/monitor.md, "The exit file"), read back by a restarted daemon (step/record.py)."""

from __future__ import annotations

import os
import stat
from typing import NamedTuple

_MAX_EXIT_FILE = 16 * 1024 * 1024  # a task orphaning millions of processes: read this much, say so
_MAX_PROBLEMS = 10


class ExitRecords(NamedTuple):
    statuses: dict[int, int]  # pid -> status (exit code, or 128+N for signal N)
    problems: list[str]  # what was not a record, for the log; empty for a clean file


def parse_exit_records(data: bytes) -> ExitRecords:
    """Parse the lines of an exit file (`PID STATUS\\n` each). Never raises.

    A last line without its newline is a write cut short and is ignored (reported among
    the problems). Anything else that is not a record is skipped and reported. A pid
    recorded twice was reused after the monitor reaped it: the first record is the
    earlier process, the one a recorded pid names, so it is kept.
    """
    statuses: dict[int, int] = {}
    problems: list[str] = []
    lines = data.split(b"\n")
    torn = lines.pop()  # empty when the data ends with a newline
    skipped = 0
    for number, line in enumerate(lines, 1):
        fields = line.split(b" ")
        if (len(fields) == 2 and all(f.isdigit() and len(f) <= 10 for f in fields)
                and 0 < int(fields[0]) < 2**22 and int(fields[1]) <= 255):
            pid, status = int(fields[0]), int(fields[1])
            if pid in statuses:
                problem = f"line {number}: pid {pid} recorded again (a reused pid); the first record is kept"
            else:
                statuses[pid] = status
                continue
        else:
            problem = f"line {number}: not a record: {line[:60]!r}"
        if len(problems) < _MAX_PROBLEMS:
            problems.append(problem)
        else:
            skipped += 1
    if skipped:
        problems.append(f"{skipped} more problems")
    if torn:
        problems.append(f"incomplete last line ignored: {torn[:60]!r}")
    return ExitRecords(statuses, problems)


def read_exit_file(path: str | os.PathLike[str] | int, *, dir_fd: int | None = None) -> ExitRecords:
    """The records of an exit file: a path (relative to dir_fd if given) or an open fd.

    Never raises on the content; raises OSError when the file cannot be opened (a missing
    file is FileNotFoundError: the caller decides what that means). Symlinks are not
    followed and only a regular file is read (at most 16 MiB).
    """
    if isinstance(path, int):
        fd = os.dup(path)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ExitRecords({}, ["not a regular file"])
        chunks: list[bytes] = []
        size = offset = 0
        while size <= _MAX_EXIT_FILE:
            chunk = os.pread(fd, 1024 * 1024, offset)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    records = parse_exit_records(data[:_MAX_EXIT_FILE])
    if size > _MAX_EXIT_FILE:
        records.problems.append(f"only the first {_MAX_EXIT_FILE} bytes were read")
    return records
