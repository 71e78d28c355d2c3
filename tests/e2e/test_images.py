"""`nodestepctl run --image`: images imported as the user into the daemon's cache, then run
by real runc through the site's oci.conf (both modes) as a --bundle step would be.

The test images are built offline, as the test user, by scripts/make-image.sh (the bench
builds its image with it too): umoci makes an OCI layout with busybox-static and an image
config (Entrypoint, Cmd, Env, WorkingDir), skopeo copies it to a docker-archive and an
oci-archive. No test needs a registry: a registry that accepts connections and never
answers (a silent TCP listener) stands in for a slow one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import stat
import tarfile
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, RUNC_RUN_CONF, runc_containers, spool_entries
from nodestepd.ctl.transport import connect, expect, receive, send
from nodestepd.process.watch import children
from test_create_start import oci_conf as create_start_conf

LAUNCH_FAILED = 125


@pytest.fixture(scope="session")
def images(workdir, user) -> Path:
    """The test user's dir with layout/ (oci:, tag latest), img.tar (docker-archive) and img-oci.tar."""
    path = workdir / "images"
    path.mkdir()
    os.chown(path, user.uid, user.gid)
    with open(REPO / "scripts" / "make-image.sh") as script:  # read as root, run as the user
        subprocess.run(user.command(["sh", "-s", "--", str(path)]), env={**user.env, "HOME": str(path)}, check=True,
                       timeout=120, stdin=script, capture_output=True)
    return path


def refs(images: Path) -> dict[str, str]:
    return {"docker-archive": f"docker-archive:{images}/img.tar", "oci-archive": f"oci-archive:{images}/img-oci.tar",
            "oci": f"oci:{images}/layout:latest"}


def status(daemon, user) -> dict:
    """The daemon's status reply (images_imported counts the images unpacked)."""
    with connect(str(daemon.socket)) as sock:
        send(sock, {"op": "status"})
        return expect(receive(sock), "status", 1)


def import_helper(daemon) -> list[int]:
    """The daemon's children once its import helper runs (a step shows `importing` as soon
    as its import begins, the helper's start in a thread comes just after)."""
    deadline = time.monotonic() + 30
    while not (helpers := children(daemon.proc.pid)):
        assert time.monotonic() < deadline, "no import helper running"
        time.sleep(0.02)
    return helpers


def errors(stderr: bytes) -> bytes:
    """stderr without the progress lines a first import may cause on a busy machine (after 1 s)."""
    return b"".join(line for line in stderr.splitlines(keepends=True)
                    if not re.match(rb"nodestepctl: (still launching after|step \S+ started after)", line))


def cache_listing(daemon, user) -> list[str]:
    top = daemon.socket.parent / f"images-{daemon.socket.name.removeprefix('sock-')}" / str(user.uid)
    return sorted(os.listdir(top)) if top.exists() else []


def leftovers(daemon, user) -> list[str]:
    return [name for name in cache_listing(daemon, user) if not name.startswith("sha256-")]


@pytest.mark.parametrize("transport", ["docker-archive", "oci-archive", "oci"])
def test_an_image_runs_its_entrypoint_and_cmd(start_daemon, user, images, transport):
    daemon = start_daemon()
    result = daemon.ctl(user, "run", "--image", refs(images)[transport])
    assert (result.returncode, result.stdout, errors(result.stderr)) == (0, b"from-entrypoint from-cmd\n", b"")
    assert runc_containers(user) == []
    assert spool_entries(daemon) == []
    entries = cache_listing(daemon, user)
    assert len(entries) == 1 and entries[0].startswith("sha256-"), entries


def test_a_command_runs_with_the_images_env_and_workdir_and_exit_status(start_daemon, user, images):
    daemon = start_daemon()
    result = daemon.ctl(user, "run", "--export", "NONE", "--env", "MINE=1", "--image", refs(images)["docker-archive"],
                        "--", "sh", "-c", 'echo "$FOO $MINE $(pwd)"; exit 3')
    assert (result.returncode, result.stdout, errors(result.stderr)) == (3, b"bar 1 /work\n", b"")


def test_create_start_mode_runs_an_image(start_daemon, user, images):
    daemon = start_daemon(create_start_conf())
    result = daemon.ctl(user, "run", "--image", refs(images)["oci-archive"])
    assert (result.returncode, result.stdout, errors(result.stderr)) == (0, b"from-entrypoint from-cmd\n", b"")
    result = daemon.ctl(user, "run", "--image", refs(images)["oci-archive"], "--", "sh", "-c", "exit 7")
    assert result.returncode == 7, result.stderr
    assert runc_containers(user) == []


@pytest.mark.skipif(not os.access("/usr/bin/ch-run", os.X_OK), reason="charliecloud-runtime (ch-run) is not installed")
def test_charliecloud_runs_the_images_rootfs(start_daemon, user, images, workdir):
    from test_charliecloud import adapted_conf
    etc_slurm, munge = workdir / "img-ch-etc-slurm", workdir / "img-ch-munge"
    for path in (etc_slurm, munge):
        path.mkdir(mode=0o755, exist_ok=True)
    daemon = start_daemon(adapted_conf(etc_slurm, munge))
    ref = refs(images)["docker-archive"]
    result = daemon.ctl(user, "run", "--image", ref)
    assert (result.returncode, result.stdout, errors(result.stderr)) == (0, b"from-entrypoint from-cmd\n", b"")
    result = daemon.ctl(user, "run", "--image", ref, "--", "sh", "-c", "ls /work >/dev/null && exit 4")
    assert result.returncode == 4, result.stderr
    assert spool_entries(daemon) == []


def test_mount_workdir_and_entrypoint(start_daemon, user, images, user_dir):
    daemon = start_daemon()
    data = user_dir("data-")
    (data / "file").write_text("host data\n")
    ref = refs(images)["docker-archive"]
    result = daemon.ctl(user, "run", "--image", ref, "--mount", f"{data}:/data:ro", "--workdir", "/data", "--",
                        "sh", "-c", "cat file; pwd; touch new 2>/dev/null || echo read-only")
    assert (result.returncode, result.stdout) == (0, b"host data\n/data\nread-only\n"), result.stderr
    result = daemon.ctl(user, "run", "--image", ref, "--mount", f"{data}:/data", "--", "sh", "-c",
                        "echo written > /data/new; touch /bin/x 2>/dev/null || echo rootfs-read-only; echo tmp > /tmp/t")
    assert (result.returncode, result.stdout) == (0, b"rootfs-read-only\n"), result.stderr
    assert (data / "new").read_text() == "written\n"
    result = daemon.ctl(user, "run", "--image", ref, "--entrypoint", "/bin/echo", "--", "given")
    assert (result.returncode, result.stdout) == (0, b"given\n"), result.stderr
    result = daemon.ctl(user, "run", "--image", ref, "--entrypoint", "/bin/pwd")
    assert (result.returncode, result.stdout) == (0, b"/work\n"), result.stderr  # the Cmd went with the Entrypoint


def test_an_image_is_imported_once_and_reused(start_daemon, user, images):
    daemon = start_daemon()
    ref = refs(images)["docker-archive"]
    for _ in range(3):
        result = daemon.ctl(user, "run", "--image", ref, "--", "true")
        assert result.returncode == 0, result.stderr
    assert status(daemon, user)["images_imported"] == 1
    assert daemon.log().count("importing image") == 1  # the later launches start no helper at all
    # The same image in another form (oci-archive: another manifest) is another entry.
    assert daemon.ctl(user, "run", "--image", refs(images)["oci-archive"], "--", "true").returncode == 0
    assert status(daemon, user)["images_imported"] == 2
    # A daemon restart forgets nothing on disk: the entry is found, not unpacked again.
    daemon.stop()
    again = start_daemon(after=daemon)
    assert again.ctl(user, "run", "--image", ref, "--", "true").returncode == 0
    assert status(again, user)["images_imported"] == 0


def test_sixteen_concurrent_launches_of_a_new_image_import_it_once(start_daemon, user, images):
    daemon = start_daemon()
    ref = refs(images)["oci-archive"]
    clients = [daemon.ctl_popen(user, "run", "--image", ref, "--", "echo", str(i)) for i in range(16)]
    outputs = [client.communicate(timeout=120) for client in clients]
    assert [c.returncode for c in clients] == [0] * 16, outputs
    assert sorted(out for out, _ in outputs) == sorted(f"{i}\n".encode() for i in range(16))
    assert status(daemon, user)["images_imported"] == 1
    assert daemon.log().count("importing image") == 1


@pytest.mark.parametrize("ref, said", [
    ("ftp://example.com/x", "unknown or unsupported image transport 'ftp'"),
    ("containers-storage:busybox", "containers-storage: images are not supported"),
    ("docker-archive:/nonexistent/img.tar", "cannot read image archive /nonexistent/img.tar: No such file or directory"),
    ("docker://busybox:latest", "cannot reach registry for docker://busybox:latest"),
    ("busybox", "cannot reach registry for docker://busybox"),
])
def test_bad_references_fail_with_one_sentence(start_daemon, user, ref, said):
    daemon = start_daemon()
    result = daemon.ctl(user, "run", "--image", ref, "--", "true", timeout=120)
    assert result.returncode == LAUNCH_FAILED, result.stderr
    assert said in result.stderr.decode(), result.stderr
    assert errors(result.stderr).count(b"\n") == 1, result.stderr
    assert leftovers(daemon, user) == [] and spool_entries(daemon) == []


def test_unreadable_corrupt_truncated_and_layerless_archives_fail_cleanly(start_daemon, user, images, user_dir):
    daemon = start_daemon()
    bad = user_dir("bad-")
    (bad / "corrupt.tar").write_bytes(b"this is not a tar archive\n" * 100)
    whole = (images / "img.tar").read_bytes()
    (bad / "truncated.tar").write_bytes(whole[: len(whole) // 2])
    secret = bad / "secret.tar"
    secret.write_bytes(whole)
    os.chown(secret, 0, 0)
    secret.chmod(0o600)
    (bad / "empty.tar").write_bytes(b"")
    layerless = bad / "layerless"
    subprocess.run(user.command(["sh", "-c", f"umoci init --layout {layerless} && umoci new --image {layerless}:x"]),
                   env={**user.env, "HOME": str(bad)}, check=True, capture_output=True)
    cases = {
        f"docker-archive:{bad}/corrupt.tar": "cannot import docker-archive:",
        f"docker-archive:{bad}/truncated.tar": "cannot import docker-archive:",
        f"oci-archive:{bad}/truncated.tar": "cannot import oci-archive:",
        f"docker-archive:{secret}": "Permission denied",
        f"docker-archive:{bad}/empty.tar": "is empty",
        f"oci:{layerless}:x": "the image has no layers",
        f"oci:{bad}:x": f"cannot read OCI layout {bad}",
    }
    for ref, said in cases.items():
        result = daemon.ctl(user, "run", "--image", ref, "--", "true")
        assert result.returncode == LAUNCH_FAILED, (ref, result.stderr)
        text = errors(result.stderr).decode()
        assert said in text and text.count("\n") == 1, (ref, text)
    assert cache_listing(daemon, user) == []
    assert spool_entries(daemon) == []


def test_zstd_layers_are_refused_naming_the_umoci_that_cannot_unpack_them(start_daemon, user, images, user_dir):
    """Debian 12's umoci (0.4.7) cannot unpack zstd-compressed layers: the launch says so,
    with the way out, instead of umoci's own complaint; nothing is left."""
    daemon = start_daemon()
    zstd = user_dir("zstd-") / "zstd.tar"
    subprocess.run(user.command(["skopeo", "copy", "--quiet", "--dest-compress", "--dest-compress-format", "zstd",
                                 f"oci:{images}/layout:latest", f"oci-archive:{zstd}"]),
                   env={**user.env, "HOME": str(zstd.parent)}, check=True, capture_output=True, timeout=60)
    umoci = subprocess.run(["umoci", "--version"], capture_output=True, text=True, check=True).stdout
    version = re.search(r"\d+\.\d+\.\d+", umoci)[0]
    result = daemon.ctl(user, "run", "--image", f"oci-archive:{zstd}", "--", "true")
    assert result.returncode == LAUNCH_FAILED, result.stderr
    said = errors(result.stderr).decode()
    assert said.count("\n") == 1 and said.endswith(
        f"the image has zstd-compressed layers, which this node's umoci {version} cannot unpack (umoci 0.5"
        " or later can): recompress it with gzip (skopeo copy --dest-compress-format gzip) or ask the site for a newer"
        " umoci\n"), said
    assert cache_listing(daemon, user) == [] and spool_entries(daemon) == []


@pytest.fixture
def silent_registry():
    """docker://127.0.0.1:PORT/...: accepts connections and never answers (skopeo waits ~20 s)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"docker://127.0.0.1:{listener.getsockname()[1]}/slow:1"
    listener.close()


def test_an_importing_step_shows_in_ps_and_cancel_stops_its_import(start_daemon, user, silent_registry):
    daemon = start_daemon()
    client = daemon.ctl_popen(user, "run", "--job-id", "7100", "--image", silent_registry, "--", "true")
    deadline = time.monotonic() + 30
    while True:
        ps = json.loads(daemon.ctl(user, "ps", "--json").stdout)
        if ps and ps[0]["state"] == "importing":
            break
        assert time.monotonic() < deadline, ps
        time.sleep(0.05)
    import_helper(daemon)
    started = time.monotonic()
    cancelled = daemon.ctl(user, "cancel", "7100.0")
    assert time.monotonic() - started < 10  # the helper is killed, not waited for
    _, err = client.communicate(timeout=30)
    assert client.returncode == LAUNCH_FAILED, err
    assert b"cancelled while importing its image" in err, err
    assert (cancelled.returncode, cancelled.stdout) == (0, b"step 7100.0 cancelled (status 125)\n"), cancelled.stderr
    assert children(daemon.proc.pid) == []
    assert leftovers(daemon, user) == []
    assert status(daemon, user)["images_imported"] == 0


def test_a_daemon_killed_mid_import_leaves_nothing_that_a_later_launch_uses(start_daemon, user, images,
                                                                           silent_registry):
    """SIGKILL of the daemon while a step imports: its client learns the step never started,
    nothing half-made is taken for an image, the next daemon removes what the dead import
    left once its helper is gone, and the next launch imports cleanly."""
    daemon = start_daemon()
    client = daemon.ctl_popen(user, "run", "--job-id", "7110", "--image", silent_registry, "--", "true")
    deadline = time.monotonic() + 30
    while not any(s["state"] == "importing" for s in json.loads(daemon.ctl(user, "ps", "--json").stdout)):
        assert time.monotonic() < deadline, "the step never showed as importing"
        time.sleep(0.05)
    helpers = import_helper(daemon)
    daemon.proc.kill()
    daemon.proc.wait()
    for pid in helpers:  # the helper dies too (as after a node crash); its process group with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    second = start_daemon(after=daemon)
    _, err = client.communicate(timeout=60)
    assert client.returncode == LAUNCH_FAILED, err
    assert b"the step did not start" in err, err
    assert leftovers(second, user) == []  # removed at start: their helper is gone
    ref = refs(images)["docker-archive"]
    result = second.ctl(user, "run", "--image", ref)
    assert (result.returncode, result.stdout) == (0, b"from-entrypoint from-cmd\n"), result.stderr
    assert status(second, user)["images_imported"] == 1
    assert len(cache_listing(second, user)) == 1 and leftovers(second, user) == []
    assert spool_entries(second) == [] and runc_containers(user) == []


def test_progress_is_printed_during_a_long_import(start_daemon, user, silent_registry):
    daemon = start_daemon()
    client = daemon.ctl_popen(user, "run", "--job-id", "7101", "--image", silent_registry, "--", "true")
    line = b""
    while b"\n" not in line:
        chunk = os.read(client.stderr.fileno(), 1)
        assert chunk, line
        line += chunk
    assert b"still launching after 1 s" in line and b"importing" in line, line
    assert daemon.ctl(user, "cancel", "7101.0").returncode == 0
    client.communicate(timeout=30)


def _docker_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    """A docker-archive by hand: one layer with exactly these tar members, whatever they say."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps([{"Config": "config.json", "RepoTags": ["hostile:latest"], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as archive:
        for name, data in (("layer.tar", layer_bytes), ("config.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = b"x\n", mode: int = 0o644,
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, link
    if kind == tarfile.REGTYPE:
        info.size = len(data or b"")
    else:
        data = None
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    return info, data


@pytest.mark.parametrize("hardlinks", [True, False], ids=["hardlinks-out", "no-hardlinks"])
def test_a_hostile_archive_writes_nothing_outside_the_users_cache_entry(start_daemon, user, user_dir, new_dir,
                                                                         hardlinks):
    daemon = start_daemon()
    bad = user_dir("hostile-")
    outside = new_dir("outside-", 0o777)  # even a dir the user could write is not reached
    targets = [outside / "dotdot", outside / "absolute", outside / "via-link", outside / "via-hardlink"]
    relative = os.path.relpath(outside, "/")
    _docker_archive(bad / "hostile.tar", [
        _member("bin/"[:-1], tarfile.DIRTYPE, mode=0o755),
        _member("../../../../../../../../" + relative + "/dotdot"),
        _member("/" + relative + "/absolute"),
        _member("escape", tarfile.SYMTYPE, link=str(outside)),
        _member("escape/via-link"),
        _member("devnull", tarfile.CHRTYPE),
        _member("suid", mode=0o4755, data=b"#!/bin/sh\n"),
    ] + ([
        _member("hard", tarfile.LNKTYPE, link="/etc/passwd"),
        _member("/" + relative + "/via-hardlink", tarfile.LNKTYPE, link="/etc/passwd"),
    ] if hardlinks else []))
    result = daemon.ctl(user, "run", "--image", f"docker-archive:{bad}/hostile.tar", "--", "true")
    # Whatever umoci made of it (refused, or unpacked inside the rootfs), nothing got out.
    assert [t for t in targets if os.path.lexists(t)] == [], result.stderr
    assert os.listdir(outside) == []
    assert leftovers(daemon, user) == []
    top = daemon.socket.parent / f"images-{daemon.socket.name.removeprefix('sock-')}" / str(user.uid)
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            assert st.st_uid == user.uid, os.path.join(root, name)  # written as the user, nothing else
            assert not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode), os.path.join(root, name)
    if result.returncode == LAUNCH_FAILED:
        assert errors(result.stderr).decode().startswith("nodestepctl: cannot import docker-archive:"), result.stderr


def test_a_full_cache_disk_fails_the_launch_cleanly(start_daemon, user, images, new_dir):
    small = new_dir("small-disk-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k,mode=0755", "tmpfs", str(small)], check=True)
    try:
        daemon = start_daemon(RUNC_RUN_CONF, "--image-cache-dir", str(small / "images"))
        result = daemon.ctl(user, "run", "--image", refs(images)["docker-archive"], "--", "true")
        assert result.returncode == LAUNCH_FAILED, result.stderr
        text = errors(result.stderr).decode()
        assert f"no space left in the image cache {small}/images/{user.uid}" in text and text.count("\n") == 1, text
        assert os.listdir(small / "images" / str(user.uid)) == []
        assert spool_entries(daemon) == []
        daemon.stop()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_entry_removed_from_the_cache_is_imported_again(start_daemon, user, images):
    daemon = start_daemon()
    ref = refs(images)["oci"]
    assert daemon.ctl(user, "run", "--image", ref, "--", "true").returncode == 0
    [entry] = cache_listing(daemon, user)
    top = daemon.socket.parent / f"images-{daemon.socket.name.removeprefix('sock-')}" / str(user.uid)
    subprocess.run(user.command(["rm", "-rf", str(top / entry)]), check=True)
    result = daemon.ctl(user, "run", "--image", ref)
    assert (result.returncode, result.stdout) == (0, b"from-entrypoint from-cmd\n"), result.stderr
    assert cache_listing(daemon, user) == [entry] and status(daemon, user)["images_imported"] == 2


def test_image_ls_rm_and_prune(start_daemon, user, other_user, images):
    daemon = start_daemon()
    ref = refs(images)["docker-archive"]
    assert daemon.ctl(user, "run", "--image", ref, "--", "true").returncode == 0
    assert daemon.ctl(user, "run", "--image", refs(images)["oci"], "--", "true").returncode == 0
    mine = json.loads(daemon.ctl(user, "image", "ls", "--json").stdout)
    assert len(mine) == 2 and {i["user"] for i in mine} == {user.name}
    assert [ref] in [i["refs"] for i in mine]
    assert json.loads(daemon.ctl(other_user, "image", "ls", "--json").stdout) == []  # nobody sees another's
    refused = daemon.ctl(other_user, "image", "rm", mine[0]["digest"], "--user", user.name)
    assert refused.returncode == 1 and b"only operators" in refused.stderr
    as_root = subprocess.run(daemon.ctl_argv("image", "ls", "--json"), capture_output=True, timeout=60, check=True)
    assert len(json.loads(as_root.stdout)) == 2  # an operator sees everyone's
    # An image a step runs from is kept; the others go.
    sleeper = daemon.ctl_popen(user, "run", "--job-id", "7200", "--image", ref, "--", "sh", "-c", "echo up; sleep 60")
    assert sleeper.stdout.readline() == b"up\n"
    pruned = daemon.ctl(user, "image", "prune")
    assert pruned.returncode == 0 and pruned.stdout.count(b"removed") == 1, pruned
    assert b"1 steps run from it" in pruned.stderr
    [left] = json.loads(daemon.ctl(user, "image", "ls", "--json").stdout)
    assert left["in_use"] == 1 and left["refs"] == [ref]
    assert daemon.ctl(user, "cancel", "7200.0").returncode == 0
    sleeper.communicate(timeout=30)
    removed = daemon.ctl(user, "image", "rm", left["digest"][:15])
    assert (removed.returncode, removed.stdout) == (0, f"removed {left['digest']} ({user.name})\n".encode())
    assert cache_listing(daemon, user) == []
    # And the next launch imports it again.
    assert daemon.ctl(user, "run", "--image", ref, "--", "true").returncode == 0
    assert status(daemon, user)["images_imported"] == 3
    missing = daemon.ctl(user, "image", "rm", "sha256:0000")
    assert missing.returncode == 1 and b"no image sha256:0000" in missing.stderr


def test_over_image_cache_max_bytes_the_least_recently_used_image_goes(start_daemon, user, images, new_dir):
    settings = new_dir("settings-") / "nodestepd.toml"
    settings.write_text("image_cache_max_bytes = 1\n")  # every import evicts what it can
    daemon = start_daemon(RUNC_RUN_CONF, "--config", str(settings))
    first, second = refs(images)["docker-archive"], refs(images)["oci-archive"]
    assert daemon.ctl(user, "run", "--image", first, "--", "true").returncode == 0
    [first_entry] = cache_listing(daemon, user)
    assert daemon.ctl(user, "run", "--image", second, "--", "true").returncode == 0
    [second_entry] = cache_listing(daemon, user)
    assert second_entry != first_entry and "image evicted from the cache" in daemon.log()
    # One a step runs from stays, over the cap.
    sleeper = daemon.ctl_popen(user, "run", "--job-id", "7300", "--image", second, "--", "sh", "-c", "echo up; sleep 60")
    assert sleeper.stdout.readline() == b"up\n"
    assert daemon.ctl(user, "run", "--image", first, "--", "true").returncode == 0
    assert cache_listing(daemon, user) == sorted([first_entry, second_entry])
    assert daemon.ctl(user, "cancel", "7300.0").returncode == 0
    sleeper.communicate(timeout=30)


def test_image_import_imports_without_running_anything(start_daemon, user, images):
    daemon = start_daemon()
    ref = refs(images)["oci"]
    result = daemon.ctl(user, "image", "import", ref)
    [image] = json.loads(daemon.ctl(user, "image", "ls", "--json").stdout)
    assert (result.returncode, result.stdout) == (0, f"{ref}: {image['digest']}\n".encode()), result.stderr
    assert status(daemon, user)["steps_finished"] == 0
    assert daemon.ctl(user, "run", "--image", ref, "--", "true").returncode == 0
    assert status(daemon, user)["images_imported"] == 1
    assert daemon.log().count("importing image") == 1  # the run found it known
    bad = daemon.ctl(user, "image", "import", "docker-archive:/nonexistent.tar")
    assert bad.returncode == 1 and bad.stderr == (b"nodestepctl: cannot import docker-archive:/nonexistent.tar: cannot "
                                                  b"read image archive /nonexistent.tar: No such file or directory\n")
