"""Build step for the one C program in nodestepd: nodestepd-monitor (docs/monitor.md).

pyproject.toml holds the metadata; this only compiles nodestepd/process/monitor.c into the
package as nodestepd/process/_libexec/nodestepd-monitor (mode 0755), where the installed daemon
finds it next to its modules. It is rebuilt on every build, so a reinstall never ships
a stale binary. A copy also goes into the source tree (as `build_ext --inplace` would;
ignored by git): the tests import nodestepd from the checkout. Linked statically when the C library allows (less memory per task and
no dynamic loader reading the environment of a root process), else dynamically.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

SOURCE = os.path.join("nodestepd", "process", "monitor.c")
TARGET = os.path.join("nodestepd", "process", "_libexec", "nodestepd-monitor")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]
NO_COMPILER = (
    "nodestepd needs a C compiler and the C library headers to build nodestepd-monitor: "
    "install the Debian packages gcc and libc6-dev (apt-get install gcc libc6-dev)"
)


def find_compiler() -> list[str]:
    cc = shlex.split(os.environ.get("CC", "")) or ["cc"]
    if shutil.which(cc[0]) is None:
        for other in ("gcc", "clang"):
            if shutil.which(other):
                return [other]
        raise SystemExit(f"error: {NO_COMPILER}")
    return cc


def compile_monitor(out: str) -> None:
    cc = find_compiler()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    failure = None
    for link in (["-static"], []):
        result = subprocess.run([*cc, *CFLAGS, *link, "-o", tmp, SOURCE], capture_output=True, text=True)
        if result.returncode == 0:
            break
        failure = result
    else:
        assert failure is not None
        raise SystemExit(
            f"error: compiling {SOURCE} failed ({shlex.join(failure.args)}):\n{failure.stderr.strip()}\n"
            f"If headers are missing: {NO_COMPILER}"
        )
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)


class BuildPyWithMonitor(build_py):
    def run(self) -> None:
        super().run()
        compile_monitor(TARGET)  # in the source tree: for the tests, and editable installs
        if not getattr(self, "editable_mode", False):
            os.makedirs(os.path.dirname(os.path.join(self.build_lib, TARGET)), exist_ok=True)
            shutil.copy2(TARGET, os.path.join(self.build_lib, TARGET))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, TARGET)]


class BinaryDistribution(Distribution):
    """The wheel holds a compiled program: tag it for this platform, not as pure Python."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithMonitor}, distclass=BinaryDistribution)
