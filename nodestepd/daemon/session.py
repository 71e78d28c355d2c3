"""One client connection: its requests read in turn, each answered by one method.

A `run` owns its connection until the step ends (attached: signals forwarded, the exit
event sent, the step cancelled if the client goes, as srun does) or is detached. An
`attach` (a client whose daemon died, back for the step it launched) owns its connection
the same way. Who may do what is decided from the connection's kernel-reported uid
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pwd
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nodestepd import __version__
from nodestepd.daemon import metrics
from nodestepd.daemon.accounts import Accounts
from nodestepd.daemon.admission import Admission, image_options, parse_signal
from nodestepd.daemon.authz import parse_user
from nodestepd.daemon.configuration import Configuration
from nodestepd.daemon.closer import MAX_CLOSE_BACKLOG, FdCloser, too_many_unclosed
from nodestepd.daemon.connection import Connection, ConnectionClosed
from nodestepd.daemon.errors import BadRequest, Refused
from nodestepd.daemon.ociproxy import OciContainer, OciProxy
from nodestepd.daemon.reattach import Reattachments
from nodestepd.daemon.registry import Registry
from nodestepd.image.cache import ImageCache
from nodestepd.image.refs import RefError, parse_ref
from nodestepd.image.importer import ImportFailed
from nodestepd.image.launch import ImageOptions, apply_image
from nodestepd.logs import BoundLogger, get_logger
from nodestepd.process.identity import Identity
from nodestepd.process.reaper import Reaper
from nodestepd.protocol import messages
from nodestepd.protocol.messages import (
    AttachRequest,
    CancelRequest,
    ErrorReply,
    ExitReply,
    ImageInfo,
    ImagesReply,
    ImagesRequest,
    JobEndReply,
    JobEndRequest,
    OciDeleteRequest,
    OciKillRequest,
    OciStartRequest,
    OciStateReply,
    OciStateRequest,
    OkReply,
    ProtocolError,
    PsRequest,
    ReloadRequest,
    Reply,
    RunRequest,
    SignalRequest,
    StartedReply,
    StatusReply,
    StatusRequest,
    StepInfo,
    StepsReply,
    TaskExit,
    TaskInfo,
    WaitRequest,
)
from nodestepd.step.prepare import create, plan, redirect_to
from nodestepd.step.record import RecordStore
from nodestepd.step.results import Finished, ResultStore
from nodestepd.step.spec import LaunchFailed, LaunchInput, LaunchSettings, Stdio, StepResult, StepSpec, step_status
from nodestepd.step.step import Preparation, Step, StepState, new_step
from nodestepd.systemd.journalqueue import JournalQueue
from nodestepd.systemd.output import StepOutputToJournal


@dataclass(frozen=True)
class DaemonState:
    """What every session works with: the daemon's long-lived parts."""

    configuration: Configuration
    registry: Registry
    admission: Admission
    store: RecordStore
    results: ResultStore  # finished steps' results, kept across restarts
    reaper: Reaper
    reload: Callable[[], Awaitable[list[str]]]  # re-read the settings: [] or every problem
    socket_path: str
    started_at: float
    closer: FdCloser  # closes what clients send, off the loop (closer.py)
    accounts: Accounts  # whose a connection is, subordinate uids included (accounts.py)
    reattachments: Reattachments  # recovered attached steps waiting for their clients
    output_journal: JournalQueue | None = None  # detached steps' output goes here, when logging to the journal
    images: ImageCache | None = None  # `run --image`: the image cache (None: images are not supported)
    oci: OciProxy | None = None  # nodestep-oci's containers (None: not served)


# Each request but `run` (which takes the connection over) and the method that answers it.
_ANSWERS = {StatusRequest: "status", PsRequest: "ps", SignalRequest: "signal", CancelRequest: "cancel",
            WaitRequest: "wait", ReloadRequest: "reload", ImagesRequest: "images", JobEndRequest: "job_end",
            OciStartRequest: "oci_start", OciStateRequest: "oci_state", OciKillRequest: "oci_kill",
            OciDeleteRequest: "oci_delete"}

# job-end cancels the job's steps, then looks again: a launch admitted while the first
# cancels ran is ended too. Slurm starts no step of a job once its Epilog runs, so a
# job still launching after this many rounds is an error, not a reason to loop for ever.
JOB_END_ROUNDS = 5


class Session:
    def __init__(self, conn: Connection, state: DaemonState) -> None:
        self.conn = conn
        self.state = state
        self.uid = conn.peer_uid
        self.log: BoundLogger = get_logger(peer_uid=conn.peer_uid, peer_pid=conn.peer_pid)
        # An attached run's or an attach's, from its request on: the client waits for an exit
        # (a daemon stopping with steps_on_stop = "cancel" lets these sessions send it).
        self.attending = False

    async def serve(self) -> None:
        """Answer requests until the client is done, goes quiet, or a run takes the connection."""
        c = self.state.configuration.config
        timeout, lifetime = c.client_timeout, c.connection_max_lifetime
        # However busy, a request/answer connection ends after connection_max_lifetime
        # (after the answer in hand): a request now and then within client_timeout must
        # not hold a place under the connection caps for ever. A run's is not cut (run()).
        ends = time.monotonic() + lifetime
        try:
            while True:
                try:
                    # Idle or slow (half a message, then nothing): either way the
                    # connection is given up after client_timeout, and with it its fds.
                    # (A timeout scope, not wait_for: no task made per request.)
                    async with asyncio.timeout(max(0.0, min(timeout, ends - time.monotonic()))):
                        received = await self.conn.receive()
                except TimeoutError:
                    if time.monotonic() >= ends:
                        self.log.info("connection lifetime over; closing connection", connection_max_lifetime=lifetime)
                        await self.conn.send(ErrorReply(
                            code="timeout", error=f"connection open longer than {lifetime:g} s; connect again"))
                    else:
                        self.log.info("client timed out; closing connection", client_timeout=timeout)
                        await self.conn.send(ErrorReply(code="timeout",
                                                        error=f"no complete request within {timeout:g} s"))
                    return
                except ProtocolError as e:
                    self.log.warning("bad message; closing connection", error=str(e))
                    await self.conn.send(ErrorReply(code="bad-request", error=str(e)))
                    return
                if received is None:
                    return
                body, fds = received
                received_at = time.monotonic()
                try:
                    request = messages.decode_request(body)
                except ProtocolError as e:
                    self.conn.release(fds)
                    self.log.info("malformed request", error=str(e))
                    await self.conn.send(ErrorReply(code="bad-request", error=str(e)))
                    continue
                if fds and self.state.closer.backlog(self.conn.account) >= MAX_CLOSE_BACKLOG:
                    # Stuck closes (closer.py): no more of this user's fds until they end.
                    self.conn.release(fds)
                    self.log.warning("connection ended: too many of the user's fds still being closed")
                    status = messages.STATUS_LAUNCH_FAILED if isinstance(request, RunRequest) else None
                    await self.conn.send(ErrorReply(code="busy", error=too_many_unclosed(), status=status))
                    return
                if isinstance(request, RunRequest):
                    await self.run(request, fds, received_at)  # waits for the releases in its way only (_launch)
                    return  # a run owns its connection until the step ends (or is detached)
                # A step of the caller's whose exit went out may still be releasing: the request
                # finds it as the exit said (finished) once the release is over.
                await self.state.registry.settled(self.state.configuration.policy, self.uid)
                self.conn.release(fds)
                if isinstance(request, AttachRequest):
                    await self.attach(request)
                    return  # as a run's
                await self.conn.send(await self._reply(request))
        except ConnectionClosed:
            pass
        except Exception:
            self.log.exception("connection handler failed")
        finally:
            self.conn.close()

    async def _reply(self, request: object) -> Reply:
        try:
            answer: Callable[[object], Awaitable[Reply]] = getattr(self, _ANSWERS[type(request)])
            return await answer(request)
        except Refused as e:
            self.log.info("request refused", op=type(request).__name__, code=e.code, error=str(e), **e.detail)
            return ErrorReply(code=e.code, error=str(e))

    # ---- one method per request ---------------------------------------------------------

    async def status(self, request: StatusRequest) -> StatusReply:
        state = self.state
        c, oci = state.configuration.config, state.configuration.oci
        return StatusReply(
            version=__version__,
            uptime=time.time() - state.started_at,
            node_name=c.node_name,
            config_file=c.config_file,
            oci_conf=oci.path,
            oci_mode=oci.mode,
            socket=state.socket_path,
            spool_dir=c.spool_dir,
            state_dir=c.state_dir,
            steps_running=len(state.registry.running),
            steps_finished=len(state.registry.finished),
            journal_queued=state.output_journal.queued if state.output_journal is not None else 0,
            journal_dropped=state.output_journal.dropped if state.output_journal is not None else 0,
            containers_not_deleted=state.registry.not_deleted,
            image_cache_dir=state.images.root if state.images is not None else "",
            images_imported=state.images.imports if state.images is not None else 0,
        )

    async def ps(self, request: PsRequest) -> StepsReply:
        steps = self.state.registry.visible(self.state.configuration.policy, self.uid)
        infos = [step_info(s) for s in steps]
        if self.state.oci is not None:
            self.state.oci.annotate(infos)
        return StepsReply(steps=infos)

    async def signal(self, request: SignalRequest) -> OkReply:
        if request.job_id is None:
            raise BadRequest("signal needs a job id outside an attached run")
        signum = parse_signal(request.signal)  # a bad request before any lookup
        for step in await self._own_running_parts(request.job_id, request.step_id or 0, request.user):
            step.signal(signum)
        return OkReply()

    async def cancel(self, request: CancelRequest) -> ExitReply:
        parts = await self._own_running_parts(request.job_id, request.step_id, request.user)
        reason = f"cancel requested by uid {self.uid}"
        results = await asyncio.gather(*(step.cancel(reason) for step in parts))
        return exit_reply(list(zip(parts, results)))

    async def wait(self, request: WaitRequest) -> ExitReply:
        whose = await self._whose(request.user, request.job_id, request.step_id)
        parts = self.state.registry.own_parts(self.state.configuration.policy, self.uid, request.job_id,
                                              request.step_id, whose)
        results = await asyncio.gather(*(step.wait() for step in parts))
        return exit_reply(list(zip(parts, results)))

    async def job_end(self, request: JobEndRequest) -> JobEndReply:
        """Cancel every step of the job on this node, whoever's; reply once all have ended
        and been cleaned up (containers deleted, spools and records removed)."""
        if self.uid != 0:
            raise Refused("permission-denied", "only root may end a job on this node "
                          "(nodestepctl job-end is for Slurm's node Epilog)")
        if request.job_id < 0:
            raise BadRequest(f"job id {request.job_id} is negative")
        reason = f"job {request.job_id} ended (job-end by uid {self.uid})"
        ended: list[Step] = []
        for _ in range(JOB_END_ROUNDS):
            steps = self.state.registry.running_of_job(request.job_id)
            if not steps:
                break
            self.log.info("ending a job's steps", job_id=request.job_id, steps=[s.ref for s in steps])
            await asyncio.gather(*(step.cancel(reason) for step in steps))
            ended += steps
        else:
            if self.state.registry.running_of_job(request.job_id):
                raise Refused("conflict", f"job {request.job_id} still had steps launching after "
                              f"{JOB_END_ROUNDS} rounds of cancelling; run job-end again")
        self.log.info("job ended", job_id=request.job_id, steps_ended=len(ended))
        return JobEndReply(job_id=request.job_id, ended=[step_info(s) for s in ended])

    async def reload(self, request: ReloadRequest) -> OkReply:
        if self.uid != 0:
            raise Refused("permission-denied", "only root may reload nodestepd's configuration")
        problems = await self.state.reload()
        if problems:
            listing = "".join(f"\n  {problem}" for problem in problems)
            raise Refused("reload-failed", f"configuration not reloaded, the old one stays in use:{listing}")
        return OkReply()

    async def images(self, request: ImagesRequest) -> ImagesReply:
        """The image cache's entries the caller may see, or (remove, prune) removes."""
        images = self.state.images
        if images is None:
            raise Refused("not-found", "this nodestepd does not run images")
        policy = self.state.configuration.policy
        if request.import_ is not None:
            return await self._import_for_caller(images, request)
        if request.user is not None:
            try:
                uid = await asyncio.to_thread(parse_user, request.user)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            if not policy.may_act_on(self.uid, uid):
                raise Refused("permission-denied", "only operators may see or remove another user's images")
            uids = [uid]
        elif policy.is_operator(self.uid) and request.remove is None and not request.prune:
            uids = await asyncio.to_thread(images.users)
        else:
            uids = [self.uid]
        in_use: dict[str, int] = {}
        for step in self.state.registry.running.values():
            for bundle in (step.spec.bundle, os.path.dirname(step.spec.bundle)):  # rootfs: IgnoreFileConfigJson
                in_use[bundle] = in_use.get(bundle, 0) + 1
        listing = []
        for uid in uids:
            user = await asyncio.to_thread(_user_name, uid)
            for digest in await asyncio.to_thread(images.entries, uid):
                listing.append(ImageInfo(user=user, uid=uid, digest=digest, refs=images.refs_of(uid, digest),
                                         in_use=in_use.get(images.bundle_of(uid, digest), 0)))
        if request.remove is None and not request.prune:
            return ImagesReply(images=listing)
        if request.remove is not None:
            wanted = request.remove.removeprefix("sha256:")
            listing = [i for i in listing if i.digest.removeprefix("sha256:").startswith(wanted)] if wanted else []
            if not listing:
                raise Refused("not-found", f"no image {request.remove} in your image cache")
            if len(listing) > 1:
                raise Refused("ambiguous", f"{request.remove} names {len(listing)} images; give more of the digest")
        removed, kept = [], []
        for info in listing:
            if info.in_use:
                kept.append(info)
                continue
            problems = await asyncio.to_thread(images.remove, info.uid, info.digest)
            if problems:
                self.log.error("cannot remove an image from the cache", digest=info.digest, problems=problems)
                raise Refused("error", f"cannot remove image {info.digest}: {problems[0]}")
            self.log.info("image removed from the cache", digest=info.digest, user=info.user)
            removed.append(info)
        return ImagesReply(images=removed, kept=kept)

    # nodestep-oci's requests (ociproxy.py): containers found by the caller's uid and engine id.

    def _oci(self) -> OciProxy:
        if self.state.oci is None:
            raise Refused("not-found", "this nodestepd does not serve nodestep-oci")
        return self.state.oci

    async def oci_start(self, request: OciStartRequest) -> OkReply:
        await self._oci().start(self.uid, request.id)
        return OkReply()

    async def oci_state(self, request: OciStateRequest) -> OciStateReply:
        return self._oci().state(self.uid, request.id)

    async def oci_kill(self, request: OciKillRequest) -> OkReply:
        self._oci().kill(self.uid, request.id, parse_signal(request.signal))
        return OkReply()

    async def oci_delete(self, request: OciDeleteRequest) -> OkReply:
        await self._oci().delete(self.uid, request.id)
        return OkReply()

    async def _import_for_caller(self, images: ImageCache, request: ImagesRequest) -> ImagesReply:
        """`image import REF`: the caller's image imported (or found) as the caller, nothing run."""
        assert request.import_ is not None
        if request.user is not None or request.remove is not None or request.prune:
            raise BadRequest("import goes alone: no user, remove or prune")
        try:
            ref = parse_ref(request.import_).canonical
        except RefError as e:
            raise BadRequest(str(e)) from None
        fingerprint = request.image_fingerprint
        if fingerprint is not None and (len(fingerprint) > 256 or "\0" in fingerprint):
            raise BadRequest("image_fingerprint must be at most 256 bytes, without NUL bytes")
        try:
            identity = await asyncio.to_thread(Identity.for_uid, self.uid)
        except LookupError as e:
            raise BadRequest(str(e)) from None
        env = self.state.configuration.launch.runtime_env(identity)
        try:
            entry = await images.get(identity, ref, fingerprint, env, self.log)
        except ImportFailed as e:
            raise Refused("launch-failed", str(e)) from None
        images.release(entry)
        return ImagesReply(images=[ImageInfo(user=identity.user, uid=identity.uid, digest=entry.digest,
                                             refs=images.refs_of(identity.uid, entry.digest), in_use=0)])

    async def _own_running_parts(self, job_id: int, step_id: int, user: str | None) -> list[Step]:
        whose = await self._whose(user, job_id, step_id)
        return self.state.registry.own_running_parts(self.state.configuration.policy, self.uid, job_id, step_id,
                                                     whose)

    async def _whose(self, user: str | None, job_id: int, step_id: int) -> int | None:
        """The uid a request's `user` names (None: not given). An unknown user is, for anyone
        but an operator, no different from a step that does not exist."""
        if user is None:
            return None
        try:
            return await asyncio.to_thread(parse_user, user)
        except ValueError as e:
            if self.state.configuration.policy.is_operator(self.uid):
                raise BadRequest(str(e)) from None
            raise Refused("not-found", f"no step {job_id}.{step_id} of yours on this node") from None

    # ---- attach ---------------------------------------------------------------------------

    async def attach(self, request: AttachRequest) -> None:
        """The attached client of a launch, back after its daemon died: `started`, then as an
        attached run (signals forwarded, the exit sent, the step cancelled if the client
        goes); for a launch that has finished, `started` and its exit at once."""
        self.attending = True
        try:
            step, running = self._attachable(request)
        except Refused as e:
            self.log.info("attach refused", code=e.code, error=str(e), **e.detail)
            await self.conn.send(ErrorReply(code=e.code, error=str(e)))
            return
        if running and self.state.oci is not None:
            self.state.oci.reattached(self.uid, step, self.conn.peer_pid)
        self.log.info("client re-attached", job_id=step.spec.job_id, step_id=step.spec.step_id,
                      first_task=step.spec.first_task, finished=not running)
        await self.conn.send(StartedReply(job_id=step.spec.job_id, step_id=step.spec.step_id, ntasks=step.spec.ntasks))
        if running:
            await self._attend(step, metrics.OFF)
        else:
            await self.conn.send(exit_reply([(step, await step.wait())]))

    def _attachable(self, request: AttachRequest) -> tuple[Step, bool]:
        """The launch the request names, found as `wait` finds it (the owner's, or any for an
        operator), and whether it still runs: a running one only if it is a recovered
        attached step that no client has claimed yet (reattach.py)."""
        ref = f"{request.job_id}.{request.step_id}"
        parts = self.state.registry.own_parts(self.state.configuration.policy, self.uid, request.job_id,
                                              request.step_id)
        launch = [s for s in parts if s.spec.first_task == request.first_task]
        if not launch:
            raise Refused("not-found", f"no step {ref} of yours on this node with first task {request.first_task}")
        step = launch[0]
        if not step.spec.attached:
            raise Refused("conflict", f"step {ref} was launched detached (nodestepctl wait {ref} gives its status)")
        # What a finished launch is asked for is its spec and its result (wait()) only, so
        # that the registry may keep finished launches as something lighter than a Step.
        running = isinstance(step, Step) and step.state is not StepState.FINISHED
        if running and not self.state.reattachments.claim(step):
            raise Refused("conflict", f"step {ref} already has its attached client")
        return step, running

    # ---- run ----------------------------------------------------------------------------

    async def run(self, request: RunRequest, fds: list[int], received_at: float) -> None:
        self.attending = not request.detach
        container = None
        try:
            if request.oci is not None:
                try:
                    container, request = self._oci().admit(self.uid, self.conn.peer_pid, self.conn.sock, request)
                except Refused as e:
                    self.log.info("OCI create refused", code=e.code, error=str(e), **e.detail)
                    await self.conn.send(ErrorReply(code=e.code, error=str(e), status=messages.STATUS_LAUNCH_FAILED))
                    return
            launched = await self._launch(request, fds, received_at, container)
        finally:
            self.conn.release(fds)  # the tasks have their own copies now
            if container is not None:
                self._oci_launched(container)
        if launched is None:
            return
        step, timings = launched
        self.state.registry.started(step)
        await self.conn.send(StartedReply(job_id=step.spec.job_id, step_id=step.spec.step_id, ntasks=step.spec.ntasks))
        timings.started(step.log)
        if request.detach:
            return
        await self._attend(step, timings)

    def _oci_launched(self, container: OciContainer) -> None:
        """An OCI create's launch is over: its start is answered; a failed one is forgotten."""
        ok = container.step is not None and container.step.state is not StepState.FINISHED
        if not container.launched.done():
            container.launched.set_result(ok)
        if not ok:
            self._oci().refused(container)

    async def _launch(self, request: RunRequest, fds: list[int], received_at: float,
                      container: OciContainer | None = None) -> tuple[Step, metrics.StepTimings | metrics.Off] | None:
        """Admit the request and launch its step; None when it was refused or failed (the
        client has its error reply, with status 125)."""
        state = self.state
        try:
            spec, given = await state.admission.admit(self.uid, request, fds)
            options = image_options(request)
            if options is not None and state.images is None:
                raise Refused("launch-failed", "this nodestepd does not run images")
            # A step whose exit went out may hold these ids (or a place under the caps) until
            # its release is over: the launch waits for that rather than being refused.
            caps = state.configuration.config
            await state.registry.room_for(spec, max_steps=caps.max_steps, max_steps_per_user=caps.max_steps_per_user)
            launch, c = state.configuration.launch, state.configuration.config
            timings = metrics.for_step(c.debug_timings, received_at)
            step = new_step(spec, launch.step, launch.runtime_env(spec.identity), store=state.store,
                            reaper=state.reaper, results=state.results, timings=timings,
                            importing=options is not None)
            state.registry.add(step, max_steps=c.max_steps, max_steps_per_user=c.max_steps_per_user)
            if container is not None and state.oci is not None:
                state.oci.bind(container, step, self.conn)
        except Refused as e:
            self.log.info("launch refused", code=e.code, error=str(e), **e.detail)
            await self.conn.send(ErrorReply(code=e.code, error=str(e), status=messages.STATUS_LAUNCH_FAILED))
            return None
        output = None
        try:
            if request.output_to_journal and request.detach and state.output_journal is not None:
                output = StepOutputToJournal(state.output_journal, job_id=spec.job_id, step_id=spec.step_id,
                                             user=spec.identity.user, task_ids=spec.task_ids)
            stdio = Stdio(fds[0], fds[1], fds[2], output.task_outputs if output is not None else None,
                          preserved=tuple(fds[3:]))
            image = None
            if options is not None:
                # An operator's client fingerprinted the archive with its own rights, not the user's.
                fingerprint = request.image_fingerprint if request.user is None else None
                image = functools.partial(self._import_image, step, given, options, fingerprint)
            await step.launch(_preparation(step, spec, given, launch), stdio, received_at, image=image)
        except Exception as e:
            state.registry.discard(step)
            if isinstance(e, LaunchFailed):
                step.log.warning("launch failed", error=str(e))
                message = str(e)
            else:
                step.log.exception("launch failed unexpectedly")
                message = f"internal error in nodestepd while launching: {e!r} (see the daemon's log)"
            await self.conn.send(ErrorReply(code="launch-failed", error=message, status=messages.STATUS_LAUNCH_FAILED))
            return None
        finally:
            if output is not None:
                output.release_write_ends()  # the tasks have their own; end of file when they are gone
        return step, timings

    async def _import_image(self, step: Step, given: LaunchInput, options: ImageOptions,
                            fingerprint: str | None) -> tuple[StepSpec, Preparation]:
        """An image step's import phase: the image from the cache (imported as the user if
        need be), then the step's spec, preparation and stage_in redirection as for a bundle of it."""
        state = self.state
        assert state.images is not None
        launch = state.configuration.launch
        try:
            entry = await state.images.get(step.spec.identity, options.ref, fingerprint, dict(step.runtime.env),
                                           step.log)
        except ImportFailed as e:
            raise LaunchFailed(str(e)) from None
        # Held until the step ends, failed launches included: never evicted while it runs.
        step.on_finished(functools.partial(state.images.release, entry))
        spec, given = apply_image(step.spec, given, entry, options, ignore_config_json=launch.oci.ignore_file_config_json)
        return spec, _preparation(step, spec, given, launch)

    async def _attend(self, step: Step, timings: metrics.StepTimings | metrics.Off) -> None:
        """An attached run: forward signal requests until the step ends; cancel it if the client goes.

        The exit goes out as soon as the step's result is final (Step.told), before the
        release's filesystem work: the client's next request waits for that (Registry.settled)."""
        done = step.told()
        incoming: asyncio.Future | None = None
        while not done.done():
            incoming = asyncio.ensure_future(self.conn.receive())
            await asyncio.wait({done, incoming}, return_when=asyncio.FIRST_COMPLETED)
            if not incoming.done():
                break  # the exit: sent first, the read given up after it
            reason = "attached client went away"
            try:
                received = incoming.result()
            except (ProtocolError, ConnectionClosed) as e:
                received, reason = None, f"attached client's connection broke: {e}"
            if received is None:
                # Like srun: the step does not outlive the client that holds its stdio.
                await step.cancel(reason)
                break
            body, fds = received
            self.conn.release(fds)
            try:
                request = messages.decode_request(body)
                if not isinstance(request, SignalRequest) or request.job_id is not None or request.user is not None:
                    raise ProtocolError("an attached run accepts only signal requests without ids")
                step.signal(parse_signal(request.signal))
            except (ProtocolError, BadRequest) as e:
                step.log.info("request refused on an attached run", peer_uid=self.uid, error=str(e))
                await self.conn.send(ErrorReply(code="bad-request", error=str(e)))
        await self.conn.send(exit_reply([(step, done.result())]))
        timings.sent(step.log)
        if incoming is not None and not incoming.done():
            incoming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await incoming


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _preparation(step: Step, spec: StepSpec, given: LaunchInput, launch: LaunchSettings) -> Preparation:
    """How the step's launch of spec is prepared (step/prepare.py), in its parts."""
    return Preparation(plan=functools.partial(plan, spec, given, launch, step.runtime.env),
                       create=functools.partial(create, spec=spec, given=given, settings=launch, log=step.log,
                                                spares=step.store.spares),
                       redirect=functools.partial(redirect_to, spec, given, launch))


# ---- replies ------------------------------------------------------------------------------


def step_info(step: Step | Finished) -> StepInfo:
    spec = step.spec
    if isinstance(step, Finished):
        return StepInfo(
            job_id=spec.job_id, step_id=spec.step_id, user=spec.identity.user, uid=spec.identity.uid,
            state="finished", attached=spec.attached, bundle=spec.bundle, args=list(spec.args),
            started_at=step.started_at,
            tasks=[TaskInfo(task_id=t, pid=pid, status=status, not_deleted=gone)
                   for t, pid, status, gone in zip(spec.task_ids, step.pids, step.result.task_statuses,
                                                   step.not_deleted)],
            status=step.result.status,
            stage_out_failed=step.stage_out_error is not None,
            container_id=spec.container_id,
        )
    return StepInfo(
        job_id=spec.job_id,
        step_id=spec.step_id,
        user=spec.identity.user,
        uid=spec.identity.uid,
        state=step.state.value,
        attached=spec.attached,
        bundle=spec.bundle,
        args=list(spec.args),
        started_at=step.started_at,
        tasks=[TaskInfo(task_id=t.task_id, pid=t.watch.pid if t.watch else None,
                        status=t.status if t.status_known else None, not_deleted=t.not_deleted) for t in step.tasks],
        status=step.result.status if step.result else None,
        stage_out_failed=step.stage_out_error is not None,
        container_id=spec.container_id,
    )


def exit_reply(parts: list[tuple[Step | Finished, StepResult]]) -> ExitReply:
    """One exit for a step launched in one or several parts: the first non-zero task status in task order."""
    tasks = sorted(
        (TaskExit(task_id=t, status=s) for step, result in parts for t, s in zip(step.spec.task_ids, result.task_statuses)),
        key=lambda task: task.task_id,
    )
    # Each part's status is its first non-zero task status, and parts hold disjoint runs
    # of task ids: in task order, the first non-zero part status is the step's.
    ordered = sorted(parts, key=lambda part: part[0].spec.first_task)
    status = step_status([result.status for _, result in ordered])
    spec = parts[0][0].spec
    return ExitReply(
        job_id=spec.job_id,
        step_id=spec.step_id,
        status=status,
        tasks=tasks,
        cancelled=any(result.cancelled for _, result in parts),
        stage_out_error="; ".join(step.stage_out_error for step, _ in ordered if step.stage_out_error) or None,
    )
