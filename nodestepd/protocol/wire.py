"""Framing of the nodestepd protocol, standard library only.

A message is a 4-byte big-endian length, then that many bytes of a UTF-8 JSON object.
The client imports only this module (not msgspec) so that `nodestepctl` starts fast:
its start-up time is part of every launch.
"""

from __future__ import annotations

import itertools
import json
import operator
import re
import struct

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes of JSON in one message
MAX_PRESERVE_FDS = 8  # fds a launch may pass into its containers besides stdio (run --preserve-fds)
MAX_FDS = 3 + MAX_PRESERVE_FDS  # stdin, stdout, stderr of a launch, then its preserved fds
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

_KEPT = b'[]{}"'
_NOT_KEPT = bytes(b for b in range(256) if b not in _KEPT)
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))
_QUOTE = tuple(1 if b == ord('"') else 0 for b in range(256))
_OUTSIDE = (1, 0)  # by the count of quotes so far, mod 2


def json_too_deep(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the arrays and objects in a JSON text nest more than `limit` deep, found
    without recursing.

    Linear, in C-level bytes operations and iterators, nothing allocated per element (a
    regular expression's or a split's pieces left megabytes of fragments in the heap):
    escapes removed (backslash pairs first, so that what is left of an escaped quote is
    one), then everything but brackets and quotes, then empty strings (two quotes in a row
    change no other byte's side of the quotes). Brackets between quotes are text. About
    60 ms for 1 MiB of brackets, 150 ms when they alternate with quoted brackets. Only
    meant to refuse before a parser recurses; the parser still judges the text.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # the common case, e.g. every request but a run's: too few brackets to nest that deep
    kept = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_KEPT).replace(b'""', b"")
    steps = map(_DEPTH_STEP.__getitem__, kept)
    if b'"' in kept:  # brackets inside strings count for nothing
        outside = map(_OUTSIDE.__getitem__, itertools.accumulate(map(_QUOTE.__getitem__, kept), operator.xor))
        steps = map(operator.mul, steps, outside)
    return max(itertools.accumulate(steps), default=0) > limit


def check_json_depth(data: bytes | str, what: str) -> None:
    """ProtocolError (naming `what`) when data nests deeper than MAX_JSON_DEPTH."""
    if json_too_deep(data):
        raise ProtocolError(f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
