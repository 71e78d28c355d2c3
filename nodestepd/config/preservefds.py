"""`run --preserve-fds N`: the first runtime command told to pass fds 3..3+N-1 into the
container. Pure: a RunTimeRun or RunTimeCreate pattern in, the same pattern with
`--preserve-fds N` after its `run` or `create` word out.

Only runc and crun are known to take the option there (both pass the fds to the
container's process at 3..); for any other runtime the rewrite is refused rather than
guessed at, since an option a runtime does not know either fails the launch obscurely or
is taken for the container's name.
"""

from __future__ import annotations

import os
import re

MAX_PRESERVE_FDS = 8  # as the protocol caps it (protocol/wire.py)
RUNTIMES = ("runc", "crun")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
# Shell syntax before the subcommand word: the pattern is then not a plain `runc ... run`.
_SHELL_SYNTAX = re.compile(r"""['"\\$`;&|<>(){}*?\[]""")


class PreserveFdsUnsupported(ValueError):
    """The command cannot be told to preserve fds; the text says why, for the user."""


def with_preserve_fds(pattern: str, count: int, key: str = "RunTimeRun") -> str:
    """pattern with `--preserve-fds count` inserted after its runtime's `run`/`create` word.

    The pattern must start (after NAME=value words, `exec` or `env`) with runc or crun,
    then the runtime's global options, then `run` or `create`: that word is found among
    whitespace-separated words with no shell syntax before it. count 0 returns pattern.
    """
    if not 0 <= count <= MAX_PRESERVE_FDS:
        raise PreserveFdsUnsupported(f"--preserve-fds must be between 0 and {MAX_PRESERVE_FDS}, got {count}")
    if count == 0:
        return pattern
    words = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", pattern)]
    i = 0
    while i < len(words) and (_ASSIGNMENT.fullmatch(words[i][2]) or words[i][2] in ("exec", "env")):
        i += 1
    program = os.path.basename(words[i][2]) if i < len(words) else ""
    if program not in RUNTIMES:
        raise PreserveFdsUnsupported(
            f"--preserve-fds (and MPI's PMI fd) needs runc or crun, whose `run`/`create` pass fds into the "
            f"container; {key} starts with {program or 'nothing'!r}"
        )
    for start, end, word in words[i + 1:]:
        if _SHELL_SYNTAX.search(word):
            break
        if word in ("run", "create"):
            return f"{pattern[:end]} --preserve-fds {count}{pattern[end:]}"
    raise PreserveFdsUnsupported(
        f"--preserve-fds: found no plain `run` or `create` word of {program} in {key} ({pattern!r})"
    )
