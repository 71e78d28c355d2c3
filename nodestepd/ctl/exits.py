"""nodestepctl's exit statuses: its own errors, and a step's status passed on as its own.

run and wait exit with the step's status (125 when it could not start, 255 when the
connection was lost or the status is not known: nodestepd.protocol.wire); every other
failure is a ClientError, one line on stderr and its status.
"""

from __future__ import annotations

import sys

from nodestepd.protocol import wire

EXIT_ERROR = 1
EXIT_USAGE = 2


class ClientError(Exception):
    """A failure nodestepctl reports in one line on stderr, exiting with `status`."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def step_exit_status(reply: dict) -> int:
    """The status of an `exit` reply; when the daemon could not know it, say so and give STATUS_UNKNOWN."""
    if reply["status"] is not None:
        return reply["status"]
    unknown = [str(t["task_id"]) for t in reply.get("tasks", []) if t["status"] is None]
    print(f"nodestepctl: step {reply['job_id']}.{reply['step_id']} ended, but the exit status of task(s) "
          f"{', '.join(unknown) or '?'} is not known (nodestepd could not watch their process: the daemon's "
          f"log says why); exiting with {wire.STATUS_UNKNOWN}", file=sys.stderr)
    return wire.STATUS_UNKNOWN
