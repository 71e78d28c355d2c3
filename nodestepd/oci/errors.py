"""Where nodestep-oci's errors go: the engine's --log file (JSON lines with --log-format
json, as runc's logrus writes them), else stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class OciError(Exception):
    """A failure reported to the engine (log file or stderr), exit status 1."""


def log_line(log_format: str, message: str, now: float | None = None) -> str:
    """One error line as the engines read it: logrus's JSON or text form."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    if log_format == "json":
        return json.dumps({"level": "error", "msg": message, "time": stamp}) + "\n"
    return f"time=\"{stamp}\" level=error msg={json.dumps(message)}\n"


def report(args: argparse.Namespace | None, message: str) -> None:
    """Tell the engine what failed: the --log file (JSON lines with --log-format json), else stderr."""
    log = getattr(args, "log", None)
    fmt = getattr(args, "log_format", "text")
    if log:
        try:
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, log_line(fmt, message).encode())
            finally:
                os.close(fd)
            if fmt == "json":
                return
        except OSError as e:
            print(f"nodestep-oci: cannot write to --log {log}: {e.strerror}", file=sys.stderr)
    print(f"nodestep-oci: {message}", file=sys.stderr, flush=True)
