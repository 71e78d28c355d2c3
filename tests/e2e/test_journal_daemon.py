"""The daemon logging to the journal over the native protocol, end to end.

A datagram socket bound by the test stands where journald's is
(NODESTEPD_JOURNAL_SOCKET); records are parsed here field by field, independently of
nodestepd's own encoder. Job ids 5100-5199 belong to this file.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import NODESTEPD, RUNC_RUN_CONF, SYSTEM_PATH
from journal_records import decode_record


def parse(datagram: bytes) -> dict[str, bytes]:
    """One native-protocol record, by field name."""
    fields = decode_record(datagram)
    for name, _ in fields:
        assert name.isupper() or name.replace("_", "").isalnum(), name
    return dict(fields)


class Journal:
    """Collects records on a thread; pause() stops reading, as a journald that fell behind
    would, until resume(): the socket's receive queue fills and the daemon's sends would block."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw: list[bytes] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)  # how soon the collector sees a pause
        os.chmod(path, 0o666)
        self._reading = threading.Event()
        self._reading.set()
        self._paused = threading.Event()
        self._closed = False
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            if not self._reading.is_set():
                self._paused.set()
                self._reading.wait()
            if self._closed:
                return
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.raw.append(data)
                self._cond.notify_all()

    def pause(self) -> None:
        """Stop reading; returns once the collector has stopped."""
        self._paused.clear()
        self._reading.clear()
        assert self._paused.wait(10)

    def resume(self) -> None:
        self._reading.set()

    def wait_for(self, predicate, count: int = 1, timeout: float = 60) -> list[dict[str, bytes]]:
        """The first `count` records matching predicate, waiting for them to arrive."""
        def matching():
            return [r for r in map(parse, self.raw) if predicate(r)]

        with self._cond:
            assert self._cond.wait_for(lambda: len(matching()) >= count, timeout), [parse(r) for r in self.raw]
            return matching()[:count]

    def wait_until(self, predicate, timeout: float = 60) -> list[dict[str, bytes]]:
        """Every record so far, once predicate(every record so far) holds."""
        with self._cond:
            assert self._cond.wait_for(lambda: predicate([parse(r) for r in self.raw]), timeout), \
                [parse(r) for r in self.raw][-20:]
            return [parse(r) for r in self.raw]

    def close(self) -> None:
        self._closed = True
        self._reading.set()
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


@pytest.fixture
def journal(workdir):
    base = Path(tempfile.mkdtemp(prefix="journal-", dir=workdir))
    j = Journal(base / "socket")
    yield j
    j.close()


def journal_daemon(start_daemon, journal):
    return start_daemon(RUNC_RUN_CONF, "--log-format", "journal", env={"NODESTEPD_JOURNAL_SOCKET": str(journal.path)})


def test_step_log_records_carry_the_step_fields(start_daemon, journal, user, bundle):
    daemon = journal_daemon(start_daemon, journal)
    run = daemon.ctl(user, "run", "--job-id", "5101", "--bundle", str(bundle), "--", "true")
    assert run.returncode == 0, run.stderr
    (record,) = journal.wait_for(lambda r: r["MESSAGE"].startswith(b"task exited") and r.get("NODESTEPD_JOB_ID") == b"5101")
    assert record["NODESTEPD_STEP_ID"] == b"0"
    assert record["NODESTEPD_TASK_ID"] == b"0"
    assert record["NODESTEPD_USER"] == user.name.encode()
    assert record["NODESTEPD_STATUS"] == b"0"
    assert record["PRIORITY"] == b"6"
    assert record["SYSLOG_IDENTIFIER"] == b"nodestepd"
    assert record["MESSAGE"] == f"task exited job_id=5101 step_id=0 user={user.name} task_id=0 status=0".encode()
    # CODE_FILE/CODE_LINE point at the line that logged it.
    source = Path(record["CODE_FILE"].decode())
    assert source.name == "step.py" and record["CODE_FUNC"] == b"_watch_task"
    assert 'log.info("task exited"' in source.read_text().splitlines()[int(record["CODE_LINE"]) - 1]
    assert daemon.log() == ""  # nothing went to stderr


def test_a_value_with_a_newline_uses_the_binary_form(start_daemon, journal, user, workdir):
    daemon = journal_daemon(start_daemon, journal)
    # A user-chosen directory name with a newline: it reaches the log as one value, never as a forged field.
    odd = Path(tempfile.mkdtemp(prefix="odd-", dir=workdir)) / "bundle\nPRIORITY=0"
    odd.mkdir()
    odd.parent.chmod(0o755)
    run = daemon.ctl(user, "run", "--job-id", "5102", "--bundle", str(odd), "--", "true")
    assert run.returncode == 125
    (record,) = journal.wait_for(lambda r: r["MESSAGE"].startswith(b"launch failed"))
    error = record["NODESTEPD_ERROR"]
    assert error == f"cannot read {odd}/config.json: No such file or directory".encode()
    raw = next(d for d in journal.raw if b"launch failed" in d)
    # NAME, newline, the length as 64-bit little-endian, the bytes, newline.
    assert b"\nNODESTEPD_ERROR\n" + struct.pack("<Q", len(error)) + error + b"\n" in raw
    assert b"\nPRIORITY=0\n" not in raw
    assert record["PRIORITY"] == b"4"  # the real one: a warning
    # MESSAGE stays one line for `journalctl`, the value escaped; the field holds it exactly.
    assert b"\n" not in record["MESSAGE"] and b"bundle\\nPRIORITY=0/config.json" in record["MESSAGE"]
    assert record["NODESTEPD_JOB_ID"] == b"5102" and record["NODESTEPD_USER"] == user.name.encode()


def test_detached_step_output_goes_to_the_journal_per_task_and_stream(start_daemon, journal, user, bundle):
    daemon = journal_daemon(start_daemon, journal)
    run = daemon.ctl(user, "run", "--detach", "--ntasks", "2", "--job-id", "5103", "--step-id", "4",
                     "--bundle", str(bundle), "--", "sh", "-c", "echo one; echo two; echo oops >&2; printf tail")
    assert run.returncode == 0, run.stderr
    assert daemon.ctl(user, "wait", "5103.4").returncode == 0
    records = journal.wait_for(lambda r: r["SYSLOG_IDENTIFIER"] == b"nodestepd-step", count=8)
    seen = set()
    for r in records:
        assert (r["NODESTEPD_JOB_ID"], r["NODESTEPD_STEP_ID"], r["NODESTEPD_USER"]) == (b"5103", b"4", user.name.encode())
        assert r["PRIORITY"] == {b"stdout": b"6", b"stderr": b"3"}[r["NODESTEPD_STREAM"]]
        seen.add((r["NODESTEPD_TASK_ID"], r["NODESTEPD_STREAM"], r["MESSAGE"]))
    assert seen == {(t, s, m) for t in (b"0", b"1")
                    for s, m in ((b"stdout", b"one"), (b"stdout", b"two"), (b"stderr", b"oops"), (b"stdout", b"tail"))}
    for t in (b"0", b"1"):  # in order within a stream
        assert [r["MESSAGE"] for r in records if r["NODESTEPD_TASK_ID"] == t and r["NODESTEPD_STREAM"] == b"stdout"] == [
            b"one", b"two", b"tail"]


# Another user's status requests, each timed, for `seconds`: printed as a JSON list once done.
STATUS_LATENCIES = """
import json, sys, time
from nodestepd.ctl.transport import request
path, seconds = sys.argv[1], float(sys.argv[2])
latencies = []
print("ready", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    start = time.monotonic()
    request(path, {"op": "status"}, "status")
    latencies.append(time.monotonic() - start)
print(json.dumps(latencies), flush=True)
"""
FLOOD_LINES = 3000
# 3,000 lines, a 50 ms pause after every 100: a flood of about 1.5 s, the other user's requests all along.
FLOOD = f"i=0; while [ $i -lt {FLOOD_LINES} ]; do echo line $i; i=$((i+1)); [ $((i % 100)) = 0 ] && usleep 50000; done; true"


def test_a_step_flooding_a_stalled_journal_blocks_nobody(start_daemon, journal, user, other_user, bundle):
    """Finding 14.1: journald stops reading while one user's detached step prints 3,000
    lines. Another user's status requests are answered at once all along; the lines beyond
    the step's share of the queue are dropped, counted in `status`, and said in the log
    once journald reads again: every line either arrives or is counted."""
    daemon = journal_daemon(start_daemon, journal)
    journal.pause()
    try:
        measure = subprocess.Popen(
            other_user.command([sys.executable, "-c", STATUS_LATENCIES, str(daemon.socket), "4"]),
            env=other_user.env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        daemon.clients.append(measure)
        assert select.select([measure.stdout], [], [], 30)[0] and measure.stdout.readline() == b"ready\n"
        run = daemon.ctl(user, "run", "--detach", "--job-id", "5110", "--bundle", str(bundle), "--", "sh", "-c", FLOOD,
                         timeout=30)
        assert run.returncode == 0, run.stderr
        out, err = measure.communicate(timeout=30)  # the daemon asleep in sendto: TimeoutExpired
        assert measure.returncode == 0, err
        latencies = sorted(json.loads(out.splitlines()[-1]))
        p99, worst = latencies[int(len(latencies) * 0.99)], latencies[-1]
        print(f"status latency during the flood: {len(latencies)} requests, p99 {p99 * 1000:.1f} ms, "
              f"max {worst * 1000:.1f} ms")
        assert p99 < 0.2 and worst < 1.0, (p99, worst)
        assert daemon.ctl(user, "wait", "5110.0", timeout=30).returncode == 0
        status = daemon.ctl(other_user, "status", timeout=10)
        assert status.returncode == 0, status.stderr
        match = re.search(rb"journal: +(\d+) records waiting, (\d+) dropped", status.stdout)
        assert match, status.stdout
        dropped = int(match.group(2))
        assert dropped > 0
        print(f"status: {match.group(0).decode()}")
    finally:
        journal.resume()

    def warnings(records: list[dict[str, bytes]]) -> list[dict[str, bytes]]:
        return [r for r in records if r.get("NODESTEPD_JOB_ID") == b"5110"
                and r["MESSAGE"].startswith(b"journal too slow: step output lines dropped")]

    def accounted(records: list[dict[str, bytes]]) -> bool:
        """Every line arrived or is counted in the last drop warning."""
        lines = sum(1 for r in records if r["SYSLOG_IDENTIFIER"] == b"nodestepd-step"
                    and r["NODESTEPD_JOB_ID"] == b"5110")
        told = warnings(records)
        return bool(told) and lines + int(told[-1]["NODESTEPD_DROPPED_TOTAL"]) == FLOOD_LINES

    last = warnings(journal.wait_until(accounted, 30))[-1]
    assert last["NODESTEPD_USER"] == user.name.encode() and last["NODESTEPD_STEP_ID"] == b"0"
    assert last["PRIORITY"] == b"4"
    assert int(last["NODESTEPD_DROPPED_TOTAL"]) <= dropped


def _nodestepd(tmp: Path, env: dict, stderr) -> subprocess.CompletedProcess:
    """A daemon that stops at once (invalid oci.conf, exit 78) after logging why."""
    (tmp / "oci.conf").write_text("NoSuchKey=1\n")
    return subprocess.run(
        [str(NODESTEPD), "--oci-conf", str(tmp / "oci.conf"), "--socket", str(tmp / "sock"),
         "--spool-dir", str(tmp / "spool"), "--state-dir", str(tmp / "state")],
        env={"PATH": SYSTEM_PATH, **env}, stderr=stderr, stdout=subprocess.DEVNULL, timeout=60,
    )


def test_journal_is_the_default_when_stderr_is_the_journal_stream(journal, tmp_path):
    with open(tmp_path / "stderr", "wb") as err:
        st = os.fstat(err.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "NODESTEPD_JOURNAL_SOCKET": str(journal.path)}
        assert _nodestepd(tmp_path, env, err).returncode == 78
    (record,) = journal.wait_for(lambda r: r["MESSAGE"].startswith(b"invalid oci.conf"))
    assert b"NoSuchKey" in record["NODESTEPD_PROBLEM"] and record["PRIORITY"] == b"3"
    assert (tmp_path / "stderr").read_text() == ""


def test_console_when_journal_stream_is_someone_elses(journal, tmp_path):
    with open(tmp_path / "stderr", "wb") as err:
        st = os.fstat(err.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}", "NODESTEPD_JOURNAL_SOCKET": str(journal.path)}
        assert _nodestepd(tmp_path, env, err).returncode == 78
    text = (tmp_path / "stderr").read_text()
    assert "[error    ] invalid oci.conf" in text and "NoSuchKey" in text


def test_records_the_journal_cannot_take_go_to_stderr_with_the_reason(tmp_path):
    env = {"NODESTEPD_JOURNAL_SOCKET": str(tmp_path / "no-journal")}
    (tmp_path / "oci.conf").write_text("NoSuchKey=1\n")
    result = subprocess.run(
        [str(NODESTEPD), "--log-format", "journal", "--oci-conf", str(tmp_path / "oci.conf"),
         "--socket", str(tmp_path / "sock"), "--spool-dir", str(tmp_path / "spool"), "--state-dir", str(tmp_path / "s")],
        env={"PATH": SYSTEM_PATH, **env}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 78
    assert f"nodestepd: journal {tmp_path}/no-journal unavailable (No such file or directory): invalid oci.conf" in result.stderr
