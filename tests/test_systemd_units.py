"""The shipped unit passes systemd-analyze verify, and points at what setup.sh installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

UNITS = Path(__file__).resolve().parent.parent / "systemd"


def test_service_unit_verifies(tmp_path):
    unit = tmp_path / "nodestepd.service"
    shutil.copy(UNITS / "nodestepd.service", unit)
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_service_runs_the_installed_daemon_as_a_notify_service():
    text = (UNITS / "nodestepd.service").read_text()
    exec_start = next(l for l in text.splitlines() if l.startswith("ExecStart="))
    binary = exec_start.split("=", 1)[1].split()[0]
    assert Path(binary).resolve().name == "nodestepd" and Path(binary).exists()
    assert "Type=notify" in text.splitlines()
