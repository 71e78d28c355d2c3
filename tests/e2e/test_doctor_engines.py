"""`nodestepctl doctor` on a user's podman and docker configurations naming nodestep-oci,
through the real CLI: the files found where the user's engines find them, read as the user."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from test_doctor import by_name, doctor_cli, site  # noqa: F401  (site: a fixture)

BAD_PODMAN = """
[engine]
runtime = "nodestep"
cgroup_manager = "systemd"
[engine.runtimes]
nodestep = ["/nowhere/nodestep-oci"]
"""


def test_the_users_podman_and_docker_configurations_are_checked(site, user, user_dir):
    config_home = user_dir("engines-config-")
    (config_home / "containers").mkdir()
    (config_home / "containers" / "containers.conf").write_text(BAD_PODMAN)
    (config_home / "docker").mkdir()
    (config_home / "docker" / "daemon.json").write_text(
        '{"bridge": "none", "runtimes": {"nodestep": {"path": "/usr/sbin/runc"}}}')  # not the proxy: not checked
    result = doctor_cli("--config", str(site / "nodestepd.toml"), "--json", as_user=user,
                        env={**user.env, "XDG_CONFIG_HOME": str(config_home)})
    podman = by_name(result)["podman"]
    conf = config_home / "containers" / "containers.conf"
    no_journal = not os.path.exists("/run/systemd/journal/socket")
    assert [(c["level"], c["message"].split(":")[0]) for c in podman if c["level"] != "ok"] == [
        ("fail", f"runtime 'nodestep' in {conf} names /nowhere/nodestep-oci, which does not exist"),
        ("fail", "[engine] cgroup_manager is 'systemd'"),
        ("warn", "[engine] runtime_supports_json does not list 'nodestep'"),
        ("warn", "[engine] runtime_supports_nocgroups does not list 'nodestep'"),
        *([("warn", "[containers] log_driver is 'unset (journald)' and this node has no journald (/run/systemd/"
                    "journal/socket)"),
           ("warn", "[engine] events_logger is 'unset (journald)' and this node has no journald (/run/systemd/"
                    "journal/socket)")] if no_journal else []),
    ], podman
    assert "docker" not in by_name(result)
    assert result.returncode == 1


def test_root_reads_the_users_files_as_the_user(site, user):
    """doctor --user as root: the user's ~/.config files, opened with the user's rights only."""
    config = Path(user.home) / ".config"
    made = [p for p in (config, config / "containers") if not p.exists()]
    conf = config / "containers" / "containers.conf"
    assert not conf.exists(), f"{conf} exists: the test would replace the user's own file"
    try:
        for path in made:
            path.mkdir()
            os.chown(path, user.uid, user.gid)
        conf.write_text(BAD_PODMAN)
        conf.chmod(0o600)  # root's: the user cannot read it, root could
        result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--json")
        [podman] = by_name(result)["podman"]
        assert (podman["level"], podman["message"]) == ("warn", f"{user.name} cannot read {conf}: "
                                                        f"cat: {conf}: Permission denied"), podman
    finally:
        conf.unlink(missing_ok=True)
        for path in reversed(made):
            shutil.rmtree(path, ignore_errors=True)
