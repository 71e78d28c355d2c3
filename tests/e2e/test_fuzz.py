"""Property-based fuzzing of the protocol against a live daemon (hypothesis).

At least 10,000 generated messages per run: random bytes, JSON of every shape with wrong
types, unknown operations and fields, unicode edge cases (lone surrogates, NUL, non-BMP,
overlong-looking escapes), truncated frames, partial headers, oversized announced
lengths and large bodies. The property: every complete frame gets exactly one well-formed
reply, and no message crashes a connection handler. After the storm the daemon is alive,
holds no more fds than before, its RSS has not grown without bound, and a real `run` works.

Messages are pipelined many per connection (the protocol keeps a connection open after a
malformed request); frames that end a connection by design (truncated, oversized) and
requests the daemon decodes as `run` (a run owns its connection) get fresh connections.
"""

from __future__ import annotations

import json
import socket
import time
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RUNC_RUN_CONF
from reply_decoder import decode_reply
from nodestepd.protocol import messages as protocol
from nodestepd.protocol.messages import ErrorReply
from test_server_protocol import HEADER, connect, daemon_fds, status

MESSAGES_PER_EXAMPLE = 20  # longer lists overrun hypothesis's per-example data budget
EXAMPLES = 510  # 10,200 messages
MAX = protocol.MAX_MESSAGE

OPS = ["run", "signal", "cancel", "wait", "ps", "status"]
FIELDS = ["v", "op", "bundle", "args", "env", "job_id", "step_id", "ntasks", "chdir", "pty", "detach", "config_json",
          "config_json_error", "user", "output", "error", "signal", "uid", "gid", ""]

edge_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=20),  # includes surrogates
    st.sampled_from(["\0", "\ud800", "\udfff", "\U0010ffff", "\ufeff", "\u202e", "ＵＳＲ1", "١٢٣", "../../etc/shadow",
                     "/", "", " ", "SIGKILL", "KILL", "9", "-1", "1e400", "NaN", "%s%n", "\\", '"']),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | edge_text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(edge_text | st.sampled_from(FIELDS), children,
                                                                        max_size=5),
    max_leaves=8,
)
# Requests that look nearly right: known and unknown ops, known and unknown fields, any value types.
request_like = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), json_values), "op": st.one_of(st.sampled_from(OPS), json_values)},
    optional={name: json_values for name in FIELDS[2:]},
)


def _dumps(value, ascii_only: bool) -> bytes:
    # ensure_ascii escapes lone surrogates as \ud800, which is valid JSON text; without it
    # they are not encodable, so "surrogatepass" puts the raw (invalid UTF-8) bytes on the wire.
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")


body = st.one_of(
    st.binary(max_size=300),  # random bytes
    st.builds(_dumps, json_values, st.booleans()),  # any JSON (wrong types at the top level too)
    st.builds(_dumps, request_like, st.booleans()),
    st.builds(lambda depth, c: (c * depth).encode(), st.integers(1, 200_000), st.sampled_from(["[", "{", '{"a":'])),
)
large_body = st.builds(lambda n, b: bytes([b]) * n, st.integers(60_000, MAX), st.integers(0, 255))


@st.composite
def message(draw):
    """(kind, data): a "frame" is a complete message; the other kinds end their connection.
    Large bodies are rare (2 %), so that 10,000 messages stay well under a minute."""
    roll = draw(st.integers(0, 99))
    if roll < 80:
        return "frame", draw(body)
    if roll < 86:  # announced length > what is sent, then EOF
        return "truncated", draw(body.filter(lambda b: 0 < len(b) < MAX))
    if roll < 92:
        return "oversized", draw(st.integers(MAX + 1, 2**32 - 1))
    if roll < 98:
        return "partial header", draw(st.binary(min_size=1, max_size=3))
    return "frame", draw(large_body)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def read_reply(sock: socket.socket):
    header = _exact(sock, HEADER.size)
    if header is None:
        return None
    data = _exact(sock, protocol.frame_length(header))
    assert data is not None, "reply cut off"
    return decode_reply(data)


def _exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            assert not data, "reply cut off"
            return None
        data += chunk
    return data


class Storm:
    def __init__(self, path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.sent = 0

    def _connection(self) -> socket.socket:
        if self.sock is None:
            self.sock = connect(self.path, timeout=30)
        return self.sock

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, kind: str, data) -> None:
        self.sent += 1
        if kind == "frame":
            sock = self._connection()
            sock.sendall(HEADER.pack(len(data)) + data)
            reply = read_reply(sock)
            assert reply is not None, f"no reply to {data[:200]!r}"
            if isinstance(reply, ErrorReply) and reply.status == protocol.STATUS_LAUNCH_FAILED:
                self._drop()  # decoded as a run: refused (no fds), and a run owns its connection
            return
        self._drop()
        with connect(self.path, timeout=30) as sock:
            if kind == "truncated":
                sock.sendall(HEADER.pack(len(data) + 1) + data)
            elif kind == "oversized":
                sock.sendall(HEADER.pack(data))
                reply = read_reply(sock)
                assert isinstance(reply, ErrorReply) and reply.code == "bad-request", reply
            else:
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert read_reply(sock) is None or kind == "oversized"


def test_protocol_fuzzing_does_not_hurt_the_daemon(start_daemon, user, bundle):
    daemon = start_daemon(RUNC_RUN_CONF)
    storm = Storm(daemon.socket)
    # Warm-up: every kind once, so lazily allocated buffers count in the baseline.
    for kind, data in [("frame", b"{}"), ("frame", b"\xff" * MAX), ("truncated", b"{"), ("oversized", MAX + 1),
                       ("partial header", b"\0\0")]:
        storm.send(kind, data)
    storm._drop()
    assert status(daemon)
    fds_before, rss_before = daemon_fds(daemon), rss_kib(daemon.proc.pid)
    begun = time.monotonic()

    @settings(max_examples=EXAMPLES, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(message(), min_size=MESSAGES_PER_EXAMPLE, max_size=MESSAGES_PER_EXAMPLE))
    def storm_of(batch):
        for kind, data in batch:
            storm.send(kind, data)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hypothesis warns about the repr of large examples
        try:
            storm_of()
        except BaseException as e:
            e.add_note(f"daemon alive: {daemon.proc.poll() is None}; its log ends:\n{daemon.log()[-3000:]}")
            raise
    storm._drop()
    elapsed = time.monotonic() - begun

    assert storm.sent >= 10_000, storm.sent
    assert daemon.proc.poll() is None, daemon.log()[-5000:]
    log = daemon.log()
    assert "connection handler failed" not in log and "Traceback" not in log, log[-5000:]
    assert status(daemon)
    assert daemon_fds(daemon) == fds_before
    growth = rss_kib(daemon.proc.pid) - rss_before
    print(f"\n{storm.sent} messages in {elapsed:.1f} s; daemon RSS {rss_before} KiB -> +{growth} KiB")
    assert growth < 16 * 1024, f"RSS grew by {growth} KiB"
    result = daemon.ctl(user, "run", "--job-id", "8001", "--bundle", str(bundle), "--", "echo", "still fine")
    assert (result.returncode, result.stdout) == (0, b"still fine\n"), result.stderr
