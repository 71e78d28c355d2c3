"""nodestep-oci's containers: each an attached step held between OCI create and start.

An OCI `create` is a `run` request with `oci` set, sent by the anchor (nodestepd/oci/):
the step is admitted and prepared as any other, with its runtime commands in the caller's
user and mount namespaces (process/namespaces.py), and held just before its tasks start
(run mode: spool and config.json ready, nothing running; create/start mode: RunTimeCreate
done, RunTimeStart not yet). The anchor is then told `created`. `oci-start` lets the
launch go on; `oci-kill` signals the step; `oci-delete` cancels it (a held one never
starts) and forgets the id. `oci-state` reports created/running/stopped with the anchor's
pid. Containers are found by (uid, engine id): another user's do not exist for anyone.

A container whose daemon restarted is the recovered step itself (its spec's container_id
is the engine id); only held containers do not survive a restart (their launch is undone,
as every launch that was not acknowledged). docs/oci-proxy.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from dataclasses import dataclass, field

import msgspec

from nodestepd.daemon.connection import Connection
from nodestepd.daemon.errors import BadRequest, Refused
from nodestepd.daemon.registry import Registry
from nodestepd.process.namespaces import NamespaceRefused, Namespaces, caller_namespaces
from nodestepd.protocol.messages import CreatedReply, OciStateReply, RunRequest, StepInfo
from nodestepd.step.results import Finished
from nodestepd.step.spec import LaunchFailed
from nodestepd.step.step import Step, StepState

# The daemon numbers the containers of a Slurm job J on this node J.100000, J.100001...:
# one Slurm step (srun) may run many containers, and these never meet srun's own steps.
OCI_STEP_BASE = 100000
MAX_ID = 1024
MAX_DELETED = 4096  # deleted ids remembered (their finished steps stay in `ps` for the retention)


def not_found(container_id: str) -> Refused:
    # "does not exist": the phrase podman maps to "no such container".
    return Refused("not-found", f"container {container_id} does not exist")


@dataclass
class OciContainer:
    uid: int
    id: str
    bundle: str
    annotations: dict[str, str]
    anchor_pid: int
    slurm_step_id: int | None
    namespaces: Namespaces | None
    # The daemon's (job, step) ids, taken at admission: a second create in the same job
    # must not be given them while this one's step is still being admitted.
    job_id: int | None = None
    step_id: int = 0
    go: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    launched: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    step: Step | None = None
    held: bool = False

    def status(self) -> str:
        if self.step is None:
            return "creating"
        if self.step.state is StepState.FINISHED:
            return "stopped"
        if self.held:
            return "created"
        return "running" if self.step.state in (StepState.RUNNING, StepState.TERMINATING) else "creating"

    def release(self) -> None:
        """The step ended: its namespaces are let go; a start still waiting is answered."""
        if self.namespaces is not None:
            self.namespaces.close()
            self.namespaces = None
        if not self.go.done():
            self.go.set_exception(LaunchFailed("the container ended before it was started"))
            self.go.exception()  # retrieved: nobody may wait for it any more
        if not self.launched.done():
            self.launched.set_result(False)


class OciProxy:
    """The daemon's OCI containers, by (uid, engine id)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.containers: dict[tuple[int, str], OciContainer] = {}
        self.anchors: dict[tuple[int, str], int] = {}  # recovered containers' anchors, from their attach
        # Ids deleted through us, whose finished steps `ps` still lists: they no longer exist.
        self.deleted: collections.OrderedDict[tuple[int, str], None] = collections.OrderedDict()

    # ---- create ---------------------------------------------------------------------------

    def admit(self, uid: int, peer_pid: int, sock: socket.socket,
              request: RunRequest) -> tuple[OciContainer, RunRequest]:
        """The container a create request makes (its namespaces pinned), and the run request
        with the daemon's step id. Raises Refused."""
        oci = request.oci
        assert oci is not None
        if not oci.id or len(oci.id) > MAX_ID or "\0" in oci.id or "/" in oci.id:
            raise BadRequest(f"an OCI container id must be 1 to {MAX_ID} characters, without NUL or /")
        if request.user is not None or request.detach or request.image is not None or request.ntasks != 1 \
                or request.task_offset is not None or request.step_id is not None:
            raise BadRequest("an OCI create is one attached task of a bundle, as the caller, its step id the daemon's")
        key = (uid, oci.id)
        old = self.containers.get(key)
        if (old is not None and old.status() != "stopped") or self._recovered(uid, oci.id) is not None:
            raise Refused("conflict", f"container {oci.id} already exists")
        try:
            namespaces = caller_namespaces(sock, uid)
        except NamespaceRefused as e:
            raise Refused("permission-denied", f"cannot run the container in the caller's namespaces: {e}") from None
        step_id = self._free_step(uid, request.job_id) if request.job_id is not None else 0
        container = OciContainer(uid=uid, id=oci.id, bundle=oci.bundle, annotations=dict(oci.annotations),
                                 anchor_pid=peer_pid, slurm_step_id=oci.slurm_step_id, namespaces=namespaces,
                                 job_id=request.job_id, step_id=step_id)
        self.containers[key] = container
        self.deleted.pop(key, None)
        return container, msgspec.structs.replace(request, step_id=step_id, container_id=oci.id)

    def refused(self, container: OciContainer) -> None:
        """The create was refused or its launch failed: forget it."""
        container.release()
        if self.containers.get((container.uid, container.id)) is container:
            del self.containers[(container.uid, container.id)]

    def _free_step(self, uid: int, job_id: int) -> int:
        taken = {key[2] for key in (*self.registry.running, *self.registry.finished)
                 if key[0] == uid and key[1] == job_id}
        taken |= {c.step_id for c in self.containers.values() if c.uid == uid and c.job_id == job_id}
        step_id = OCI_STEP_BASE
        while step_id in taken:
            step_id += 1
        return step_id

    def bind(self, container: OciContainer, step: Step, conn: Connection) -> None:
        """The container's step: its runtime in the caller's namespaces, held before its start."""
        container.step = step
        step.runtime.namespaces = container.namespaces
        step.hold = lambda: self._hold(container, conn)
        step.on_finished(container.release)
        step.log.info("OCI container", container_id=container.id, anchor_pid=container.anchor_pid,
                      slurm_step_id=container.slurm_step_id, namespaces=container.namespaces is not None)

    async def _hold(self, container: OciContainer, conn: Connection) -> None:
        """The launch waits here for `oci-start`; the anchor is told `created` first. An anchor
        that goes away, or a delete, ends the launch (LaunchFailed)."""
        step = container.step
        assert step is not None
        container.held = True
        try:
            await conn.send(CreatedReply(job_id=step.spec.job_id, step_id=step.spec.step_id))
            incoming = asyncio.ensure_future(conn.receive())
            try:
                await asyncio.wait({container.go, incoming}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not incoming.done():
                    incoming.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await incoming
            if not container.go.done():
                with contextlib.suppress(Exception):
                    received = incoming.result()
                    if received is not None:
                        conn.release(received[1])
                raise LaunchFailed(f"the anchor of container {container.id} went away before its start")
            container.go.result()  # raises for a delete before the start
        finally:
            container.held = False

    # ---- requests -------------------------------------------------------------------------

    def _recovered(self, uid: int, container_id: str) -> Step | None:
        """A running step of uid with that engine id that this daemon did not create (a restart)."""
        for step in self.registry.running.values():
            if step.spec.identity.uid == uid and step.spec.container_id == container_id \
                    and (uid, container_id) not in self.containers:
                return step
        return None

    def _ended(self, uid: int, container_id: str) -> Finished | Step | None:
        """A finished step of uid with that engine id (one a restarted daemon took over, then
        saw end): the engine's cleanup still deletes it, and must not be told it never was."""
        if (uid, container_id) in self.deleted:
            return None
        for step in self.registry.finished.values():
            if step.spec.identity.uid == uid and step.spec.container_id == container_id:
                return step
        return None

    def _forget(self, uid: int, container_id: str) -> None:
        self.anchors.pop((uid, container_id), None)
        self.deleted[(uid, container_id)] = None
        while len(self.deleted) > MAX_DELETED:
            self.deleted.popitem(last=False)

    def _find(self, uid: int, container_id: str) -> OciContainer | Step | Finished:
        container = self.containers.get((uid, container_id))
        if container is not None:
            return container
        found = self._recovered(uid, container_id) or self._ended(uid, container_id)
        if found is None:
            raise not_found(container_id)
        return found

    async def start(self, uid: int, container_id: str) -> None:
        found = self._find(uid, container_id)
        if not isinstance(found, OciContainer) or found.go.done():
            raise Refused("conflict", f"container {container_id} is not created (it was started already)")
        found.go.set_result(None)
        if not await asyncio.shield(found.launched):
            raise Refused("launch-failed", f"container {container_id} could not be started (the daemon's log says why)")

    def state(self, uid: int, container_id: str) -> OciStateReply:
        found = self._find(uid, container_id)
        if isinstance(found, OciContainer):
            return OciStateReply(id=found.id, status=found.status(), pid=found.anchor_pid, bundle=found.bundle,
                                 annotations=found.annotations)
        status = "stopped" if isinstance(found, Finished) or found.state is StepState.FINISHED else "running"
        return OciStateReply(id=container_id, status=status, pid=self.anchors.get((uid, container_id), 0),
                             bundle=found.spec.bundle)

    def kill(self, uid: int, container_id: str, signum: int) -> None:
        found = self._find(uid, container_id)
        if isinstance(found, Finished):
            return  # ended already, as runc's kill of a stopped container
        step = found.step if isinstance(found, OciContainer) else found
        if isinstance(found, OciContainer) and found.held:
            # A created container has no process yet: a signal that ends a process ends it.
            if not found.go.done():
                found.go.set_exception(LaunchFailed(f"container {container_id} was killed before its start"))
            return
        if step is not None and step.state is not StepState.FINISHED:
            step.signal(signum)

    async def delete(self, uid: int, container_id: str) -> None:
        if (uid, container_id) in self.deleted and (uid, container_id) not in self.containers:
            return  # deleted already: a delete is idempotent (docker's shims delete twice)
        found = self._find(uid, container_id)
        if isinstance(found, Finished):
            self._forget(uid, container_id)
            return  # ended and cleaned up by the daemon already
        step = found.step if isinstance(found, OciContainer) else found
        if isinstance(found, OciContainer):
            if not found.go.done():
                found.go.set_exception(LaunchFailed(f"container {container_id} was deleted before its start"))
        if step is not None and step.state is not StepState.FINISHED:
            await step.cancel(f"container {container_id} deleted through nodestep-oci")
        if step is not None:
            await step.wait()
        if isinstance(found, OciContainer) and self.containers.get((uid, container_id)) is found:
            del self.containers[(uid, container_id)]
        self._forget(uid, container_id)

    def annotate(self, infos: list[StepInfo]) -> None:
        """ps: each container's creator's SLURM_STEP_ID (known to the daemon that created it)."""
        for info in infos:
            if info.container_id is not None:
                container = self.containers.get((info.uid, info.container_id))
                if container is not None and container.step is not None \
                        and (container.step.spec.job_id, container.step.spec.step_id) == (info.job_id, info.step_id):
                    info.slurm_step_id = container.slurm_step_id

    def reattached(self, uid: int, step: Step, anchor_pid: int) -> None:
        """An anchor attached again after a restart: its pid is the container's for `state`."""
        if step.spec.container_id is not None:
            self.anchors[(uid, step.spec.container_id)] = anchor_pid
