"""What the daemon keeps on disk in --state-dir."""

from __future__ import annotations

import os
import threading

# Slurm's job ids stay below 0x04000000; ours start above, so an id the daemon hands
# out never collides with a real SLURM_JOB_ID on the same node.
FIRST_DAEMON_JOB_ID = 100_000_000


class JobIdAllocator:
    """Job ids unique on this node across daemon restarts: the next free id lives in a file."""

    def __init__(self, state_dir: str) -> None:
        self._path = os.path.join(state_dir, "next-job-id")
        self._next = FIRST_DAEMON_JOB_ID
        self._lock = threading.Lock()
        try:
            with open(self._path) as f:
                self._next = max(FIRST_DAEMON_JOB_ID, int(f.read().strip()))
        except FileNotFoundError:
            pass
        except ValueError:
            raise ValueError(f"{self._path}: not a job id; remove the file to start again at {FIRST_DAEMON_JOB_ID}") from None

    def allocate(self) -> int:
        """Blocking (a small atomic write): call through asyncio.to_thread."""
        with self._lock:
            job_id = self._next
            tmp = f"{self._path}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{job_id + 1}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
            self._next = job_id + 1
            return job_id
