"""The doctor's checks of a user's podman and docker configurations for nodestep-oci.

Only a configuration that names nodestep-oci as a runtime is checked: podman's
containers.conf (`[engine.runtimes]`) and rootless docker's daemon.json (`runtimes`).
What is checked is what docs/user-guide.md asks for ("podman and docker through
nodestep-oci"), which is what the engines need to run rootless on a node without systemd:
the runtime's path exists and is the nodestep-oci installed beside this nodestepctl,
podman uses cgroupfs (the engines' default, systemd, needs a systemd user session) and is
told the runtime writes JSON errors, docker does not ask for the systemd cgroup driver.

The files are read as the user (doctor may run as root for --user: it never opens a path
the user controls with root's rights). Parsing and checking are pure functions of the
text, tested without any engine.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass

from nodestepd.ctl.checks import Check, fail, ok, warn
from nodestepd.ctl.probes import PROBE_TIMEOUT, run_as
from nodestepd.process.identity import Identity

PROXY_NAME = "nodestep-oci"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# How a file that does not exist shows in the reading helper's status (cat's own failures are 1).
_ABSENT = 100
_READ_SCRIPT = 'test -e "$1" || exit 100; exec cat -- "$1"'


@dataclass(frozen=True)
class EngineFiles:
    """Where the user's engines read their configuration (rootless: under the user's config dir)."""

    containers_conf: str
    daemon_json: str


def engine_files(home: str, env: Mapping[str, str]) -> EngineFiles:
    """podman: $CONTAINERS_CONF, else $XDG_CONFIG_HOME/containers/containers.conf; docker
    (rootless): $XDG_CONFIG_HOME/docker/daemon.json; $XDG_CONFIG_HOME defaults to ~/.config."""
    config_home = env.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    return EngineFiles(
        containers_conf=env.get("CONTAINERS_CONF") or os.path.join(config_home, "containers", "containers.conf"),
        daemon_json=os.path.join(config_home, "docker", "daemon.json"),
    )


def names_proxy(path: str, installed: str | None) -> bool:
    """Whether a runtime path means nodestep-oci: by its name, or as the installed one itself."""
    if os.path.basename(path) == PROXY_NAME:
        return True
    return installed is not None and os.path.realpath(path) == os.path.realpath(installed)


def _runtime_path_checks(name: str, where: str, path: str, installed: str | None,
                         exists=os.path.exists) -> list[Check]:
    """`where` (e.g. "runtime 'nodestep' in FILE") names `path`: is it the installed nodestep-oci?"""
    if not os.path.isabs(path):
        return [fail(name, f"{where} names {path!r}, not an absolute path",
                     f"name the runtime by its absolute path, {installed or '/usr/local/bin/' + PROXY_NAME}.")]
    if not exists(path):
        return [fail(name, f"{where} names {path}, which does not exist",
                     f"point it at {installed or 'the installed ' + PROXY_NAME} (scripts/setup.sh links "
                     f"/usr/local/bin/{PROXY_NAME}).")]
    if installed is None:
        return [warn(name, f"{where} names {path}, but no {PROXY_NAME} is installed beside this nodestepctl",
                     "install nodestepd with nodestep-oci, and run doctor with the same installation.")]
    if os.path.realpath(path) != os.path.realpath(installed):
        return [warn(name, f"{where} names {path}, which is not the installed {installed}",
                     f"point it at {installed} (or a link to it), so that the proxy and the daemon match.")]
    return [ok(name, f"{where} names {path} ({installed})")]


# ---- podman ------------------------------------------------------------------------------


def check_containers_conf(text: str, path: str, installed: str | None, *, exists=os.path.exists,
                          journal_socket: str = JOURNAL_SOCKET) -> list[Check]:
    """podman's containers.conf: [] when it does not name nodestep-oci, else its checks."""
    name = "podman"
    try:
        conf = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [fail(name, f"{path} is not valid TOML: {e}", f"fix {path} (podman cannot read it either).")]
    engine = conf.get("engine") if isinstance(conf.get("engine"), dict) else {}
    containers = conf.get("containers") if isinstance(conf.get("containers"), dict) else {}
    runtimes = engine.get("runtimes") if isinstance(engine.get("runtimes"), dict) else {}
    proxies = {rt: paths for rt, paths in runtimes.items()
               if isinstance(paths, list) and any(isinstance(p, str) and names_proxy(p, installed) for p in paths)}
    if not proxies:
        return []
    checks: list[Check] = []
    for rt, paths in proxies.items():
        # podman runs the first path of the list that exists.
        first = next((p for p in paths if isinstance(p, str) and exists(p)), None)
        checks += _runtime_path_checks(name, f"runtime {rt!r} in {path}",
                                       first or next(p for p in paths if isinstance(p, str)), installed, exists)
    default = engine.get("runtime")
    names = ", ".join(repr(rt) for rt in proxies)
    if default in proxies:
        checks.append(ok(name, f"podman's default runtime is {default!r}: every podman container goes through {PROXY_NAME}"))
    else:
        checks.append(ok(name, f"podman's default runtime is {default or 'crun/runc'!r}; {names} is used with "
                           f"`podman run --runtime {next(iter(proxies))}`"))
    manager = engine.get("cgroup_manager")
    if manager != "cgroupfs":
        checks.append(fail(name, f"[engine] cgroup_manager is {manager or 'unset (podman uses systemd)'!r}: "
                           "containers of steps are placed in cgroups by the site's runtime, and podman's "
                           "systemd manager needs a systemd user session",
                           f'set cgroup_manager = "cgroupfs" under [engine] in {path}.'))
    else:
        checks.append(ok(name, 'cgroup_manager = "cgroupfs"'))
    for key in ("runtime_supports_json", "runtime_supports_nocgroups"):
        listed = engine.get(key)
        missing = [rt for rt in proxies if not (isinstance(listed, list) and rt in listed)]
        if missing:
            what = ("podman then reads the runtime's errors from its stderr, not from the JSON log "
                    "nodestep-oci writes" if key == "runtime_supports_json"
                    else "podman refuses --cgroups=disabled with it")
            checks.append(warn(name, f"[engine] {key} does not list {', '.join(map(repr, missing))}: {what}",
                               f"add {', '.join(map(repr, missing))} to {key} under [engine] in {path}."))
    no_journal = not exists(journal_socket)
    for section, key, value, default in (("containers", "log_driver", containers.get("log_driver"), "journald"),
                                         ("engine", "events_logger", engine.get("events_logger"), "journald")):
        if no_journal and (value or default) == "journald":
            fixed = '"k8s-file"' if key == "log_driver" else '"file"'
            checks.append(warn(name, f"[{section}] {key} is {value or 'unset (journald)'!r} and this node has no "
                               f"journald ({journal_socket})", f"set {key} = {fixed} under [{section}] in {path}."))
    return checks


# ---- docker ------------------------------------------------------------------------------


def check_daemon_json(text: str, path: str, installed: str | None, *, exists=os.path.exists) -> list[Check]:
    """rootless docker's daemon.json: [] when it does not name nodestep-oci, else its checks."""
    name = "docker"
    try:
        conf = json.loads(text)
    except ValueError as e:
        return [fail(name, f"{path} is not valid JSON: {e}", f"fix {path} (dockerd cannot read it either).")]
    if not isinstance(conf, dict):
        return [fail(name, f"{path} is not a JSON object", f"fix {path} (dockerd cannot read it either).")]
    runtimes = conf.get("runtimes") if isinstance(conf.get("runtimes"), dict) else {}
    proxies = {rt: spec["path"] for rt, spec in runtimes.items()
               if isinstance(spec, dict) and isinstance(spec.get("path"), str) and names_proxy(spec["path"], installed)}
    if not proxies:
        return []
    checks: list[Check] = []
    for rt, runtime_path in proxies.items():
        checks += _runtime_path_checks(name, f"runtime {rt!r} in {path}", runtime_path, installed, exists)
    default = conf.get("default-runtime")
    if default in proxies:
        checks.append(ok(name, f"docker's default runtime is {default!r}: every docker container goes through {PROXY_NAME}"))
    else:
        checks.append(ok(name, f"{', '.join(map(repr, proxies))} is used with `docker run --runtime "
                           f"{next(iter(proxies))} --network none`"))
    opts = conf.get("exec-opts") if isinstance(conf.get("exec-opts"), list) else []
    if any(isinstance(o, str) and o.replace(" ", "") == "native.cgroupdriver=systemd" for o in opts):
        checks.append(fail(name, "exec-opts asks for the systemd cgroup driver: steps' containers are placed in "
                           "cgroups by the site's runtime, and the systemd driver needs a systemd user session",
                           f"remove native.cgroupdriver=systemd from exec-opts in {path}."))
    if conf.get("bridge") != "none":
        checks.append(warn(name, f"bridge is {conf.get('bridge', 'unset')!r}: rootless docker's default bridge "
                           "network needs slirp4netns and /dev/net/tun; containers through "
                           f"{PROXY_NAME} run with --network none",
                           f'set "bridge": "none" (and "iptables": false) in {path}.'))
    return checks


# ---- the doctor's entry point ------------------------------------------------------------


def read_as(identity: Identity, path: str) -> tuple[str | None, str | None]:
    """(text, None), (None, None) when the file does not exist, or (None, why) — read as the user."""
    outcome = run_as(identity, ["/bin/sh", "-c", _READ_SCRIPT, "sh", path], env={"PATH": "/usr/bin:/bin", "LANG": "C"},
                     cwd="/", timeout=PROBE_TIMEOUT)
    if outcome.status == _ABSENT:
        return None, None
    if outcome.status != 0:
        return None, outcome.output or f"exit status {outcome.status}"
    return outcome.output, None


def check_engine_configs(identity: Identity, env: Mapping[str, str], installed: str | None) -> list[Check]:
    """The user's podman and docker configurations, when they name nodestep-oci. `env`: the
    user's environment when doctor runs as the user (CONTAINERS_CONF, XDG_CONFIG_HOME); as
    root for --user, the files under the user's home."""
    files = engine_files(identity.home, env)
    checks: list[Check] = []
    for path, check in ((files.containers_conf, check_containers_conf), (files.daemon_json, check_daemon_json)):
        text, error = read_as(identity, path)
        if error is not None:
            checks.append(warn("podman" if check is check_containers_conf else "docker",
                               f"{identity.user} cannot read {path}: {error}",
                               f"make {path} readable by {identity.user}, or remove it."))
        elif text is not None:
            checks += check(text, path, installed)
    return checks
