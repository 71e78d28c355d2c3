"""The installed `nodestepctl` program (written by setup.py's BuildScripts): Python without site,
nodestepd found beside it, through a symlink too, or by site when it was moved; and what a
launch's start-up loads, end to end."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import NODESTEPCTL, REPO
from nodestepd import __version__

# Never on a launch's path: what the client's start-up saves (docs/benchmarks/README.md).
SLOW = {"site", "argparse", "json", "re", "enum", "struct", "socket", "signal", "selectors", "collections",
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
