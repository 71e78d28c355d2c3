"""`nodestep-oci`: create, start, state, kill, delete, features, --version, as runc's.

Every flag podman 4 and docker 20.10 pass is accepted (those that mean nothing here are
ignored: --root, --systemd-cgroup, --no-pivot, --no-new-keyring...). Errors go where the
engine reads them: with `--log-format json`, as JSON lines {"level", "msg", "time"} in the
--log file; otherwise on stderr (and in the --log file as a text line, when given). An
unknown container id is reported as "container ID does not exist": podman maps that
phrase to "no such container".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from nodestepd import __version__
from nodestepd.ctl.exits import ClientError
from nodestepd.ctl.transport import connect, expect, receive, send
from nodestepd.oci.errors import OciError, report
from nodestepd.protocol import wire

OCI_VERSION = "1.0.2"
DEFAULT_SOCKET = "/run/nodestepd/nodestepd.sock"
SOCKET_ENV = "NODESTEPD_SOCKET"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise OciError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nodestep-oci", description=(
        "An OCI runtime for podman and docker that runs each container as a nodestepd step, "
        "through the site's oci.conf (docs/oci-proxy.md)."))
    p.add_argument("--version", "-v", action="store_true", help="print the version and exit")
    p.add_argument("--socket", default=os.environ.get(SOCKET_ENV, DEFAULT_SOCKET),
                   help=f"nodestepd's socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})")
    p.add_argument("--root", help="accepted for runc compatibility; the daemon keeps the state")
    p.add_argument("--log", help="file for error messages (the engine reads it)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="format of --log")
    p.add_argument("--systemd-cgroup", action="store_true", help="accepted and ignored")
    p.add_argument("--debug", action="store_true", help="accepted and ignored")
    p.add_argument("--rootless", help="accepted and ignored")
    p.add_argument("--criu", help="accepted and ignored")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    c = sub.add_parser("create", help="create a container (prepared as a nodestepd step, not started)")
    c.add_argument("--bundle", "-b", default=".", help="the bundle directory (default: the current one)")
    c.add_argument("--pid-file", help="where the anchor's pid is written (no trailing newline)")
    c.add_argument("--console-socket", help="AF_UNIX socket the pty master is sent to (process.terminal)")
    c.add_argument("--no-pivot", action="store_true", help="accepted and ignored")
    c.add_argument("--no-new-keyring", action="store_true", help="accepted and ignored")
    c.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                   help=f"pass fds 3 .. 3+N-1 into the container (N at most {wire.MAX_PRESERVE_FDS}; "
                        "the site's runtime must be runc or crun)")
    c.add_argument("id")
    s = sub.add_parser("start", help="start a created container")
    s.add_argument("id")
    st = sub.add_parser("state", help="print the container's OCI state as JSON")
    st.add_argument("id")
    k = sub.add_parser("kill", help="send a signal (name or number, default SIGTERM) to the container")
    k.add_argument("--all", "-a", action="store_true", help="accepted: the signal goes to the whole container")
    k.add_argument("id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    d = sub.add_parser("delete", help="delete the container, killing it if it runs")
    d.add_argument("--force", "-f", action="store_true", help="accepted: every delete kills a running container")
    d.add_argument("id")
    sub.add_parser("features", help="print the runtime's features as JSON")
    return p


def parse_signal(text: str) -> int:
    """A signal as runc takes it: a number, or a name with or without SIG (any case)."""
    word = text.strip().upper()
    try:
        if word.isdigit():
            return signal.Signals(int(word)).value
        return signal.Signals[word if word.startswith("SIG") else "SIG" + word].value
    except (KeyError, ValueError):
        raise OciError(f"unknown signal {text!r}") from None


def features() -> dict:
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": [],
        "mountOptions": [],
        "linux": {},
        "annotations": {"org.nodestepd.proxy": "true"},
    }


def state_json(reply: dict) -> dict:
    """The OCI state of a daemon's `oci-state` reply."""
    return {
        "ociVersion": OCI_VERSION,
        "id": reply["id"],
        "status": reply["status"],
        "pid": reply["pid"],
        "bundle": reply["bundle"],
        "annotations": reply.get("annotations") or {},
    }


def _ask(args: argparse.Namespace, message: dict, kind: str) -> dict:
    with connect(args.socket) as sock:
        send(sock, message)
        return expect(receive(sock), kind)


def run(argv: list[str]) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            print(f"nodestep-oci version {__version__}\nspec: {OCI_VERSION}")
            return 0
        if args.command is None:
            raise OciError("no command given (create, start, state, kill, delete, features)")
        if args.command == "features":
            print(json.dumps(features(), indent=2))
            return 0
        if args.command == "create":
            from nodestepd.oci.anchor import create
            return create(args)
        if args.command == "start":
            _ask(args, {"op": "oci-start", "id": args.id}, "ok")
        elif args.command == "state":
            print(json.dumps(state_json(_ask(args, {"op": "oci-state", "id": args.id}, "oci-state")), indent=2))
        elif args.command == "kill":
            signum = parse_signal(args.signal)
            _ask(args, {"op": "oci-kill", "id": args.id, "signal": str(signum)}, "ok")
        elif args.command == "delete":
            _ask(args, {"op": "oci-delete", "id": args.id}, "ok")
        return 0
    except (OciError, ClientError) as e:
        report(args if args is not None else _globals_of(argv), str(e))
        return 1


def _globals_of(argv: list[str]) -> argparse.Namespace:
    """--log and --log-format of a command line that did not parse: where its error goes."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--log")
    p.add_argument("--log-format", default="text")
    known, _ = p.parse_known_args(argv)
    return known


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
