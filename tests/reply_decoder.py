"""Replies decoded as a client written against the protocol's types would: the tests' own
reader (nodestepctl decodes with the standard library's json; the daemon only encodes)."""

from __future__ import annotations

import msgspec

from nodestepd.protocol.messages import AnyReply

_decoder = msgspec.json.Decoder(AnyReply)


def decode_reply(body: bytes) -> AnyReply:
    """Raises msgspec.DecodeError (or ValidationError) for a body that is not a reply."""
    return _decoder.decode(body)
