"""`nodestepctl run --preserve-fds N` end to end with real runc: the client's fds 3.. reach
the container's process at 3.., in run mode and in create/start mode. Job ids: assigned by
the daemon."""

from __future__ import annotations

import subprocess

import pytest

from conftest import REPO, RUNC_RUN_CONF, runc_containers, spool_entries

MODES = {
    "run": RUNC_RUN_CONF,
    "create-start": (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text(),
}
CHARLIECLOUD = (REPO / "tests" / "oci-conf-examples" / "charliecloud.conf").read_text()


def _with_fds(files: list[str], argv: list[str]) -> list[str]:
    """argv run with each of files opened for reading at fds 3, 4, ... (opened by root's
    shell, then argv is a user's command: setpriv keeps them)."""
    opens = " ".join(f'{3 + i}<"${i + 1}"' for i in range(len(files)))
    return ["/bin/sh", "-c", f'exec {opens}; shift {len(files)}; exec "$@"', "sh", *files, *argv]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_container_reads_the_fds_the_client_preserves(start_daemon, user, bundle, workdir, mode):
    daemon = start_daemon(MODES[mode])
    files = []
    for i, text in enumerate(("first\n", "second\n")):
        path = workdir / f"preserved-{mode}-{i}"
        path.write_text(text)
        path.chmod(0o644)
        files.append(str(path))
    argv = _with_fds(files, user.command(daemon.ctl_argv("run", "--preserve-fds", "2", "--bundle", str(bundle), "--",
                                            "sh", "-c", "cat <&4; cat <&3; ls /proc/self/fd")))
    result = subprocess.run(argv, env=user.env, cwd="/", capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    said = result.stdout.decode().splitlines()
    assert said[:2] == ["second", "first"]
    assert {"3", "4"} <= set(said[2:]), said  # ls's own directory fd comes after them
    assert spool_entries(daemon) == []
    assert runc_containers(user) == []


def test_a_runtime_that_cannot_preserve_fds_fails_the_launch_clearly(start_daemon, user, bundle, workdir):
    daemon = start_daemon(CHARLIECLOUD)
    path = workdir / "preserved-ch"
    path.write_text("x\n")
    path.chmod(0o644)
    argv = _with_fds([str(path)], user.command(daemon.ctl_argv("run", "--preserve-fds", "1", "--bundle",
                                                               str(bundle), "--", "true")))
    result = subprocess.run(argv, env=user.env, cwd="/", capture_output=True, timeout=60)
    assert result.returncode == 125
    assert b"--preserve-fds (and MPI's PMI fd) needs runc or crun" in result.stderr, result.stderr
    assert spool_entries(daemon) == []
