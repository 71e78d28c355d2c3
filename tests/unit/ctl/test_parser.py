"""nodestepctl's command line (nodestepd/ctl/parser.py): --help with examples, and the parser
built for one subcommand reading argv exactly as the whole one does."""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

import pytest

from conftest import NODESTEPCTL
from nodestepd.ctl.argparse_walk import subparsers
from nodestepd.ctl.parser import build_parser as ctl_parser
from nodestepd.ctl.parser import HelpFormatter, named_subcommand, remainder, terminal_columns

SUBCOMMANDS = list(subparsers(ctl_parser()))


# ---- --help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(subcommand):
    result = subprocess.run([str(NODESTEPCTL), subcommand, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert re.search(r"^Examples?:\n  nodestepctl " + subcommand, result.stdout, re.M) or \
        f"nodestepctl {subcommand}" in result.stdout.split("Example", 1)[1], result.stdout


def test_the_subcommands_are_the_expected_ones():
    assert SUBCOMMANDS == ["run", "ps", "signal", "cancel", "wait", "job-end", "status", "image", "reload", "check-config", "doctor",
                           "completion"]


def test_reload_help_names_every_setting_that_needs_a_restart():
    from nodestepd.daemon.service import RESTART_ONLY

    description = " ".join(subparsers(ctl_parser())["reload"].description.split())
    missing = [name for name in RESTART_ONLY if name not in description]
    assert missing == [], description


# ---- the parser built for one subcommand -------------------------------------------------------

@pytest.mark.parametrize("argv, named", [
    (["run", "--bundle", "/b", "--", "true"], "run"),
    (["--socket", "/s", "ps", "--json"], "ps"),
    (["--socket=/s", "wait", "4.0"], "wait"),
    (["--socket", "run", "ps"], "ps"),  # "run" is the socket's path here, as argparse reads it
    (["--sock", "/s", "ps"], None),  # an abbreviation: the whole parser decides
    (["--version"], None),
    (["--help"], None),
    (["frobnicate"], None),
    ([], None),
])
def test_named_subcommand_reads_argv_as_argparse_does(argv, named):
    assert named_subcommand(argv) == named


@pytest.mark.parametrize("argv", [
    ["--socket", "/s", "run", "--job-id", "7", "--ntasks", "2", "--env", "A=1", "--detach", "--bundle", "/b", "--",
     "sh", "-c", "echo hi"],
    ["run", "--bundle", "/b", "--export", "NONE", "--", "--not-an-option"],
    ["--socket=/s", "signal", "4.1", "USR1"],
    ["doctor", "--bundle", "/b", "--json", "--", "true"],
])
def test_a_parser_with_only_the_named_subcommand_parses_like_the_whole_one(argv):
    only = named_subcommand(argv)
    assert only is not None
    assert vars(ctl_parser(only=only).parse_args(argv)) == vars(ctl_parser().parse_args(argv))


def test_a_parser_with_only_the_named_subcommand_has_only_that_one():
    assert list(subparsers(ctl_parser(only="wait"))) == ["wait"]


def test_usage_errors_are_the_same_with_only_the_named_subcommand():
    # `run` without --bundle: the message comes from run's own parser, which is the same either way.
    result = subprocess.run([str(NODESTEPCTL), "run", "--", "true"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "nodestepctl run: error: one of the arguments --bundle --image is required" in result.stderr
    # An unknown subcommand: the whole parser, listing the real ones.
    result = subprocess.run([str(NODESTEPCTL), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr and "'run'" in result.stderr


# ---- what the parser leaves to the commands ----------------------------------------------------


def test_the_container_command_comes_without_the_double_dash_argparse_keeps():
    args = ctl_parser().parse_args(["run", "--bundle", "/b", "--", "sh", "-c", "--"])
    assert args.command == ["--", "sh", "-c", "--"]
    assert remainder(args.command) == ["sh", "-c", "--"]
    assert remainder(["true", "--"]) == ["true", "--"]
    assert remainder([]) == []


def test_the_socket_defaults_to_nodestepd_socket_from_the_environment(monkeypatch):
    monkeypatch.setenv("NODESTEPD_SOCKET", "/elsewhere.sock")
    assert ctl_parser(only="ps").parse_args(["ps"]).socket == "/elsewhere.sock"
    monkeypatch.delenv("NODESTEPD_SOCKET")
    assert ctl_parser(only="ps").parse_args(["ps"]).socket == "/run/nodestepd/nodestepd.sock"


# ---- the help's width, found without shutil --------------------------------------------------------


@pytest.mark.parametrize("columns", [None, "100", "0", "-5", "wide"])
def test_the_help_is_as_wide_as_shutil_would_make_it(monkeypatch, columns):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert terminal_columns() == shutil.get_terminal_size().columns
    assert HelpFormatter("nodestepctl")._width == argparse.RawDescriptionHelpFormatter("nodestepctl")._width


def test_on_a_terminal_the_help_is_as_wide_as_the_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 123, 0, 0))
        with open(slave, "w", closefd=False) as terminal:
            monkeypatch.setattr(sys, "__stdout__", terminal)
            assert terminal_columns() == shutil.get_terminal_size().columns == 123
    finally:
        os.close(master)
        os.close(slave)
