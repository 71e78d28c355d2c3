"""What the daemon keeps on disk in --state-dir."""

from __future__ import annotations

import os
import threading

from nodestepd.daemon.errors import Refused
from nodestepd.step import statefiles

# Slurm's job ids stay below 0x04000000; ours start above, so an id the daemon hands
# out never collides with a real SLURM_JOB_ID on the same node.
FIRST_DAEMON_JOB_ID = 100_000_000


_NAME = "next-job-id"


class JobIdAllocator:
    """Job ids unique on this node across daemon restarts: the next free id lives in a file.

    The file is read and replaced relative to the state dir's fd, never following a
    symlink: even a state dir someone else could write (the daemon refuses to start
    with one) could not make root write through a link.
    """

    def __init__(self, state_dir: str) -> None:
        self._path = os.path.join(state_dir, _NAME)
        self._next = FIRST_DAEMON_JOB_ID
        self._lock = threading.Lock()
        self._dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = os.open(_NAME, os.O_RDONLY | statefiles.NOFOLLOW, dir_fd=self._dir_fd)
        except FileNotFoundError:
            return
        except OSError as e:
            os.close(self._dir_fd)
            raise ValueError(f"{self._path}: cannot read: {e.strerror}") from None
        try:
            with os.fdopen(fd) as f:
                self._next = max(FIRST_DAEMON_JOB_ID, int(f.read(64).strip()))
        except ValueError:
            os.close(self._dir_fd)
            raise ValueError(f"{self._path}: not a job id; remove the file to start again at {FIRST_DAEMON_JOB_ID}") from None

    def allocate(self) -> int:
        """Blocking (a small atomic write): call through asyncio.to_thread. Raises Refused
        (launch-failed) when the id cannot be kept, leaving no temporary file."""
        with self._lock:
            job_id = self._next
            try:
                self._keep(job_id + 1)
            except OSError as e:
                raise Refused("launch-failed", f"cannot assign a job id: writing {self._path} failed: "
                              f"{e.strerror or e}") from None
            self._next = job_id + 1
            return job_id

    def _keep(self, next_id: int) -> None:
        statefiles.write_atomically(self._dir_fd, _NAME, f"{next_id}\n".encode())
