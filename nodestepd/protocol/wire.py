"""Framing of the nodestepd protocol, standard library only.

A message is a 4-byte big-endian length, then that many bytes of a UTF-8 JSON object.
The client imports only this module (not msgspec) so that `nodestepctl` starts fast:
its start-up time is part of every launch.
"""

from __future__ import annotations

import itertools
import json
import re
import struct

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes of JSON in one message
MAX_FDS = 3  # stdin, stdout, stderr of a launch
HEADER = struct.Struct(">I")

# Exit status conventions shared by the daemon and the client.
STATUS_LAUNCH_FAILED = 125  # the step could not start (as docker/podman run do)
STATUS_CONNECTION_LOST = 255
# The step ended, but no task failed that we know of and some task's status is not known
# (it ended while no daemon watched it, with no record left): the same "we cannot tell
# how it ended" as a lost connection, said on stderr.
STATUS_UNKNOWN = 255


class ProtocolError(Exception):
    """A message that cannot be decoded; the text is safe to send back to the peer."""


def frame_body(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def frame_dict(message: dict) -> bytes:
    return frame_body(json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode())


def frame_length(header: bytes, limit: int = MAX_MESSAGE) -> int:
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"message of {length} bytes is larger than the limit of {limit}")
    return length


def parse_step_ref(text: str) -> tuple[int, int]:
    """'JOB.STEP' (or 'JOB', meaning step 0) as the client and logs write it."""
    match = _STEP_REF.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a step reference: expected JOB.STEP, e.g. 42.0")
    return int(match.group(1)), int(match.group(2) or "0")


_STEP_REF = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)


# ---- JSON nesting -------------------------------------------------------------------------

# How deep user-supplied JSON may nest (requests, a bundle's config.json, a runtime's
# state). JSON parsers recurse once per level: Python's json and msgspec raise
# RecursionError near 1000 levels, which must not be the daemon's only guard. OCI configs
# nest about 6 levels (linux.seccomp.syscalls[].args[]); 64 is far beyond any real one.
MAX_JSON_DEPTH = 64

# A JSON string (escapes included), in the unrolled form that matches without
# backtracking; an unterminated one is left for the parser to reject.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 for b in range(256))


def json_too_deep(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the arrays and objects in a JSON text nest more than `limit` deep, found
    without recursing.

    Linear, at C speed but for one step per bracket: strings are cut out first (their
    brackets are text), then everything but brackets. Only meant to refuse before a
    parser recurses; the parser still judges whether the text is JSON at all.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case, e.g. every request but a run's: too few brackets to nest that deep
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > limit


def check_json_depth(data: bytes | str, what: str) -> None:
    """ProtocolError (naming `what`) when data nests deeper than MAX_JSON_DEPTH."""
    if json_too_deep(data):
        raise ProtocolError(f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
