"""The image import, as a program run AS THE USER (never as root): `python -I -m
nodestepd.image.helper CACHE_DIR REF`.

The daemon starts it with the user's uid, gid and groups (importer.py, through
process/spawn.py) in the user's own cache dir, so every file it reads (the archive, the
layout) is read with the user's rights and everything it writes (the unpacked rootfs)
is written with them: skopeo and umoci --rootless parse and unpack whatever the user gave,
and can write nothing the user could not write anyway.

What it does, in CACHE_DIR (the user's, 0700):

1. `skopeo inspect --raw REF`: the manifest; its sha256 names the cache entry `sha256-HEX`.
2. If that entry exists, it is complete (the rename below is the commit): answer from it.
3. Else, in `.tmp-PID` (PID: this helper's, which tells a crashed import's leftovers from
   a running one): `skopeo copy REF oci:.tmp-PID/layout:img`, `umoci unpack --rootless`
   into `.tmp-PID/bundle`, the image's Entrypoint and Cmd kept beside config.json, and the
   bundle renamed to `sha256-HEX`. `.tmp-PID` is removed whatever happens (a SIGKILL
   leaves it for the daemon, which removes it once this pid is gone).

The answer is one JSON object on stdout: {"digest", "entry", "config_json", "entrypoint",
"cmd", "imported"} (with --sizes and a new import, "sizes": bytes of each entry), or
{"error": one sentence}; exit status 0 or 1. Standard library only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys

from nodestepd.image.refs import LAYOUT_TRANSPORTS, ImageRef, RefError, parse_ref

ENTRY_PREFIX = "sha256-"
TMP_PREFIX = ".tmp-"
META_NAME = "nodestepd-image.json"
CONFIG_NAME = "config.json"
TAG = "img"
MAX_JSON = 1 << 20  # manifests, image configs and config.json larger than this are refused
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_REGISTRY_TROUBLE = ("pinging container registry", "dial tcp", "no such host", "connection refused",
                     "i/o timeout", "TLS handshake", "network is unreachable", "lookup ")


class Failed(Exception):
    """The import cannot go on; the message is the reason, for "cannot import REF: REASON"."""


def main(argv: list[str]) -> int:
    sizes = argv[2:] == ["--sizes"]
    if len(argv) != 2 and not sizes:
        print(json.dumps({"error": "usage: helper CACHE_DIR REF [--sizes]"}))
        return 2
    cache, text = argv[:2]
    try:
        ref = parse_ref(text)
    except RefError as e:
        return _answer({"error": str(e)}, 1)
    os.umask(0o022)
    tmp = os.path.join(cache, f"{TMP_PREFIX}{os.getpid()}")
    try:
        _check_source(ref)
        os.mkdir(tmp, 0o700)
        try:
            answer = _import(cache, tmp, ref)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if sizes and answer.get("imported"):
            answer["sizes"] = _entry_sizes(cache)
    except Failed as e:
        return _answer({"error": f"cannot import {ref.canonical}: {e}"}, 1)
    except OSError as e:
        return _answer({"error": f"cannot import {ref.canonical}: {_os_reason(e, cache)}"}, 1)
    return _answer(answer, 0)


def _answer(answer: dict, status: int) -> int:
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()
    return status


def _os_reason(e: OSError, cache: str) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left in the image cache {cache}"
    return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")


def _check_source(ref: ImageRef) -> None:
    """A missing or unreadable archive or layout, said plainly (before skopeo says it less so)."""
    if ref.path is None:
        return
    layout = ref.transport in LAYOUT_TRANSPORTS
    path = os.path.join(ref.path, "index.json") if layout else ref.path
    what = f"OCI layout {ref.path}" if layout else f"image archive {ref.path}"
    try:
        # O_NONBLOCK: a FIFO named as the archive must not hold the import up.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise Failed(f"cannot read {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Failed(f"{path} is not a regular file")
    if st.st_size == 0:
        raise Failed(f"{what} is empty")


def _tool_env(tmp: str, ref: ImageRef) -> dict[str, str]:
    # Temporary files (docker-archive's decompressed layers, skopeo's blob cache) go to
    # the import's own dir, on the cache's disk, and go with it. A registry image keeps
    # the user's HOME, where skopeo finds the user's registry credentials.
    home = os.environ.get("HOME", tmp) if ref.transport == "docker" else tmp
    env = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": tmp}
    for name in ("USER", "LOGNAME", "XDG_RUNTIME_DIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _run(argv: list[str], env: dict[str, str], ref: ImageRef, cache: str) -> bytes:
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, cwd=env["TMPDIR"])
    if proc.returncode != 0:
        raise Failed(_explain(ref, proc.stderr.decode("utf-8", "replace") + proc.stdout.decode("utf-8", "replace"),
                              cache, argv[0]))
    return proc.stdout


def _explain(ref: ImageRef, output: str, cache: str, tool: str) -> str:
    """skopeo's or umoci's complaint as one short line."""
    lowered = output.lower()
    if "no space left on device" in lowered or "disk quota exceeded" in lowered:
        return f"no space left in the image cache {cache}"
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"{tool} failed"
    if 'msg="' in last:  # logrus: time=... level=fatal msg="..."
        last = last.split('msg="', 1)[1].rsplit('"', 1)[0].replace('\\"', '"')
    last = last.lstrip("⨯ ").removeprefix("Error: ")
    if last.startswith("Error parsing image name") and '": ' in last:
        last = last.split('": ', 1)[1]
    if ref.transport == "docker" and any(t.lower() in lowered for t in _REGISTRY_TROUBLE):
        raise Failed(f"cannot reach registry for {ref.canonical}: {_short(last)}")
    return _short(last)


def _short(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _import(cache: str, tmp: str, ref: ImageRef) -> dict:
    env = _tool_env(tmp, ref)
    manifest = _run(["skopeo", "inspect", "--raw", ref.canonical], env, ref, cache)
    if not manifest.strip():
        raise Failed("the image has no manifest")
    document = _json(manifest, "the image's manifest")
    if isinstance(document, dict) and document.get("layers") == []:
        raise Failed("the image has no layers")
    digest = hashlib.sha256(manifest).hexdigest()
    entry = ENTRY_PREFIX + digest
    where = os.path.join(cache, entry)
    if os.path.isfile(os.path.join(where, META_NAME)):
        return _from_entry(where, entry, imported=False)
    layout = os.path.join(tmp, "layout")
    bundle = os.path.join(tmp, "bundle")
    _run(["skopeo", "copy", "--quiet", ref.canonical, f"oci:{layout}:{TAG}"], env, ref, cache)
    image_config, layers = _image_config(layout)
    if any(isinstance(layer, dict) and "zstd" in str(layer.get("mediaType")) for layer in layers):
        _refuse_zstd_before_umoci_0_5(env, ref, cache)
    _run(["umoci", "--log", "error", "unpack", "--rootless", "--image", f"{layout}:{TAG}", bundle], env, ref, cache)
    meta = {"ref": ref.canonical, "digest": "sha256:" + digest,
            "entrypoint": _strings(image_config.get("Entrypoint")), "cmd": _strings(image_config.get("Cmd"))}
    with open(os.path.join(bundle, META_NAME), "w") as f:
        json.dump(meta, f)
    shutil.rmtree(layout)  # the blobs are unpacked: they would only double the disk used
    try:
        os.rename(bundle, where)  # the commit: an entry that exists is complete
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        # Another import of the same image (under another reference) got there first.
        return _from_entry(where, entry, imported=False)
    return _from_entry(where, entry, imported=True)


def _entry_sizes(cache: str) -> dict[str, int]:
    """Bytes on disk of each complete entry (for the daemon's image_cache_max_bytes)."""
    sizes = {}
    for name in os.listdir(cache):
        if not name.startswith(ENTRY_PREFIX):
            continue
        total = 0
        for root, dirs, files in os.walk(os.path.join(cache, name)):
            for item in dirs + files:
                try:
                    total += os.lstat(os.path.join(root, item)).st_blocks * 512
                except OSError:
                    pass
        sizes[name] = total
    return sizes


def _from_entry(where: str, entry: str, *, imported: bool) -> dict:
    meta = _json(_read(os.path.join(where, META_NAME)), META_NAME)
    config = _read(os.path.join(where, CONFIG_NAME)).decode("utf-8")
    return {"digest": meta.get("digest"), "entry": entry, "config_json": config,
            "entrypoint": meta.get("entrypoint"), "cmd": meta.get("cmd"), "imported": imported}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise Failed(f"{os.path.basename(path)} is larger than {MAX_JSON} bytes")
    return data


def _json(data: bytes, what: str) -> object:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise Failed(f"{what} is not valid JSON") from None


def _refuse_zstd_before_umoci_0_5(env: dict[str, str], ref: ImageRef, cache: str) -> None:
    """umoci learnt zstd-compressed layers in 0.5: before, say so instead of its complaint."""
    said = _run(["umoci", "--version"], env, ref, cache).decode(errors="replace")
    version = re.search(r"(\d+)\.(\d+)(\.\d+)?", said)
    if version is not None and (int(version[1]), int(version[2])) < (0, 5):
        raise Failed(f"the image has zstd-compressed layers, which this node's umoci {version[0]} cannot unpack "
                     "(umoci 0.5 or later can): recompress it with gzip (skopeo copy --dest-compress-format gzip) "
                     "or ask the site for a newer umoci")


def _image_config(layout: str) -> tuple[dict, list]:
    """The image config's `config` object (Entrypoint, Cmd, Env, WorkingDir), and the
    manifest's layers, from the layout skopeo wrote."""
    index = _json(_read(os.path.join(layout, "index.json")), "the OCI index")
    try:
        manifest = _blob(layout, index["manifests"][0]["digest"])
        layers = manifest.get("layers")
        if not layers:
            raise Failed("the image has no layers")
        config = _blob(layout, manifest["config"]["digest"])
    except (KeyError, IndexError, TypeError, AttributeError):
        raise Failed("the image's manifest or config is malformed") from None
    inner = config.get("config") if isinstance(config, dict) else None
    return (inner if isinstance(inner, dict) else {}), (layers if isinstance(layers, list) else [])


def _blob(layout: str, digest: object) -> dict:
    if not isinstance(digest, str) or not digest.startswith("sha256:") or "/" in digest:
        raise Failed(f"unexpected digest {str(digest)[:80]!r} in the image")
    value = _json(_read(os.path.join(layout, "blobs", "sha256", digest.removeprefix("sha256:"))), "an image blob")
    if not isinstance(value, dict):
        raise Failed("an image blob is not a JSON object")
    return value


def _strings(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
