"""The per-user image cache on this node, owned by the daemon: its layout, its entries,
and one import per image however many launches want it at once.

    IMAGE_CACHE_DIR/            root's, 0755 (image_cache_dir)
      UID/                      the user's, 0700, made by root
        sha256-HEX/             one image, unpacked: a bundle (config.json, rootfs/),
                                keyed by its manifest's digest; complete once it exists
        .tmp-PID/               an import under way (helper.py); left by a crash, removed
                                at the next start once PID is gone

Everything inside UID/ is made by the import helper as the user; root makes only the two
levels above and, to clean up, removes `.tmp-PID` dirs through directory fds without
following links (step/cleardir.py).

Launches of the same reference by the same user share one import (an asyncio task with
a count of who waits for it; the last to stop waiting cancels it); different images import
in parallel up to image_imports_max. An image once imported is remembered by its
reference and the fingerprint the client sent (refs.fingerprint): a later launch of it
starts no process at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodestepd.image.helper import ENTRY_PREFIX, TMP_PREFIX
from nodestepd.image.importer import Answer, ImportFailed, run_import
from nodestepd.logs import BoundLogger, get_logger
from nodestepd.process.identity import Identity
from nodestepd.process.watch import running
from nodestepd.step.cleardir import clear_dir

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ImageEntry:
    """An imported image: the bundle dir and what the launch takes from it."""

    digest: str
    bundle: str  # IMAGE_CACHE_DIR/UID/sha256-HEX
    config_json: str  # umoci's rootless config.json (the image's Env, WorkingDir, Entrypoint+Cmd in it)
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None


class _Import:
    def __init__(self, task: asyncio.Task[ImageEntry]) -> None:
        self.task = task
        self.waiters = 0
        self.abandoned = False


Key = tuple[int, str, "str | None"]  # uid, canonical reference, fingerprint


class ImageCache:
    def __init__(self, root: str, *, imports_max: int, timeout: float,
                 untrusted_reason: Callable[[str], str | None], log: BoundLogger | None = None,
                 max_bytes: int = 0) -> None:
        """root: image_cache_dir. untrusted_reason: the trusted-path rule for root's own
        directories (daemon/trustedpaths.py), checked when the cache dir is made.
        max_bytes: image_cache_max_bytes, per user (0: no cap)."""
        self.root = root
        self.max_bytes = max_bytes
        self.evictions = 0
        # Entries steps are launched from (held from the moment get() gives them out until
        # the step ends: never evicted), and when each was last given out.
        self._holds: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self.timeout = timeout
        self.untrusted_reason = untrusted_reason
        self.log = log or get_logger()
        self.imports = 0  # images unpacked by this daemon (an import that found its entry made is not one)
        self._slots = asyncio.Semaphore(imports_max)
        self._known: dict[Key, ImageEntry] = {}
        self._inflight: dict[Key, _Import] = {}

    # ---- a launch's image ---------------------------------------------------------------

    async def get(self, identity: Identity, ref: str, fingerprint: str | None, env: dict[str, str],
                  log: BoundLogger) -> ImageEntry:
        """The image ref names, imported as the user unless already known. Raises ImportFailed.

        fingerprint: the client's (refs.fingerprint), or None: then the helper runs to
        resolve the reference (a cached image costs it a `skopeo inspect`)."""
        key = (identity.uid, ref, fingerprint)
        known = self._known.get(key) if fingerprint is not None else None
        if known is not None:
            if await asyncio.to_thread(_is_dir, known.bundle):
                return self._hold(known)
            del self._known[key]  # removed (by its user, or an administrator): imported again
        imp = self._inflight.get(key)
        if imp is None or imp.abandoned:
            imp = _Import(asyncio.create_task(self._import(key, identity, ref, env, log), name=f"import {ref}"))
            self._inflight[key] = imp
            imp.task.add_done_callback(lambda _t, imp=imp: self._forget(key, imp))
        else:
            log.debug("waiting for an import already under way", image=ref)
        imp.waiters += 1
        try:
            return self._hold(await asyncio.shield(imp.task))
        finally:
            imp.waiters -= 1
            if imp.waiters == 0 and not imp.task.done():
                # Nobody wants it any more (every launch waiting for it was cancelled).
                imp.abandoned = True
                self._forget(key, imp)
                imp.task.cancel()
                # Until its helper is killed and its files are gone: a cancel leaves nothing behind.
                await asyncio.wait([imp.task])

    def _hold(self, entry: ImageEntry) -> ImageEntry:
        self._holds[entry.bundle] = self._holds.get(entry.bundle, 0) + 1
        self._last_used[entry.bundle] = time.monotonic()
        return entry

    def release(self, entry: ImageEntry) -> None:
        """The step get() gave entry to has ended (one release per get)."""
        left = self._holds.get(entry.bundle, 0) - 1
        if left > 0:
            self._holds[entry.bundle] = left
        else:
            self._holds.pop(entry.bundle, None)

    def _forget(self, key: Key, imp: _Import) -> None:
        if self._inflight.get(key) is imp:
            del self._inflight[key]

    async def _import(self, key: Key, identity: Identity, ref: str, env: dict[str, str],
                      log: BoundLogger) -> ImageEntry:
        async with self._slots:
            user_dir = await asyncio.to_thread(self.user_dir, identity)
            pid: list[int] = []
            log.info("importing image", image=ref)
            try:
                answer = await run_import(identity, user_dir, ref, env, timeout=self.timeout,
                                          on_started=pid.append, sizes=self.max_bytes > 0)
            except BaseException:
                if pid:  # killed and reaped by now: its leftovers are nobody's
                    await asyncio.to_thread(self.remove_tmp, identity.uid, pid[0])
                raise
        entry = self._entry(user_dir, answer)
        if answer.imported:
            self.imports += 1
            log.info("image imported", image=ref, digest=entry.digest, imports=self.imports)
            if self.max_bytes and answer.sizes:
                await asyncio.to_thread(self._evict, identity.uid, user_dir, answer.sizes, entry.bundle, log)
        else:
            log.debug("image found in the cache", image=ref, digest=entry.digest)
        if key[2] is not None:
            self._known[key] = entry
        return entry

    def _evict(self, uid: int, user_dir: str, sizes: dict[str, int], keep: str, log: BoundLogger) -> None:
        """Bring the user's cache under max_bytes: least recently used entries first, never
        the one just imported nor one a step runs from. Blocking."""
        sizes = {n: s for n, s in sizes.items() if n.startswith(ENTRY_PREFIX) and "/" not in n and s >= 0}
        total = sum(sizes.values())
        candidates = sorted((self._last_used.get(os.path.join(user_dir, n), 0.0), n) for n in sizes)
        for _, name in candidates:
            if total <= self.max_bytes:
                return
            bundle = os.path.join(user_dir, name)
            if bundle == keep or self._holds.get(bundle):
                continue
            digest = "sha256:" + name.removeprefix(ENTRY_PREFIX)
            if self.remove(uid, digest):
                continue
            self._last_used.pop(bundle, None)
            total -= sizes[name]
            self.evictions += 1
            log.info("image evicted from the cache (image_cache_max_bytes)", digest=digest, bytes=sizes[name])
        if total > self.max_bytes:
            log.warning("the user's images exceed image_cache_max_bytes; the rest are in use", bytes=total,
                        image_cache_max_bytes=self.max_bytes)

    @staticmethod
    def _entry(user_dir: str, answer: Answer) -> ImageEntry:
        assert answer.entry is not None and answer.config_json is not None
        return ImageEntry(
            digest=answer.digest or answer.entry.replace(ENTRY_PREFIX, "sha256:", 1),
            bundle=os.path.join(user_dir, answer.entry), config_json=answer.config_json,
            entrypoint=tuple(answer.entrypoint) if answer.entrypoint is not None else None,
            cmd=tuple(answer.cmd) if answer.cmd is not None else None,
        )

    # ---- the directories ---------------------------------------------------------------

    def user_dir(self, identity: Identity) -> str:
        """IMAGE_CACHE_DIR/UID, made (root's parent 0755, the user's dir 0700) when missing. Blocking."""
        self._make_root()
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            name = str(identity.uid)
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                made = True
            except FileExistsError:
                made = False
            try:
                ufd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                raise ImportFailed(f"the image cache dir {self.root}/{name} is unusable: {e.strerror}") from None
            try:
                if made:
                    os.fchown(ufd, identity.uid, identity.gid)
                    os.fchmod(ufd, 0o700)
                st = os.fstat(ufd)
                if st.st_uid != identity.uid:
                    raise ImportFailed(f"the image cache dir {self.root}/{name} is owned by uid {st.st_uid}, "
                                       f"not {identity.user}; an administrator must remove it")
            finally:
                os.close(ufd)
        finally:
            os.close(fd)
        return os.path.join(self.root, name)

    def _make_root(self) -> None:
        try:
            os.mkdir(self.root, 0o755)
            os.chmod(self.root, 0o755)  # whatever the umask
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(os.path.dirname(self.root), 0o755, exist_ok=True)
            return self._make_root()
        except OSError as e:
            raise ImportFailed(f"cannot make the image cache dir {self.root}: {e.strerror}") from None
        if os.geteuid() == 0:
            reason = self.untrusted_reason(self.root)
            if reason is not None:
                raise ImportFailed(f"the image cache dir {self.root} is not safe for a root daemon: {reason}")

    def remove_tmp(self, uid: int, pid: int) -> list[str]:
        """Remove UID/.tmp-PID as root without following links; the problems, if any. Blocking."""
        errors: list[str] = []
        try:
            ufd = os.open(os.path.join(self.root, str(uid)), _DIR_FLAGS)
        except OSError:
            return errors
        try:
            _remove_dir(ufd, os.path.join(self.root, str(uid)), f"{TMP_PREFIX}{pid}", errors)
        finally:
            os.close(ufd)
        for error in errors:
            self.log.warning("cannot remove an interrupted import's files", error=error)
        return errors

    def clean_stale(self) -> int:
        """At start: remove every `.tmp-PID` whose helper is gone (a crash or a kill left it).
        Returns how many were removed. Blocking."""
        try:
            users = os.listdir(self.root)
        except OSError:
            return 0
        removed = 0
        for name in users:
            if not name.isdigit():
                continue
            try:
                entries = os.listdir(os.path.join(self.root, name))
            except OSError:
                continue
            for entry in entries:
                pid = entry.removeprefix(TMP_PREFIX)
                if entry.startswith(TMP_PREFIX) and pid.isdigit() and not running(int(pid)):
                    if not self.remove_tmp(int(name), int(pid)):
                        removed += 1
        if removed:
            self.log.info("removed interrupted image imports", count=removed)
        return removed

    # ---- listing and removal (`nodestepctl image`) ---------------------------------------

    def users(self) -> list[int]:
        """The uids with a cache dir. Blocking."""
        try:
            return sorted(int(name) for name in os.listdir(self.root) if name.isdigit())
        except OSError:
            return []

    def entries(self, uid: int) -> list[str]:
        """The user's complete entries, as sha256:HEX digests (names only: nothing is opened). Blocking."""
        top = os.path.join(self.root, str(uid))
        try:
            names = os.listdir(top)
        except OSError:
            return []
        return sorted("sha256:" + n.removeprefix(ENTRY_PREFIX) for n in names
                      if n.startswith(ENTRY_PREFIX) and _is_dir(os.path.join(top, n)))

    def refs_of(self, uid: int, digest: str) -> list[str]:
        return sorted({key[1] for key, entry in self._known.items() if key[0] == uid and entry.digest == digest})

    def bundle_of(self, uid: int, digest: str) -> str:
        return os.path.join(self.root, str(uid), ENTRY_PREFIX + digest.removeprefix("sha256:"))

    def remove(self, uid: int, digest: str) -> list[str]:
        """Remove the user's entry as root, through directory fds without following links,
        and forget it; the problems, if any. Blocking."""
        for key in [k for k, e in self._known.items() if k[0] == uid and e.digest == digest]:
            del self._known[key]
        errors: list[str] = []
        top = os.path.join(self.root, str(uid))
        try:
            ufd = os.open(top, _DIR_FLAGS)
        except OSError as e:
            return [f"cannot open {top}: {e.strerror}"]
        try:
            _remove_dir(ufd, top, ENTRY_PREFIX + digest.removeprefix("sha256:"), errors)
        finally:
            os.close(ufd)
        return errors


def _is_dir(path: str) -> bool:
    """lstat only: IMAGE_CACHE_DIR and UID/ are root's making, so no link of the user's is followed."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove_dir(parent_fd: int, parent_path: str, name: str, errors: list[str]) -> None:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent_fd)
            return
        errors.append(f"cannot open {parent_path}/{name}: {e.strerror}")
        return
    try:
        # A dir the user cannot write (chmod 0500 inside the image) is still root's to empty.
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            clear_dir(fd, f"{parent_path}/{name}", errors)
    finally:
        os.close(fd)
    if not errors:
        try:
            os.rmdir(name, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"cannot remove {parent_path}/{name}: {e.strerror}")
