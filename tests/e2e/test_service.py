"""nodestepd as a systemd service, end to end: what it tells the manager, reload, stop.

The manager is played by datagram sockets the tests bind (NOTIFY_SOCKET); everything
else is real: the daemon, nodestepctl as a test user, rootless runc, the recording runtime.
Job ids 4000-4999 belong to this file.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import NODESTEPD, REPO, RUNC_RUN_CONF, SYSTEM_PATH, read_line_from, runc_containers, spool_entries

REC = REPO / "tests" / "runtimes" / "record.py"


def recording_conf(out: Path) -> str:
    """Every RunTime* command records into out/{run,kill,delete}-JOB.json: which config a step used."""
    return (
        f'RunTimeRun="{REC} --out {out}/run-%j.json --say recorded --block -- %@"\n'
        f'RunTimeKill="{REC} --out {out}/kill-%j.json --killpg %p -- x"\n'
        f'RunTimeDelete="{REC} --out {out}/delete-%j.json -- x"\n'
    )


@pytest.fixture
def service_dir(user_dir) -> Path:
    return user_dir("service-")


def until(daemon, key: str) -> dict[str, str]:
    """Notifications up to and including the first that sets key (WATCHDOG=1 pings are skipped)."""
    while True:
        message = daemon.next_notification()
        if key in message:
            return message


def root_ctl(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(daemon.ctl_argv(*args), capture_output=True, text=True, timeout=60,
                          env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"})


# ---- sd_notify ---------------------------------------------------------------------------


def test_notifications_in_order_with_watchdog_from_the_loop(workdir, user, bundle):
    base = Path(tempfile.mkdtemp(prefix="notify-", dir=workdir))
    base.chmod(0o755)
    conf = base / "oci.conf"
    conf.write_text(RUNC_RUN_CONF)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(base / "notify"))
    notify.settimeout(30)
    sock = base / "sock"
    argv = [str(NODESTEPD), "--socket", str(sock), "--oci-conf", str(conf), "--spool-dir", str(base / "spool"),
            "--state-dir", str(base / "state"), "--node-name", "testnode", "--steps-on-stop", "cancel"]
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "NOTIFY_SOCKET": str(base / "notify"),
           "WATCHDOG_USEC": "200000"}  # systemd's WatchdogSec=0.2: a ping every 0.1 s
    # WATCHDOG_PID must be the daemon's own pid, as systemd sets it: the shell execs, keeping its pid.
    log = open(base / "log", "wb")
    proc = subprocess.Popen(["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    messages: list[dict[str, str]] = []
    pings = 0

    def next_message() -> dict[str, str]:
        nonlocal pings
        while True:
            try:
                data = notify.recv(4096).decode()
            except TimeoutError:
                raise AssertionError((base / "log").read_text()) from None
            message = dict(line.split("=", 1) for line in data.split("\n"))
            if message == {"WATCHDOG": "1"}:
                pings += 1
                continue
            messages.append(message)
            return message

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(user.command([str(NODESTEPD.parent / "nodestepctl"), "--socket", str(sock), *args]),
                              env=user.env, capture_output=True, timeout=60, cwd="/")

    try:
        assert next_message() == {"READY": "1"}
        assert next_message() == {"STATUS": f"idle, serving {sock}"}
        while pings < 3:  # the loop's own timer keeps them coming while nothing else happens
            assert notify.recv(4096) == b"WATCHDOG=1"
            pings += 1
        started = ctl("run", "--detach", "--job-id", "4001", "--bundle", str(bundle), "--", "sleep", "1000")
        assert started.returncode == 0, started.stderr
        assert next_message() == {"STATUS": f"1 step running: 4001.0 ({user.name})"}
        proc.send_signal(signal.SIGHUP)
        reloading = next_message()
        assert reloading.keys() == {"RELOADING", "MONOTONIC_USEC"} and reloading["RELOADING"] == "1"
        assert 0 < int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert next_message() == {"READY": "1"}
        assert next_message() == {"STATUS": f"1 step running: 4001.0 ({user.name})"}
        assert ctl("cancel", "4001.0").returncode == 0
        assert next_message() == {"STATUS": f"idle, serving {sock}"}
        proc.send_signal(signal.SIGTERM)
        assert next_message() == {"STOPPING": "1", "STATUS": "stopping; no steps running"}
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.close()
    assert pings >= 3
    assert "watchdog enabled" in (base / "log").read_text()


# ---- reload -----------------------------------------------------------------------------


def test_reload_applies_to_new_steps_and_running_steps_keep_their_config(start_daemon, user, bundle, service_dir):
    old_out, new_out = service_dir / "old", service_dir / "new"
    for out in (old_out, new_out):
        out.mkdir()
        os.chown(out, user.uid, user.gid)
    settings = service_dir / "nodestepd.toml"
    settings.write_text("kill_wait = 30\n")
    daemon = start_daemon(recording_conf(old_out), "--config", str(settings))
    first = daemon.ctl_popen(user, "run", "--job-id", "4101", "--bundle", str(bundle), "--", "x")
    read_line_from(first.stdout, b"recorded")

    daemon.oci_conf.write_text(recording_conf(new_out))
    settings.write_text("kill_wait = 5\n")
    reload = root_ctl(daemon, "reload")
    assert (reload.returncode, reload.stdout) == (0, "nodestepd reloaded its settings file and oci.conf\n"), reload.stderr
    assert "configuration reloaded" in daemon.log() and "kill_wait=5.0" in daemon.log()

    second = daemon.ctl_popen(user, "run", "--job-id", "4102", "--bundle", str(bundle), "--", "x")
    read_line_from(second.stdout, b"recorded")
    for ref in ("4101.0", "4102.0"):
        assert daemon.ctl(user, "cancel", ref).returncode == 0
    first.communicate(timeout=30)
    second.communicate(timeout=30)
    # Each step ran, was killed and deleted with the oci.conf it started with.
    assert sorted(os.listdir(old_out)) == ["delete-4101.json", "kill-4101.json", "run-4101.json"]
    assert sorted(os.listdir(new_out)) == ["delete-4102.json", "kill-4102.json", "run-4102.json"]


def test_bad_oci_conf_is_rejected_with_reasons_and_the_old_config_kept(start_daemon, user, bundle):
    daemon = start_daemon()
    daemon.oci_conf.write_text('RunTimeRun="runc run %n.%u.%j.%s.%t -b %b"\nOCIRunTimeQuery="runc state %n"\n')
    reload = root_ctl(daemon, "reload")
    assert reload.returncode == 1
    assert reload.stderr.startswith("nodestepctl: configuration not reloaded, the old one stays in use:\n  ")
    assert f"{daemon.oci_conf}:2" in reload.stderr and "OCIRunTimeQuery" in reload.stderr, reload.stderr
    log = daemon.log()
    assert "reload rejected, the old configuration stays in use" in log and "OCIRunTimeQuery" in log
    # The old oci.conf (the guide's runc run form) still launches.
    run = daemon.ctl(user, "run", "--job-id", "4103", "--bundle", str(bundle), "--", "echo", "old config")
    assert (run.returncode, run.stdout) == (0, b"old config\n"), run.stderr


def test_sighup_with_a_bad_settings_file_tells_systemd_and_keeps_serving(start_daemon, user, bundle, service_dir):
    settings = service_dir / "nodestepd.toml"
    settings.write_text("kill_wait = 30\n")
    daemon = start_daemon(RUNC_RUN_CONF, "--config", str(settings))
    settings.write_text('kill_wait = "soon"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    assert until(daemon, "RELOADING")["RELOADING"] == "1"
    assert daemon.next_notification() == {"READY": "1"}
    status = daemon.next_notification()["STATUS"]
    assert status.startswith(f"reload failed ({settings}: kill_wait: expected int, got str); old configuration in use")
    assert "reload rejected" in daemon.log()
    assert daemon.ctl(user, "status").returncode == 0


def test_settings_that_need_a_restart_are_kept_and_named(start_daemon, user, service_dir):
    settings = service_dir / "nodestepd.toml"
    settings.write_text("")
    daemon = start_daemon(RUNC_RUN_CONF, "--config", str(settings))
    settings.write_text('log_format = "json"\nkill_wait = 3\n')
    assert root_ctl(daemon, "reload").returncode == 0
    lines = daemon.log().splitlines()
    assert any("setting changed but only takes effect at restart" in line and "setting=log_format" in line
               for line in lines), lines
    # Still console lines: the format did not change under the running daemon; kill_wait did.
    assert lines[-1].split()[1:4] == ["[info", "]", "configuration"] and "kill_wait=3.0" in lines[-1]


def test_only_root_may_reload(start_daemon, user):
    daemon = start_daemon()
    result = daemon.ctl(user, "reload")
    assert (result.returncode, result.stderr) == (1, b"nodestepctl: only root may reload nodestepd's configuration\n")


# ---- stop -------------------------------------------------------------------------------


def test_sigterm_leaves_running_steps_alone_by_default(start_daemon, user, bundle, service_dir):
    daemon = start_daemon(RUNC_RUN_CONF, "--steps-on-stop", "leave")
    fifo = service_dir / "out"
    os.mkfifo(fifo)
    os.chown(fifo, user.uid, user.gid)
    # Our own write end keeps the fifo from reading as end-of-file before the container opens it.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    keeper = os.open(fifo, os.O_WRONLY)
    # A client that gives up on its daemon after 1 s (one that waits for the next daemon:
    # test_ridethrough.py).
    attached = daemon.ctl_popen(user, "run", "--job-id", "4201", "--reattach-timeout", "1", "--bundle", str(bundle),
                                "--", "sh", "-c", "echo ready; exec sleep 1000")
    detached = daemon.ctl(user, "run", "--detach", "--output", str(fifo), "--job-id", "4202", "--bundle", str(bundle),
                          "--", "sh", "-c", "echo ready; exec sleep 1000")
    containers = [f"testnode.{user.name}.{job}.0.0" for job in (4201, 4202)]
    try:
        assert detached.returncode == 0, detached.stderr
        read_line_from(attached.stdout, b"ready")
        with os.fdopen(reader, "rb", buffering=0) as stream:
            read_line_from(stream, b"ready")

        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=60) == 0, daemon.log()

        # The client lost its daemon; the container (which shares its stderr) runs on.
        assert attached.wait(timeout=30) == 255
        said = b""
        while b"step 4201.0 may still be running" not in said:
            said += read_line_from(attached.stderr, b"")
        assert sorted(runc_containers(user)) == containers
        for name in containers:
            state = subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "state", name]),
                                   env=user.env, capture_output=True, text=True, check=True)
            assert '"status": "running"' in state.stdout
        assert spool_entries(daemon) == [f"oci-job4201-0-uid{user.uid}", f"oci-job4202-0-uid{user.uid}"]
        log = daemon.log()
        assert "shutting down: leaving running steps alone" in log and log.count("step left running") == 2
        assert "RunTimeKill" not in log and "cancelling step" not in log
    finally:
        os.close(keeper)
        for name in runc_containers(user):
            if name in containers:
                subprocess.run(user.command(["runc", "--root", f"/run/user/{user.uid}/", "delete", "--force", name]),
                               env=user.env, check=True)
