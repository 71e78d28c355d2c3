"""journald's native protocol: structured records sent as datagrams to the journal socket.

A record is a list of FIELD=value entries (systemd.journal-fields(7), the "native
protocol" of systemd-journald.service(8)). A value without a newline is sent as

    NAME=value\\n

and a value with one as the field name, a newline, the value's length as 64-bit
little-endian, the value, a newline. A record too large for one datagram is written
to a sealed memfd whose descriptor is sent instead, as sd_journal_send(3) does.

The daemon's log records become journal records here (`--log-format journal`), every
structlog key its own field (job_id -> NODESTEPD_JOB_ID), so that
`journalctl -u nodestepd NODESTEPD_JOB_ID=42` shows one job. They, and detached steps'
output, reach journald through a JournalQueue (journalqueue.py): never a blocking send.
"""

from __future__ import annotations

import array
import errno
import os
import re
import socket
import struct
from typing import Iterable, Mapping

from nodestepd.process.kernel import sealed_memfd

DEFAULT_SOCKET = "/run/systemd/journal/socket"
# Tests (and only tests) point the daemon at a socket of their own.
SOCKET_ENV = "NODESTEPD_JOURNAL_SOCKET"
SYSLOG_IDENTIFIER = "nodestepd"
FIELD_PREFIX = "NODESTEPD_"

Field = tuple[str, "str | bytes"]

_VALID_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_LENGTH = struct.Struct("<Q")
# syslog priorities (PRIORITY=) by structlog level
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2, "fatal": 2}


def socket_path(env: Mapping[str, str]) -> str:
    return env.get(SOCKET_ENV) or DEFAULT_SOCKET


def stderr_is_journal(env: Mapping[str, str], stderr_fd: int = 2) -> bool:
    """Whether stderr is the journal stream the service manager connected (JOURNAL_STREAM=dev:inode)."""
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    dev, sep, ino = value.partition(":")
    try:
        st = os.fstat(stderr_fd)
        return bool(sep) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def field_name(key: str) -> str:
    """A structlog key as a journal field of ours: job_id -> NODESTEPD_JOB_ID."""
    name = FIELD_PREFIX + re.sub(r"[^A-Z0-9_]", "_", key.upper())
    return name[:64]


def encode_field(name: str, value: str | bytes) -> bytes:
    if not _VALID_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a journal field name (A-Z, 0-9, _; a letter first; at most 64)")
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if b"\n" in data:
        return name.encode() + b"\n" + _LENGTH.pack(len(data)) + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def encode_record(fields: Iterable[Field]) -> bytes:
    return b"".join(encode_field(name, value) for name, value in fields)


class JournalSender:
    """One datagram socket connected to journald, never blocking: try_send() says False when
    journald's receive queue is full, and the socket polls writable once it has room again.

    Connected, not sendto() per record: only a connected AF_UNIX datagram socket polls
    writable on the receiver's queue (an unconnected one always looks writable), and that
    is what JournalQueue waits for instead of sleeping in the kernel.
    """

    def __init__(self, path: str = DEFAULT_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._connected = False

    def fileno(self) -> int:
        return self._sock.fileno()

    def try_send(self, data: bytes) -> bool:
        """Send one encoded record: True when sent, False when journald cannot take it now
        (EAGAIN). Raises OSError when there is no journal to send to."""
        if not self._connected:
            self._connect()
        try:
            return self._send(data)
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ENOTCONN):
                raise
        # journald restarted: its socket is a new one at the same path.
        self._connect()
        return self._send(data)

    def send(self, fields: Iterable[Field]) -> None:
        """One record now, or BlockingIOError when journald's queue is full."""
        if not self.try_send(encode_record(fields)):
            raise BlockingIOError(errno.EAGAIN, "the journal's receive queue is full")

    def _connect(self) -> None:
        self._connected = False
        self._sock.connect(self.path)
        self._connected = True

    def _send(self, data: bytes) -> bool:
        try:
            self._sock.send(data)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            return self._send_as_memfd(data)
        return True

    def _send_as_memfd(self, data: bytes) -> bool:
        """Too big for a datagram: a sealed memfd, which journald reads whole."""
        fd = sealed_memfd("nodestepd-journal", data)
        try:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            self._sock.sendmsg([], rights)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True

    def close(self) -> None:
        self._sock.close()


# ---- structlog ------------------------------------------------------------------------

# structlog keys with a standard journal field; everything else becomes NODESTEPD_<KEY>.
_STANDARD = {"pathname": "CODE_FILE", "lineno": "CODE_LINE", "func_name": "CODE_FUNC"}
_NOT_FIELDS = {"event", "level", "timestamp", "exception", "logger"}


def record_fields(event_dict: Mapping[str, object]) -> list[Field]:
    """A structlog event as journal fields (pure): MESSAGE, PRIORITY, CODE_*, one field per key.

    MESSAGE repeats the keys as key=value, since plain `journalctl` shows only MESSAGE;
    a traceback follows on its own lines.
    """
    level = str(event_dict.get("level", "info"))
    context = [(k, v) for k, v in event_dict.items() if k not in _NOT_FIELDS and k not in _STANDARD]
    message = str(event_dict.get("event", ""))
    if context:
        message += " " + " ".join(f"{k}={_show(v)}" for k, v in context)
    if event_dict.get("exception"):
        message += "\n" + str(event_dict["exception"]).rstrip("\n")
    fields: list[Field] = [
        ("MESSAGE", message),
        ("PRIORITY", str(PRIORITIES.get(level, 6))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
    ]
    fields += [(name, str(event_dict[key])) for key, name in _STANDARD.items() if key in event_dict]
    fields += [(field_name(k), _text(v)) for k, v in context]
    return fields


def _text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def _show(value: object) -> str:
    text = _text(value)
    return repr(text) if (not text or any(c.isspace() for c in text)) and isinstance(value, str) else text


def journal_renderer(_logger: object, _method: str, event_dict: dict) -> tuple[tuple[list[Field]], dict]:
    """The last structlog processor for `--log-format journal`: hands the fields to JournalLogger.msg."""
    return (record_fields(event_dict),), {}
