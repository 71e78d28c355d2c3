"""nodestepctl for people: --help with examples, bash completion (real bash), the man pages
(real man), the ps table and the launch progress line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, NODESTEPD, REPO, read_line_from
from nodestepd.ctl.argparse_walk import option_actions, subparsers
from nodestepd.ctl.main import build_parser as ctl_parser
from nodestepd.daemon.main import build_parser as daemon_parser
from nodestepd.ctl.manpage import generated_files
from test_recording_runtime import oci_conf

PREFIX = Path(sys.prefix)
SUBCOMMANDS = list(subparsers(ctl_parser()))


@pytest.fixture
def out(user_dir) -> Path:
    return user_dir("records-")


# ---- --help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(subcommand):
    result = subprocess.run([str(NODESTEPCTL), subcommand, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert re.search(r"^Examples?:\n  nodestepctl " + subcommand, result.stdout, re.M) or \
        f"nodestepctl {subcommand}" in result.stdout.split("Example", 1)[1], result.stdout


def test_the_subcommands_are_the_expected_ones():
    assert SUBCOMMANDS == ["run", "ps", "signal", "cancel", "wait", "status", "reload", "check-config", "doctor",
                           "completion"]


def test_reload_help_names_every_setting_that_needs_a_restart():
    from nodestepd.daemon.service import RESTART_ONLY

    description = " ".join(subparsers(ctl_parser())["reload"].description.split())
    missing = [name for name in RESTART_ONLY if name not in description]
    assert missing == [], description


# ---- man pages -------------------------------------------------------------------------------

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
    text = rendered("share/man/man1/nodestepctl.1")
    assert "one line per check (ok, warn, fail)" in text.lower()
    assert "nodestepctl doctor --user alice --bundle /home/alice/images/alpine" in text


# ---- bash completion -------------------------------------------------------------------------

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


# ---- ps --------------------------------------------------------------------------------------


def test_ps_is_an_aligned_table_and_json(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, run="--block"))
    for job, args in ((4001, ["short"]), (4002, ["a-much-longer-command", "with", "arguments"])):
        result = daemon.ctl(user, "run", "--detach", "--job-id", str(job), "--ntasks", "2" if job == 4002 else "1",
                            "--bundle", str(bundle), "--", *args)
        assert result.returncode == 0, result.stderr
    table = daemon.ctl(user, "ps").stdout.decode().splitlines()
    header, rows = table[0], table[1:]
    assert header.split() == ["STEP", "USER", "STATE", "TASKS", "STATUS", "AGE", "COMMAND"]
    assert len(rows) == 2
    # Every column starts where its heading starts.
    for heading in ("USER", "STATE", "TASKS", "STATUS", "AGE", "COMMAND"):
        column = header.index(heading)
        for row in rows:
            assert row[column - 2:column] == "  " and row[column] != " ", (heading, row)
    assert rows[1].endswith("a-much-longer-command with arguments")
    steps = json.loads(daemon.ctl(user, "ps", "--json").stdout)
    assert [(s["job_id"], len(s["tasks"]), s["state"]) for s in steps] == [(4001, 1, "running"), (4002, 2, "running")]
    for job in (4001, 4002):
        assert daemon.ctl(user, "cancel", f"{job}.0").returncode == 0


# ---- the launch progress line ------------------------------------------------------------------

PROGRESS = b"nodestepctl: still launching after 1 s: nodestepd is preparing the step"


def test_a_slow_launch_shows_progress_after_one_second(start_daemon, user, bundle, out):
    """The daemon is held (SIGSTOP) while the launch waits: after 1 s the client says so, once."""
    daemon = start_daemon(oci_conf(out, run="--say ran"))
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        client = daemon.ctl_popen(user, "run", "--job-id", "4010", "--bundle", str(bundle), "--", "x")
        read_line_from(client.stderr, PROGRESS + b" (spool, stage-in, runtime create)", timeout=30)
        assert time.monotonic() - began >= 1.0
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    stdout, stderr = client.communicate(timeout=60)
    assert client.returncode == 0 and stdout == b"ran\n"
    assert re.search(rb"nodestepctl: step 4010\.0 started after \d+\.\d s\n$", stderr), stderr


def test_a_fast_launch_shows_no_progress(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, run="--say ran"))
    # A launch here takes well under a second; on a machine so loaded that it does not,
    # the line would be right to appear, so only a run that finished in time is judged.
    for attempt in range(5):
        began = time.monotonic()
        result = daemon.ctl(user, "run", "--job-id", str(4020 + attempt), "--bundle", str(bundle), "--", "x")
        elapsed = time.monotonic() - began
        assert result.returncode == 0, result.stderr
        if elapsed < 1.0:
            assert result.stderr == b""
            return
    pytest.fail("no launch finished within a second in five attempts")


def test_nodestepd_help_and_version():
    result = subprocess.run([str(NODESTEPD), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "--slurm-conf" in result.stdout and "Example" in result.stdout


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
    from nodestepd.ctl.main import named_subcommand

    assert named_subcommand(argv) == named


@pytest.mark.parametrize("argv", [
    ["--socket", "/s", "run", "--job-id", "7", "--ntasks", "2", "--env", "A=1", "--detach", "--bundle", "/b", "--",
     "sh", "-c", "echo hi"],
    ["run", "--bundle", "/b", "--export", "NONE", "--", "--not-an-option"],
    ["--socket=/s", "signal", "4.1", "USR1"],
    ["doctor", "--bundle", "/b", "--json", "--", "true"],
])
def test_a_parser_with_only_the_named_subcommand_parses_like_the_whole_one(argv):
    from nodestepd.ctl.main import named_subcommand

    only = named_subcommand(argv)
    assert only is not None
    assert vars(ctl_parser(only=only).parse_args(argv)) == vars(ctl_parser().parse_args(argv))


def test_usage_errors_are_the_same_with_only_the_named_subcommand():
    # `run` without --bundle: the message comes from run's own parser, which is the same either way.
    result = subprocess.run([str(NODESTEPCTL), "run", "--", "true"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "nodestepctl run: error: the following arguments are required: --bundle" in result.stderr
    # An unknown subcommand: the whole parser, listing the real ones.
    result = subprocess.run([str(NODESTEPCTL), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr and "'run'" in result.stderr
