"""Running the import helper (helper.py) as the user, through process/spawn.py, with a deadline.

The daemon never parses an archive: the helper does, as the user. What comes back is one
JSON object the daemon reads with a size cap and a nesting check (Answer), and the
generated config.json's text, checked the same way before anyone parses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys

import msgspec

from nodestepd.process.identity import Identity
from nodestepd.process.spawn import RUNTIME_UMASK, off_loop, spawn

MAX_ANSWER = 1 << 20
MAX_DEPTH = 64  # config.json nests a few levels; anything deeper is not one


class ImportFailed(Exception):
    """The import did not produce an image; the message is one sentence for the user."""


class Answer(msgspec.Struct, forbid_unknown_fields=False):
    """The helper's answer (helper.py): an entry, or an error."""

    error: str | None = None
    digest: str | None = None
    entry: str | None = None
    config_json: str | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    imported: bool = False
    sizes: dict[str, int] | None = None  # bytes of each of the user's entries, when asked for


_decoder = msgspec.json.Decoder(Answer)


def helper_argv(user_dir: str, ref: str, sizes: bool = False) -> list[str]:
    return [sys.executable, "-I", "-m", "nodestepd.image.helper", user_dir, ref] + (["--sizes"] if sizes else [])


async def run_import(identity: Identity, user_dir: str, ref: str, env: dict[str, str], *, timeout: float,
                     on_started=None, sizes: bool = False) -> Answer:
    """Run the helper for ref in the user's cache dir, as the user; its Answer (with an entry).

    Raises ImportFailed (its error, a timeout, a crash). Cancelled, or past the deadline, the
    helper's whole process group is SIGKILLed and awaited before this returns or raises;
    on_started(pid) is told the helper's pid (its temporary dir is named after it)."""
    out = os.memfd_create("nodestepd-import", os.MFD_CLOEXEC)
    try:
        starting = asyncio.ensure_future(off_loop(  # bounded: the user may stop the helper before its exec
            spawn, helper_argv(user_dir, ref, sizes), identity=identity, cwd=user_dir, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL, process_group=True,
            umask=RUNTIME_UMASK, start_timeout=timeout,
        ))
        try:
            watch = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Cancelled while the helper starts: its thread starts it anyway. Kill it (and say
            # its pid, so that its temporary dir goes too) before being cancelled.
            with contextlib.suppress(Exception):
                watch = await starting
                if on_started is not None:
                    on_started(watch.pid)
                watch.kill_group(signal.SIGKILL)
                await watch.wait()
                watch.reap()
            raise
        except OSError as e:
            raise ImportFailed(f"cannot import {ref}: cannot start the import helper as {identity.user}: "
                               f"{e.strerror or e}") from None
        if on_started is not None:
            on_started(watch.pid)
        timed_out = False
        try:
            try:
                await asyncio.wait_for(asyncio.shield(watch.wait()), timeout)
            except TimeoutError:
                timed_out = True
        finally:
            # Whatever is left of it (all of it when cancelled or late): skopeo and umoci with it.
            watch.kill_group(signal.SIGKILL)
            status = await asyncio.shield(watch.wait())
            watch.reap()
        if timed_out:
            raise ImportFailed(f"cannot import {ref}: timed out after {timeout:g} s (image_import_timeout)")
        return _answer(out, ref, status)
    finally:
        os.close(out)


def _answer(out: int, ref: str, status: int | None) -> Answer:
    os.lseek(out, 0, os.SEEK_SET)
    data = os.read(out, MAX_ANSWER + 1)
    if len(data) > MAX_ANSWER:
        raise ImportFailed(f"cannot import {ref}: the import helper's answer is larger than {MAX_ANSWER} bytes")
    try:
        answer = _decoder.decode(data) if data else None
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        answer = None
    if answer is None:
        raise ImportFailed(f"cannot import {ref}: the import helper failed (exit status {status})")
    if answer.error is not None:
        raise ImportFailed(answer.error)
    if (status != 0 or answer.entry is None or answer.config_json is None or not answer.entry.startswith("sha256-")
            or "/" in answer.entry or len(answer.entry) != len("sha256-") + 64):
        raise ImportFailed(f"cannot import {ref}: the import helper gave no usable entry (exit status {status})")
    check_depth(answer.config_json, f"the config.json generated for {ref}")
    return answer


def check_depth(text: str, what: str, limit: int = MAX_DEPTH) -> None:
    """Refuse JSON text nested deeper than limit (counting brackets outside strings), before any parser sees it."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                raise ImportFailed(f"{what} is nested deeper than {limit} levels")
        elif ch in "]}":
            depth -= 1
