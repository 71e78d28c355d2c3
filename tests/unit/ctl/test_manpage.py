"""The man pages (nodestepd/ctl/manpage.py): generated from the parsers behind --help,
installed current, rendered by real man."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NODESTEPD, REPO
from nodestepd import __version__
from nodestepd.ctl.argparse_walk import option_actions, subparsers
from nodestepd.ctl.manpage import generated_files
from nodestepd.ctl.parser import build_parser as ctl_parser
from nodestepd.daemon.main import build_parser as daemon_parser

PREFIX = Path(sys.prefix)
PAGES = {
    "nodestepctl": ("share/man/man1/nodestepctl.1", ctl_parser),
    "nodestepd": ("share/man/man8/nodestepd.8", daemon_parser),
}


def test_installed_files_are_the_current_generated_ones():
    """Generated from the parsers; `python -m nodestepd.ctl.manpage .` rewrites them after a change."""
    for relative, content in generated_files().items():
        installed = PREFIX / relative
        assert installed.read_text() == content, f"{installed} is stale: run python -m nodestepd.ctl.manpage ."
        assert (REPO / relative).read_text() == content, f"{relative} in the repo is stale"


def rendered(page: str) -> str:
    result = subprocess.run(["man", "--warnings", "-l", str(PREFIX / page)], capture_output=True, text=True,
                            env={"MANWIDTH": "200", "MANPAGER": "cat", "PAGER": "cat", "PATH": os.environ["PATH"],
                                 "LANG": "C.UTF-8"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no groff warnings
    # man may use Unicode hyphens and bold/underline overstrikes when not on a terminal.
    return re.sub(r".\x08", "", result.stdout).replace("\u2010", "-").replace("\u2212", "-")


@pytest.mark.parametrize("name", PAGES)
def test_man_page_renders_and_lists_every_option(name):
    page, make_parser = PAGES[name]
    text = rendered(page)
    parser = make_parser()
    assert text.startswith(f"{name.upper()}(")
    for action in option_actions(parser):
        for option in action.option_strings:
            assert option in text, f"{option} missing from {name}'s man page"
    for sub_name, sub in subparsers(parser).items():
        assert re.search(rf"^   {re.escape(sub_name)}$", text, re.M), f"no section for {sub_name}"
        section = text.split(f"\n   {sub_name}\n", 1)[1]
        for action in option_actions(sub):
            for option in action.option_strings:
                assert option in section, f"{sub_name} {option} missing from the man page"


def test_man_page_carries_the_help_text():
    text = " ".join(rendered("share/man/man1/nodestepctl.1").split())  # however man justified the lines
    assert "one line per check (ok, warn, fail)" in text.lower()
    assert "nodestepctl doctor --user alice --bundle /home/alice/images/alpine" in text


def test_nodestepd_help_and_version():
    """The page of nodestepd(8) comes from this parser: its --help has the examples too."""
    result = subprocess.run([str(NODESTEPD), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--slurm-conf" in result.stdout and "Example" in result.stdout
    result = subprocess.run([str(NODESTEPD), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == f"nodestepd {__version__}\n"
