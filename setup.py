"""Build step for the one C program in nodestepd: nodestepd-monitor (docs/monitor.md).

pyproject.toml holds the metadata; this only compiles nodestepd/process/monitor.c into the
package as nodestepd/process/_libexec/nodestepd-monitor (mode 0755), where the installed daemon
finds it next to its modules. It is rebuilt on every build, so a reinstall never ships
a stale binary. A copy also goes into the source tree (as `build_ext --inplace` would;
ignored by git): the tests import nodestepd from the checkout. Linked statically when the C library allows (less memory per task and
no dynamic loader reading the environment of a root process), else dynamically.

It also writes the `nodestepctl` program (build_scripts below): a console script made from an
entry point starts Python with `site` and imports re, milliseconds of every launch.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

from distutils.command.build_scripts import build_scripts  # setuptools' own distutils, once setuptools is imported

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


NODESTEPCTL = """\
#!{python} -S
# nodestepctl, written by nodestepd's setup.py for {python}.
# Python starts without `site` (-S): the client's start-up is part of every launch, and
# site's work (pyvenv.cfg, .pth files, sitecustomize, os) was a fifth of it. This finds
# the nodestepd installed beside it instead ({packages} from here), else lets site find it.
import posix  # not os: nodestepd/ctl/__init__.py says why
import sys

path = __file__
for _ in range(40):  # a symlink to the program (setup.sh's in /usr/local/bin): nodestepd is beside the program
    try:
        target = posix.readlink(path)
    except OSError:
        break
    path = target if target.startswith("/") else (path.rpartition("/")[0] or ".") + "/" + target
here = path.rpartition("/")[0] or "."
sys.path += [here + "/" + relative for relative in {packages!r}]
try:
    from nodestepd.ctl.main import entry
except ModuleNotFoundError:  # installed elsewhere than where it was built for
    import site

    site.main()
    from nodestepd.ctl.main import entry
entry()
"""


def nodestepctl_script(python: str) -> str:
    """The nodestepctl program for `python`, as installed in its default scheme (what pip uses)."""
    paths = sysconfig.get_paths()
    packages = list(dict.fromkeys(os.path.relpath(paths[key], paths["scripts"]) for key in ("purelib", "platlib")))
    return NODESTEPCTL.format(python=python, packages=packages)


class BuildScripts(build_scripts):
    """Writes nodestepctl (instead of copying a script from the tree): its first line names the
    Python that builds it, as pip's console scripts do, with -S after it, which pip's own
    rewriting of `#!python` would drop. pip builds with the Python it installs for."""

    def run(self) -> None:
        python = sys.executable
        if len(python) > 120 or " " in python:  # too long for a #! line, or split at the space
            raise SystemExit(f"error: cannot write nodestepctl's first line for the Python at {python!r}")
        os.makedirs(self.build_dir, exist_ok=True)
        path = os.path.join(self.build_dir, "nodestepctl")
        with open(path, "w") as f:
            f.write(nodestepctl_script(python))
        os.chmod(path, 0o755)

    def get_outputs(self) -> list[str]:
        return [os.path.join(self.build_dir, "nodestepctl")]


class BinaryDistribution(Distribution):
    """The wheel holds a compiled program: tag it for this platform, not as pure Python."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithMonitor, "build_scripts": BuildScripts}, distclass=BinaryDistribution,
      scripts=["nodestepctl"])  # a name only: BuildScripts writes it
