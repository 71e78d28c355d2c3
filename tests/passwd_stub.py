"""A passwd database of the test's own, for code that takes a getpwnam."""

from __future__ import annotations

import pwd


def passwd(names: dict[str, int]):
    def getpwnam(name: str) -> pwd.struct_passwd:
        if name not in names:
            raise KeyError(name)
        return pwd.struct_passwd((name, "x", names[name], names[name], "", "/", "/bin/sh"))
    return getpwnam
