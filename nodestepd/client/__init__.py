"""An asyncio API for programs that launch many steps from one process (docs/api.md).

    async with nodestepd.Client() as c:
        step = await c.run("/path/bundle", ["app", "--x"], ntasks=4, stdout=COLLECT)
        ended = await step.wait()

A client like nodestepctl: the same protocol, the same authorisation. Standard library
only (nodestepd.protocol.wire for the framing), so that it imports without the daemon's
dependencies, and it runs on plain asyncio and on uvloop.
"""

from nodestepd.client.client import COLLECT, DEVNULL, PIPE, STDOUT, Client, Mount, Step, signal_name
from nodestepd.client.errors import (
    Ambiguous,
    BadRequest,
    Busy,
    Conflict,
    ConnectionLost,
    DaemonUnavailable,
    LaunchFailed,
    LimitExceeded,
    NodestepdError,
    NotFound,
    PermissionDenied,
    ProtocolError,
    Refused,
    ReloadFailed,
    StatusUnknown,
    Timeout,
)
from nodestepd.client.results import DaemonStatus, StepExit, StepInfo, TaskExit, TaskInfo

__all__ = [
    "Client", "Step", "Mount", "DEVNULL", "PIPE", "COLLECT", "STDOUT", "signal_name",
    "StepExit", "TaskExit", "StepInfo", "TaskInfo", "DaemonStatus",
    "NodestepdError", "DaemonUnavailable", "ConnectionLost", "ProtocolError", "StatusUnknown", "Refused",
    "BadRequest", "NotFound", "PermissionDenied", "LaunchFailed", "Conflict", "Ambiguous", "ReloadFailed",
    "LimitExceeded", "Busy", "Timeout",
]
