"""`nodestepctl`: the command-line client of nodestepd.

main() builds the parser of the subcommand named (parser.py), runs the subcommand (run.py,
commands.py) and turns its errors into nodestepctl's exit statuses (exits.py). Those that
need the daemon talk to it through transport.py, synchronously, one request per
connection. Besides these modules, run, signal, cancel and wait load the standard library
and nodestepd.protocol.wire only, no msgspec or asyncio: the client's start-up time is
part of every launch (tests/unit/ctl/test_main.py checks it).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from nodestepd.ctl import commands
from nodestepd.ctl.exits import EXIT_ERROR, ClientError
from nodestepd.ctl.parser import build_parser, named_subcommand
from nodestepd.ctl.run import cmd_run
from nodestepd.protocol.wire import ProtocolError

# What each subcommand of parser.SUBCOMMANDS does: its exit status, or a ClientError.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "ps": commands.cmd_ps,
    "signal": commands.cmd_signal,
    "cancel": commands.cmd_cancel,
    "wait": commands.cmd_wait,
    "job-end": commands.cmd_job_end,
    "status": commands.cmd_status,
    "image": commands.cmd_image,
    "reload": commands.cmd_reload,
    "check-config": commands.cmd_check_config,
    "doctor": commands.cmd_doctor,
    "completion": commands.cmd_completion,
}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(only=named_subcommand(argv)).parse_args(argv)
    try:
        return COMMANDS[args.subcommand](args)
    except ClientError as e:
        print(f"nodestepctl: {e}", file=sys.stderr)
        return e.status
    except ProtocolError as e:
        print(f"nodestepctl: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as coreutils do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
