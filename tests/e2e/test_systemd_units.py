"""The shipped units pass systemd-analyze verify, and say what the daemon expects of them."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

from nodestepd.config.settings import DaemonConfig

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def unit(name: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(UNITS / name)
    return {section: dict(parser[section]) for section in parser.sections()}


def test_units_verify(tmp_path):
    for name in ("nodestepd.socket", "nodestepd.service"):
        shutil.copy(UNITS / name, tmp_path / name)
    # Verified together: the socket's service must resolve; ExecStart's binary must exist
    # (/usr/local/bin/nodestepd, which scripts/setup.sh links, as a site's install would).
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "nodestepd.socket"),
                             str(tmp_path / "nodestepd.service")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


def test_socket_is_the_daemons_default_and_open_to_every_local_user():
    socket = unit("nodestepd.socket")["Socket"]
    assert socket["ListenStream"] == DaemonConfig().socket
    assert socket["SocketMode"] == "0666"
    assert socket["Accept"] == "no"  # one daemon serves every connection on one socket
    assert unit("nodestepd.socket")["Install"]["WantedBy"] == "sockets.target"


def test_service_is_a_notify_service_with_watchdog_reload_and_steps_left_running():
    service = unit("nodestepd.service")
    s = service["Service"]
    assert s["Type"] == "notify"
    assert int(s["WatchdogSec"]) > 0
    # Only the daemon is signalled on stop: its children (the steps) are left alone.
    assert s["KillMode"] == "process"
    assert s["OOMPolicy"] == "continue"  # a container's OOM kill does not stop the service
    assert s["RestartPreventExitStatus"] == "78"  # EX_CONFIG: a bad config is not fixed by restarting
    binary = s["ExecStart"].split()[0]
    assert Path(binary).name == "nodestepd" and Path(binary).exists()
    assert s["ExecReload"].split()[0] == str(Path(binary).parent / "nodestepctl")
    assert s["ExecReload"].split()[-1] == "reload"
    assert service["Unit"]["Requires"] == "nodestepd.socket"
