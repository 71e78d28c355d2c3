"""`nodestepctl`: the command-line client of nodestepd.

main() builds the parser of the subcommand named (parser.py), runs the subcommand (run.py,
commands.py) and turns its errors into nodestepctl's exit statuses (exits.py). Those that
need the daemon talk to it through transport.py, synchronously, one request per
connection. Besides these modules, run, signal, cancel and wait load the standard library
and nodestepd.protocol.wire only, no msgspec or asyncio: the client's start-up time is
part of every launch (tests/unit/ctl/test_main.py checks it). They do without argparse,
json, re, enum, socket.py and signal.py too: parser.fast_parse() reads their usual command
lines, and argparse only the others (--help, mistakes, the other subcommands).
`nodestepctl` itself is a script setup.py writes, which starts Python without `site`
(-S) and calls entry() below (docs/benchmarks/README.md says what that saves).
"""

from __future__ import annotations

import _signal  # signal's C half: signal.py builds its enums at import
import posix  # os's C half (nodestepd/ctl/__init__.py says why)
import sys

from nodestepd.ctl import commands
from nodestepd.ctl.exits import EXIT_ERROR, ClientError
from nodestepd.ctl.parser import build_parser, fast_parse, named_subcommand
from nodestepd.ctl.run import cmd_run
from nodestepd.protocol.wire import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

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
    args = fast_parse(argv)
    if args is None:
        _site()
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
        posix.dup2(posix.open("/dev/null", posix.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 128 + _signal.SIGINT


def _site() -> None:
    """What the program's Python skipped (-S), for the commands off a launch's path: doctor
    and check-config load the daemon's side, whose dependencies may be anywhere site looks."""
    if "site" not in sys.modules:
        import site

        site.main()


def entry() -> None:
    """The `nodestepctl` program: main(), then a quick exit.

    Once the output is flushed nothing is left to do that the kernel does not do itself
    (the client holds no temporary files, threads or atexit work), so _exit skips the
    interpreter's teardown, about a millisecond. If flushing fails (a closed pipe), the
    ordinary exit reports it, as it always has.
    """
    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        sys.exit(status)
    posix._exit(status)


if __name__ == "__main__":
    sys.exit(main())
