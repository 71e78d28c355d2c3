"""MPI steps under srun (`srun --mpi=pmix` or `--mpi=pmi2` ... `nodestepctl run`): what a
per-task container needs so that its ranks reach Slurm's PMIx server or PMI2 channel.
Pure functions, but for reading the subordinate id files (subid_ranges).

What each piece is for was measured (the team's MPI facts page; docs/admin-guide.md#mpi):

- PMIx (Open MPI): the rank reaches the PMIx server in slurmstepd over the host's
  loopback (PMIX_SERVER_URI*), which checks that the client's uid is the job's: the rank
  must run as the user's own uid inside the container, not as container root mapped to
  the user. runc cannot map a user to itself rootless, so the runtime runs in an outer
  user namespace where the user is root and the user's subordinate ids are 1..N (made by
  nodestepd-monitor, --userns: what `unshare --map-user=0 --map-users=SUBUID,1,N` does
  through newuidmap, which no_new_privs rules out for the task itself; only the ids
  /etc/subuid gives the user, never more than the user could map alone), and the
  container maps its uid U to that namespace's 0 (the user) and its root to its 1. The step's dirs: the slurmd spool's pmix.J.S (PMIx's
  shared-memory store, PMIX_SERVER_TMPDIR) and /tmp/spmix_appdir_U_J.S (Open MPI's
  session dir); /dev/shm.
- PMI2 (MPICH): the channel is an fd srun's slurmstepd hands the task (PMI_FD); the client
  passes it along (run --preserve-fds, ctl/run.py) and the container gets it at 3 and up.
- Both: the host's network (no network namespace).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nodestepd.config.settings import DEFAULT_MPI_MOUNTS, MPI_MOUNT_KEYWORDS, MPI_PMIX_APP_DIR, MPI_PMIX_SERVER_DIR
from nodestepd.config.subids import parse_subids

SUBIDS_MAPPED = 65536  # at most this many of the user's subordinate ids (as `unshare --map-auto`)


# What srun gives a task (PMIx server URIs in each version's variable, PMI2's fd): the
# environment that makes a step an MPI step, and that EnvExclude must not cut.
_PMIX_URI = re.compile(r"PMIX_SERVER_URI[0-9]*\Z")


# Measured: runc create in the user namespace leaves its exec.fifo to the container's root
# (a subordinate id), which `runc start`, run as the user outside it, cannot open.
CREATE_START_OWN_UID = (
    "a PMIx step runs its ranks as the user's own uid, which takes RunTimeRun (run mode): with RunTimeCreate, "
    "RunTimeStart runs outside the user namespace the container was created in and cannot start it (the site "
    "uses a run-mode oci.conf for MPI, or sets mpi_user_namespace = \"never\")")


class MpiError(Exception):
    """The MPI step cannot be set up as asked; one sentence for the user."""


@dataclass(frozen=True)
class MpiSettings:
    """The site's MPI settings (nodestepd.toml: mpi_mounts, mpi_user_namespace, mpi_network_namespace)."""

    mounts: tuple[str, ...] = DEFAULT_MPI_MOUNTS
    user_namespace: str = "auto"  # auto: PMIx steps run as the user's own uid; never: as the bundle says
    network_namespace: str = "refuse"  # a bundle with its own network namespace: refuse the step, or warn


@dataclass(frozen=True)
class MpiStep:
    """An MPI task's interface to Slurm, as srun's environment tells it."""

    kind: str  # "pmix" or "pmi2"
    pmix_server_dir: str | None = None  # the spool's pmix.J.S, when PMIX_SERVER_TMPDIR names it
    pmix_app_dir: str | None = None  # Slurm's /tmp/spmix_appdir_U_J.S


def detect(env: Mapping[str, str], *, job_id: int, step_id: int, uid: int) -> MpiStep | None:
    """The MPI interface srun gave the task whose environment this is, or None.

    The environment is the user's to set: what it names is only ever bound into the
    container by the runtime, running as the user (never opened by the daemon), and only
    in the shape Slurm gives it, for this step's own ids."""
    if env.get("PMIX_NAMESPACE") and any(_PMIX_URI.match(name) for name in env):
        server = env.get("PMIX_SERVER_TMPDIR", "").rstrip("/")
        if not (server.startswith("/") and os.path.normpath(server) == server
                and os.path.basename(server) == f"pmix.{job_id}.{step_id}"):
            server = ""
        tmp = env.get("PMIX_SYSTEM_TMPDIR", "/tmp").rstrip("/") or "/tmp"
        if not (tmp.startswith("/") and os.path.normpath(tmp) == tmp):
            tmp = "/tmp"
        return MpiStep("pmix", server or None, f"{tmp}/spmix_appdir_{uid}_{job_id}.{step_id}")
    if env.get("PMI_FD", "").isdigit() and "PMI_RANK" in env:
        return MpiStep("pmi2")
    return None


def needs_own_uid(step: MpiStep | None, settings: MpiSettings, uid: int) -> bool:
    """PMIx checks the rank's uid against the job's: run it as the user's own uid."""
    return step is not None and step.kind == "pmix" and settings.user_namespace == "auto" and uid != 0


class SubidRanges(NamedTuple):
    """The first subordinate uid and gid range of a user (/etc/subuid, /etc/subgid): what
    nodestepd-monitor maps in the user namespace it makes for the task (--userns)."""

    uid_start: int
    uid_count: int
    gid_start: int
    gid_count: int


def subid_ranges(user: str, uid: int, subuid_text: str, subgid_text: str) -> SubidRanges | None:
    """The user's first range in each file (by name or decimal uid, as newuidmap reads
    them), or None when either file gives the user none."""
    def first(text: str) -> tuple[int, int] | None:
        for r in parse_subids(text):
            if r.owner in (user, str(uid)):
                return r.start, min(r.count, SUBIDS_MAPPED)
        return None
    uids, gids = first(subuid_text), first(subgid_text)
    if uids is None or gids is None:
        return None
    return SubidRanges(uids[0], uids[1], gids[0], gids[1])


def read_subid_ranges(user: str, uid: int, subuid: str = "/etc/subuid", subgid: str = "/etc/subgid") -> SubidRanges | None:
    """subid_ranges from the files (root's, read as they are: a missing file gives none)."""
    texts = []
    for path in (subuid, subgid):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read(1 << 20))
        except FileNotFoundError:
            texts.append("")
    return subid_ranges(user, uid, texts[0], texts[1])


def has_own_network_namespace(config: dict) -> bool:
    namespaces = (config.get("linux") or {}).get("namespaces") or []
    return any(isinstance(n, dict) and n.get("type") == "network" for n in namespaces)


def network_warnings(config: dict, settings: MpiSettings) -> list[str]:
    """A bundle with its own network namespace: MpiError (mpi_network_namespace = refuse),
    else the warning for the log (warn); [] for a bundle on the host's network."""
    if not has_own_network_namespace(config):
        return []
    what = ("the bundle's config.json gives the container its own network namespace: MPI's ranks reach "
            "Slurm's PMIx/PMI server and each other over the host's network")
    if settings.network_namespace == "refuse":
        raise MpiError(f"{what}; remove the \"network\" namespace from linux.namespaces (or the site sets "
                       "mpi_network_namespace = \"warn\")")
    return [what]


def rewrite_config(config: dict, step: MpiStep, settings: MpiSettings, *, uid: int, gid: int,
                   own_uid: bool) -> tuple[dict, list[str]]:
    """The task's config.json for an MPI step, and warnings for the log. Raises MpiError.

    Adds the site's mpi_mounts (a bind of the same path; the bundle's own mount at that
    destination, such as its private /dev/shm, is replaced), checks the network namespace,
    and with own_uid maps container uid/gid U/G to the outer namespace's 0 (the user) and
    container root to its 1 (the first subordinate id), the process running as U:G.
    """
    new = copy.deepcopy(config)
    warnings = network_warnings(new, settings)
    mounts = new.setdefault("mounts", [])
    if not isinstance(mounts, list):
        raise MpiError("the bundle's config.json has a \"mounts\" value that is not an array")
    for entry in settings.mounts:
        source = {MPI_PMIX_SERVER_DIR: step.pmix_server_dir, MPI_PMIX_APP_DIR: step.pmix_app_dir}.get(entry, entry)
        if source is None or (entry in MPI_MOUNT_KEYWORDS and step.kind != "pmix"):
            continue
        mounts[:] = [m for m in mounts if not (isinstance(m, dict) and m.get("destination") == source)]
        mounts.append({"destination": source, "type": "bind", "source": source, "options": ["rbind", "rw"]})
    if own_uid:
        linux = new.setdefault("linux", {})
        if not isinstance(linux, dict) or not isinstance(new.get("process"), dict):
            raise MpiError("the bundle's config.json has no usable \"linux\" and \"process\" objects")
        linux["uidMappings"] = [{"containerID": 0, "hostID": 1, "size": 1},
                                {"containerID": uid, "hostID": 0, "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": 1, "size": 1}]
        if gid != 0:
            linux["gidMappings"].append({"containerID": gid, "hostID": 0, "size": 1})
        new["process"]["user"] = {"uid": uid, "gid": gid}
    return new, warnings
