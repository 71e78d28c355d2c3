"""The doctor's checks of podman's containers.conf and docker's daemon.json for nodestep-oci
(nodestepd/ctl/engineconf.py): pure functions of the files' text."""

from __future__ import annotations

import json
import os

import pytest

from nodestepd.ctl.checks import Level
from nodestepd.ctl.engineconf import check_containers_conf, check_daemon_json, engine_files, names_proxy

INSTALLED = "/opt/nodestepd/venv/bin/nodestep-oci"
LINK = "/usr/local/bin/nodestep-oci"
EXISTING = {INSTALLED, LINK, "/usr/sbin/runc", "/run/systemd/journal/socket"}


def exists(path: str) -> bool:
    return path in EXISTING


@pytest.fixture(autouse=True)
def link_resolves(monkeypatch):
    """LINK is a symlink to INSTALLED, as scripts/setup.sh makes it."""
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p: INSTALLED if p == LINK else real(p))


GOOD_PODMAN = f"""
[containers]
netns = "host"
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "nodestep"
runtime_supports_json = ["nodestep"]
runtime_supports_nocgroups = ["nodestep"]

[engine.runtimes]
nodestep = ["{LINK}"]
"""


def levels(checks) -> list[tuple[str, str]]:
    return [(c.level.value, c.message) for c in checks]


def podman(text: str, **kwargs):
    return check_containers_conf(text, "/home/u/.config/containers/containers.conf", INSTALLED, exists=exists, **kwargs)


def test_a_good_podman_configuration_passes():
    checks = podman(GOOD_PODMAN)
    assert all(c.level is Level.OK for c in checks), levels(checks)
    assert any("default runtime is 'nodestep'" in c.message for c in checks)
    assert any(f"names {LINK} ({INSTALLED})" in c.message for c in checks)


@pytest.mark.parametrize("text", ["", '[engine]\nruntime = "crun"\n', '[engine.runtimes]\nrunc = ["/usr/sbin/runc"]\n'])
def test_a_podman_configuration_without_the_proxy_is_not_checked(text):
    assert podman(text) == []


def test_podman_must_use_cgroupfs():
    checks = podman(GOOD_PODMAN.replace('cgroup_manager = "cgroupfs"\n', ""))
    bad = [c for c in checks if c.level is Level.FAIL]
    assert len(bad) == 1 and "cgroup_manager is 'unset (podman uses systemd)'" in bad[0].message
    assert 'cgroup_manager = "cgroupfs"' in bad[0].fix
    checks = podman(GOOD_PODMAN.replace('"cgroupfs"', '"systemd"'))
    assert [c.level for c in checks].count(Level.FAIL) == 1


def test_podman_runtime_path_missing_or_not_the_installed_one():
    checks = podman(GOOD_PODMAN.replace(LINK, "/nowhere/nodestep-oci"))
    assert [c.message for c in checks if c.level is Level.FAIL] == [
        "runtime 'nodestep' in /home/u/.config/containers/containers.conf names /nowhere/nodestep-oci, "
        "which does not exist"]
    EXISTING.add("/home/u/bin/nodestep-oci")
    try:
        checks = podman(GOOD_PODMAN.replace(LINK, "/home/u/bin/nodestep-oci"))
    finally:
        EXISTING.discard("/home/u/bin/nodestep-oci")
    assert [c.level for c in checks].count(Level.WARN) == 1
    assert "which is not the installed" in next(c.message for c in checks if c.level is Level.WARN)


def test_podman_runs_the_first_existing_path_of_a_runtime():
    checks = podman(GOOD_PODMAN.replace(f'["{LINK}"]', f'["/nowhere/nodestep-oci", "{INSTALLED}"]'))
    assert all(c.level is Level.OK for c in checks), levels(checks)


def test_no_installed_proxy_is_a_warning():
    checks = check_containers_conf(GOOD_PODMAN, "c.conf", None, exists=exists)
    assert [c.level for c in checks].count(Level.WARN) == 1
    assert "no nodestep-oci is installed beside this nodestepctl" in levels(checks)[0][1]


def test_podman_json_errors_and_nocgroups_are_warned_of():
    text = GOOD_PODMAN.replace('runtime_supports_json = ["nodestep"]\n', "").replace(
        'runtime_supports_nocgroups = ["nodestep"]', 'runtime_supports_nocgroups = ["crun"]')
    warnings = [c for c in podman(text) if c.level is Level.WARN]
    assert [w.message.split(" does not list")[0] for w in warnings] == [
        "[engine] runtime_supports_json", "[engine] runtime_supports_nocgroups"]


def test_podman_journald_logging_without_journald_is_warned_of():
    text = GOOD_PODMAN.replace('log_driver = "k8s-file"\n', "").replace('events_logger = "file"\n', "")
    assert [c for c in podman(text) if c.level is not Level.OK] == []  # the node has journald
    warnings = [c for c in podman(text, journal_socket="/nowhere") if c.level is Level.WARN]
    assert [w.fix for w in warnings] == [
        'set log_driver = "k8s-file" under [containers] in /home/u/.config/containers/containers.conf.',
        'set events_logger = "file" under [engine] in /home/u/.config/containers/containers.conf.']


def test_a_non_default_proxy_runtime_says_how_to_use_it():
    checks = podman(GOOD_PODMAN.replace('runtime = "nodestep"', 'runtime = "crun"'))
    assert all(c.level is Level.OK for c in checks)
    assert any("podman run --runtime nodestep" in c.message for c in checks)


def test_invalid_toml_fails():
    checks = podman("[engine\n")
    assert len(checks) == 1 and checks[0].level is Level.FAIL and "not valid TOML" in checks[0].message


GOOD_DOCKER = {"bridge": "none", "iptables": False, "runtimes": {"nodestep": {"path": LINK}}}


def docker(conf) -> list:
    text = conf if isinstance(conf, str) else json.dumps(conf)
    return check_daemon_json(text, "/home/u/.config/docker/daemon.json", INSTALLED, exists=exists)


def test_a_good_docker_configuration_passes():
    checks = docker(GOOD_DOCKER)
    assert all(c.level is Level.OK for c in checks), levels(checks)
    assert any("docker run --runtime nodestep --network none" in c.message for c in checks)
    checks = docker({**GOOD_DOCKER, "default-runtime": "nodestep"})
    assert any("default runtime is 'nodestep'" in c.message for c in checks)


@pytest.mark.parametrize("conf", [{}, {"runtimes": {"runc": {"path": "/usr/sbin/runc"}}}, {"runtimes": []}])
def test_a_docker_configuration_without_the_proxy_is_not_checked(conf):
    assert docker(conf) == []


def test_docker_systemd_cgroup_driver_fails_and_a_bridge_is_warned_of():
    checks = docker({**GOOD_DOCKER, "exec-opts": ["native.cgroupdriver=systemd"]})
    assert [c.level for c in checks].count(Level.FAIL) == 1
    checks = docker({"runtimes": GOOD_DOCKER["runtimes"]})
    assert [c.level for c in checks].count(Level.WARN) == 1
    assert docker({**GOOD_DOCKER, "runtimes": {"nodestep": {"path": "/nowhere/nodestep-oci"}}})[0].level is Level.FAIL
    assert docker({**GOOD_DOCKER, "runtimes": {"x": {"path": "nodestep-oci"}}})[0].message.endswith(
        "not an absolute path")


@pytest.mark.parametrize("text", ["{", "[]"])
def test_invalid_json_fails(text):
    checks = docker(text)
    assert len(checks) == 1 and checks[0].level is Level.FAIL


def test_the_files_follow_the_users_environment():
    files = engine_files("/home/u", {})
    assert (files.containers_conf, files.daemon_json) == ("/home/u/.config/containers/containers.conf",
                                                          "/home/u/.config/docker/daemon.json")
    files = engine_files("/home/u", {"XDG_CONFIG_HOME": "/x", "CONTAINERS_CONF": "/c.conf"})
    assert (files.containers_conf, files.daemon_json) == ("/c.conf", "/x/docker/daemon.json")


def test_names_proxy():
    assert names_proxy("/anywhere/nodestep-oci", None)
    assert names_proxy(LINK, INSTALLED)
    assert not names_proxy("/usr/sbin/runc", INSTALLED)
