"""Refusals: a request the daemon will not carry out becomes an error reply with a code."""

from __future__ import annotations


class Refused(Exception):
    """A request the daemon will not carry out; becomes an error reply with this code
    (bad-request, not-found, permission-denied, launch-failed, conflict, reload-failed, limit)."""

    def __init__(self, code: str, message: str, **detail: object) -> None:
        super().__init__(message)
        self.code = code
        self.detail = detail  # for the log only, never the reply (e.g. whose step it really was)


class BadRequest(Refused):
    """A request that is well-formed JSON but asks for something invalid."""

    def __init__(self, message: str) -> None:
        super().__init__("bad-request", message)
