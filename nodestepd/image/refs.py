"""Image references as `nodestepctl run --image` takes them: skopeo's transport syntax, pure.

Standard library only and cheap to import: the client parses the reference too (to make
an archive's path absolute and to fingerprint it) on its launch path.
"""

from __future__ import annotations

import os
import re

# Transports whose reference is a path on this node, and the ones that name a registry.
ARCHIVE_TRANSPORTS = ("docker-archive", "oci-archive")
LAYOUT_TRANSPORTS = ("oci",)
REGISTRY_TRANSPORTS = ("docker",)
UNSUPPORTED = {
    "containers-storage": "containers-storage: images are not supported (its store needs a rootful or "
    "per-user storage driver set up for the daemon); export the image with `podman save --format "
    "oci-archive -o FILE NAME` and run it as oci-archive:FILE",
}
# skopeo's other transports: named so that `dir:X` is refused as a transport, not taken for image `dir`, tag X.
OTHER_SKOPEO_TRANSPORTS = ("dir", "docker-daemon", "ostree", "sif", "tarball", "atomic")
MAX_REF_BYTES = 4096
# A registry name as docker parses it, loosely: lowercase path components, an optional
# host[:port]/ in front, an optional :TAG and @DIGEST.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._/-]*[a-z0-9])?(:[0-9]+/[a-z0-9._/-]+)?(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
                   r"(@sha256:[0-9a-f]{64})?$")


class RefError(ValueError):
    """An image reference that cannot be used; the message is one sentence for the user."""


class ImageRef:
    """A parsed reference. path: the archive or layout dir (local transports); name: what
    follows the transport (a registry image name, or path[:tag])."""

    __slots__ = ("transport", "path", "tag", "name")

    def __init__(self, transport: str, path: str | None, tag: str | None, name: str) -> None:
        self.transport, self.path, self.tag, self.name = transport, path, tag, name

    @property
    def local(self) -> bool:
        return self.path is not None

    @property
    def canonical(self) -> str:
        """The reference as skopeo takes it (a bare NAME becomes docker://NAME)."""
        if self.transport == "docker":
            return f"docker://{self.name}"
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageRef) and self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    def __repr__(self) -> str:
        return f"ImageRef({self.canonical!r})"


def parse_ref(text: str, cwd: str | None = None) -> ImageRef:
    """Parse REF: docker-archive:PATH, oci-archive:PATH[:TAG], oci:DIR[:TAG], docker://NAME[:TAG],
    or a bare NAME[:TAG] (docker://). A relative PATH is made absolute against cwd (the
    client's); the daemon accepts only absolute ones (cwd None). Raises RefError."""
    if not text or "\0" in text or len(text.encode("utf-8", "surrogatepass")) > MAX_REF_BYTES:
        raise RefError("the image reference must be a non-empty string without NUL bytes, "
                       f"at most {MAX_REF_BYTES} bytes")
    if text.startswith("docker://"):
        return _registry(text[len("docker://"):], text)
    transport, colon, rest = text.partition(":")
    if colon and transport in UNSUPPORTED:
        raise RefError(UNSUPPORTED[transport])
    if colon and transport in ARCHIVE_TRANSPORTS + LAYOUT_TRANSPORTS:
        path, tag = rest, None
        if transport != "docker-archive":
            # oci-archive:PATH:TAG and oci:DIR:TAG: the tag follows the last colon, as in skopeo.
            head, sep, last = rest.rpartition(":")
            if sep and "/" not in last:
                path, tag = head, last
                if not tag:
                    raise RefError(f"image reference {text!r} has an empty tag")
        if not path:
            raise RefError(f"image reference {text!r} names no path")
        if not os.path.isabs(path):
            if cwd is None:
                raise RefError(f"the path in image reference {text!r} must be absolute")
            path = os.path.join(cwd, path)
        return ImageRef(transport, os.path.normpath(path), tag, rest)
    if "://" in text or (colon and (transport in OTHER_SKOPEO_TRANSPORTS or rest.startswith("/"))):
        scheme = text.split(":", 1)[0]
        raise RefError(f"unknown or unsupported image transport {scheme!r} in {text!r} (use docker-archive:PATH, "
                       "oci-archive:PATH[:TAG], oci:DIR[:TAG] or docker://NAME[:TAG])")
    return _registry(text, text)


def _registry(name: str, text: str) -> ImageRef:
    if not _NAME.match(name):
        raise RefError(f"image reference {text!r} is not a registry image name")
    return ImageRef("docker", None, None, name)


def fingerprint(ref: ImageRef) -> str | None:
    """What identifies a local image's current content cheaply, read with the caller's own
    rights (the client): the archive's, or the layout's index.json's, device, inode, size,
    mtime and ctime. None for a registry image, or when the file cannot be read (the
    import then says why)."""
    if ref.path is None:
        return None
    path = os.path.join(ref.path, "index.json") if ref.transport in LAYOUT_TRANSPORTS else ref.path
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
