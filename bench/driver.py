"""The load side of the benchmarks, run as the unprivileged user (the bench itself is root).

    python driver.py '{"op": "launch", ...}'   ->  one JSON object on stdout

It speaks the nodestepd protocol through nodestepctl's own functions (nodestepd.ctl.transport),
from one long-lived process, so what it measures is the daemon and the runtime, not a
Python interpreter starting per step (section 1 measures that). The references it
measures (the same processes spawned without the daemon) are spawned the way the daemon
spawns a runtime: `/bin/sh -c COMMAND` as this user, in a new session.

Operations (fields of the JSON argument):
  launch  socket, bundle, args, first_job, count, concurrency, detach
          `count` run requests, `concurrency` at a time; detached: done when each got
          `started`; attached: done when each got its `exit` (status 0, or it counts as failed).
  cancel  socket, first_job, count, concurrency: `cancel` for each, done at each `exit`.
  spawn   command (a shell command; "{i}" is the process's number), count, concurrency,
          hold: without hold, run each to its end; with hold (in threads, which keep the
          processes), print the launch time,
          wait for a line on stdin, then SIGKILL each process group, wait for it and run
          after_kill (a shell command with "{i}", or null), and print the cancel time.
  sequence  runc (the command, split on spaces), name, bundle: the direct create/start
          sequence nodestepd's create/start mode stands for: `create`, `state` (the init's
          pid, watched by pidfd), `start`, the wait for the init's exit, `delete`; prints
          the time (time.time_ns) when the delete has returned.
Only the standard library and nodestepctl's transport (nodestepd.ctl.transport, .exits): this file
runs as a script, as the user.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from nodestepd.ctl import transport
from nodestepd.ctl.exits import ClientError


def _each(count: int, concurrency: int, work: Callable[[int], str | None]) -> tuple[float, list[str]]:
    """work(i) for i in range(count), `concurrency` at a time: (seconds, errors).

    Concurrency comes from forked worker processes, each doing its share in turn: Python
    threads would take turns on the GIL, and the driver, not the daemon, would be measured.
    """
    if concurrency <= 1:
        return _timed_share(work, range(count))
    start = time.perf_counter()
    workers = []
    for w in range(concurrency):
        r, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: its share, then its errors as JSON on the pipe
            os.close(r)
            _, errors = _timed_share(work, range(w, count, concurrency))
            os.write(wfd, json.dumps(errors).encode())
            os._exit(0)
        os.close(wfd)
        workers.append((pid, r))
    errors = []
    for pid, r in workers:
        with os.fdopen(r) as f:
            errors += json.loads(f.read() or "[]")
        os.waitpid(pid, 0)
    return time.perf_counter() - start, errors


def _timed_share(work: Callable[[int], str | None], share) -> tuple[float, list[str]]:
    start = time.perf_counter()
    errors = [e for e in map(work, share) if e]
    return time.perf_counter() - start, errors


def _threads(count: int, concurrency: int, work: Callable[[int], None]) -> float:
    """work(i) for each i in threads: for holding processes, whose Popen objects stay in this process."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(work, range(count)))
    return time.perf_counter() - start


def launch(p: dict) -> dict:
    devnull_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    devnull_w = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with open(os.path.join(p["bundle"], "config.json")) as f:
            config_json = f.read()  # read as this user, as nodestepctl does
    except OSError:
        config_json = None  # a runtime that ignores config.json (the fake one)
    def one(i: int) -> str | None:
        message = {
            "op": "run", "bundle": p["bundle"], "args": p["args"], "env": {}, "job_id": p["first_job"] + i,
            "step_id": 0, "chdir": "/", "detach": p["detach"], "config_json": config_json,
        }
        try:
            with transport.connect(p["socket"]) as sock:
                transport.send(sock, message, [devnull_r, devnull_w, devnull_w])
                transport.expect(transport.receive(sock), "started")
                status = 0 if p["detach"] else transport.expect(transport.receive(sock), "exit")["status"]
        except (ClientError, OSError) as e:
            return f"job {p['first_job'] + i}: {e}"
        return f"job {p['first_job'] + i}: exit status {status}" if status else None

    try:
        seconds, errors = _each(p["count"], p["concurrency"], one)
    finally:
        os.close(devnull_r)
        os.close(devnull_w)
    return {"seconds": seconds, "errors": errors[:5], "failed": len(errors)}


def cancel(p: dict) -> dict:
    def one(i: int) -> str | None:
        job = p["first_job"] + i
        try:
            transport.request(p["socket"], {"op": "cancel", "job_id": job, "step_id": 0}, "exit")
        except (ClientError, OSError) as e:
            return f"job {job}: {e}"
        return None

    seconds, errors = _each(p["count"], p["concurrency"], one)
    return {"seconds": seconds, "errors": errors[:5], "failed": len(errors)}


def _spawn(command: str) -> subprocess.Popen:
    return subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def spawn(p: dict) -> dict:
    command, count, concurrency = p["command"], p["count"], p["concurrency"]
    if not p.get("hold"):
        def run(i: int) -> str | None:
            status = _spawn(command.format(i=i)).wait()
            return f"exit status {status}" if status else None

        seconds, errors = _each(count, concurrency, run)
        return {"seconds": seconds, "errors": errors[:5], "failed": len(errors)}
    procs: dict[int, subprocess.Popen] = {}

    def start(i: int) -> None:
        procs[i] = _spawn(command.format(i=i))

    launched = _threads(count, concurrency, start)
    print(json.dumps({"seconds": launched}), flush=True)
    sys.stdin.readline()  # the bench measures the idle processes, then says go

    def end(i: int) -> None:
        os.killpg(procs[i].pid, signal.SIGKILL)
        procs[i].wait()
        if p.get("after_kill"):
            subprocess.run(["/bin/sh", "-c", p["after_kill"].format(i=i)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    cancelled = _threads(count, concurrency, end)
    return {"seconds": cancelled}


def sequence(p: dict) -> dict:
    runc, name = p["runc"].split(), p["name"]

    def call(*args: str, output: bool = False) -> bytes:
        # The container's init inherits create's stdio: a pipe there would be held open.
        return subprocess.run([*runc, *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE if output else subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, check=True).stdout

    call("create", name, "-b", p["bundle"])
    pidfd = os.pidfd_open(json.loads(call("state", name, output=True))["pid"])
    try:
        call("start", name)
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)
    call("delete", name)
    return {"returned_ns": time.time_ns()}


OPS = {"launch": launch, "cancel": cancel, "spawn": spawn, "sequence": sequence}

if __name__ == "__main__":
    params = json.loads(sys.argv[1])
    print(json.dumps(OPS[params["op"]](params)), flush=True)
