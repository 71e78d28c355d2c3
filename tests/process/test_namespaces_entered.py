"""The runtime's commands in a caller's namespaces (namespaces.py's Namespaces): the monitor's
task (monitor.c --userns-fd/--mntns-fd) and the short helpers (nsenter) enter them as the
user, so the kernel lets them into the user's own namespaces and nowhere else."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from pathlib import Path

import pytest

from nodestepd.process.namespaces import Namespaces
from nodestepd.process.spawn import run_helper
from test_monitor import PATH_ENV, Harness, our_children
from uvloop_fixtures import OVERRIDE_WARNING, event_loop_policy, identity, on_uvloop  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings(OVERRIDE_WARNING)


@pytest.fixture
async def harness(identity, user_dir, new_dir):
    before = our_children()
    h = Harness(identity, user_dir("task-"), new_dir("state-", 0o700) / "exit")
    try:
        yield h
    finally:
        await h.close()
    assert our_children() == before


def _holder(argv: list[str]) -> subprocess.Popen:
    holder = subprocess.Popen([*argv, "sh", "-c", "echo ready; exec sleep 1000"], stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"ready\n"
    return holder


def _pinned(pid: int) -> Namespaces:
    return Namespaces(os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC),
                      os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))


def _ns(pid: int | str, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


@pytest.fixture
def users_namespaces(user):
    """(pid, Namespaces) of a user namespace the user made, as podman's, and its mount namespace."""
    holder = _holder(user.command(["unshare", "--user", "--map-root-user", "--mount"]))
    namespaces = _pinned(holder.pid)
    yield holder.pid, namespaces
    namespaces.close()
    holder.kill()
    holder.wait()


@pytest.fixture
def roots_namespaces(user):
    """Namespaces root made (mapping the user's uid): not the user's to enter."""
    holder = _holder(["unshare", "--user", "--mount"])
    Path(f"/proc/{holder.pid}/uid_map").write_text(f"{user.uid} {user.uid} 1\n")
    Path(f"/proc/{holder.pid}/gid_map").write_text(f"{user.gid} {user.gid} 1\n")
    namespaces = _pinned(holder.pid)
    yield namespaces
    namespaces.close()
    holder.kill()
    holder.wait()


async def test_the_task_runs_in_the_users_namespaces_in_its_task_dir(harness, users_namespaces):
    pid, namespaces = users_namespaces
    (harness.cwd / "marker").write_text("")
    monitor = await harness.spawn("readlink /proc/self/ns/user /proc/self/ns/mnt; id -u; test -e marker && echo here",
                                  namespaces=namespaces)
    assert await asyncio.wait_for(monitor.task.wait(), 10) == 0
    assert harness.output().split() == [_ns(pid, "user"), _ns(pid, "mnt"), "0", "here"]  # uid 0 there: the user
    await harness.release(monitor)


async def test_the_task_may_not_enter_namespaces_the_user_does_not_own(harness, roots_namespaces):
    with pytest.raises(PermissionError) as raised:
        await harness.spawn("echo entered", namespaces=roots_namespaces)
    assert raised.value.errno == errno.EPERM
    assert harness.output() == ""


async def test_helpers_run_in_the_users_namespaces(identity, users_namespaces):
    pid, namespaces = users_namespaces
    result = await run_helper("readlink /proc/self/ns/user /proc/self/ns/mnt", identity=identity, cwd="/",
                              env=PATH_ENV, timeout=30, namespaces=namespaces)
    assert (result.status, result.output.split()) == (0, [_ns(pid, "user"), _ns(pid, "mnt")])


async def test_helpers_may_not_enter_namespaces_the_user_does_not_own(identity, roots_namespaces):
    result = await run_helper("echo entered", identity=identity, cwd="/", env=PATH_ENV, timeout=30,
                              namespaces=roots_namespaces)
    assert result.status != 0 and "entered" not in result.output
    assert "Operation not permitted" in result.output
