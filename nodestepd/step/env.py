"""Environments: the step's (for the container) and the runtime commands' own."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "SlurmTask", "env_file_bytes", "exclude_env", "runtime_env_base", "runtime_env_for", "runtime_environment",
    "slurm_task_env", "validate_env_name",
]


def validate_env_name(name: str) -> None:
    """Raise ValueError unless name can stand before the '=' of an environment entry."""
    if not name:
        raise ValueError("an environment variable name must not be empty")
    if "=" in name:
        raise ValueError(f"environment variable name {name!r} must not contain '='")
    if "\0" in name:
        raise ValueError(f"environment variable name {name!r} must not contain a NUL byte")


def exclude_env(env: Mapping[str, str], regex: re.Pattern[str] | None) -> dict[str, str]:
    """Drop entries whose whole "NAME=value" text matches regex anywhere (EnvExclude semantics)."""
    if regex is None:
        return dict(env)
    return {name: value for name, value in env.items() if regex.search(f"{name}={value}") is None}


def env_file_bytes(env: Mapping[str, str], fmt: str) -> bytes:
    """The environment file for CreateEnvFile=null or CreateEnvFile=newline."""
    if fmt == "null":
        terminator = b"\0"
    elif fmt == "newline":
        terminator = b"\n"
    elif fmt == "disabled":
        raise ValueError("CreateEnvFile is disabled: there is no environment file to write")
    else:
        raise ValueError(f"unknown environment file format {fmt!r}; expected 'null' or 'newline'")
    out = bytearray()
    for name, value in env.items():
        validate_env_name(name)
        if "\0" in value:
            raise ValueError(f"the value of environment variable {name!r} contains a NUL byte")
        # One entry per line cannot carry a newline; CreateEnvFile=newline drops such
        # variables. A newline in the name would break the file the same way.
        if fmt == "newline" and ("\n" in value or "\n" in name):
            continue
        # fsencode: values taken from os.environ may hold undecodable bytes as surrogates.
        out += os.fsencode(f"{name}={value}") + terminator
    return bytes(out)


# The service manager's conversation with the daemon itself (sd_notify, socket
# activation, watchdog, journal stream): a runtime that saw them would answer for the
# daemon (runc, for one, proxies NOTIFY_SOCKET into every container).
SERVICE_MANAGER_VARIABLES = frozenset(
    {"NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC", "JOURNAL_STREAM"}
)


def runtime_env_base(daemon_env: Mapping[str, str], regex: re.Pattern[str] | None) -> dict[str, str]:
    """The daemon's environment as every runtime command gets it: minus RunTimeEnvExclude and
    the service manager's variables. It changes only with the configuration."""
    return {k: v for k, v in exclude_env(daemon_env, regex).items() if k not in SERVICE_MANAGER_VARIABLES}


def runtime_env_for(base: Mapping[str, str], *, user: str, home: str, uid: int) -> dict[str, str]:
    """A step's runtime environment: the base, as the user. Set after filtering: the runtime
    needs these to be the step user's, whatever the regex says."""
    return {**base, "HOME": home, "USER": user, "LOGNAME": user, "XDG_RUNTIME_DIR": f"/run/user/{uid}"}


def runtime_environment(
    daemon_env: Mapping[str, str], regex: re.Pattern[str] | None, *, user: str, home: str, uid: int
) -> dict[str, str]:
    """Environment for the RunTime* commands: the daemon's, minus RunTimeEnvExclude and the
    service manager's variables, as the user."""
    return runtime_env_for(runtime_env_base(daemon_env, regex), user=user, home=home, uid=uid)


@dataclass(frozen=True)
class SlurmTask:
    """Who one task is, in Slurm's terms."""

    job_id: int
    step_id: int
    task_id: int  # the task's rank in the step: %t, SLURM_PROCID
    local_id: int  # its rank among the step's tasks on this node: SLURM_LOCALID
    node_id: int | None  # SLURM_NODEID, when the caller knows it
    container: str  # the bundle: SLURM_CONTAINER (srun --container)
    container_id: str | None  # SLURM_CONTAINER_ID (srun --container-id), when given


def slurm_task_env(task: SlurmTask) -> dict[str, str]:
    """The variables Slurm gives a task of a containerised step; they override the caller's
    own (a step launched from inside another carries that one's ids)."""
    env = {
        "SLURM_JOB_ID": str(task.job_id),
        "SLURM_JOBID": str(task.job_id),
        "SLURM_STEP_ID": str(task.step_id),
        "SLURM_STEPID": str(task.step_id),
        "SLURM_PROCID": str(task.task_id),
        "SLURM_LOCALID": str(task.local_id),
        "SLURM_CONTAINER": task.container,
    }
    if task.node_id is not None:
        env["SLURM_NODEID"] = str(task.node_id)
    if task.container_id is not None:
        env["SLURM_CONTAINER_ID"] = task.container_id
    return env
