"""Admission: a run request becomes a StepSpec and a LaunchInput, or a Refused that says why.

Everything the request asks for is checked here, before anything is created: paths,
sizes against the limits (docs/security.md), ids, the environment, who the step runs as
(the caller's kernel-reported uid, or the user an operator names), and, for an operator
launching as another user, config.json and the output files opened as that user.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterable, Mapping

from nodestepd.daemon.authz import parse_user
from nodestepd.daemon.configuration import Configuration
from nodestepd.daemon.closer import FdCloser
from nodestepd.daemon.errors import BadRequest, Refused
from nodestepd.daemon.jobids import JobIdAllocator
from nodestepd.image.launch import ImageOptions
from nodestepd.image.refs import RefError, parse_ref
from nodestepd.process import asuser
from nodestepd.process.identity import Identity
from nodestepd.process.spawn import off_loop
from nodestepd.protocol.messages import MAX_JSON_DEPTH, MAX_PRESERVE_FDS, RunRequest, json_too_deep
from nodestepd.step.env import validate_env_name
from nodestepd.step.spec import LaunchInput, StepSpec

MAX_STEP_ID = 0xFFFFFFF0  # Slurm keeps the ids above for its special steps
MAX_JOB_ID = 0xFFFFFFF0
MAX_NTASKS = 1024
MAX_TASK_ID = 0xFFFFFFF0  # task offsets, local ids and node ids are Slurm's 32-bit ids
MAX_PATH_BYTES = 4096  # PATH_MAX: a longer bundle or chdir could not be opened anyway
MAX_MOUNTS = 64


class Admission:
    def __init__(self, configuration: Configuration, job_ids: JobIdAllocator, closer: FdCloser) -> None:
        self.configuration = configuration
        self.job_ids = job_ids
        self.closer = closer  # the fds a request brought and no longer needs are closed off the loop

    async def admit(self, uid: int, request: RunRequest, fds: list[int]) -> tuple[StepSpec, LaunchInput]:
        """Check a run request from uid (its stdio fds may be replaced by files opened as the step's user)."""
        if not 0 <= request.preserve_fds <= MAX_PRESERVE_FDS:
            raise BadRequest(f"preserve_fds must be between 0 and {MAX_PRESERVE_FDS}, got {request.preserve_fds}")
        if len(fds) != 3 + request.preserve_fds:
            raise BadRequest(f"a run request carries 3 + preserve_fds file descriptors (stdin, stdout, stderr, "
                             f"then {request.preserve_fds} to preserve), got {len(fds)}")
        _check_request(request, self.configuration)
        # Refused here, before step/configjson.py parses it (each level a recursion); in a
        # worker thread, as a scan of up to a whole message may take a fraction of a second.
        if request.config_json is not None and await asyncio.to_thread(json_too_deep, request.config_json):
            raise BadRequest(f"config_json nests arrays and objects more than {MAX_JSON_DEPTH} levels deep")
        step_id = request.step_id if request.step_id is not None else 0
        target = uid
        if request.user is not None:
            if request.config_json is not None or request.config_json_error is not None:
                raise BadRequest("a run with user must not carry config_json: the daemon reads it as that user")
            try:
                target = await asyncio.to_thread(parse_user, request.user)
            except ValueError as e:
                raise BadRequest(str(e)) from None
            if not self.configuration.policy.may_launch_as(uid, target):
                raise Refused("permission-denied", f"only operators may launch steps as another user "
                              f"(uid {uid} is not one; see `operators` in nodestepd.toml)", target_uid=target)
        try:
            identity = await asyncio.to_thread(Identity.for_uid, target)
        except LookupError as e:
            raise BadRequest(str(e)) from None
        config_json, config_json_error = request.config_json, request.config_json_error
        if request.image is not None:
            config_json, config_json_error = None, None  # the image's, once it is imported
        if request.user is not None or request.output is not None or request.error is not None:
            config_json, config_json_error = await self._open_as_user(uid, identity, request, fds)
        job_id = request.job_id if request.job_id is not None else await asyncio.to_thread(self.job_ids.allocate)
        spec = StepSpec(
            job_id=job_id,
            step_id=step_id,
            ntasks=request.ntasks,
            identity=identity,
            bundle=os.path.normpath(request.bundle) if request.image is None else "",
            args=tuple(request.args),
            workdir=request.chdir,
            attached=not request.detach,
            task_offset=request.task_offset,
            local_offset=request.local_offset,
            node_id=request.node_id,
            container_id=request.container_id,
        )
        return spec, LaunchInput(dict(request.env), request.pty, config_json, config_json_error,
                                 preserve_fds=request.preserve_fds)

    async def _open_as_user(
        self, uid: int, identity: Identity, request: RunRequest, fds: list[int]
    ) -> tuple[str | None, str | None]:
        """Read config.json (for a run with `user`) and open output/error as the step's user.

        The opened output files replace fds[1] and fds[2] (closing the ones the request
        brought). Returns (config_json, config_json_error) for the step.
        """
        config = self.configuration.config
        reads = []
        if request.user is not None and request.image is None and not self.configuration.oci.ignore_file_config_json:
            reads.append(os.path.join(os.path.normpath(request.bundle), "config.json"))
        writes = list(dict.fromkeys(p for p in (request.output, request.error) if p is not None))
        try:
            opened = await off_loop(asuser.open_as, identity, reads, writes, timeout=config.client_timeout)
        except OSError as e:
            raise Refused("launch-failed", str(e)) from None
        config_json = config_json_error = None
        if reads:
            result = opened.pop(0)
            if result.fd is None:
                config_json_error = result.error
            else:
                config_json, config_json_error = await asyncio.to_thread(
                    asuser.read_regular, result, config.max_message_size)
        failed = next((o for o in opened if o.fd is None), None)
        if failed is not None:
            self.closer.close([o.fd for o in opened], uid)  # files of the user's: closing may block (FUSE)
            raise Refused("launch-failed", f"cannot open {failed.path} as {identity.user}: {failed.error}")
        by_path = {o.path: o.fd for o in opened}
        if request.output is not None:
            self.closer.close([fds[1]], uid)
            fds[1] = by_path[request.output]
            if request.error is None:
                self.closer.close([fds[2]], uid)
                fds[2] = os.dup(fds[1])
        if request.error is not None:
            self.closer.close([fds[2]], uid)
            # One file for both: a second fd of it, so that each fd has one owner.
            fds[2] = by_path[request.error] if request.error != request.output else os.dup(fds[1])
        return config_json, config_json_error


def image_options(request: RunRequest) -> ImageOptions | None:
    """An image step's options (None for a bundle step), from a request _check_request passed."""
    if request.image is None:
        return None
    return ImageOptions(
        ref=parse_ref(request.image).canonical, command=tuple(request.args), entrypoint=request.entrypoint,
        workdir=request.workdir,
        mounts=tuple((m.source, os.path.normpath(m.destination), m.readonly) for m in request.mounts),
    )


def _check_image(request: RunRequest) -> None:
    if request.image is None:
        if request.mounts or request.entrypoint is not None or request.workdir is not None \
                or request.image_fingerprint is not None:
            raise BadRequest("mounts, entrypoint, workdir and image_fingerprint go with image")
        return
    if request.bundle:
        raise BadRequest("a run request names a bundle or an image, not both")
    if request.config_json is not None or request.config_json_error is not None:
        raise BadRequest("a run with an image must not carry config_json: the image brings its own")
    try:
        parse_ref(request.image)
    except RefError as e:
        raise BadRequest(str(e)) from None
    if request.image_fingerprint is not None and (len(request.image_fingerprint) > 256
                                                  or "\0" in request.image_fingerprint):
        raise BadRequest("image_fingerprint must be at most 256 bytes, without NUL bytes")
    if request.entrypoint is not None and "\0" in request.entrypoint:
        raise BadRequest("entrypoint contains a NUL byte")
    if request.workdir is not None:
        _check_path("workdir", request.workdir)
    if len(request.mounts) > MAX_MOUNTS:
        raise Refused("limit", f"{len(request.mounts)} mounts, more than {MAX_MOUNTS}")
    for mount in request.mounts:
        _check_path("a mount's source", mount.source)
        _check_path("a mount's destination", mount.destination)


def _check_request(request: RunRequest, configuration: Configuration) -> None:
    """What a run request may ask for, whoever asks: pure checks, in a fixed order."""
    _check_image(request)
    if request.image is None:
        _check_path("bundle", request.bundle)
    _check_path("chdir", request.chdir)
    for name in ("output", "error"):
        if getattr(request, name) is not None:
            _check_path(name, getattr(request, name))
    if not request.args and request.image is None:
        raise BadRequest("no command given: args must not be empty")
    for arg in request.args:
        if "\0" in arg:
            raise BadRequest("command arguments cannot contain NUL bytes")
    c = configuration.config
    if args_size(request.args) > c.max_args_bytes:
        raise Refused("limit", f"the command is {args_size(request.args)} bytes, more than max_args_bytes "
                      f"({c.max_args_bytes})")
    if env_size(request.env) > c.max_env_bytes:
        raise Refused("limit", f"the environment is {env_size(request.env)} bytes, more than max_env_bytes "
                      f"({c.max_env_bytes})")
    for name, value in request.env.items():
        try:
            validate_env_name(name)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if "\0" in value:
            raise BadRequest(f"environment variable {name} contains a NUL byte")
    if not 1 <= request.ntasks <= MAX_NTASKS:
        raise BadRequest(f"ntasks must be between 1 and {MAX_NTASKS}, got {request.ntasks}")
    for name in ("task_offset", "local_offset", "node_id"):
        value = getattr(request, name)
        if value is not None and not 0 <= value <= MAX_TASK_ID:
            raise BadRequest(f"{name} must be between 0 and {MAX_TASK_ID}, got {value}")
    if request.container_id is not None and ("\0" in request.container_id or not request.container_id):
        raise BadRequest("container_id must be a non-empty string without NUL bytes")
    if request.job_id is not None and not 0 < request.job_id < MAX_JOB_ID:
        raise BadRequest(f"job id must be between 1 and {MAX_JOB_ID - 1}, got {request.job_id}")
    step_id = request.step_id if request.step_id is not None else 0
    if not 0 <= step_id < MAX_STEP_ID:
        raise BadRequest(f"step id must be between 0 and {MAX_STEP_ID - 1}, got {step_id}")


def _check_path(name: str, value: str) -> None:
    if "\0" in value:
        raise BadRequest(f"{name} contains a NUL byte")
    if not os.path.isabs(value):
        raise BadRequest(f"{name} must be an absolute path, got {value[:200]!r}")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise BadRequest(f"{name} is longer than {MAX_PATH_BYTES} bytes")


def _size(strings: Iterable[str]) -> int:
    """Bytes as the kernel counts an argv or environment: UTF-8 plus a NUL each."""
    return sum(len(s.encode("utf-8", "surrogatepass")) + 1 for s in strings)


def args_size(args: Iterable[str]) -> int:
    return _size(args)


def env_size(env: Mapping[str, str]) -> int:
    return _size(f"{name}={value}" for name, value in env.items())


def parse_signal(name: str) -> int:
    """A signal request's `signal`: a name (with or without SIG) or a number."""
    if not name.isascii() or len(name) > 32:
        raise BadRequest(f"unknown signal {name[:32]!r}")
    text = name.strip().upper()
    try:
        if text.isdigit():
            return signal.Signals(int(text)).value
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text].value
    except (KeyError, ValueError):
        raise BadRequest(f"unknown signal {name!r}") from None
