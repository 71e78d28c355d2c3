"""Who may do what: decided from the kernel-reported uid (SO_PEERCRED) of a connection only.

Any user may launch steps as themselves and see, signal, wait for and cancel their own
steps. Operators (the `operators` setting; default root and the `slurm` user if it
exists) may also launch as another user and act on everyone's steps.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    operators: frozenset[int]

    def is_operator(self, uid: int) -> bool:
        return uid in self.operators

    def may_act_on(self, caller: int, owner: int) -> bool:
        """See, signal, wait for, cancel a step owned by `owner`."""
        return caller == owner or self.is_operator(caller)

    def may_launch_as(self, caller: int, target: int) -> bool:
        return caller == target or self.is_operator(caller)


def parse_user(text: str, getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam) -> int:
    """A run request's `user`: a user name, or a uid in decimal (ASCII digits). ValueError when unknown."""
    if not text or len(text) > 256 or "\0" in text:
        raise ValueError(f"{text[:64]!r} is not a user name or uid")
    if text.isascii() and text.isdigit():
        uid = int(text)
        if uid >= 0xFFFFFFFF:
            raise ValueError(f"uid {text} is out of range")
        return uid
    try:
        return getpwnam(text).pw_uid
    except (KeyError, UnicodeError):
        raise ValueError(f"no user {text!r} on this node") from None
