"""The installed `nodestepctl` program (written by setup.py's BuildScripts): Python without site,
nodestepd found beside it, through a symlink too, or by site when it was moved; what a
launch's start-up loads, end to end; and what it takes from os without os (ctl/__init__.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import NODESTEPCTL, REPO
from nodestepd import __version__, ctl

# Never on a launch's path: what the client's start-up saves (docs/benchmarks/README.md).
SLOW = {"site", "os", "argparse", "json", "re", "enum", "struct", "socket", "signal", "selectors", "collections",
        "functools", "typing", "gettext", "shutil", "msgspec", "asyncio"}


def test_python_starts_without_site():
    first = NODESTEPCTL.read_text().splitlines()[0]
    assert first.startswith("#!/") and first.endswith(" -S"), first


@pytest.mark.parametrize("argv", [
    ["run", "--bundle", "/", "--", "true"],
    ["run", "--detach", "--output", "/dev/null", "--bundle", "/", "--", "true"],
    ["signal", "4.0", "USR1"],
    ["cancel", "4.0"],
    ["wait", "4.0"],
])
def test_a_launch_path_loads_nothing_slow(tmp_path, argv):
    """As the program runs: its #! line's Python and flag, then the command failing at connect."""
    python, flag = NODESTEPCTL.read_text().splitlines()[0][2:].split()
    result = subprocess.run([python, flag, "-X", "importtime", str(NODESTEPCTL), "--socket", str(tmp_path / "none"),
                             *argv], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("nodestepctl: nodestepd is not running: no socket at")
    loaded = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert {m.split(".")[0] for m in loaded} & SLOW == set()


def test_a_symlink_to_it_finds_nodestepd(tmp_path):
    """setup.sh links it from /usr/local/bin: nodestepd is found beside the program, not the link."""
    (tmp_path / "nodestepctl").symlink_to(NODESTEPCTL)
    result = subprocess.run([str(tmp_path / "nodestepctl"), "--version"], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, f"nodestepctl {__version__}\n")


def test_moved_away_from_nodestepd_it_lets_site_find_it(tmp_path):
    shutil.copy(NODESTEPCTL, tmp_path / "nodestepctl")
    result = subprocess.run([str(tmp_path / "nodestepctl"), "--version"], capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": ""})
    assert (result.returncode, result.stdout) == (0, f"nodestepctl {__version__}\n")


def test_the_other_commands_get_what_site_finds():
    """check-config loads nodestepd's daemon side and its dependencies: site runs for it, as before."""
    conf = REPO / "tests" / "oci-conf-examples" / "runc-run.conf"
    code = f"import runpy, sys; sys.argv = {[str(NODESTEPCTL), 'check-config', str(conf)]!r}; " \
           f"runpy.run_path({str(NODESTEPCTL)!r}, run_name='__main__')"
    python = NODESTEPCTL.read_text().splitlines()[0][2:].split()[0]
    result = subprocess.run([python, "-S", "-X", "importtime", "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "| site\n" in result.stderr or "|   site\n" in result.stderr


# ---- nodestepd/ctl/__init__.py: what the launch path takes from os, without os --------------------

PATHS = st.text(alphabet="/.a", max_size=10)


@given(PATHS)
@example("//a/../b")
@example("///a")
@example("../..")
def test_normpath_and_abspath_are_os_paths(path):
    assert ctl.normpath(path) == os.path.normpath(path)
    assert ctl.abspath(path) == os.path.abspath(path)


def test_isdir_is_os_paths(tmp_path):
    (tmp_path / "f").write_text("")
    (tmp_path / "d").mkdir()
    (tmp_path / "l").symlink_to(tmp_path / "d")
    for path in ["f", "d", "l", "none", "d/", "f/", "\0"]:
        assert ctl.isdir(str(tmp_path / path)) == os.path.isdir(str(tmp_path / path)), path


def test_environ_is_os_environ_in_a_python_without_os():
    """The program's Python never loads os on a launch's path: the environment is read as os reads it."""
    code = ("import sys; sys.path[:0] = %r; from nodestepd import ctl; env = ctl.environ(); "
            "assert 'os' not in sys.modules; import os; assert env == dict(os.environ), (env, os.environ); "
            "print(env['ODD'].encode('utf-8', 'surrogateescape'))" % sys.path)
    env = {"PATH": "/usr/bin:/bin", "ODD": "caf\udce9"}
    result = subprocess.run([sys.executable, "-S", "-c", code], env={k: os.fsencode(v) for k, v in env.items()},
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "b'caf\\xe9'\n")
