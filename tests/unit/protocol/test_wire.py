"""The client's side of the framing (nodestepd/protocol/wire.py): its JSON is json's, byte for
byte and value for value, without importing json; step references; the length header."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nodestepd.protocol import wire

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(JSON)
def test_dumps_is_json_dumps_as_the_protocol_uses_it(value):
    assert wire.dumps(value) == json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def test_dumps_refuses_what_json_refuses():
    with pytest.raises(TypeError, match="Object of type bytes is not JSON serializable"):
        wire.dumps({"a": b"x"})


def same(a: object, b: object) -> bool:
    return repr(a) == repr(b)  # nan is nan


@settings(max_examples=500, deadline=None)
@given(JSON)
def test_loads_reads_what_json_writes(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False, separators=(",", ":"))):
        assert same(wire.loads(text.encode("utf-8", "surrogatepass")), json.loads(text.encode("utf-8", "surrogatepass")))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=12) | st.text(alphabet='{}[]":,0123456789.eE+-ntrufalsNIy\\ \n', max_size=12).map(str.encode))
@example(b"")
@example(b' {"a": 1} ')
@example(b'{"a":1}x')
@example(b"\xef\xbb\xbf{}")  # a BOM
@example('"\ud800"'.encode("utf-8", "surrogatepass"))
@example(b'"\x01"')
def test_loads_gives_json_loads_value_or_error(data):
    try:
        expected = json.loads(data)
    except ValueError as e:
        with pytest.raises(type(e)) as got:
            wire.loads(data)
        assert str(got.value) == str(e)
    else:
        assert same(wire.loads(data), expected)


STEP_REF = re.compile(r"([0-9]+)(?:\.([0-9]+))?", re.ASCII)  # what parse_step_ref accepted before


@given(st.text(alphabet="0123456789.²٣a \n", max_size=8))
@example("4\n")
def test_a_step_reference_is_digits_and_an_optional_dot_and_digits(text):
    match = STEP_REF.fullmatch(text)
    if match is None:
        with pytest.raises(ValueError, match="is not a step reference"):
            wire.parse_step_ref(text)
    else:
        assert wire.parse_step_ref(text) == (int(match.group(1)), int(match.group(2) or "0"))


def test_the_header_is_a_big_endian_length():
    assert isinstance(wire.HEADER, struct.Struct) and wire.HEADER.format == ">I"
    assert wire.HEADER.size == wire.HEADER_SIZE
    assert wire.frame_body(b"abc") == wire.HEADER.pack(3) + b"abc"
    assert wire.frame_length(wire.HEADER.pack(70000), limit=70000) == 70000
    with pytest.raises(wire.ProtocolError, match="larger than the limit"):
        wire.frame_length(wire.HEADER.pack(70001), limit=70000)


def test_the_client_side_imports_nothing_the_interpreter_has_not_loaded():
    """json, re, struct, enum... are what the client's start-up saves: none is loaded by wire."""
    code = ("import sys; before = set(sys.modules); from nodestepd.protocol import wire; "
            "wire.loads(wire.frame_dict({'a': [1, 'é']})[4:]); wire.parse_step_ref('4.2'); "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {sys.path!r}; {code}"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert set(loaded) <= {"nodestepd", "nodestepd.protocol", "nodestepd.protocol.wire", "_json", "__future__"}


def nesting(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


NESTED = st.recursive(st.text(alphabet='[]{}"\\ a', max_size=4) | st.integers(),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text('[]{}"\\', max_size=3), inner,
                                                                                   max_size=3), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(NESTED, st.integers(0, 4))
def test_json_too_deep_counts_the_nesting_of_arrays_and_objects_only(value, limit):
    text = json.dumps(value)
    assert wire.json_too_deep(text, limit) == (nesting(value) > limit)
    assert wire.json_too_deep(text.encode(), limit) == (nesting(value) > limit)
