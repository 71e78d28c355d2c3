"""Socket activation through the real systemd-socket-activate: the socket exists before the
daemon, a client connects first, the connection starts the daemon, which serves it.
Job ids 5000-5099 belong to this file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

from conftest import NODESTEPCTL, NODESTEPD, RUNC_RUN_CONF, SYSTEM_PATH, read_line_from


def test_client_connecting_before_the_daemon_runs_is_served(workdir, user, bundle):
    base = Path(tempfile.mkdtemp(prefix="activate-", dir=workdir))
    base.chmod(0o755)
    (base / "oci.conf").write_text(RUNC_RUN_CONF)
    sock = base / "nodestepd.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(base / "notify"))
    notify.settimeout(60)
    daemon_argv = [str(NODESTEPD), "--socket", str(sock), "--oci-conf", str(base / "oci.conf"),
                   "--spool-dir", str(base / "spool"), "--state-dir", str(base / "state"),
                   "--node-name", "testnode", "--log-level", "debug", "--steps-on-stop", "cancel"]
    # The tool binds the socket and execs the daemon (same pid) on the first connection,
    # with LISTEN_FDS=1, LISTEN_PID and LISTEN_FDNAMES, as systemd does for nodestepd.socket.
    manager = subprocess.Popen(
        # It passes on PATH and the -E variables only.
        ["systemd-socket-activate", "--listen", str(sock), "--fdname", "nodestepd.socket",
         "-E", "LANG=C.UTF-8", "-E", f"NOTIFY_SOCKET={base / 'notify'}", *daemon_argv],
        env={"PATH": SYSTEM_PATH},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    log: list[bytes] = []
    try:
        log.append(read_line_from(manager.stderr, f"Listening on {sock} as 3.".encode()))
        threading.Thread(target=lambda: log.append(manager.stderr.read()), daemon=True).start()
        os.chmod(sock, 0o666)  # SocketMode=0666 in nodestepd.socket; the tool has no such option
        assert not (base / "state").exists()  # nothing has run the daemon yet

        client = subprocess.run(
            user.command([str(NODESTEPCTL), "--socket", str(sock), "run", "--job-id", "5001",
                          "--bundle", str(bundle), "--", "sh", "-c", "echo served by $(hostname)"]),
            env=user.env, cwd="/", capture_output=True, timeout=120,
        )
        assert (client.returncode, client.stdout) == (0, b"served by runc\n"), (client.stderr, log)
        assert notify.recv(4096) == b"READY=1"
        status = subprocess.run(
            user.command([str(NODESTEPCTL), "--socket", str(sock), "status"]),
            env=user.env, cwd="/", capture_output=True, text=True, timeout=60,
        )
        assert f"socket:       {sock}\n" in status.stdout and "0 running, 1 finished" in status.stdout

        manager.send_signal(signal.SIGTERM)  # the daemon, by now: exec kept the pid
        assert manager.wait(timeout=60) == 0
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait()
        notify.close()
    text = b"".join(log).decode()
    assert "serving the socket passed by the service manager" in text and f"socket={sock}" in text, text
    assert "the passed socket is not the configured one" not in text
    # The socket is the manager's: the daemon neither replaced nor removed it.
    assert sock.is_socket()


def test_sockets_passed_to_another_process_are_refused_with_the_reason(workdir):
    base = Path(tempfile.mkdtemp(prefix="activate-", dir=workdir))
    (base / "oci.conf").write_text(RUNC_RUN_CONF)
    result = subprocess.run(
        [str(NODESTEPD), "--socket", str(base / "sock"), "--oci-conf", str(base / "oci.conf"),
         "--spool-dir", str(base / "spool"), "--state-dir", str(base / "state"), "--log-format", "console"],
        env={"PATH": SYSTEM_PATH, "LISTEN_FDS": "1", "LISTEN_PID": "1"}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert "cannot use the socket passed by the service manager" in result.stderr
    assert "LISTEN_PID=1 is not this process" in result.stderr
    assert not (base / "sock").exists()
