"""The bash completion (nodestepd/ctl/completion.py), as installed, run by real bash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import NODESTEPCTL
from nodestepd.ctl.argparse_walk import subparsers
from nodestepd.ctl.parser import build_parser as ctl_parser

PREFIX = Path(sys.prefix)
SUBCOMMANDS = list(subparsers(ctl_parser()))
COMPLETION = PREFIX / "share/bash-completion/completions/nodestepctl"


def complete(words: list[str], cwd: str = "/") -> list[str]:
    """What real bash completes for the command line `words` (the last word is being typed)."""
    script = (
        f"source {COMPLETION}\n"
        "complete -p nodestepctl >/dev/null || exit 3\n"
        f"COMP_WORDS=({' '.join(_bash_quote(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_nodestepctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                            cwd=cwd, timeout=30)
    assert result.returncode == 0, result.stderr
    return sorted(line for line in result.stdout.splitlines() if line)


def _bash_quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def test_completion_offers_subcommands():
    assert complete(["nodestepctl", ""]) == sorted(["--help", "-h", "--socket", "--version", *SUBCOMMANDS])
    assert complete(["nodestepctl", "d"]) == ["doctor"]
    assert complete(["nodestepctl", "c"]) == ["cancel", "check-config", "completion"]


def test_completion_offers_each_subcommands_options():
    assert "--bundle" in complete(["nodestepctl", "run", "--"])
    assert complete(["nodestepctl", "run", "--b"]) == ["--bundle"]
    assert complete(["nodestepctl", "--socket", "/x", "ps", "--"]) == ["--help", "--json"]
    assert complete(["nodestepctl", "doctor", "--u"]) == ["--user"]


def test_completion_of_option_values(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images-file").touch()
    assert complete(["nodestepctl", "run", "--export", ""]) == ["ALL", "NONE"]
    assert complete(["nodestepctl", "run", "--bundle", "ima"], cwd=str(tmp_path)) == ["images"]  # directories only
    assert complete(["nodestepctl", "doctor", "--config", "ima"], cwd=str(tmp_path)) == ["images", "images-file"]
    assert complete(["nodestepctl", "completion", ""]) == ["--help", "-h", "bash"]


def test_no_completion_inside_the_containers_command():
    assert complete(["nodestepctl", "run", "--bundle", "b", "--", "--b"]) == []


def test_completion_subcommand_prints_the_installed_script():
    result = subprocess.run([str(NODESTEPCTL), "completion", "bash"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == COMPLETION.read_text()
