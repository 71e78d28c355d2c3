"""nodestepctl, the client: main.py picks the subcommand, run.py launches a step, commands.py
the rest; doctor and check-config need no daemon. The run, signal, cancel and wait paths
import nothing beyond the standard library and protocol.wire (start-up time).

Not even os: importing it builds collections.abc's classes, two thirds of what the client's
start-up cost above a bare interpreter (docs/benchmarks/README.md). Those paths make their
system calls through posix, the C module os is built on (the same functions), and the few
things os adds are here: the environment as os.environ has it, abspath, isdir.
"""

from __future__ import annotations

import posix
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

_environ: dict[str, str] | None = None


def environ() -> Mapping[str, str]:
    """os.environ when os is loaded (a test may have changed it), else the same mapping,
    made as os makes it: without os nothing here can have changed the environment."""
    global _environ
    os = sys.modules.get("os")
    if os is not None:
        return os.environ
    if _environ is None:
        encoding = sys.getfilesystemencoding()
        _environ = {k.decode(encoding, "surrogateescape"): v.decode(encoding, "surrogateescape")
                    for k, v in posix.environ.items()}
    return _environ


def getenv(name: str) -> str | None:
    return environ().get(name)


def abspath(path: str) -> str:
    """os.path.abspath(path), for str paths."""
    if not path.startswith("/"):
        cwd = posix.getcwd()
        path = cwd + path if cwd.endswith("/") else f"{cwd}/{path}"
    return normpath(path)


def normpath(path: str) -> str:
    """os.path.normpath(path), for str paths: POSIX keeps two leading slashes, not three."""
    if not path:
        return "."
    leading = 2 if path.startswith("//") and not path.startswith("///") else 1 if path.startswith("/") else 0
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part != ".." or (not leading and not parts) or (parts and parts[-1] == ".."):
            parts.append(part)
        elif parts:
            parts.pop()
    return "/" * leading + "/".join(parts) or "."


def isdir(path: str) -> bool:
    """os.path.isdir(path)."""
    try:
        return posix.stat(path).st_mode & 0o170000 == 0o040000
    except (OSError, ValueError):
        return False
