"""oci.conf pattern replacement; %@ is checked byte for byte through the real /bin/sh."""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from nodestepd.config.patterns import (
    REPLACEMENTS,
    PatternContext,
    check_pattern,
    cut_before_task_component,
    expand,
    pattern_letters,
    shell_quote_args,
    shell_unsafe_value,
    user_chosen_letters,
)

CTX = PatternContext(
    args=("/bin/echo", "hello world"),
    bundle="/spool/oci-job42-7/task-3",
    env_file="/spool/oci-job42-7/task-3/environment",
    job_id=42,
    step_dir="/spool/oci-job42-7",
    node_name="node001",
    pid=12345,
    rootfs="/images/alpine/rootfs",
    step_id=7,
    task_id=3,
    user="alice",
    uid=1001,
    workdir="/home/alice/work",
)

NASTY_ARGS = [
    "plain",
    "two words",
    "it's",
    "'",
    "''",
    "'\"'\"'",
    'say "hi"',
    "$HOME",
    "${PATH}",
    "$(id)",
    "`id`",
    "back\\slash\\",
    "\\'",
    "line1\nline2\n",
    "",
    "*",
    "?",
    "[a-z]*",
    "-n",
    "--",
    "-e",
    "~",
    "a;b|c&d>e<f",
    "#notacomment",
    "tab\there",
    "\x01\x7f",
    "Grüße, 世界 🚀",
    "%s%d%%",
    "!",
]


def test_replacements_constant() -> None:
    assert REPLACEMENTS == "%@bejmnprstuUZ"


def test_expand_every_replacement() -> None:
    pattern = "%%|%@|%b|%e|%j|%m|%n|%p|%r|%s|%t|%u|%U|%Z"
    assert expand(pattern, CTX) == (
        "%|'/bin/echo' 'hello world'|/spool/oci-job42-7/task-3|/spool/oci-job42-7/task-3/environment|42|"
        "/spool/oci-job42-7|node001|12345|/images/alpine/rootfs|7|3|alice|1001|/home/alice/work"
    )


def test_expand_published_runc_pattern() -> None:
    pattern = "runc --rootless=true --root=/run/user/%U/ run %n.%u.%j.%s.%t -b %b"
    assert expand(pattern, CTX) == (
        "runc --rootless=true --root=/run/user/1001/ run node001.alice.42.7.3 -b /spool/oci-job42-7/task-3"
    )


def test_percent_percent_is_literal_and_not_reexpanded() -> None:
    assert expand("%%t", CTX) == "%t"
    assert expand("%%%t", CTX) == "%3"
    assert expand("100%%", CTX) == "100%"


def test_pid_none_is_shell_pid_text() -> None:
    ctx = PatternContext(**{**CTX.__dict__, "pid": None})
    assert expand("kill -s SIGTERM %p", ctx) == "kill -s SIGTERM $$"


def test_pid_none_is_the_pid_of_the_shell() -> None:
    ctx = PatternContext(**{**CTX.__dict__, "pid": None})
    proc = subprocess.Popen(["/bin/sh", "-c", expand("echo %p", ctx)], stdout=subprocess.PIPE)
    out, _ = proc.communicate()
    assert proc.returncode == 0
    assert out == f"{proc.pid}\n".encode()


def test_pid_zero_is_zero() -> None:
    ctx = PatternContext(**{**CTX.__dict__, "pid": 0})
    assert expand("%p", ctx) == "0"


def test_expand_rejects_invalid_pattern() -> None:
    with pytest.raises(ValueError, match=r"unknown replacement '%x' at column 6"):
        expand("echo %x", CTX)
    with pytest.raises(ValueError, match="lone '%'"):
        expand("echo %", CTX)


# --- check_pattern ------------------------------------------------------------------


def test_check_pattern_valid() -> None:
    assert check_pattern("") == []
    assert check_pattern("no replacements") == []
    assert check_pattern("%%%@%b%e%j%m%n%p%r%s%t%u%U%Z") == []
    assert check_pattern("printf '%%s\\n' %@") == []


def test_check_pattern_reports_every_problem_with_column() -> None:
    problems = check_pattern("run %x then %T and %")
    assert len(problems) == 3
    assert problems[0].startswith("unknown replacement '%x' at column 5 (known: %% %@ %b %e %j %m %n %p %r %s %t %u %U %Z")
    assert problems[1].startswith("unknown replacement '%T' at column 13")
    assert problems[2].startswith("lone '%' at end of value")


def test_check_pattern_percent_percent_consumes_pair() -> None:
    # "%%x" is a literal "%x": no problem. "%%%x" has an unknown %x at column 3.
    assert check_pattern("%%x") == []
    assert check_pattern("%%%x")[0].startswith("unknown replacement '%x' at column 3")


def test_printf_style_percent_needs_doubling() -> None:
    # '%s' is the step id and '%d' is unknown: a printf format must be written with '%%'.
    assert expand("printf '%s'", CTX) == "printf '7'"
    assert check_pattern("printf '%d' %@")[0].startswith("unknown replacement '%d' at column 9")


# --- pattern_letters ----------------------------------------------------------------


def test_pattern_letters() -> None:
    assert pattern_letters("%n.%u.%j.%s.%t") == {"n", "u", "j", "s", "t"}
    assert pattern_letters("exec %@") == {"@"}
    assert pattern_letters("100%% %%t") == set()
    assert pattern_letters("kill %p") == {"p"}
    with pytest.raises(ValueError):
        pattern_letters("%q")


# --- cut_before_task_component ------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/var/spool/nodestepd", None),
        ("/var/spool/%t/x", "/var/spool"),
        ("/var/spool/task%t", "/var/spool"),
        ("/run/user/%U/oci/%n-%t/work", "/run/user/%U/oci"),
        ("/a/%j/b%tc/%t", "/a/%j"),
        ("/a//%t", "/a"),
        ("/%t", "/"),
        ("/%t/x", "/"),
        ("%t/x", ""),
        ("/tmp/%%t", None),
        ("/tmp/%%t/%t", "/tmp/%%t"),
        ("/tmp/x%%t/y%%%t", "/tmp/x%%t"),
        ("/tmp/%%%%t", None),
    ],
)
def test_cut_before_task_component(pattern: str, expected: str | None) -> None:
    assert cut_before_task_component(pattern) == expected


def test_cut_before_task_component_rejects_invalid() -> None:
    with pytest.raises(ValueError):
        cut_before_task_component("/x/%y/%t")


# --- %@ quoting -----------------------------------------------------------------------


def test_shell_quote_args_text() -> None:
    assert shell_quote_args(["a", "b c"]) == "'a' 'b c'"
    assert shell_quote_args(["it's"]) == "'it'\"'\"'s'"
    assert shell_quote_args([""]) == "''"
    assert shell_quote_args([]) == '"/bin/false"'
    assert shell_quote_args(()) == '"/bin/false"'


def test_shell_quote_args_rejects_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        shell_quote_args(["a\0b"])


def run_sh(command: str) -> bytes:
    result = subprocess.run(["/bin/sh", "-c", command], capture_output=True, check=True, env={"PATH": os.defpath})
    assert result.stderr == b""
    return result.stdout


def nul_joined(args: list[str]) -> bytes:
    return b"".join(os.fsencode(a) + b"\0" for a in args)


def test_shell_quote_round_trip_all_at_once() -> None:
    out = run_sh("printf '%s\\0' " + shell_quote_args(NASTY_ARGS))
    assert out == nul_joined(NASTY_ARGS)


@pytest.mark.parametrize("arg", NASTY_ARGS)
def test_shell_quote_round_trip_each(arg: str) -> None:
    assert run_sh("printf '%s\\0' " + shell_quote_args([arg])) == nul_joined([arg])


def test_shell_quote_round_trip_undecodable_bytes() -> None:
    # A command line that is not UTF-8 reaches us as surrogate escapes; it must come out
    # of the shell as the original bytes.
    arg = os.fsdecode(b"caf\xe9 \xff'")
    assert run_sh("printf '%s\\0' " + shell_quote_args([arg])) == b"caf\xe9 \xff'\0"


def test_expand_at_through_shell() -> None:
    ctx = PatternContext(**{**CTX.__dict__, "args": tuple(NASTY_ARGS)})
    assert run_sh(expand("printf '%%s\\0' %@", ctx)) == nul_joined(NASTY_ARGS)


def test_no_command_runs_bin_false_text() -> None:
    ctx = PatternContext(**{**CTX.__dict__, "args": ()})
    assert expand("exec %@", ctx) == 'exec "/bin/false"'
    assert run_sh(expand("printf '%%s\\0' %@", ctx)) == b"/bin/false\0"
    assert subprocess.run(["/bin/sh", "-c", expand("exec %@", ctx)]).returncode == 1


# ---- issue 14.5: user-chosen values that reach /bin/sh unquoted ---------------------------------


def test_user_chosen_letters():
    assert user_chosen_letters("run %b %Z %r %@ %u %j %%Z") == ["@", "b", "r", "Z"]
    assert user_chosen_letters("run %u %j") == []


@pytest.mark.parametrize("value", ["/a/$(touch x)", "/a/`id`", "/a/b;id", "/a b", "/a/*", "/a/b|c", "/a/b&", "/a/'",
                                   '/a/"', "/a\\b", "/a/b>c", "/a/~", "/a/b\nc", "/a/{b,c}", "/a/#", "/a/!"])
@pytest.mark.parametrize("letter,field,what", [
    ("b", "bundle", "the bundle path"), ("r", "rootfs", "the rootfs path (from the user's config.json)"),
    ("Z", "workdir", "the working directory (--chdir)"),
])
def test_a_value_the_shell_would_act_on_is_refused(value, letter, field, what):
    ctx = PatternContext(**{**CTX.__dict__, field: value})
    problem = shell_unsafe_value(f"runtime --x=%{letter}", ctx, bundle_is_users=True)
    bad = next(c for c in value if c not in "/ab")
    assert problem == (
        f"{what} {value!r} holds {bad!r}, which the shell would act on: %{letter} goes into the runtime command"
        " unquoted (as in Slurm), so paths there may hold only letters, digits and / . _ + , : @ % = -"
    )


def test_plain_values_and_unused_letters_pass():
    ctx = PatternContext(**{**CTX.__dict__, "workdir": "/home/élodie/run-1.2_x+y,z:a@b%c=d", "rootfs": "/a b"})
    assert shell_unsafe_value("run --cwd %Z", ctx, bundle_is_users=True) is None
    assert shell_unsafe_value("run %b", ctx, bundle_is_users=True) is None  # %r is not used
    # %b is the task dir the daemon made (config.json rewritten), not the user's: not checked.
    odd = PatternContext(**{**CTX.__dict__, "bundle": "/spool dir/oci-job1-0/task-0"})
    assert shell_unsafe_value("run %b", odd, bundle_is_users=False) is None
    assert shell_unsafe_value("run %b", odd, bundle_is_users=True) is not None


def test_a_pattern_expanded_again_takes_each_context_s_values_and_a_bad_one_fails_each_time() -> None:
    # A pattern's pieces are kept between expansions (every launch expands the same few).
    pattern = "run %n.%j.%t -b %b %%t"
    other = dataclasses.replace(CTX, job_id=43, task_id=0, bundle="/spool/oci-job43-7/task-0")
    assert expand(pattern, CTX) == "run node001.42.3 -b /spool/oci-job42-7/task-3 %t"
    assert expand(pattern, other) == "run node001.43.0 -b /spool/oci-job43-7/task-0 %t"
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown replacement '%y'"):
            expand("run %y", CTX)
