"""ociproxy.py without a daemon: what an OCI create may be, the step ids of a Slurm job's
containers, unknown and other users' ids, and a held container's start and delete."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

import pytest

from nodestepd.daemon.errors import BadRequest, Refused
from nodestepd.daemon.ociproxy import OCI_STEP_BASE, OciProxy
from nodestepd.daemon.registry import Registry
from nodestepd.protocol.messages import OciCreate, RunRequest
from nodestepd.step.spec import LaunchFailed
from nodestepd.step.step import StepState


def create(cid: str = "c" * 64, **fields) -> RunRequest:
    return RunRequest(v=1, bundle="/b", args=["true"], oci=OciCreate(id=cid, bundle="/b"), **fields)


@pytest.fixture
def peer():
    """A connected socket whose peer is this process (our own namespaces: nothing to enter)."""
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


async def test_a_create_gets_the_engine_id_as_container_id(peer):
    proxy = OciProxy(Registry())
    container, request = proxy.admit(1000, 42, peer, create())
    assert (request.container_id, request.step_id, request.job_id) == ("c" * 64, 0, None)
    assert container.namespaces is None and container.anchor_pid == 42
    assert container.status() == "creating"


@pytest.mark.parametrize("cid", ["", "a/b", "a\0b", "x" * 1025])
async def test_bad_ids_are_refused(peer, cid):
    with pytest.raises(BadRequest, match="container id"):
        OciProxy(Registry()).admit(1000, 42, peer, create(cid))


@pytest.mark.parametrize("fields", [{"detach": True}, {"ntasks": 2}, {"step_id": 3}, {"user": "root"},
                                    {"task_offset": 0}])
async def test_only_one_attached_task_of_the_caller(peer, fields):
    with pytest.raises(BadRequest, match="one attached task"):
        OciProxy(Registry()).admit(1000, 42, peer, create(**fields))


async def test_containers_of_a_slurm_job_are_numbered_by_the_daemon(peer):
    proxy = OciProxy(Registry())
    first, a = proxy.admit(1000, 42, peer, create("a", job_id=77))
    first.step = SimpleNamespace(spec=SimpleNamespace(job_id=77, step_id=a.step_id), state=StepState.LAUNCHING)
    _, b = proxy.admit(1000, 43, peer, create("b", job_id=77))
    _, other_user = proxy.admit(1001, 44, peer, create("a", job_id=77))
    assert (a.step_id, b.step_id, other_user.step_id) == (OCI_STEP_BASE, OCI_STEP_BASE + 1, OCI_STEP_BASE)


async def test_two_creates_admitted_together_never_share_a_step_id(peer):
    # Neither has its step yet (both still being admitted): the second must not take the
    # first's number (CI saw the second create of a job fail as a duplicate step).
    proxy = OciProxy(Registry())
    first, a = proxy.admit(1000, 42, peer, create("a", job_id=77))
    _, b = proxy.admit(1000, 43, peer, create("b", job_id=77))
    assert (a.step_id, b.step_id) == (OCI_STEP_BASE, OCI_STEP_BASE + 1)
    proxy.refused(first)  # a refused create gives its number back
    _, c = proxy.admit(1000, 44, peer, create("c", job_id=77))
    assert c.step_id == OCI_STEP_BASE


async def test_an_id_in_use_is_a_conflict_for_its_user_only(peer):
    proxy = OciProxy(Registry())
    proxy.admit(1000, 42, peer, create("same"))
    with pytest.raises(Refused, match="already exists"):
        proxy.admit(1000, 42, peer, create("same"))
    proxy.admit(1001, 42, peer, create("same"))  # another user's namespace of names


async def test_unknown_and_other_users_ids_do_not_exist(peer):
    proxy = OciProxy(Registry())
    proxy.admit(1000, 42, peer, create("mine"))
    for uid, cid in ((1000, "unknown"), (1001, "mine")):
        with pytest.raises(Refused, match=f"container {cid} does not exist"):
            proxy.state(uid, cid)
        with pytest.raises(Refused, match="does not exist"):
            proxy.kill(uid, cid, 9)
        with pytest.raises(Refused, match="does not exist"):
            await proxy.delete(uid, cid)
        with pytest.raises(Refused, match="does not exist"):
            await proxy.start(uid, cid)


async def test_a_held_container_starts_once(peer):
    proxy = OciProxy(Registry())
    container, _ = proxy.admit(1000, 42, peer, create("c"))
    container.step = SimpleNamespace(state=StepState.LAUNCHING)
    container.held = True
    assert proxy.state(1000, "c").status == "created"
    starting = asyncio.ensure_future(proxy.start(1000, "c"))
    await asyncio.sleep(0)
    assert container.go.done() and container.go.result() is None
    container.launched.set_result(True)
    await starting
    with pytest.raises(Refused, match="started already"):
        await proxy.start(1000, "c")


async def test_killing_a_held_container_ends_it_before_its_start(peer):
    proxy = OciProxy(Registry())
    container, _ = proxy.admit(1000, 42, peer, create("c"))
    container.step = SimpleNamespace(state=StepState.LAUNCHING)
    container.held = True
    proxy.kill(1000, "c", 9)
    with pytest.raises(LaunchFailed, match="killed before its start"):
        container.go.result()


async def test_delete_is_idempotent_and_forgets_the_id(peer):
    proxy = OciProxy(Registry())
    container, _ = proxy.admit(1000, 42, peer, create("c"))
    await proxy.delete(1000, "c")
    await proxy.delete(1000, "c")
    with pytest.raises(Refused, match="does not exist"):
        proxy.state(1000, "c")
    with pytest.raises(Refused, match="does not exist"):
        await proxy.delete(1001, "c")  # someone else's delete of it is still "does not exist"
