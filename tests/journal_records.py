"""Reading journald's native protocol in the tests, independently of the daemon's encoder."""

from __future__ import annotations

import struct


def decode_record(data: bytes) -> list[tuple[str, bytes]]:
    """The fields of one native-protocol record, in order, decoded as journald does on receipt
    (written here from the protocol's description, not with the daemon's encoder)."""
    fields: list[tuple[str, bytes]] = []
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields.append((name.decode(), value))
            i = end + 1
        else:
            (length,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start:start + length]
            if data[start + length:start + length + 1] != b"\n":
                raise ValueError(f"field {line!r}: binary value not followed by a newline")
            fields.append((line.decode(), value))
            i = start + length + 1
    return fields
