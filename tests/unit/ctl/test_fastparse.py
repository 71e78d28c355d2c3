"""The launch path's own reading of the command line (parser.fast_parse): whatever it accepts,
argparse accepts too, with the same values; all else it leaves to argparse (None)."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nodestepd.ctl.argparse_walk import option_actions, positional_actions, subparsers
from nodestepd.ctl.parser import DEFAULT_SOCKET, FAST, FLAG, build_parser, fast_parse, named_subcommand


def argparse_reading(argv: list[str]) -> dict | None:
    """What nodestepctl's argparse parser makes of argv (as main() builds it), None if it refuses it."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return values(build_parser(only=named_subcommand(argv)).parse_args(argv))
        except SystemExit:
            return None


def values(args: object) -> dict:
    return {name: repr(value) for name, value in vars(args).items()}  # repr: nan is nan


def agree(argv: list[str]) -> bool:
    """Whether fast_parse accepts argv (and if so, that argparse reads it the same)."""
    fast = fast_parse(argv)
    if fast is None:
        return False
    assert values(fast) == argparse_reading(argv), argv
    return True


# ---- the usual command lines are read fast -------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["run", "--bundle", "/b", "--", "true"],
    ["--socket", "/s", "run", "--bundle", "/b", "--", "true"],
    ["--socket=/s", "run", "--bundle=/b", "true", "--x", "-h"],
    ["run", "--bundle", "/b"],  # no command: run.py says so, as before
    ["run", "--bundle", "/b", "--"],
    ["run", "--bundle", "/b", "", "x"],
    ["run", "--image", "docker-archive:a.tar", "--mount", "/d:/d:ro", "--mount=/e:/e", "--workdir", "/w",
     "--entrypoint", "", "--", "/app"],
    ["run", "--job-id", "12", "--step-id=3", "--ntasks", " 4 ", "--task-id", "+1", "--local-id", "0",
     "--container-id", "c", "--chdir", "/tmp", "--env", "A=1", "--env=B=2", "--export", "NONE", "--pty",
     "--detach", "--output", "o", "--error", "e", "--reattach-timeout", "2.5", "--user", "alice",
     "--bundle", "/b", "--", "sh", "-c", "exit 3"],
    ["run", "--reattach-timeout", "nan", "--bundle", "/b", "--", "true"],  # run.py refuses it, as before
    ["run", "--bundle", "/a", "--bundle", "/b", "--", "true"],  # the last one
    ["signal", "4.0", "USR1"],
    ["signal", "--user", "alice", "4.0", "USR1"],
    ["signal", "4.0", "--user=alice", "USR1"],
    ["cancel", "4.0"],
    ["wait", "4", "--user", "1001"],
    ["wait", ""],
])
def test_a_usual_command_line_is_read_fast_and_as_argparse_reads_it(argv):
    assert agree(argv)


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["-h"], ["--version"], ["ps"], ["status"], ["run", "--help"], ["run", "-h"],
    ["run", "--bund", "/b", "--", "true"],  # an abbreviation: argparse's
    ["--sock", "/s", "run", "--bundle", "/b"],
    ["run", "--", "true"], ["run", "true", "--bundle", "/b"],  # no --bundle nor --image
    ["run", "--bundle", "/b", "--image", "i", "--", "true"],
    ["run", "--bundle", "--pty", "--", "true"],  # an option where a value goes
    ["run", "--job-id", "x", "--bundle", "/b"], ["run", "--job-id", "-1", "--bundle", "/b"],
    ["run", "--export", "all", "--bundle", "/b"], ["run", "--pty=yes", "--bundle", "/b"],
    ["run", "--bundle"], ["run", "--socket", "/s", "--bundle", "/b"],
    ["signal", "4.0"], ["signal", "4.0", "USR1", "x"], ["signal", "4.0", "-9"], ["signal", "--", "4.0", "USR1"],
    ["wait", "4.0", "--user"], ["cancel", "-h"],
])
def test_anything_else_is_left_to_argparse(argv):
    assert fast_parse(argv) is None


def test_the_socket_defaults_to_nodestepd_socket_from_the_environment(monkeypatch):
    monkeypatch.delenv("NODESTEPD_SOCKET", raising=False)
    assert fast_parse(["cancel", "1"]).socket == DEFAULT_SOCKET
    monkeypatch.setenv("NODESTEPD_SOCKET", "/elsewhere.sock")
    assert agree(["cancel", "1"]) and fast_parse(["cancel", "1"]).socket == "/elsewhere.sock"


@pytest.mark.parametrize("name", list(FAST))
def test_every_option_of_a_fast_subcommand_is_known_to_fast_parse(name):
    """An option added to the argparse parser only would still work, through argparse: this says
    it is missing from parser.FAST, which keeps that command line on the fast path."""
    options, positionals = FAST[name]
    sub = subparsers(build_parser(only=name))[name]
    declared = {o: (a.dest, a.default) for a in option_actions(sub) for o in a.option_strings if a.dest != "help"}
    assert declared == {o: (dest, default) for o, (dest, _, default) in options.items()}, f"parser.FAST[{name!r}]"
    wanted = [a.dest for a in positional_actions(sub)]
    assert wanted == (["command"] if positionals is None else list(positionals))


# ---- property: whatever fast_parse accepts, argparse reads the same ------------------------------

OPTIONS = sorted({o for options, _ in FAST.values() for o in options})
WORDS = st.one_of(
    st.sampled_from(OPTIONS + ["--socket", "--", "-", "-h", "--help", "--version", "--bun", "--env=", "--pty=1",
                               "-x y", "-1", "-1.5", "--socket=/s"]),
    st.sampled_from(["", "x", "/b", "4.0", "5", " 7", "+3", "-2", "1e3", "nan", "inf", "ALL", "NONE", "all",
                     "USR1", "a=b", "run", "signal", "٣", "4_0", "0x1"]),
    st.builds(lambda o, v: f"{o}={v}", st.sampled_from(OPTIONS), st.sampled_from(["", "x", "-x", "5", "ALL", "a=b"])),
    st.text(max_size=6),
)
HEADS = st.sampled_from([[], ["--socket", "/s"], ["--socket=/t"], ["--socket"], ["--socket", "-s"]])
ARGV = st.builds(lambda head, name, rest: [*head, name, *rest], HEADS,
                 st.sampled_from([*FAST, "ps", "--help", "nothing"]), st.lists(WORDS, max_size=10))
VALUES = st.one_of(st.sampled_from(["", "x", "/b", "4.0", "5", " 7", "+3", "-2", "1e3", "nan", "ALL", "NONE", "all",
                                    "a=b", "٣", "0x1", "USR1"]), st.text(max_size=4))


@st.composite
def usual(draw) -> list[str]:
    """A command line of a fast subcommand made of its own options and values (with some noise):
    most are accepted, so that the property is tested on what fast_parse does read."""
    name = draw(st.sampled_from(list(FAST)))
    options, positionals = FAST[name]
    with_value = sorted(o for o, (_, kind, _) in options.items() if kind != FLAG)
    flags = sorted(o for o, (_, kind, _) in options.items() if kind == FLAG)
    words: list[str] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            words += [draw(st.sampled_from(with_value)), draw(VALUES)]
        elif kind == 1:
            words.append(f"{draw(st.sampled_from(with_value))}={draw(VALUES)}")
        elif flags:
            words.append(draw(st.sampled_from(flags)))
    if positionals is None:
        at = draw(st.integers(0, len(words) // 2)) * 2 if draw(st.booleans()) else len(words)
        words[at:at] = draw(st.sampled_from([["--bundle", "/b"], ["--image=i"], []]))
        words += draw(st.sampled_from([["--"], []])) + draw(st.lists(WORDS, max_size=3))
    else:
        for ref in draw(st.lists(VALUES, min_size=len(positionals) - 1, max_size=len(positionals) + 1)):
            words.insert(draw(st.integers(0, len(words))), ref)
    if draw(st.integers(0, 4)) == 0:
        words.insert(draw(st.integers(0, len(words))), draw(WORDS))
    return [*draw(HEADS), name, *words]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(ARGV, usual()))
@example(["run", "--bundle", "/b", "--", "--bundle", "x"])
@example(["run", "--bundle", "/b", "x", "--image", "y"])
@example(["signal", "", "--user", "", ""])
def test_whatever_fast_parse_accepts_argparse_reads_the_same(argv):
    agree(argv)
