"""Input limits: what one message, one launch, one user and all users together may ask for.

The settings live in DaemonConfig (TOML); their bounds and the checks applied to a
launch request are here. docs/security.md lists them with their defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodestepd.config.settings import DaemonConfig

MAX_PATH_BYTES = 4096  # PATH_MAX: a longer bundle or chdir could not be opened anyway
# One RunTimeRun command line, with %@ expanded, is a single argument of `/bin/sh -c`:
# Linux refuses any single argument over 128 KiB (MAX_ARG_STRLEN) with E2BIG.
ARGS_BYTES_CEILING = 96 * 1024
MESSAGE_SIZE_RANGE = (4096, 16 << 20)
# fds the daemon needs besides one per connection: steps' pidfds, spool dir fds, logs.
FD_HEADROOM = 4096

# name: (lowest, highest) allowed
_INT_BOUNDS = {
    "max_message_size": MESSAGE_SIZE_RANGE,
    "max_args_bytes": (256, ARGS_BYTES_CEILING),
    "max_env_bytes": (1024, 16 << 20),
    "max_connections": (1, 1_000_000),
    "max_connections_per_user": (1, 1_000_000),
    "max_steps": (1, 100_000),
    "max_steps_per_user": (1, 100_000),
}


def setting_problems(config: "DaemonConfig") -> list[tuple[str, str]]:
    """(setting, message) for each limit or security setting out of range, in a fixed order."""
    from nodestepd.daemon.authz import resolve_operators

    problems = []
    for name, (low, high) in _INT_BOUNDS.items():
        value = getattr(config, name)
        if not low <= value <= high:
            problems.append((name, f"must be between {low} and {high}, got {value}"))
    if config.max_steps_per_user > config.max_steps:
        problems.append(("max_steps_per_user", f"must not exceed max_steps ({config.max_steps})"))
    if not 0.1 <= config.client_timeout <= 3600:
        problems.append(("client_timeout", f"must be between 0.1 and 3600 seconds, got {config.client_timeout}"))
    try:
        resolve_operators(config.operators)
    except ValueError as e:
        problems.append(("operators", str(e)))
    return problems


def _size(strings: Iterable[str]) -> int:
    """Bytes as the kernel counts an argv or environment: UTF-8 plus a NUL each."""
    return sum(len(s.encode("utf-8", "surrogatepass")) + 1 for s in strings)


def args_size(args: Iterable[str]) -> int:
    return _size(args)


def env_size(env: Mapping[str, str]) -> int:
    return _size(f"{name}={value}" for name, value in env.items())
