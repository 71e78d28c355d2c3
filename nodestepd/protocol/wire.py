"""Framing of the nodestepd protocol, standard library only.

A message is a 4-byte big-endian length, then that many bytes of a UTF-8 JSON object.
The client imports only this module (not msgspec) so that `nodestepctl` starts fast:
its start-up time is part of every launch.
"""

from __future__ import annotations

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
