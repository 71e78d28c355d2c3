"""500 simultaneous connections, some idle, some slow, while real runc steps launch and finish.

No step is lost, and the daemon stays responsive: the p99 of `status` round trips
measured during the launches is under 100 ms. Job ids 9000-9999 belong to this file.
"""

from __future__ import annotations

import resource
import socket
import statistics
import subprocess
import threading
import time

from conftest import RUNC_RUN_CONF
from nodestepd.protocol.messages import StatusReply
from test_server_protocol import HEADER, daemon_fds, msg, receive, send, send_raw, status

IDLE, SLOW, PROBES = 250, 200, 50
STEPS = 24
P99_BOUND_MS = 100


def connect(path) -> socket.socket:
    """A blocking connect: it waits while the listen backlog is full, as nodestepctl's does
    (a connect with a timeout fails at once with EAGAIN on a Unix socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(str(path))
    sock.settimeout(30)
    return sock


def test_500_connections_while_steps_launch_and_finish(start_daemon, user, bundle):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2000, hard), hard))
    daemon = start_daemon(RUNC_RUN_CONF)
    assert isinstance(status(daemon), StatusReply)
    baseline = len(daemon_fds(daemon))

    idle = [connect(daemon.socket) for _ in range(IDLE)]
    slow = [connect(daemon.socket) for _ in range(SLOW)]
    for sock in slow:  # half a request; more bytes trickle in below, never a whole message
        send_raw(sock, HEADER.pack(4000) + b'{"v": 1, "op": "sta')
    probes = [connect(daemon.socket) for _ in range(PROBES)]
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.2):
            for sock in slow:
                try:
                    sock.send(b" ")
                except OSError:
                    pass

    launched: dict[int, subprocess.CompletedProcess] = {}

    def launch(job_id: int) -> None:
        launched[job_id] = daemon.ctl(user, "run", "--detach", "--job-id", str(job_id), "--bundle", str(bundle),
                                      "--", "sh", "-c", f"sleep 0.$((RANDOM % 5)); exit {job_id % 7}")

    def launcher():
        for first in range(9000, 9000 + STEPS, 4):  # four launches at a time
            batch = [threading.Thread(target=launch, args=(j,)) for j in range(first, first + 4)]
            for t in batch:
                t.start()
            for t in batch:
                t.join()

    trickler = threading.Thread(target=trickle)
    launching = threading.Thread(target=launcher)
    latencies: list[float] = []
    try:
        trickler.start()
        for sock in probes:  # accepted in order: once the last ones answer, all 500 are in
            send(sock, msg("status"))
            assert isinstance(receive(sock), StatusReply)
        # Every connection is open in the daemon at once (one fd each).
        assert len(daemon_fds(daemon)) >= baseline + IDLE + SLOW + PROBES
        launching.start()
        i = 0
        while launching.is_alive() or len(latencies) < 500:
            sock = probes[i % PROBES]
            i += 1
            begun = time.perf_counter()
            send(sock, msg("status"))
            reply = receive(sock)
            latencies.append(time.perf_counter() - begun)
            assert isinstance(reply, StatusReply)
        launching.join()

        # No step lost: each launched, each ends with its own status, all are accounted for.
        assert sorted(launched) == list(range(9000, 9000 + STEPS))
        for job_id, result in sorted(launched.items()):
            assert (result.returncode, result.stdout) == (0, f"{job_id}.0\n".encode()), result.stderr
        for job_id in launched:
            assert daemon.ctl(user, "wait", f"{job_id}.0").returncode == job_id % 7
        reply = status(daemon)
        assert (reply.steps_running, reply.steps_finished) == (0, STEPS)
    finally:
        stop.set()
        if trickler.is_alive():
            trickler.join()
        if launching.is_alive():
            launching.join()
        for sock in idle + slow + probes:
            sock.close()

    latencies_ms = sorted(1000 * x for x in latencies)
    p99 = latencies_ms[int(len(latencies_ms) * 0.99) - 1]
    print(f"\nstatus round trips: {len(latencies_ms)}, median {statistics.median(latencies_ms):.2f} ms, "
          f"p99 {p99:.2f} ms, max {latencies_ms[-1]:.2f} ms, with {IDLE + SLOW + PROBES} connections open "
          f"and {STEPS} steps launched")
    assert p99 < P99_BOUND_MS, f"p99 {p99:.1f} ms (median {statistics.median(latencies_ms):.1f} ms)"
    assert daemon.proc.poll() is None
