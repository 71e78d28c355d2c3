"""journald's native protocol: encoding, sending (datagram and memfd), and log records as fields."""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct

import pytest
from journal_records import decode_record

from nodestepd.systemd import journal
from nodestepd.systemd.journal import JournalSender, encode_field, encode_record, field_name, record_fields


@pytest.fixture
def journal_socket(tmp_path):
    """A datagram socket standing where journald's would: we read what it would read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "journal"))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_simple_value_is_name_equals_value_newline():
    assert encode_field("MESSAGE", "step started") == b"MESSAGE=step started\n"
    assert encode_field("PRIORITY", "6") == b"PRIORITY=6\n"


def test_value_with_newline_uses_the_binary_length_form():
    value = "line one\nline two"
    encoded = encode_field("MESSAGE", value)
    # NAME \n, 64-bit little-endian length, the bytes, \n: the protocol's only way to carry a newline.
    assert encoded == b"MESSAGE\n" + struct.pack("<Q", 17) + b"line one\nline two\n"
    assert encoded[8:16] == b"\x11\x00\x00\x00\x00\x00\x00\x00"


def test_a_newline_in_a_value_cannot_forge_a_field():
    # A user-chosen path with "\nPRIORITY=0" in it stays one value of one field.
    fields = [("NODESTEPD_BUNDLE", "/home/a/x\nPRIORITY=0"), ("PRIORITY", "6")]
    assert decode_record(encode_record(fields)) == [("NODESTEPD_BUNDLE", b"/home/a/x\nPRIORITY=0"), ("PRIORITY", b"6")]


def test_binary_values_pass_unchanged():
    data = bytes(range(256))
    assert decode_record(encode_field("MESSAGE", data)) == [("MESSAGE", data)]


@pytest.mark.parametrize("name", ["message", "_PID", "1ABC", "A-B", "", "A" * 65])
def test_invalid_field_names_are_refused(name):
    with pytest.raises(ValueError, match="not a journal field name"):
        encode_field(name, "x")


def test_field_names_from_log_keys():
    assert [field_name(k) for k in ("job_id", "step_id", "task_id", "user", "launch_ms")] == [
        "NODESTEPD_JOB_ID", "NODESTEPD_STEP_ID", "NODESTEPD_TASK_ID", "NODESTEPD_USER", "NODESTEPD_LAUNCH_MS"]


def test_log_event_becomes_fields():
    event = {
        "event": "task exited", "job_id": 42, "step_id": 0, "task_id": 1, "user": "alice", "status": 0,
        "level": "warning", "pathname": "/x/step.py", "lineno": 17, "func_name": "_watch_task",
    }
    fields = dict(record_fields(event))
    assert fields == {
        "MESSAGE": "task exited job_id=42 step_id=0 task_id=1 user=alice status=0",
        "PRIORITY": "4",
        "SYSLOG_IDENTIFIER": "nodestepd",
        "CODE_FILE": "/x/step.py",
        "CODE_LINE": "17",
        "CODE_FUNC": "_watch_task",
        "NODESTEPD_JOB_ID": "42",
        "NODESTEPD_STEP_ID": "0",
        "NODESTEPD_TASK_ID": "1",
        "NODESTEPD_USER": "alice",
        "NODESTEPD_STATUS": "0",
    }


def test_traceback_follows_the_message_on_its_own_lines():
    fields = dict(record_fields({"event": "boom", "level": "error", "exception": "Traceback:\n  x\nValueError\n"}))
    assert fields["MESSAGE"] == "boom\nTraceback:\n  x\nValueError"
    assert fields["PRIORITY"] == "3"
    message = b"boom\nTraceback:\n  x\nValueError"
    assert encode_record(record_fields({"event": "boom", "level": "error", "exception": "Traceback:\n  x\nValueError\n"}))\
        .startswith(b"MESSAGE\n" + struct.pack("<Q", len(message)) + message + b"\nPRIORITY=3\n")


def test_sender_sends_one_datagram_per_record(journal_socket, tmp_path):
    sender = JournalSender(str(tmp_path / "journal"))
    sender.send([("MESSAGE", "a\nb"), ("NODESTEPD_JOB_ID", "42")])
    assert decode_record(journal_socket.recv(65536)) == [("MESSAGE", b"a\nb"), ("NODESTEPD_JOB_ID", b"42")]
    sender.close()


def test_sender_never_blocks_and_finds_a_restarted_journal(journal_socket, tmp_path):
    sender = JournalSender(str(tmp_path / "journal"))
    sent = 0
    while sender.try_send(encode_record([("MESSAGE", str(sent))])):  # nobody reads: full, not blocked
        sent += 1
    assert sent > 0
    with pytest.raises(BlockingIOError):
        sender.send([("MESSAGE", "one more")])
    # journald restarts: a new socket at the same path.
    journal_socket.close()
    os.unlink(tmp_path / "journal")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as restarted:
        restarted.bind(str(tmp_path / "journal"))
        assert sender.try_send(encode_record([("MESSAGE", "after")]))
        assert decode_record(restarted.recv(65536)) == [("MESSAGE", b"after")]
    sender.close()


def test_a_record_too_big_for_a_datagram_goes_as_a_sealed_memfd(journal_socket, tmp_path):
    sender = JournalSender(str(tmp_path / "journal"))
    big = "x" * (4 * 1024 * 1024)
    sender.send([("MESSAGE", big), ("NODESTEPD_JOB_ID", "7")])
    data, ancillary, _, _ = journal_socket.recvmsg(1, socket.CMSG_SPACE(4))
    assert data == b""
    (level, kind, payload), = ancillary
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", payload)[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        # journald maps it from offset 0 (the sender's writes left the shared offset at the end).
        fields = decode_record(os.pread(fd, os.fstat(fd).st_size, 0))
    finally:
        os.close(fd)
    assert fields == [("MESSAGE", big.encode()), ("NODESTEPD_JOB_ID", b"7")]
    sender.close()


def test_stderr_is_journal_only_when_journal_stream_matches(tmp_path):
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert journal.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not journal.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())
        assert not journal.stderr_is_journal({}, f.fileno())
