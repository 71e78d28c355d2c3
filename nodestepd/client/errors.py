"""The client's exceptions: one class per refusal code of the protocol, and the failures
of the connection itself.

Every error reply of the daemon (docs/protocol.md, "Replies") becomes the subclass of
Refused named for its code, carrying the daemon's sentence, its code and the exit status
it gives (125 for a launch that did not start). A code this client does not know becomes
a plain Refused, so that a newer daemon's refusal is still an exception with its text.
"""

from __future__ import annotations

from typing import Any


class NodestepdError(Exception):
    """Base of every exception the client raises on purpose."""


class DaemonUnavailable(NodestepdError):
    """No nodestepd serves the socket (none there, nobody listening, not ours to connect
    to), or one that went away did not come back within the client's reattach_timeout."""


class ConnectionLost(NodestepdError):
    """The daemon closed the connection at a point the client cannot ride through: before
    it acknowledged a launch that nobody can name again (no job id given, or detached), or
    in the middle of a request's answer."""


class ProtocolError(NodestepdError):
    """A reply that is not a valid message of the protocol."""


class StatusUnknown(NodestepdError):
    """The step ended while nodestepd restarted, and the next nodestepd does not know it:
    its exit status cannot be told."""


class Refused(NodestepdError):
    """An error reply: the daemon will not (or could not) do what was asked.

    code: the protocol's refusal code (`not-found`, `limit`, ...); status: the exit status
    the daemon gives with it (125 for a launch that did not start), or None."""

    code = "error"

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.status = status


class BadRequest(Refused, ValueError):
    """`bad-request`: the request asks for something invalid (also raised before anything
    is sent, for arguments this client can tell are wrong)."""

    code = "bad-request"


class NotFound(Refused):
    """`not-found`: no such step of yours (another user's step is reported exactly so), or
    it has already finished (signal, cancel)."""

    code = "not-found"


class PermissionDenied(Refused):
    """`permission-denied`: an operator's request from someone who is not one."""

    code = "permission-denied"


class LaunchFailed(Refused):
    """`launch-failed`: the step could not start (the runtime failed, stage-in failed, an
    output file could not be opened, the image could not be imported...)."""

    code = "launch-failed"


class Conflict(Refused):
    """`conflict`: the step (or one of its task ids) already runs, or a launch cannot be
    attached to (launched detached, or it already has its client)."""

    code = "conflict"


class Ambiguous(Refused):
    """`ambiguous`: an operator named a job.step that several users have; name the user."""

    code = "ambiguous"


class ReloadFailed(Refused):
    """`reload-failed`: the new configuration was rejected and the old one stays."""

    code = "reload-failed"


class LimitExceeded(Refused):
    """`limit`: over one of the daemon's limits (steps on the node or per user, the size
    of the command or environment, mounts)."""

    code = "limit"


class Busy(Refused):
    """`busy`: over the daemon's connection limits (max_connections, per user); try again later."""

    code = "busy"


class Timeout(Refused):
    """`timeout`: the daemon gave up on the connection (client_timeout, connection_max_lifetime)."""

    code = "timeout"


REFUSALS: dict[str, type[Refused]] = {cls.code: cls for cls in (
    BadRequest, NotFound, PermissionDenied, LaunchFailed, Conflict, Ambiguous, ReloadFailed, LimitExceeded, Busy,
    Timeout)}


def refusal(reply: dict[str, Any]) -> Refused:
    """The exception for an `error` reply."""
    code = reply.get("code")
    code = code if isinstance(code, str) else "error"
    message = reply.get("error")
    status = reply.get("status")
    return REFUSALS.get(code, Refused)(message if isinstance(message, str) and message else f"nodestepd refused: {code}",
                                       code, status if isinstance(status, int) else None)


def socket_unavailable(path: str, error: OSError) -> DaemonUnavailable:
    """What a failed connect() means for the user."""
    if isinstance(error, FileNotFoundError):
        return DaemonUnavailable(f"nodestepd is not running: no socket at {path}")
    if isinstance(error, ConnectionRefusedError):
        return DaemonUnavailable(f"nodestepd is not running: nobody listens on {path}")
    if isinstance(error, PermissionError):
        return DaemonUnavailable(f"cannot connect to {path}: permission denied")
    return DaemonUnavailable(f"cannot connect to {path}: {error.strerror or error}")


__all__ = ["NodestepdError", "DaemonUnavailable", "ConnectionLost", "ProtocolError", "StatusUnknown", "Refused",
           "BadRequest", "NotFound", "PermissionDenied", "LaunchFailed", "Conflict", "Ambiguous", "ReloadFailed",
           "LimitExceeded", "Busy", "Timeout", "refusal", "socket_unavailable"]
