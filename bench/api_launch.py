"""Launches through the asyncio API (nodestepd.client) from one long-lived process, for
section 1's API row: what a workflow engine pays per step, with no interpreter started per
step. The process runs as the user, on uvloop, and launches one `run true` (attached,
output to /dev/null) per job id it reads on stdin, answering with the seconds from the
call of Client.run() to the step's exit from Step.wait().

    python api_launch.py SOCKET BUNDLE   (stdin: a job id per line; stdout: seconds per line)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


class ApiLauncher:
    """The API process of section 1 (the bench is root; this runs as the user)."""

    def __init__(self, user, socket: Path, bundle: Path) -> None:
        self.proc = subprocess.Popen(user.argv([sys.executable, __file__, str(socket), str(bundle)]), env=user.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")

    def launch(self, job: int) -> float:
        """Seconds for one `run true` through the API, timed inside the API's process."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{job}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the API process ended (status {self.proc.wait()})")
        return float(line)

    def stop(self) -> None:
        """End of its input: it returns from its loop (after the launch in hand, if any)."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve(socket_path: str, bundle: str) -> None:
    import asyncio

    import uvloop

    from nodestepd.client import DEVNULL, Client

    client = Client(socket_path)

    async def one(job: int) -> float:
        began = time.perf_counter()
        step = await client.run(bundle, ["true"], job=job, env={}, chdir="/", stdout=DEVNULL, stderr=DEVNULL)
        ended = await step.wait()
        elapsed = time.perf_counter() - began
        if ended.status != 0:
            raise RuntimeError(f"step {step.ref} exited {ended.status}")
        return elapsed

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        for line in sys.stdin:
            print(runner.run(one(int(line))), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
