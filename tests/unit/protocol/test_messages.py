"""Unit tests of the wire protocol: framing, request and reply decoding, step references."""

from __future__ import annotations

import json
import struct

import msgspec
import pytest
from reply_decoder import decode_reply

from nodestepd.protocol import messages as protocol
from nodestepd.protocol.messages import (
    CancelRequest,
    ErrorReply,
    ExitReply,
    JobEndReply,
    JobEndRequest,
    OkReply,
    ProtocolError,
    PsRequest,
    RunRequest,
    SignalRequest,
    StartedReply,
    StatusReply,
    StatusRequest,
    StepInfo,
    StepsReply,
    TaskExit,
    TaskInfo,
    WaitRequest,
    decode_request,
    frame,
    frame_length,
    parse_step_ref,
)

V = protocol.VERSION


def body_of(framed: bytes) -> bytes:
    (length,) = struct.unpack(">I", framed[:4])
    assert length == len(framed) - 4
    return framed[4:]


def req(**fields) -> bytes:
    return json.dumps({"v": V, **fields}).encode()


# ---- framing --------------------------------------------------------------------


def test_frame_is_big_endian_length_then_json():
    framed = frame(StatusRequest(v=V))
    assert framed[:4] == struct.pack(">I", len(framed) - 4)
    assert json.loads(framed[4:]) == {"op": "status", "v": 1}


def test_frame_length_of_a_non_ascii_message_counts_bytes_not_characters():
    framed = frame(RunRequest(v=V, bundle="/b", args=["é" * 10]))
    assert frame_length(framed[:4]) == len(framed) - 4
    assert len(framed) - 4 > len(framed[4:].decode())


def test_frame_length_accepts_up_to_the_limit():
    assert frame_length(struct.pack(">I", 0)) == 0
    assert frame_length(struct.pack(">I", protocol.MAX_MESSAGE)) == protocol.MAX_MESSAGE


@pytest.mark.parametrize("length", [protocol.MAX_MESSAGE + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_frame_length_rejects_oversized(length):
    with pytest.raises(ProtocolError, match=f"message of {length} bytes is larger than the limit of {protocol.MAX_MESSAGE}"):
        frame_length(struct.pack(">I", length))


# ---- requests: round trips ---------------------------------------------------------------


REQUESTS = [
    StatusRequest(v=V),
    PsRequest(v=V),
    SignalRequest(v=V, signal="USR1"),
    SignalRequest(v=V, signal="9", job_id=42, step_id=3),
    CancelRequest(v=V, job_id=42, step_id=0),
    JobEndRequest(v=V, job_id=42),
    WaitRequest(v=V, job_id=7, step_id=0xFFFFFFEF),
    RunRequest(v=V, bundle="/b", args=["true"]),
    RunRequest(
        v=V, bundle="/home/u/img", args=["sh", "-c", "echo 'a b' \"$X\"", "", "line1\nline2", "é", "\t"],
        env={"X": "1", "EMPTY": "", "UNI": "ü=ü"}, job_id=3000, step_id=2, ntasks=4, chdir="/tmp", pty=True,
        detach=True, config_json='{"ociVersion": "1.0.2"}', config_json_error=None,
    ),
    RunRequest(v=V, bundle="/b", args=[], config_json_error="Permission denied"),
]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_request_round_trip(message):
    decoded = decode_request(body_of(frame(message)))
    assert type(decoded) is type(message)
    assert decoded == message


def test_run_request_defaults():
    request = decode_request(req(op="run", bundle="/b", args=["x"]))
    assert request == RunRequest(
        v=V, bundle="/b", args=["x"], env={}, job_id=None, step_id=None, ntasks=1, chdir="/", pty=False,
        detach=False, config_json=None, config_json_error=None,
    )


def test_defaults_are_not_shared_between_decoded_requests():
    first = decode_request(req(op="run", bundle="/b", args=[]))
    first.env["X"] = "1"
    assert decode_request(req(op="run", bundle="/b", args=[])).env == {}


# ---- requests: rejections ----------------------------------------------------------------


@pytest.mark.parametrize(
    "body, message",
    [
        (req(op="frobnicate"), "Invalid value 'frobnicate' - at `$.op`"),
        (req(op="Status"), "Invalid value 'Status' - at `$.op`"),
        (json.dumps({"v": V}).encode(), "missing required field `op`"),
        (json.dumps({"op": "status"}).encode(), "missing required field `v`"),
        (req(op="cancel", job_id=1), "missing required field `step_id`"),
        (req(op="run", args=["x"]), "missing required field `bundle`"),
    ],
)
def test_unknown_op_and_missing_fields(body, message):
    assert_malformed(decode_request, body, "malformed request: ", message)


def assert_malformed(decode, body: bytes, prefix: str, message: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(body)
    assert str(e.value).startswith(prefix)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "body, message",
    [
        (req(op="run", bundle=5, args=[]), "Expected `str`, got `int` - at `$.bundle`"),
        (req(op="run", bundle="/b", args="true"), "Expected `array`, got `str` - at `$.args`"),
        (req(op="run", bundle="/b", args=["a", 1]), "Expected `str`, got `int` - at `$.args[1]`"),
        (req(op="run", bundle="/b", args=[], env=["A=1"]), "Expected `object`, got `array` - at `$.env`"),
        (req(op="run", bundle="/b", args=[], env={"A": 1}), "Expected `str`, got `int` - at `$.env[...]`"),
        (req(op="run", bundle="/b", args=[], ntasks="2"), "Expected `int`, got `str` - at `$.ntasks`"),
        (req(op="run", bundle="/b", args=[], ntasks=True), "Expected `int`, got `bool` - at `$.ntasks`"),
        (req(op="run", bundle="/b", args=[], ntasks=1.0), "Expected `int`, got `float` - at `$.ntasks`"),
        (req(op="run", bundle="/b", args=[], job_id="7"), "Expected `int | null`, got `str` - at `$.job_id`"),
        (req(op="run", bundle="/b", args=[], detach="yes"), "Expected `bool`, got `str` - at `$.detach`"),
        (req(op="signal", signal=9), "Expected `str`, got `int` - at `$.signal`"),
        (req(op="wait", job_id=None, step_id=0), "Expected `int`, got `null` - at `$.job_id`"),
        (json.dumps({"v": "1", "op": "status"}).encode(), "Expected `int`, got `str` - at `$.v`"),
        (json.dumps({"v": True, "op": "status"}).encode(), "Expected `int`, got `bool` - at `$.v`"),
    ],
)
def test_wrong_types(body, message):
    with pytest.raises(ProtocolError) as e:
        decode_request(body)
    assert str(e.value) == f"malformed request: {message}"


@pytest.mark.parametrize(
    "body",
    [
        req(op="status", uid=0),
        req(op="ps", user="root"),
        req(op="run", bundle="/b", args=[], uid=0),
        req(op="run", bundle="/b", args=[], gid=0),
        req(op="cancel", job_id=1, step_id=0, force=True),
    ],
)
def test_unknown_fields_are_rejected(body):
    field = next(k for k in json.loads(body) if k not in ("v", "op", "bundle", "args", "job_id", "step_id"))
    with pytest.raises(ProtocolError, match=f"^malformed request: Object contains unknown field `{field}`$"):
        decode_request(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"not json", b"\xff\xfe", b"null", b"[]", b'"status"', b"{}{}", b'{"v":1,"op":"status"} x',
     # An encoded lone surrogate as the tag: msgspec raises UnicodeDecodeError there (found by test_fuzz).
     b'{"v":1,"op":"\xed\xbf\xbf"}', b'{"v":"","op":"\xed\xbf\xbf","bundle":[]}'],
)
def test_garbage_is_malformed(body):
    with pytest.raises(ProtocolError, match="^malformed request: "):
        decode_request(body)


@pytest.mark.parametrize("version", [0, 2, -1, 1000])
def test_wrong_version(version):
    with pytest.raises(ProtocolError) as e:
        decode_request(json.dumps({"v": version, "op": "status"}).encode())
    assert str(e.value) == f"unsupported protocol version {version} (this daemon speaks 1)"


@pytest.mark.parametrize("body", [
    json.dumps({"v": 2, "op": "status", "verbose": True}).encode(),
    json.dumps({"v": 2, "op": "attach", "job_id": 1}).encode(),
])
def test_wrong_version_is_reported_as_such_whatever_the_shape(body):
    with pytest.raises(ProtocolError, match="^unsupported protocol version 2 "):
        decode_request(body)


# ---- replies -----------------------------------------------------------------------------


REPLIES = [
    ErrorReply(code="bad-request", error="nope", status=125),
    ErrorReply(code="not-found", error="no step 1.0 of yours on this node"),
    OkReply(),
    StartedReply(job_id=3000, step_id=1, ntasks=2),
    ExitReply(job_id=3000, step_id=1, status=137, tasks=[TaskExit(0, 137), TaskExit(1, None)], cancelled=True),
    StepsReply(steps=[
        StepInfo(job_id=3000, step_id=0, user="nsdtest1", uid=1002, state="running", attached=True, bundle="/b",
                 args=["sh", "-c", "x"], started_at=1700000000.25,
                 tasks=[TaskInfo(0, 1234, None), TaskInfo(1, None, None)]),
        StepInfo(job_id=3001, step_id=0, user="u", uid=1, state="finished", attached=False, bundle="/c", args=[],
                 started_at=1.5, tasks=[TaskInfo(0, 99, 3)], status=3),
    ]),
    JobEndReply(job_id=3000, ended=[
        StepInfo(job_id=3000, step_id=0, user="u", uid=1, state="finished", attached=False, bundle="/c", args=[],
                 started_at=1.5, tasks=[TaskInfo(0, 99, 143)], status=143),
    ]),
    StatusReply(version="0.1.0", uptime=12.5, node_name="n1", config_file=None, oci_conf="/etc/slurm/oci.conf",
                oci_mode="run", socket="/run/s", spool_dir="/sp", state_dir="/st", steps_running=1, steps_finished=2),
]


@pytest.mark.parametrize("message", REPLIES, ids=lambda m: type(m).__name__)
def test_reply_round_trip(message):
    decoded = decode_reply(body_of(frame(message)))
    assert type(decoded) is type(message)
    assert decoded == message
    assert decoded.v == V


def test_replies_tolerate_fields_a_newer_daemon_adds():
    body = json.dumps({"v": 1, "type": "ok", "hint": "new"}).encode()
    assert decode_reply(body) == OkReply()


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{", "truncated"),
        (json.dumps({"v": 1, "type": "surprise"}).encode(), "Invalid value 'surprise' - at `$.type`"),
        (json.dumps({"v": 1, "type": "exit", "status": "0"}).encode(), "Expected `int | null`, got `str` - at `$.status`"),
        (json.dumps({"v": 1}).encode(), "missing required field `type`"),
    ],
)
def test_bad_replies(body, message):
    """The reply types themselves refuse what is not a reply (clients rely on their shapes)."""
    with pytest.raises(msgspec.DecodeError) as e:
        decode_reply(body)
    assert message in str(e.value)


# ---- step references ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("42.0", (42, 0)), ("42", (42, 0)), ("42.7", (42, 7)), ("0.0", (0, 0)), ("100000000.4294967279", (100000000, 4294967279))],
)
def test_parse_step_ref(text, expected):
    assert parse_step_ref(text) == expected


@pytest.mark.parametrize("text", ["", ".", ".5", "abc", "42.x", "x.1", "1.2.3", "0x10.0", "4e2.0", "42,0"])
def test_parse_step_ref_rejects_non_refs(text):
    with pytest.raises(ValueError) as e:
        parse_step_ref(text)
    assert str(e.value) == f"{text!r} is not a step reference: expected JOB.STEP, e.g. 42.0"


@pytest.mark.parametrize("text", ["-1.0", "-1", "1.-1", "-5.-5"])
def test_parse_step_ref_rejects_negative_ids(text):
    with pytest.raises(ValueError, match="is not a step reference: expected JOB.STEP"):
        parse_step_ref(text)


@pytest.mark.parametrize("text", ["1_000.0", "+42.1", "42.-0", "42.", "42 .0", "\u0664\u0662.0"])
def test_parse_step_ref_rejects_int_quirks(text):
    with pytest.raises(ValueError):
        parse_step_ref(text)


# ---- JSON nesting (issue 14.5) ----------------------------------------------------------------


@pytest.mark.parametrize("text, deep", [
    ("[" * 64 + "]" * 64, False),
    ("[" * 65 + "]" * 65, True),
    ('{"a":' * 65 + "1" + "}" * 65, True),
    ("[]" * 10_000, False),  # many brackets, none deep
    ('["' + "[" * 1000 + '"]', False),  # brackets in a string are text
    ('["\\"' + "[" * 1000 + '"]', False),  # even after an escaped quote
    ('["\\\\"' + ",[" * 65 + "]" * 66, True),  # an escaped backslash ends no string
    ("[" * 100_000, True),  # unbalanced: still refused before a parser sees it
])
def test_json_nesting_is_measured_without_recursion(text, deep):
    assert protocol.json_too_deep(text) is deep
    assert protocol.json_too_deep(text.encode()) is deep


@pytest.mark.parametrize("depth", [65, 100_000])
def test_a_request_nested_too_deep_is_refused_before_it_is_decoded(depth):
    body = b'{"v":1,"op":"run","bundle":"/b","args":["x"],"env":' + b'{"a":' * depth + b"1" + b"}" * (depth + 1)
    with pytest.raises(ProtocolError, match="^malformed request: the request nests arrays and objects more than 64 "
                                            "levels deep$"):
        decode_request(body)


def test_ordinary_nesting_decodes():
    assert decode_request(req(op="run", bundle="/b", args=["x"], config_json=json.dumps({"a": [[[[{}]]]]}))).args == ["x"]
