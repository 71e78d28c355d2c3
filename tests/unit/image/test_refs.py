"""image/refs.py: REF as skopeo's transports, pure."""

from __future__ import annotations

import os

import pytest

from nodestepd.image.refs import RefError, fingerprint, parse_ref


@pytest.mark.parametrize("text, canonical, path, tag", [
    ("docker-archive:/x/img.tar", "docker-archive:/x/img.tar", "/x/img.tar", None),
    ("docker-archive:img.tar", "docker-archive:/home/u/img.tar", "/home/u/img.tar", None),
    ("oci-archive:/x/img.tar:v1", "oci-archive:/x/img.tar:v1", "/x/img.tar", "v1"),
    ("oci-archive:/x:y/img.tar", "oci-archive:/x:y/img.tar", "/x:y/img.tar", None),  # a colon in the path
    ("oci:/layouts/app:latest", "oci:/layouts/app:latest", "/layouts/app", "latest"),
    ("oci:layout", "oci:/home/u/layout", "/home/u/layout", None),
    ("docker://busybox:1.36", "docker://busybox:1.36", None, None),
    ("busybox", "docker://busybox", None, None),
    ("busybox:1.36", "docker://busybox:1.36", None, None),
    ("registry.example.com:5000/team/app:2", "docker://registry.example.com:5000/team/app:2", None, None),
])
def test_references(text, canonical, path, tag):
    ref = parse_ref(text, "/home/u")
    assert (ref.canonical, ref.path, ref.tag) == (canonical, path, tag)
    assert parse_ref(ref.canonical) == ref  # what the client sends, the daemon reads the same


@pytest.mark.parametrize("text, said", [
    ("", "non-empty"),
    ("a\0b", "NUL"),
    ("ftp://host/x", "unknown or unsupported image transport 'ftp'"),
    ("dir:/some/dir", "unknown or unsupported image transport 'dir'"),
    ("foo:/some/path", "unknown or unsupported image transport 'foo'"),
    ("containers-storage:busybox", "containers-storage: images are not supported"),
    ("docker-archive:", "names no path"),
    ("oci:/x:", "empty tag"),
    ("Busybox", "not a registry image name"),
    ("/abs/path.tar", "not a registry image name"),
    ("x" * 5000, "at most 4096 bytes"),
])
def test_bad_references(text, said):
    with pytest.raises(RefError, match=said.replace("(", r"\(")):
        parse_ref(text, "/")


def test_the_daemon_takes_only_absolute_paths():
    with pytest.raises(RefError, match="must be absolute"):
        parse_ref("docker-archive:img.tar")


def test_a_fingerprint_changes_with_the_file(tmp_path):
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"one")
    ref = parse_ref(f"docker-archive:{archive}")
    first = fingerprint(ref)
    assert first is not None and fingerprint(ref) == first
    archive.write_bytes(b"two")
    os.utime(archive, ns=(0, 0))
    assert fingerprint(ref) != first
    (tmp_path / "index.json").write_text("{}")
    assert fingerprint(parse_ref(f"oci:{tmp_path}:x")) is not None
    assert fingerprint(parse_ref(f"docker-archive:{tmp_path}/missing.tar")) is None
    assert fingerprint(parse_ref("busybox")) is None
