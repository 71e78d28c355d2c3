"""The protocol between clients and the daemon (docs/protocol.md): wire.py frames messages
with the standard library alone (the client's side, for a fast start); messages.py types
them as msgspec structs (the daemon's side, validated in one pass)."""
