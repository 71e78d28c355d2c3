"""Daemon settings: built-in defaults, then the TOML file, then command-line overrides,
and the bounds each setting must stay within."""

from __future__ import annotations

import dataclasses
import os
import pwd
import socket
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Mapping

from nodestepd.config.slurmconf import DEFAULT_SLURM_CONF, SlurmConfError, read_slurm_conf

DEFAULT_CONFIG_FILE = "/etc/nodestepd/nodestepd.toml"
LOG_FORMATS = ("auto", "console", "json", "journal")
STEPS_ON_STOP = ("leave", "cancel")
# MPI steps (step/mpi.py, docs/admin-guide.md#mpi). mpi_mounts: absolute paths bound at the
# same place in MPI steps' containers, or these keywords for the step's own PMIx dirs.
MPI_PMIX_SERVER_DIR = "pmix-server-dir"  # the slurmd spool's pmix.J.S (PMIX_SERVER_TMPDIR)
MPI_PMIX_APP_DIR = "pmix-app-dir"  # Slurm's /tmp/spmix_appdir_U_J.S, Open MPI's session dir
MPI_MOUNT_KEYWORDS = (MPI_PMIX_SERVER_DIR, MPI_PMIX_APP_DIR)
DEFAULT_MPI_MOUNTS = ("/dev/shm", MPI_PMIX_SERVER_DIR, MPI_PMIX_APP_DIR)
MPI_USER_NAMESPACE = ("auto", "never")
MPI_NETWORK_NAMESPACE = ("refuse", "warn")


class ConfigError(Exception):
    """A settings problem; the message names the file and the setting."""


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/nodestepd/nodestepd.sock"
    oci_conf: str = "/etc/slurm/oci.conf"
    spool_dir: str = "/var/spool/nodestepd"
    state_dir: str = "/var/lib/nodestepd"
    node_name: str = ""  # empty: the short host name, resolved by load_config
    kill_wait: float = 30.0
    runtime_timeout: float = 60.0
    log_format: str = "auto"  # console, json, journal; auto: journal when stderr is journald's, else console
    log_level: str = "info"
    steps_on_stop: str = "leave"  # on SIGTERM: leave running steps alone, or cancel them
    # A recovered attached step whose client has not attached again within this many
    # seconds of the restart is cancelled, as if its client had gone (daemon/reattach.py).
    reattach_grace: float = 60.0
    slurm_conf: str = DEFAULT_SLURM_CONF  # when it exists: default node_name and spool_dir
    # Security and limits (docs/security.md). operators None: root and `slurm` if it exists.
    operators: tuple[str | int, ...] | None = None
    no_new_privs: bool = True
    max_message_size: int = 1 << 20
    max_args_bytes: int = 64 * 1024
    max_env_bytes: int = 256 * 1024
    max_connections: int = 1024
    max_connections_per_user: int = 256
    max_steps: int = 1024
    max_steps_per_user: int = 128
    client_timeout: float = 30.0
    # Finished steps' results kept for `wait` and `ps`, across restarts (docs/admin-guide.md).
    results_max_age: float = 86400.0  # seconds after the step ended
    results_max: int = 1024  # on the node
    results_max_per_user: int = 256
    # A request/answer connection is ended after this long, however busy (an attached run's is not).
    connection_max_lifetime: float = 300.0
    # The site's stage hooks (docs/admin-guide.md): absolute paths of programs run as the
    # step's user at each launch; "" for none. daemon/configuration.py checks they are root's.
    stage_in: str = ""
    stage_out: str = ""
    # Container images (`run --image`): the per-user cache on local disk, how many imports
    # run at once, and how long one may take (docs/admin-guide.md).
    image_cache_dir: str = "/var/cache/nodestepd/images"
    image_imports_max: int = 2
    image_import_timeout: float = 600.0
    image_cache_max_bytes: int = 0  # per user; 0: no cap
    debug_timings: bool = False  # log each step's daemon-side launch and exit latency (metrics.py)
    # MPI steps under srun --mpi=pmix/pmi2 (docs/admin-guide.md#mpi): what their containers get.
    mpi_mounts: tuple[str, ...] = DEFAULT_MPI_MOUNTS
    mpi_user_namespace: str = "auto"  # auto: PMIx ranks run as the user's own uid (subordinate ids); never
    mpi_network_namespace: str = "refuse"  # a bundle with its own network namespace: refuse the MPI step, or warn
    config_file: str | None = None  # where the settings came from, for `status`

    def validate(self, sources: Mapping[str, str]) -> None:
        """sources: where each setting came from (a file, the command line), for the message."""

        def fail(name: str, message: str) -> ConfigError:
            return ConfigError(f"{sources.get(name, 'default')}: {name}: {message}")

        for name in ("socket", "oci_conf", "spool_dir", "state_dir", "slurm_conf", "image_cache_dir"):
            value = getattr(self, name)
            if not os.path.isabs(value):
                raise fail(name, f"must be an absolute path, got {value!r}")
        for name in ("stage_in", "stage_out"):
            value = getattr(self, name)
            if value and (not os.path.isabs(value) or "\0" in value):
                raise fail(name, f"must be the absolute path of a program (or \"\" for none), got {value!r}")
        if not self.node_name or "/" in self.node_name or any(c.isspace() for c in self.node_name):
            raise fail("node_name", f"{self.node_name!r} is not a usable node name")
        if not (0 < self.kill_wait <= 3600):
            raise fail("kill_wait", f"must be between 0 and 3600 seconds, got {self.kill_wait}")
        if not (0 < self.runtime_timeout <= 3600):
            raise fail("runtime_timeout", f"must be between 0 and 3600 seconds, got {self.runtime_timeout}")
        if self.log_format not in LOG_FORMATS:
            raise fail("log_format", f"must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if not (1 <= self.reattach_grace <= 3600):
            raise fail("reattach_grace", f"must be between 1 and 3600 seconds, got {self.reattach_grace}")
        if self.steps_on_stop not in STEPS_ON_STOP:
            raise fail("steps_on_stop", f"must be 'leave' or 'cancel', got {self.steps_on_stop!r}")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise fail("log_level", f"must be debug, info, warning or error, got {self.log_level!r}")
        for name, message in setting_problems(self):
            raise fail(name, message)


# One RunTimeRun command line, with %@ expanded, is a single argument of `/bin/sh -c`:
# Linux refuses any single argument over 128 KiB (MAX_ARG_STRLEN) with E2BIG.
ARGS_BYTES_CEILING = 96 * 1024
MESSAGE_SIZE_RANGE = (4096, 16 << 20)

# The bounds of the limit settings (docs/security.md lists them): name -> (lowest, highest).
_INT_BOUNDS = {
    "max_message_size": MESSAGE_SIZE_RANGE,
    "max_args_bytes": (256, ARGS_BYTES_CEILING),
    "max_env_bytes": (1024, 16 << 20),
    "max_connections": (1, 1_000_000),
    "max_connections_per_user": (1, 1_000_000),
    "max_steps": (1, 100_000),
    "max_steps_per_user": (1, 100_000),
    "results_max": (1, 100_000),
    "results_max_per_user": (1, 100_000),
    "image_imports_max": (1, 64),
    "image_cache_max_bytes": (0, 1 << 50),
}
IMAGE_IMPORT_TIMEOUT_RANGE = (1.0, 86400.0)
RESULTS_MAX_AGE_RANGE = (60.0, 366 * 86400.0)


def setting_problems(config: DaemonConfig) -> list[tuple[str, str]]:
    """(setting, message) for each limit or security setting out of range, in a fixed order."""
    problems = []
    for name, (low, high) in _INT_BOUNDS.items():
        value = getattr(config, name)
        if not low <= value <= high:
            problems.append((name, f"must be between {low} and {high}, got {value}"))
    if config.max_steps_per_user > config.max_steps:
        problems.append(("max_steps_per_user", f"must not exceed max_steps ({config.max_steps})"))
    if config.results_max_per_user > config.results_max:
        problems.append(("results_max_per_user", f"must not exceed results_max ({config.results_max})"))
    low, high = RESULTS_MAX_AGE_RANGE
    if not low <= config.results_max_age <= high:
        problems.append(("results_max_age", f"must be between {low:.0f} and {high:.0f} seconds, got "
                         f"{config.results_max_age}"))
    low, high = IMAGE_IMPORT_TIMEOUT_RANGE
    if not low <= config.image_import_timeout <= high:
        problems.append(("image_import_timeout", f"must be between {low:.0f} and {high:.0f} seconds, got "
                         f"{config.image_import_timeout}"))
    if not 0.1 <= config.client_timeout <= 3600:
        problems.append(("client_timeout", f"must be between 0.1 and 3600 seconds, got {config.client_timeout}"))
    if not 1 <= config.connection_max_lifetime <= 86400:
        problems.append(("connection_max_lifetime",
                         f"must be between 1 and 86400 seconds, got {config.connection_max_lifetime}"))
    try:
        resolve_operators(config.operators)
    except ValueError as e:
        problems.append(("operators", str(e)))
    for mount in config.mpi_mounts:
        if mount not in MPI_MOUNT_KEYWORDS and (not isinstance(mount, str) or not os.path.isabs(mount)
                                                or os.path.normpath(mount) != mount or "\0" in mount):
            problems.append(("mpi_mounts", f"{mount!r} is neither a normalised absolute path nor one of "
                                           f"{', '.join(MPI_MOUNT_KEYWORDS)}"))
    if config.mpi_user_namespace not in MPI_USER_NAMESPACE:
        problems.append(("mpi_user_namespace", f"must be 'auto' or 'never', got {config.mpi_user_namespace!r}"))
    if config.mpi_network_namespace not in MPI_NETWORK_NAMESPACE:
        problems.append(("mpi_network_namespace",
                         f"must be 'refuse' or 'warn', got {config.mpi_network_namespace!r}"))
    return problems


def resolve_operators(
    entries: Iterable[str | int] | None, getpwnam: Callable[[str], pwd.struct_passwd] = pwd.getpwnam
) -> frozenset[int]:
    """The operators' uids. Explicit names must exist (ValueError naming the first that does not)."""
    if entries is None:
        uids = {0}
        try:
            uids.add(getpwnam("slurm").pw_uid)
        except KeyError:
            pass
        return frozenset(uids)
    uids = set()
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise ValueError(f"{entry!r} is neither a user name nor a uid")
        if isinstance(entry, int):
            if not 0 <= entry < 0xFFFFFFFF:
                raise ValueError(f"uid {entry} is out of range")
            uids.add(entry)
            continue
        try:
            uids.add(getpwnam(entry).pw_uid)
        except KeyError:
            raise ValueError(f"no user {entry!r} on this node") from None
    return frozenset(uids)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "socket": (str,),
    "oci_conf": (str,),
    "spool_dir": (str,),
    "state_dir": (str,),
    "node_name": (str,),
    "kill_wait": (int, float),
    "runtime_timeout": (int, float),
    "log_format": (str,),
    "log_level": (str,),
    "steps_on_stop": (str,),
    "reattach_grace": (int, float),
    "slurm_conf": (str,),
    "operators": (list,),
    "no_new_privs": (bool,),
    "max_message_size": (int,),
    "max_args_bytes": (int,),
    "max_env_bytes": (int,),
    "max_connections": (int,),
    "max_connections_per_user": (int,),
    "max_steps": (int,),
    "max_steps_per_user": (int,),
    "client_timeout": (int, float),
    "results_max_age": (int, float),
    "results_max": (int,),
    "results_max_per_user": (int,),
    "connection_max_lifetime": (int, float),
    "image_cache_dir": (str,),
    "image_imports_max": (int,),
    "image_import_timeout": (int, float),
    "image_cache_max_bytes": (int,),
    "debug_timings": (bool,),
    "stage_in": (str,),
    "stage_out": (str,),
    "mpi_mounts": (list,),
    "mpi_user_namespace": (str,),
    "mpi_network_namespace": (str,),
}
_FLOATS = ("kill_wait", "runtime_timeout", "client_timeout", "results_max_age", "connection_max_lifetime",
           "reattach_grace", "image_import_timeout")


def _from_toml(path: str, required: bool) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"{path}: no such file") from None
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {known})")
        types = _FIELD_TYPES[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ConfigError(f"{path}: {key}: expected {types[0].__name__}, got {type(value).__name__}")
        if key in ("operators", "mpi_mounts"):
            value = tuple(value)
        settings[key] = float(value) if key in _FLOATS else value
    return settings


def load_config(config_file: str | None, overrides: Mapping[str, Any]) -> DaemonConfig:
    """Defaults, then the TOML file (required only when named explicitly), then overrides (None = unset)."""
    path = config_file or DEFAULT_CONFIG_FILE
    settings = _from_toml(path, required=config_file is not None)
    sources = {key: path for key in settings}
    given = {k: v for k, v in overrides.items() if v is not None}
    settings.update(given)
    sources.update({key: "--" + key.replace("_", "-") for key in given})
    _defaults_from_slurm_conf(settings, sources)
    if not settings.get("node_name"):
        settings["node_name"] = socket.gethostname().split(".", 1)[0]
        sources["node_name"] = "host name"
    config = dataclasses.replace(DaemonConfig(), **settings, config_file=path if os.path.exists(path) else None)
    config.validate(sources)
    return config


def _defaults_from_slurm_conf(settings: dict[str, Any], sources: dict[str, str]) -> None:
    """Where Slurm runs, its own NodeName for this host and SlurmdSpoolDir, unless set here."""
    path = settings.get("slurm_conf", DEFAULT_SLURM_CONF)
    if settings.get("node_name") and settings.get("spool_dir"):
        return
    try:
        slurm = read_slurm_conf(path)
    except SlurmConfError as e:
        raise ConfigError(str(e)) from None
    if slurm is None:
        return
    hostname = socket.gethostname()
    if not settings.get("node_name"):
        name = slurm.node_name_for(hostname)
        if name is not None:
            settings["node_name"] = name
            sources["node_name"] = f"{path}: NodeName"
    if not settings.get("spool_dir"):
        node = settings.get("node_name") or hostname.split(".", 1)[0]
        spool = slurm.spool_dir_for(node, hostname)
        if spool is not None:
            settings["spool_dir"] = spool
            sources["spool_dir"] = f"{path}: SlurmdSpoolDir"
