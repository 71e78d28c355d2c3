"""nodestepctl's entry point (nodestepd/ctl/main.py): every subcommand dispatched, errors
turned into exit statuses, and what a launch's start-up loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import NODESTEPCTL
from fakedaemon import fake_daemon  # noqa: F401 - a fixture
from nodestepd.ctl import main as ctl_main
from nodestepd.ctl.exits import ClientError
from nodestepd.ctl.parser import SUBCOMMANDS
from nodestepd.protocol.wire import ProtocolError


def test_every_subcommand_has_a_command():
    assert list(ctl_main.COMMANDS) == list(SUBCOMMANDS)


def failing(error: BaseException):
    def command(args):
        raise error
    return command


@pytest.mark.parametrize("error, status, said", [
    (ClientError("no step 4.0"), 1, "nodestepctl: no step 4.0\n"),
    (ClientError("bad option", 2), 2, "nodestepctl: bad option\n"),
    (ClientError("step lost", 255), 255, "nodestepctl: step lost\n"),
    (ProtocolError("malformed reply from nodestepd: no type"), 1, "nodestepctl: malformed reply from nodestepd: no type\n"),
    (KeyboardInterrupt(), 130, ""),  # as a shell reports a command killed by SIGINT
])
def test_errors_become_exit_statuses(monkeypatch, capsys, error, status, said):
    monkeypatch.setitem(ctl_main.COMMANDS, "status", failing(error))
    assert ctl_main.main(["status"]) == status
    assert capsys.readouterr() == ("", said)


def test_the_subcommand_gets_the_parsed_command_line(monkeypatch):
    got = []
    monkeypatch.setitem(ctl_main.COMMANDS, "wait", lambda args: got.append(args) or 9)
    assert ctl_main.main(["--socket", "/s", "wait", "4.2"]) == 9
    assert (got[0].subcommand, got[0].socket, got[0].step) == ("wait", "/s", "4.2")


def test_only_the_named_subcommands_parser_is_built(monkeypatch):
    built = []
    real = ctl_main.build_parser

    def build_parser(only=None):
        built.append(only)
        return real(only=only)

    monkeypatch.setattr(ctl_main, "build_parser", build_parser)
    monkeypatch.setitem(ctl_main.COMMANDS, "ps", lambda args: 0)
    assert ctl_main.main(["--socket", "/s", "ps"]) == 0
    assert built == ["ps"]


def test_a_usage_error_exits_2_from_argparse(capsys):
    with pytest.raises(SystemExit) as e:
        ctl_main.main(["wait"])
    assert e.value.code == 2
    assert "nodestepctl wait: error: the following arguments are required: JOB.STEP" in capsys.readouterr().err


def test_output_into_a_closed_pipe_ends_quietly(fake_daemon):
    """`nodestepctl ps | head -1`: once head is gone, no traceback, no "Exception ignored"."""
    steps = [{"job_id": i, "step_id": 0, "user": "alice", "state": "running", "status": None, "args": ["x" * 100],
              "started_at": 0, "tasks": []} for i in range(2000)]  # more than the pipe and stdout's buffer take

    def serve(peer):
        peer.read()
        peer.write({"type": "steps", "steps": steps})

    daemon = fake_daemon(serve)
    r, w = os.pipe()
    os.close(r)
    try:
        result = subprocess.run([str(NODESTEPCTL), "--socket", daemon.path, "ps"], stdout=w, stderr=subprocess.PIPE,
                                timeout=30)
    finally:
        os.close(w)
    daemon.stop()
    assert (result.returncode, result.stderr) == (1, b"")


# ---- start-up -----------------------------------------------------------------------------------

# What the commands on a launch's path may load of nodestepd: the client and the framing.
CLIENT_MODULES = {
    "nodestepd", "nodestepd.ctl", "nodestepd.ctl.main", "nodestepd.ctl.parser", "nodestepd.ctl.exits",
    "nodestepd.ctl.transport", "nodestepd.ctl.run", "nodestepd.ctl.commands", "nodestepd.protocol",
    "nodestepd.protocol.wire",
}
LOADED = textwrap.dedent("""
    import json, sys
    before = set(sys.modules)
    from nodestepd.ctl.main import main
    status = main(sys.argv[1:])
    loaded = set(sys.modules) - before
    print(json.dumps({"status": status, "loaded": sorted(loaded), "stdlib": sorted(sys.stdlib_module_names)}),
          file=sys.stderr)
""")


@pytest.mark.parametrize("argv", [
    ["run", "--bundle", "/", "--", "true"],
    ["run", "--detach", "--bundle", "/", "--", "true"],
    ["signal", "4.0", "USR1"],
    ["cancel", "4.0"],
    ["wait", "4.0"],
    ["ps"],
])
def test_a_launch_path_loads_the_client_and_the_standard_library_only(tmp_path, argv):
    """No msgspec, asyncio, structlog, nor any daemon module: start-up time is part of every launch."""
    result = subprocess.run([sys.executable, "-c", LOADED, "--socket", str(tmp_path / "none.sock"), *argv],
                            capture_output=True, text=True, cwd=tmp_path, timeout=30)
    report = json.loads(result.stderr.splitlines()[-1])
    assert report["status"] == 1  # no daemon: failed fast, after everything was imported
    ours = {m for m in report["loaded"] if m.split(".")[0] == "nodestepd"}
    assert ours == CLIENT_MODULES
    others = {m.split(".")[0] for m in report["loaded"]} - {"nodestepd"}
    assert others - set(report["stdlib"]) == set()
    assert "asyncio" not in others
    assert "shutil" not in others  # argparse's help width, found without it (parser.HelpFormatter)
