"""image/cache.py: one import per image however many launches want it, imports in parallel
up to the bound, cancel when nobody waits, and the start-up cleanup. The helper is a
stand-in here (counting its runs); tests/e2e/test_images.py runs the real one as a user."""

from __future__ import annotations

import asyncio
import os

import pytest

from nodestepd.image import cache as cache_module
from nodestepd.image.cache import ImageCache
from nodestepd.image.importer import Answer, ImportFailed, check_depth
from nodestepd.logs import get_logger
from nodestepd.process.identity import Identity

ALICE = Identity("alice", 1000, 1000, (1000,), "/home/alice")
BOB = Identity("bob", 1001, 1001, (1001,), "/home/bob")
LOG = get_logger()


class FakeImports:
    """run_import's stand-in: each run waits for the test's go, counted; started and cancelled ones noted."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.running = 0
        self.most_running = 0
        self.cancelled: list[str] = []
        self.go = asyncio.Event()

    async def __call__(self, identity, user_dir, ref, env, *, timeout, on_started=None, sizes=False) -> Answer:
        self.runs.append(ref)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.go.wait()
        except asyncio.CancelledError:
            self.cancelled.append(ref)
            raise
        finally:
            self.running -= 1
        if ref == "docker://fails":
            raise ImportFailed("cannot import docker://fails: no")
        os.makedirs(os.path.join(user_dir, "sha256-" + "a" * 64), exist_ok=True)
        return Answer(digest="sha256:" + "a" * 64, entry="sha256-" + "a" * 64, config_json="{}", imported=True)


@pytest.fixture
def images(monkeypatch, tmp_path):
    fake = FakeImports()
    monkeypatch.setattr(cache_module, "run_import", fake)
    cache = ImageCache(str(tmp_path / "images"), imports_max=2, timeout=10, untrusted_reason=lambda path: None)
    monkeypatch.setattr(cache, "user_dir", lambda identity: str(tmp_path / str(identity.uid)))
    return cache, fake


async def settle(until=lambda: False) -> None:
    """Let the imports get going (the user dir is made in a worker thread): until the
    condition holds, else for a moment."""
    for _ in range(100):
        if until():
            return
        await asyncio.sleep(0.01)


async def test_sixteen_launches_of_a_new_image_share_one_import(images):
    cache, fake = images
    launches = [asyncio.ensure_future(cache.get(ALICE, "oci-archive:/x.tar", "fp", {}, LOG)) for _ in range(16)]
    await settle(lambda: fake.running == 1)
    assert fake.runs == ["oci-archive:/x.tar"]
    fake.go.set()
    entries = await asyncio.gather(*launches)
    assert len({e.bundle for e in entries}) == 1 and cache.imports == 1
    # Known now (reference and fingerprint): no run at all, while the entry is there.
    await cache.get(ALICE, "oci-archive:/x.tar", "fp", {}, LOG)
    assert len(fake.runs) == 1
    os.rmdir(entries[0].bundle)
    await cache.get(ALICE, "oci-archive:/x.tar", "fp", {}, LOG)
    assert len(fake.runs) == 2
    # Another fingerprint (the file changed), or another user: a new run each.
    await cache.get(ALICE, "oci-archive:/x.tar", "fp2", {}, LOG)
    await cache.get(BOB, "oci-archive:/x.tar", "fp", {}, LOG)
    assert len(fake.runs) == 4


async def test_different_images_import_in_parallel_up_to_the_bound(images):
    cache, fake = images
    launches = [asyncio.ensure_future(cache.get(ALICE, f"oci:/l{i}", None, {}, LOG)) for i in range(5)]
    await settle(lambda: fake.running == 2)
    await settle()  # and no third one starts
    assert fake.running == 2
    fake.go.set()
    await asyncio.gather(*launches)
    assert fake.most_running == 2 and len(fake.runs) == 5


async def test_a_failed_import_fails_every_waiter_and_is_not_remembered(images):
    cache, fake = images
    launches = [asyncio.ensure_future(cache.get(ALICE, "docker://fails", None, {}, LOG)) for _ in range(3)]
    await settle()
    fake.go.set()
    results = await asyncio.gather(*launches, return_exceptions=True)
    assert all(isinstance(r, ImportFailed) for r in results) and len(fake.runs) == 1
    with pytest.raises(ImportFailed):
        await cache.get(ALICE, "docker://fails", None, {}, LOG)
    assert len(fake.runs) == 2


async def test_the_import_goes_on_while_anyone_waits_and_stops_when_nobody_does(images):
    cache, fake = images
    first = asyncio.ensure_future(cache.get(ALICE, "oci:/l", None, {}, LOG))
    second = asyncio.ensure_future(cache.get(ALICE, "oci:/l", None, {}, LOG))
    await settle(lambda: fake.running == 1)
    first.cancel()
    await settle()
    assert fake.cancelled == []  # the second still waits for it
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    assert fake.cancelled == ["oci:/l"]  # stopped before the cancel returned
    # A later launch starts a new import rather than joining the cancelled one.
    fake.go.set()
    await cache.get(ALICE, "oci:/l", None, {}, LOG)
    assert fake.runs == ["oci:/l", "oci:/l"]


def test_start_up_removes_only_the_leftovers_of_helpers_that_are_gone(tmp_path):
    root = tmp_path / "images"
    user = root / "1000"
    dead = user / ".tmp-999999999"
    (dead / "bundle" / "rootfs" / "bin").mkdir(parents=True)
    (dead / "bundle" / "rootfs" / "bin" / "sh").write_text("x")
    os.symlink("/etc", dead / "bundle" / "rootfs" / "etc")
    (dead / "bundle" / "rootfs" / "bin").chmod(0o500)
    alive = user / f".tmp-{os.getpid()}"
    alive.mkdir()
    entry = user / ("sha256-" + "b" * 64)
    entry.mkdir()
    cache = ImageCache(str(root), imports_max=1, timeout=1, untrusted_reason=lambda path: None)
    assert cache.clean_stale() == 1
    assert sorted(os.listdir(user)) == sorted([alive.name, entry.name])
    assert os.path.exists("/etc/passwd")


def test_json_nested_too_deeply_is_refused_before_parsing():
    check_depth('{"a": [{"b": "[[[[[[[[[[[[[[["}]}', "x", limit=3)
    with pytest.raises(ImportFailed, match="nested deeper than 3 levels"):
        check_depth("[[[[1]]]]", "x", limit=3)


async def test_over_the_cap_the_least_recently_used_entries_go_never_one_in_use(monkeypatch, tmp_path):
    user_dir = tmp_path / "images" / "1000"
    (user_dir / ("sha256-" + "c" * 64)).mkdir(parents=True)  # from before this daemon: never used by it

    async def fake_import(identity, user_dir, ref, env, *, timeout, on_started=None, sizes=False):
        assert sizes
        name = "sha256-" + ref[-1] * 64
        os.mkdir(os.path.join(user_dir, name))
        return Answer(digest="sha256:" + ref[-1] * 64, entry=name, config_json="{}", imported=True,
                      sizes={n: 100 for n in os.listdir(user_dir)})

    monkeypatch.setattr(cache_module, "run_import", fake_import)
    cache = ImageCache(str(tmp_path / "images"), imports_max=1, timeout=1, untrusted_reason=lambda p: None,
                       max_bytes=250)
    monkeypatch.setattr(cache, "user_dir", lambda identity: str(user_dir))
    a = await cache.get(ALICE, "oci:/x-a", None, {}, LOG)  # held: a step runs from it
    assert len(os.listdir(user_dir)) == 2
    b = await cache.get(ALICE, "oci:/x-b", None, {}, LOG)  # 300 bytes: c, the least recently used, goes
    assert sorted(os.listdir(user_dir)) == ["sha256-" + "a" * 64, "sha256-" + "b" * 64]
    cache.release(b)
    await cache.get(ALICE, "oci:/x-d", None, {}, LOG)  # 300 again: b goes; a is held, d just came
    assert sorted(os.listdir(user_dir)) == ["sha256-" + "a" * 64, "sha256-" + "d" * 64] and cache.evictions == 2
    cache.release(a)
    assert list(cache._holds) == [str(user_dir / ("sha256-" + "d" * 64))]
