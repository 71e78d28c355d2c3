"""Rootless podman and docker with runc as their runtime (the reference) and with nodestep-oci
in front of a real daemon in both oci.conf modes: the same scenarios, the same results.

The engines' calls are the ones docs/oci-runtime-proxy-facts.md (shared) recorded; the
statuses are what the engines report with runc: an exit code as is, 128+N for signal N.
"""

from __future__ import annotations

import os
import subprocess

from conftest import wait_gone
from engines import (  # noqa: F401  (fixtures)
    ENGINE_TIMEOUT, IMAGE, busybox_tar, engine_runtime, make_docker, make_podman, wait_output,
)

# A container that ignores SIGTERM (as PID 1 without a handler would anyway) and says when it is set.
IGNORES_TERM = 'trap "" TERM; echo ready; while :; do sleep 0.2; done'
# A container that exits 138 on SIGUSR1 (PID 1 of a pid namespace only gets signals it handles).
TRAPS_USR1 = 'trap "echo got-usr1; exit 138" USR1; echo ready; while :; do sleep 0.2; done'


# ---------------------------------------------------------------- podman


def test_podman_run_rm_output_and_exit(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    r = podman("run", "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 0")
    assert (r.returncode, r.stdout, r.stderr.splitlines()[-1:]) == (0, b"out\n", [b"err"]), r
    r = podman("run", "--rm", IMAGE, "sh", "-c", "exit 3")
    assert r.returncode == 3, r
    assert podman.ok("ps", "--all", "--quiet") == ""


def test_podman_run_exit_3_kept(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    r = podman("run", "--name", "three", IMAGE, "sh", "-c", "exit 3")
    assert r.returncode == 3, r
    assert podman.inspect("three", "{{.State.ExitCode}}") == "3"
    podman.ok("rm", "three")


def test_podman_run_detached_then_wait(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    cid = podman.ok("run", "-d", IMAGE, "sh", "-c", "sleep 1; exit 9").strip()
    assert podman.ok("wait", cid).strip() == "9"
    podman.ok("rm", cid)


def test_podman_kill_usr1_with_trap(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    podman.ok("run", "-d", "--name", "usr1", IMAGE, "sh", "-c", TRAPS_USR1)
    wait_output(podman, "usr1")
    podman.ok("kill", "--signal", "USR1", "usr1")
    assert podman.ok("wait", "usr1").strip() == "138"
    assert "got-usr1" in podman.ok("logs", "usr1")
    podman.ok("rm", "usr1")


def test_podman_stop_time_2_of_term_ignoring(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    podman.ok("run", "-d", "--name", "stubborn", IMAGE, "sh", "-c", IGNORES_TERM)
    wait_output(podman, "stubborn")
    podman.ok("stop", "--time", "2", "stubborn")
    assert podman.inspect("stubborn", "{{.State.ExitCode}}") == "137"
    assert podman.ok("wait", "stubborn").strip() == "137"
    podman.ok("rm", "stubborn")


def test_podman_rm_force_running(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    cid = podman.ok("run", "-d", IMAGE, "sh", "-c", IGNORES_TERM).strip()
    wait_output(podman, cid)
    pid = int(podman.inspect(cid, "{{.State.Pid}}"))
    conmon = int(podman.inspect(cid, "{{.State.ConmonPid}}"))
    assert pid > 0 and conmon > 0
    podman.ok("rm", "--force", "--time", "2", cid)
    assert podman.ok("ps", "--all", "--quiet") == ""
    wait_gone([pid, conmon])  # podman rm returns once they are gone; bounded all the same
    if not engine_runtime.proxied:  # through the proxy: test_engines_proxy.py checks the daemon's side
        root = podman.runtime_root()
        assert cid not in (os.listdir(root) if root.exists() else [])


def test_podman_interactive_stdin(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    r = podman("run", "--rm", "-i", IMAGE, "sh", "-c", "tr a-z A-Z; exit 5", input=b"hello\nworld\n")
    assert (r.returncode, r.stdout) == (5, b"HELLO\nWORLD\n"), r


# nodestepd runs a terminal step in run mode only (docs/oci-conf.md): in create/start mode the
# site's runtime would need a console socket. Through the proxy, -t is then refused, clearly.
PTY_REFUSED = b"--pty needs RunTimeRun"


def test_podman_tty(make_podman, user, engine_runtime):
    podman = make_podman(user, engine_runtime)
    r = podman.in_pty("run", "--rm", "-it", IMAGE, "sh", "-c", "tty; test -t 0 && echo stdin-is-tty; exit 4")
    if engine_runtime.name == "proxy-create-start":
        assert r.returncode != 0 and PTY_REFUSED in r.stdout, r
        return
    assert r.returncode == 4, r
    assert b"/dev/pts/" in r.stdout and b"stdin-is-tty" in r.stdout, r


def test_podman_preserve_fds(make_podman, user, engine_runtime, user_dir):
    podman = make_podman(user, engine_runtime)
    out = user_dir("engines-fd3-") / "fd3"
    script = 'exec "$@" 3>"$OUT"'
    r = subprocess.run(
        user.command(["sh", "-c", script, "sh", *podman.argv("run", "--rm", "--preserve-fds", "1", IMAGE,
                                                             "sh", "-c", "echo via-fd3 >&3; echo via-stdout")]),
        env={**podman.env, "OUT": str(out)}, cwd="/", capture_output=True, timeout=ENGINE_TIMEOUT,
        stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (0, b"via-stdout\n"), r
    assert out.read_bytes() == b"via-fd3\n"


# ---------------------------------------------------------------- docker


def test_docker_run_output_and_exit(make_docker, user, engine_runtime):
    docker = make_docker(user, engine_runtime)
    r = docker("run", "--rm", *docker.run_args(), IMAGE, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n"), r


def test_docker_run_detached_wait_and_stop(make_docker, user, engine_runtime):
    docker = make_docker(user, engine_runtime)
    cid = docker.ok("run", "-d", *docker.run_args(), IMAGE, "sh", "-c", "sleep 1; exit 9").strip()
    assert docker.ok("wait", cid).strip() == "9"
    docker.ok("rm", cid)
    cid = docker.ok("run", "-d", *docker.run_args(), IMAGE, "sh", "-c", IGNORES_TERM).strip()
    wait_output(docker, cid)
    docker.ok("stop", "--time", "2", cid)
    assert docker.ok("wait", cid).strip() == "137"
    assert docker.ok("inspect", "--format", "{{.State.ExitCode}}", cid).strip() == "137"
    docker.ok("rm", cid)


def test_docker_tty(make_docker, user, engine_runtime):
    docker = make_docker(user, engine_runtime)
    r = docker.in_pty("run", "--rm", "-it", *docker.run_args(), IMAGE, "sh", "-c",
                      "tty; test -t 0 && echo stdin-is-tty; exit 4")
    if engine_runtime.name == "proxy-create-start":
        assert r.returncode != 0 and PTY_REFUSED in r.stdout, r
        return
    assert r.returncode == 4, r
    assert b"/dev/pts/" in r.stdout and b"stdin-is-tty" in r.stdout, r
