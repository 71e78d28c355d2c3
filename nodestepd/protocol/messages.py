"""The wire protocol between nodestepctl (or any client) and nodestepd.

The message types, as msgspec structs: decoding a request validates it completely
(types, required fields, no unknown fields) with an error that names the field.
Framing lives in wire.py. docs/protocol.md is the reference; keep the three in step.
"""

from __future__ import annotations

from typing import Union

import msgspec

from nodestepd.protocol.wire import (  # noqa: F401  (re-exported: the daemon's single view of the protocol)
    HEADER,
    MAX_FDS,
    MAX_PRESERVE_FDS,
    MAX_JSON_DEPTH,
    MAX_MESSAGE,
    STATUS_CONNECTION_LOST,
    STATUS_LAUNCH_FAILED,
    VERSION,
    ProtocolError,
    check_json_depth,
    frame_body,
    frame_length,
    json_too_deep,
    parse_step_ref,
)


# ---- requests -------------------------------------------------------------------


class Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    v: int


class Mount(msgspec.Struct, forbid_unknown_fields=True):
    """A bind mount an image step asks for (`run --mount SRC:DST[:ro]`): source on the host, as the user sees it."""

    source: str
    destination: str
    readonly: bool = False


class OciCreate(msgspec.Struct, forbid_unknown_fields=True):
    """What makes a run an OCI container of nodestep-oci (docs/oci-proxy.md): the daemon
    holds the step once prepared (replying `created`) until an `oci-start` for its id."""

    id: str  # the engine's container id, unique per user among the daemon's containers
    bundle: str  # as the engine gave it: it may exist only in the caller's mount namespace
    annotations: dict[str, str] = {}
    slurm_step_id: int | None = None  # the caller's SLURM_STEP_ID, kept for ps and the log


class RunRequest(Request, tag="run"):
    """Launch a step. 3 + preserve_fds fds ride along: the tasks' stdin, stdout, stderr,
    then the fds each container gets at 3, 4, ... (`run --preserve-fds`, MPI's PMI fd)."""

    bundle: str
    args: list[str]
    env: dict[str, str] = {}
    job_id: int | None = None
    step_id: int | None = None
    ntasks: int = 1
    chdir: str = "/"
    pty: bool = False
    detach: bool = False
    # The bundle's config.json as the caller read it with its own rights, or why it
    # could not be read: the daemon never opens paths under the caller's control as root.
    config_json: str | None = None
    config_json_error: str | None = None
    # Detached without output files: the daemon sends the tasks' stdout and stderr to the
    # journal with the step's fields (when it logs to the journal; else the fds are used).
    output_to_journal: bool = False
    # A per-task launch (srun starts one nodestepctl per task): this launch's tasks are
    # task_offset ... task_offset+ntasks-1 of the step, and other launches of the same
    # job.step may run beside it as long as their task ids do not overlap. None: the
    # launch is the whole step on this node (task ids from 0).
    task_offset: int | None = None
    local_offset: int | None = None  # SLURM_LOCALID of the first task (default: its task id)
    node_id: int | None = None  # SLURM_NODEID, when the caller knows it
    container_id: str | None = None  # SLURM_CONTAINER_ID (srun --container-id), when given
    # Operators only (docs/security.md): run the step as this user (a name or a decimal
    # uid). The daemon then reads config.json itself, as that user, so the two fields
    # above must be null.
    user: str | None = None
    # Files the daemon opens as the step's user for the tasks' stdout/stderr, in place of
    # the fds that came with the request (how an operator's --output reaches the user's files).
    output: str | None = None
    error: str | None = None
    # Run a container image (`run --image`) in place of a bundle: bundle is then "" and the
    # daemon imports the image as the user into its cache (docs/user-guide.md). args may be
    # empty: the image's Entrypoint and Cmd run. image_fingerprint: the client's refs.fingerprint
    # of a local archive or layout, how a cached image is found without starting anything.
    image: str | None = None
    image_fingerprint: str | None = None
    mounts: list[Mount] = []
    entrypoint: str | None = None  # replaces the image's Entrypoint ("": none)
    workdir: str | None = None  # the container's working directory (default: the image's WorkingDir)
    # nodestep-oci's create: the step is an OCI container (held before its start, its
    # runtime run in the caller's user and mount namespaces). step_id is then the daemon's.
    oci: OciCreate | None = None
    # How many fds after stdio came along, for the containers' fds 3.. (0..MAX_PRESERVE_FDS);
    # the runtime (runc, crun) is told `--preserve-fds N`.
    preserve_fds: int = 0


class SignalRequest(Request, tag="signal"):
    """Signal a step. Without ids: the step this connection launched (attached runs)."""

    signal: str
    job_id: int | None = None
    step_id: int | None = None
    user: str | None = None  # whose step (a name or a decimal uid): see StepRef


class StepRef(Request):
    job_id: int
    step_id: int
    # Whose job.step (a name or a decimal uid). Step names are per user: an operator names
    # the user when several users have a step J.S; anyone else may name only themselves.
    user: str | None = None


class CancelRequest(StepRef, tag="cancel"):
    pass


class WaitRequest(StepRef, tag="wait"):
    pass


class AttachRequest(StepRef, tag="attach"):
    """Attach again to a launch whose attached client lost its daemon (a restart): the
    reply is `started`, then `exit` when it ends, as for the `run` that launched it."""

    first_task: int = 0  # the launch's first task id: task_offset, 0 for a whole-step launch


class PsRequest(Request, tag="ps"):
    pass


class JobEndRequest(Request, tag="job-end"):
    """End job `job_id` on this node (root only; Slurm's node Epilog runs it): cancel every
    step of the job, whoever's, and reply `job-end` once they are all ended and cleaned up."""

    job_id: int


class StatusRequest(Request, tag="status"):
    pass


class ReloadRequest(Request, tag="reload"):
    """Re-read the settings file and oci.conf (root only). Reply: ok, or error with every reason."""


class ImagesRequest(Request, tag="images"):
    """The image cache's entries: the caller's; an operator's: everyone's, or `user`'s.

    With remove: remove the entry whose digest is (or starts with) `remove`, or with
    prune every entry of the user, leaving those a step still runs from. With import_:
    import that image for the caller (as a run would, without running anything)."""

    user: str | None = None
    remove: str | None = None
    prune: bool = False
    import_: str | None = msgspec.field(default=None, name="import")
    image_fingerprint: str | None = None


class OciRef(Request):
    id: str  # an OCI container of the caller's, by the engine's id


class OciStartRequest(OciRef, tag="oci-start"):
    """Start a created container. Reply: ok once it runs."""


class OciStateRequest(OciRef, tag="oci-state"):
    """Reply: oci-state."""


class OciKillRequest(OciRef, tag="oci-kill"):
    """Deliver a signal to the container (running; a created one is deleted by SIGKILL). Reply: ok."""

    signal: str


class OciDeleteRequest(OciRef, tag="oci-delete"):
    """Cancel the container if it runs, and forget it. Reply: ok (also for an unknown id once ended)."""


AnyRequest = Union[RunRequest, SignalRequest, CancelRequest, WaitRequest, PsRequest, StatusRequest, ReloadRequest,
                   AttachRequest, ImagesRequest, JobEndRequest, OciStartRequest, OciStateRequest, OciKillRequest,
                   OciDeleteRequest]

# ---- replies --------------------------------------------------------------------


class Reply(msgspec.Struct, tag_field="type"):
    v: int = VERSION


class ErrorReply(Reply, tag="error"):
    # bad-request, not-found, permission-denied, launch-failed, conflict, reload-failed, limit, timeout, busy
    code: str = "error"
    error: str = ""
    status: int | None = None  # exit status the client should use, when it has one


class OkReply(Reply, tag="ok"):
    pass


class StartedReply(Reply, tag="started"):
    job_id: int = 0
    step_id: int = 0
    ntasks: int = 1


class CreatedReply(Reply, tag="created"):
    """An OCI create's step is prepared and held until `oci-start` (then `started` follows)."""

    job_id: int = 0
    step_id: int = 0


class OciStateReply(Reply, tag="oci-state"):
    id: str = ""
    status: str = ""  # created, running, stopped
    pid: int = 0  # the anchor's (the engine's view of the container's process)
    bundle: str = ""
    annotations: dict[str, str] = {}


class TaskExit(msgspec.Struct):
    task_id: int
    status: int | None  # exit code, 128+N for signal N; None: never started, or not known


class ExitReply(Reply, tag="exit"):
    job_id: int = 0
    step_id: int = 0
    # The first non-zero task status, else 0; None (null) when no task failed but some
    # task's status is not known (it ended while no daemon watched it and no record of
    # its status survived): never a made-up 0.
    status: int | None = 0
    tasks: list[TaskExit] = []
    cancelled: bool = False
    # How the site's stage_out failed (the step's status is the tasks' all the same).
    stage_out_error: str | None = None


class TaskInfo(msgspec.Struct):
    task_id: int
    pid: int | None
    status: int | None
    # RunTimeDelete hung every time it ran for this task: the runtime may still hold the
    # container (the daemon's log has the command that deletes it).
    not_deleted: bool = False


class StepInfo(msgspec.Struct):
    job_id: int
    step_id: int
    user: str
    uid: int
    state: str  # importing (its image), launching, running, terminating, finished
    attached: bool
    bundle: str
    args: list[str]
    started_at: float
    tasks: list[TaskInfo]
    status: int | None = None
    stage_out_failed: bool = False  # the site's stage_out failed at the step's end (the log says how)
    container_id: str | None = None  # an OCI container's engine id (nodestep-oci), or SLURM_CONTAINER_ID
    slurm_step_id: int | None = None  # an OCI container's creator's SLURM_STEP_ID (while this daemon knows it)


class StepsReply(Reply, tag="steps"):
    steps: list[StepInfo] = []


class JobEndReply(Reply, tag="job-end"):
    job_id: int = 0
    ended: list[StepInfo] = []  # the steps job-end cancelled, as they finished (a launch of several parts: each)


class StatusReply(Reply, tag="status"):
    version: str = ""
    uptime: float = 0.0
    node_name: str = ""
    config_file: str | None = None
    oci_conf: str = ""
    oci_mode: str = ""
    socket: str = ""
    spool_dir: str = ""
    state_dir: str = ""
    steps_running: int = 0
    steps_finished: int = 0
    # Journal records (log records, detached steps' output) waiting for a slow journald,
    # and dropped since the start because they exceeded the queue's bounds.
    journal_queued: int = 0
    journal_dropped: int = 0
    # Containers whose RunTimeDelete hung every time, since the start (see TaskInfo.not_deleted).
    containers_not_deleted: int = 0
    # Images unpacked into the image cache since the start (an image found there is not counted).
    image_cache_dir: str = ""
    images_imported: int = 0


class ImageInfo(msgspec.Struct):
    user: str
    uid: int
    digest: str  # sha256:HEX of the image's manifest
    refs: list[str]  # the references this daemon imported or found it as (since its start)
    in_use: int  # steps running from it


class ImagesReply(Reply, tag="images"):
    images: list[ImageInfo] = []  # the listing; after a removal, what was removed
    kept: list[ImageInfo] = []  # a removal's entries left because steps run from them


AnyReply = Union[ErrorReply, OkReply, StartedReply, ExitReply, StepsReply, StatusReply, ImagesReply, JobEndReply,
                 CreatedReply, OciStateReply]

_request_decoder = msgspec.json.Decoder(AnyRequest)
_encoder = msgspec.json.Encoder()


def frame(message: msgspec.Struct) -> bytes:
    return frame_body(_encoder.encode(message))


class _Versioned(msgspec.Struct):
    v: int


_version_decoder = msgspec.json.Decoder(_Versioned)


def decode_request(body: bytes) -> AnyRequest:
    # Before any decoder recurses: each nesting level is a recursion in msgspec.
    check_json_depth(body, "malformed request: the request")
    # The version first, leniently: a newer client's request may have a shape we don't know.
    try:
        version = _version_decoder.decode(body).v
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        version = VERSION  # let the full decode name what is wrong
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this daemon speaks {VERSION})")
    try:
        return _request_decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed request: {e}") from None
    except UnicodeDecodeError:
        # msgspec raises this (not a DecodeError) for a tag value that is not valid UTF-8,
        # such as an encoded lone surrogate in "op".
        raise ProtocolError("malformed request: invalid UTF-8") from None
    except RecursionError:
        # msgspec raises this for JSON nested deeper than it recurses, even where the
        # nesting sits in a field it would only skip or reject.
        raise ProtocolError("malformed request: JSON nested too deeply") from None
