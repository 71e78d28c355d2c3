"""oci.conf pattern replacement (`%j`, `%@`, ...): pure functions, no I/O.

Every RunTime* value, ContainerPath and MountSpoolDir is a pattern. The expanded
RunTime* string is run as `/bin/sh -c STRING`, so only `%@` is shell-quoted: the other
replacements are inserted as they are, exactly as Slurm does, and sites write their
commands knowing that. Of those, the user chooses the values of %b (with
IgnoreFileConfigJson), %r and %Z: a value with a character the shell would act on is
refused (shell_unsafe_value), rather than quoted, which would change what a site's
command means (`--bundle "%b"`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = [
    "REPLACEMENTS",
    "PatternContext",
    "check_pattern",
    "shell_quote_args",
    "expand",
    "pattern_letters",
    "cut_before_task_component",
    "USER_CHOSEN",
    "user_chosen_letters",
    "shell_unsafe_value",
]

# The characters that may follow '%' ("%%" is a literal '%').
REPLACEMENTS = "%@bejmnprstuUZ"

_KNOWN = " ".join(f"%{c}" for c in REPLACEMENTS)

# %@ with no command: Slurm substitutes this text, double quotes included, so the
# runtime is handed a command that fails instead of an empty argument list.
NO_COMMAND = '"/bin/false"'

# $$ in `sh -c` is the pid of that shell, which is the task's first process.
PID_UNKNOWN = "$$"

# The letters whose values the step's user chooses, and what they are.
USER_CHOSEN = {
    "@": "the command",
    "b": "the bundle path",
    "r": "the rootfs path (from the user's config.json)",
    "Z": "the working directory (--chdir)",
}

# What a user-chosen value may hold to go into a `sh -c` string unquoted: nothing the
# shell splits, expands, globs, redirects or ends a command at. Bytes above ASCII are
# never special to a POSIX shell, so non-ASCII names pass.
_SHELL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._+,:@%=-")


@dataclass(frozen=True)
class PatternContext:
    args: tuple[str, ...]  # %@
    bundle: str  # %b
    env_file: str  # %e
    job_id: int  # %j
    step_dir: str  # %m
    node_name: str  # %n
    pid: int | None  # %p; None => "$$"
    rootfs: str  # %r
    step_id: int  # %s
    task_id: int  # %t
    user: str  # %u
    uid: int  # %U
    workdir: str  # %Z


def _tokens(pattern: str) -> Iterator[tuple[int, str]]:
    """(index, token) pairs: a token is "%X" for a replacement or a single literal character.

    An invalid '%' sequence is yielded as "%" + the next character (or "%" alone at the
    end) so callers can report it; valid sequences are never split, which is what makes
    "%%t" a literal "%t" and not a task id.
    """
    i = 0
    n = len(pattern)
    while i < n:
        if pattern[i] == "%":
            yield i, pattern[i : i + 2]
            i += 2
        else:
            yield i, pattern[i]
            i += 1


def check_pattern(pattern: str) -> list[str]:
    """Problems with `pattern` (columns are 1-based); an empty list means it is valid."""
    problems: list[str] = []
    for index, token in _tokens(pattern):
        if token == "%":
            problems.append("lone '%' at end of value (write '%%' for a literal '%')")
        elif token[0] == "%" and token[1] not in REPLACEMENTS:
            problems.append(
                f"unknown replacement '{token}' at column {index + 1} (known: {_KNOWN}; write '%%' for a literal '%')"
            )
    return problems


# Patterns are oci.conf's (and a few derived from them): the same handful are checked and
# expanded for every launch, so their tokens and pieces are kept (bounded, in case a
# caller's patterns vary). An invalid pattern raises each time: nothing is kept for it.
@functools.lru_cache(maxsize=512)
def _validated_tokens(pattern: str) -> tuple[tuple[int, str], ...]:
    problems = check_pattern(pattern)
    if problems:
        raise ValueError(f"invalid pattern {pattern!r}: " + "; ".join(problems))
    return tuple(_tokens(pattern))


@functools.lru_cache(maxsize=512)
def _pieces(pattern: str) -> tuple[tuple[str, str], ...]:
    """The valid pattern as (letter, "") for each replacement and ("", text) for each run of
    literal text between them, in order."""
    pieces: list[tuple[str, str]] = []
    literal: list[str] = []
    for _, tok in _validated_tokens(pattern):
        if len(tok) == 2:
            if literal:
                pieces.append(("", "".join(literal)))
                literal = []
            pieces.append((tok[1], ""))
        else:
            literal.append(tok)
    if literal:
        pieces.append(("", "".join(literal)))
    return tuple(pieces)


def shell_quote_args(args: Sequence[str]) -> str:
    """The `%@` text: every argument single-quoted for POSIX sh, joined by one space."""
    if not args:
        return NO_COMMAND
    quoted = []
    for arg in args:
        if "\0" in arg:
            # No argv entry can hold a NUL (execve would cut it); refuse rather than truncate.
            raise ValueError("a command argument contains a NUL character")
        # Inside '...' nothing is special except the closing quote, so an embedded quote
        # closes the string, adds a double-quoted quote, and reopens it.
        quoted.append("'" + arg.replace("'", "'\"'\"'") + "'")
    return " ".join(quoted)


def _value(letter: str, ctx: PatternContext) -> str:
    if letter == "%":
        return "%"
    if letter == "@":
        return shell_quote_args(ctx.args)
    if letter == "p":
        return PID_UNKNOWN if ctx.pid is None else str(ctx.pid)
    if letter in _NUMBERS:
        return str(getattr(ctx, _NUMBERS[letter]))
    return getattr(ctx, _TEXTS[letter])


# The letters whose value is a PatternContext field: as it is, or a number in decimal.
_TEXTS = {"b": "bundle", "e": "env_file", "m": "step_dir", "n": "node_name", "r": "rootfs", "u": "user",
          "Z": "workdir"}
_NUMBERS = {"j": "job_id", "s": "step_id", "t": "task_id", "U": "uid"}


def expand(pattern: str, ctx: PatternContext) -> str:
    """`pattern` with every replacement substituted; ValueError if the pattern is invalid."""
    return "".join(_value(letter, ctx) if letter else text for letter, text in _pieces(pattern))


def pattern_letters(pattern: str) -> set[str]:
    """The replacement characters `pattern` uses ("@", "t", ...; "%%" is not one)."""
    return {tok[1] for _, tok in _validated_tokens(pattern) if len(tok) == 2 and tok[1] != "%"}


def cut_before_task_component(pattern: str) -> str | None:
    """ContainerPath rule: the pattern cut before the first '/'-component that uses %t.

    Returns None when the pattern does not use %t. The result has no trailing slash,
    except that the root stays "/" ("/%t" gives "/"); a relative pattern whose first
    component uses %t gives "".
    """
    for index, token in _validated_tokens(pattern):
        if token == "%t":
            head = pattern[: pattern.rfind("/", 0, index) + 1]
            stripped = head.rstrip("/")
            if not stripped and head.startswith("/"):
                return "/"
            return stripped
    return None


def user_chosen_letters(pattern: str) -> list[str]:
    """The letters of USER_CHOSEN that `pattern` uses, in USER_CHOSEN's order."""
    used = pattern_letters(pattern)
    return [letter for letter in USER_CHOSEN if letter in used]


def shell_unsafe_value(pattern: str, ctx: PatternContext, *, bundle_is_users: bool) -> str | None:
    """Why `pattern` cannot be expanded with `ctx` for `sh -c`, or None.

    The unquoted values the user chooses (%Z, %r, and %b when it is the user's bundle
    rather than the task dir, bundle_is_users) must hold only characters the shell takes
    literally, or `$(...)`, backticks or `;` in a directory name would run as a command
    outside the container.
    """
    values = {"Z": ctx.workdir, "r": ctx.rootfs}
    if bundle_is_users:
        values["b"] = ctx.bundle
    for letter in user_chosen_letters(pattern):
        value = values.get(letter)
        if value is None:
            continue
        bad = next((c for c in value if ord(c) < 128 and c not in _SHELL_SAFE), None)
        if bad is not None:
            return (
                f"{USER_CHOSEN[letter]} {value!r} holds {bad!r}, which the shell would act on: %{letter} goes into"
                " the runtime command unquoted (as in Slurm), so paths there may hold only letters, digits and"
                " / . _ + , : @ % = -"
            )
    return None
