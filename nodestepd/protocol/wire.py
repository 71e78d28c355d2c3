"""Framing of the nodestepd protocol, standard library only.

A message is a 4-byte big-endian length, then that many bytes of a UTF-8 JSON object.
The client imports only this module (not msgspec) so that `nodestepctl` starts fast:
its start-up time is part of every launch. For the same reason it imports nothing at
the top beyond what the interpreter has already loaded: json, re and struct (with enum,
functools, collections...) cost the client several milliseconds, so the framing is done
with int.to_bytes and the JSON with the json package's own C codec (_json), which is
what json.dumps and json.loads use themselves, byte for byte; json itself is imported
only to report a malformed message (its error text) or for what the C codec cannot do.
"""

from __future__ import annotations

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes of JSON in one message
MAX_PRESERVE_FDS = 8  # fds a launch may pass into its containers besides stdio (run --preserve-fds)
MAX_FDS = 3 + MAX_PRESERVE_FDS  # stdin, stdout, stderr of a launch, then its preserved fds
HEADER_SIZE = 4  # the length in front of each message: HEADER.size


def __getattr__(name: str):
    # HEADER, the struct.Struct(">I") of the length, made on first use: struct is not
    # loaded on the client's path.
    if name == "HEADER":
        import struct

        globals()["HEADER"] = header = struct.Struct(">I")
        return header
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def frame_dict(message: dict) -> bytes:
    return frame_body(dumps(message).encode())


def frame_length(header: bytes, limit: int = MAX_MESSAGE) -> int:
    if len(header) != HEADER_SIZE:
        raise ProtocolError(f"a message header is {HEADER_SIZE} bytes, not {len(header)}")
    length = int.from_bytes(header, "big")
    if length > limit:
        raise ProtocolError(f"message of {length} bytes is larger than the limit of {limit}")
    return length


def dumps(value: object) -> str:
    """json.dumps(value, ensure_ascii=False, separators=(",", ":")), the same text, without
    importing json: its C encoder, set up as json.dumps sets it up."""
    global _encode
    if _encode is None:
        import _json

        _encode = _json.make_encoder({}, _not_serializable, _json.encode_basestring, None, ":", ",",
                                     False, False, True)
    return "".join(_encode(value, 0))


def loads(data: bytes) -> object:
    """json.loads(data): the same value, or the same ValueError (json.JSONDecodeError).

    A UTF-8 JSON text without surrounding white space (all that nodestepd and msgspec
    write) goes to json's C scanner directly; anything else, including every malformed
    text, goes through json.loads itself, which then says what is wrong."""
    global _scan
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and text[0] not in _JSON_SPACE and text[-1] not in _JSON_SPACE:
        if _scan is None:
            import _json

            _scan = _json.make_scanner(_ScannerContext())
        try:
            value, end = _scan(text, 0)
        except (StopIteration, ValueError):
            pass
        else:
            if end == len(text):
                return value
    import json

    return json.loads(data)


def _not_serializable(value: object) -> object:
    raise TypeError(f"Object of type {value.__class__.__name__} is not JSON serializable")


class _ScannerContext:
    """What _json.make_scanner reads from a json.JSONDecoder() made with no arguments."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity: what json makes of them


_JSON_SPACE = " \t\n\r"
_encode = None
_scan = None


def parse_step_ref(text: str) -> tuple[int, int]:
    """'JOB.STEP' (or 'JOB', meaning step 0) as the client and logs write it: ASCII digits."""
    job, dot, step = text.partition(".")
    if not (_digits(job) and (_digits(step) or not dot)):
        raise ValueError(f"{text!r} is not a step reference: expected JOB.STEP, e.g. 42.0")
    return int(job), int(step or "0")


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


# ---- JSON nesting -------------------------------------------------------------------------

# How deep user-supplied JSON may nest (requests, a bundle's config.json, a runtime's
# state). JSON parsers recurse once per level: Python's json and msgspec raise
# RecursionError near 1000 levels, which must not be the daemon's only guard. OCI configs
# nest about 6 levels (linux.seccomp.syscalls[].args[]); 64 is far beyond any real one.
MAX_JSON_DEPTH = 64

_KEPT = b'[]{}"'
_NOT_KEPT = bytes(range(256)).translate(None, _KEPT)
# By the bytes that are kept (literals, not loops over 256: wire is on the client's start-up):
_DEPTH_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1, ord('"'): 0}
_QUOTE = {ord("["): 0, ord("{"): 0, ord("]"): 0, ord("}"): 0, ord('"'): 1}
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
    import itertools
    import operator

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


def read_bundle_config(bundle: str) -> tuple[str | None, str | None]:
    """A bundle's config.json as the client sends it (`config_json`): (text, None), or
    (None, why not). Read with the caller's own rights: the daemon never opens it as root."""
    path = bundle.rstrip("/") + "/config.json"  # as os.path.join, without importing os
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MESSAGE // 2 + 1)
    except OSError as e:
        return None, e.strerror or str(e)
    if len(data) > MAX_MESSAGE // 2:
        return None, f"larger than {MAX_MESSAGE // 2} bytes"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 ({e.reason} at byte {e.start})"
