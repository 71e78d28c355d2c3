"""Section 6: running an image (`nodestepctl run --image`, issue 15).

The image is scripts/make-image.sh's busybox image (the e2e tests' image), built offline as
the user. Three figures, each next to its reference from the same run:

- a launch of `true` from the image once it is in the cache (docker-archive:), next to a
  `--bundle` launch of the same image unpacked by umoci as the user (the same rootfs and
  the same umoci config.json the cache entry has), interleaved (A B A B ...) on one daemon
  so that machine noise hits both alike. The image step differs only by what nodestepd adds
  for an image: the cache lookup, a read-only root and a tmpfs on /tmp;
- the first launch of the image (import + launch) and `nodestepctl image import` alone, each
  on a fresh daemon with an empty cache, next to the cached launch;
- N concurrent launches of an image new to a fresh daemon, next to one launch of a new image
  on another fresh daemon, and the number of imports the N caused (the daemon's status
  `images_imported`: one import, the others wait for it).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from pathlib import Path

from .common import REPO, RUNC_RUN_CONF, Context, Daemon, p95, start_daemon, timed
from .report import Row

FULL = {"runs": 40, "fresh": 3, "concurrent": 16}
QUICK = {"runs": 2, "fresh": 1, "concurrent": 4}
TARGET_RATIO = 1.05
S6 = "6 images"


def build_image(ctx: Context) -> Path:
    """scripts/make-image.sh's image in base/image (as the user), and its bundle unpacked by umoci."""
    path = ctx.base / "image"
    path.mkdir()
    subprocess.run(["chown", f"{ctx.user.uid}:{ctx.user.gid}", str(path)], check=True)
    env = {**ctx.user.env, "HOME": str(path)}  # umoci and skopeo keep their state there
    with open(REPO / "scripts" / "make-image.sh") as script:  # read as root, run as the user
        subprocess.run(ctx.user.argv(["sh", "-s", "--", str(path)]), env=env, stdin=script, check=True,
                       capture_output=True, timeout=300, cwd=path)
    subprocess.run(ctx.user.argv(["umoci", "unpack", "--rootless", "--image", f"{path}/layout:latest",
                                  f"{path}/bundle"]), env=env, check=True, capture_output=True, timeout=300, cwd=path)
    return path


def imports(daemon: Daemon) -> int:
    """images_imported from `nodestepctl status` (as root): images unpacked since the daemon started."""
    out = subprocess.run(daemon.ctl + ["status"], capture_output=True, text=True, check=True, timeout=60).stdout
    found = re.search(r"\((\d+) images imported since the start\)", out)
    if found is None:
        raise RuntimeError(f"nodestepctl status shows no images_imported:\n{out}")
    return int(found.group(1))


def run(ctx: Context, params: dict) -> list[Row]:
    user, env = ctx.user, ctx.user.env
    image = build_image(ctx)
    docker, oci = f"docker-archive:{image}/img.tar", f"oci-archive:{image}/img-oci.tar"
    fresh_count = 0

    def fresh() -> Daemon:
        """A daemon with an empty image cache of its own."""
        nonlocal fresh_count
        fresh_count += 1
        name = f"s6-{fresh_count}"
        return start_daemon(ctx.base, name, RUNC_RUN_CONF.read_text(), "--image-cache-dir",
                            str(ctx.base / f"{name}-images"))

    def ctl(daemon: Daemon, *args: str) -> list[str]:
        return user.argv(daemon.ctl + list(args))

    # The first launch and the import alone, each on an empty cache; then N at once and one.
    first, alone, one, many, imported = [], [], [], [], []
    n = params["concurrent"]
    for _ in range(params["fresh"]):
        for sample, argv in ((first, ["run", "--image", docker, "--", "true"]), (alone, ["image", "import", docker]),
                             (one, ["run", "--image", oci, "--", "true"])):
            daemon = fresh()
            try:
                sample.append(timed(ctl(daemon, *argv), env))
            finally:
                daemon.stop()
        daemon = fresh()
        try:
            start = time.perf_counter()
            clients = [subprocess.Popen(ctl(daemon, "run", "--image", oci, "--", "true"), env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                       for _ in range(n)]
            errors = [c.communicate(timeout=300)[1] for c in clients]
            many.append(time.perf_counter() - start)
            failed = [e.decode(errors="replace") for c, e in zip(clients, errors) if c.returncode != 0]
            if failed:
                raise RuntimeError(f"{len(failed)} of {n} concurrent launches of a new image failed: {failed[0]}")
            imported.append(imports(daemon))
        finally:
            daemon.stop()

    # The cached image next to its own bundle, interleaved on one daemon.
    daemon = fresh()
    try:
        by_image = ctl(daemon, "run", "--image", docker, "--", "true")
        by_bundle = ctl(daemon, "run", "--bundle", str(image / "bundle"), "--", "true")
        for argv in (by_image, by_bundle):  # the import, and the page cache and runc's first-run costs
            timed(argv, env)
        times: dict[str, list[float]] = {"image": [], "bundle": []}
        for _ in range(params["runs"]):
            times["bundle"].append(timed(by_bundle, env))
            times["image"].append(timed(by_image, env))
        cached_imports = imports(daemon)
    finally:
        daemon.stop()
    if cached_imports != 1:
        raise RuntimeError(f"the cached image was imported {cached_imports} times, not once")

    ms = {k: [t * 1000 for t in v] for k, v in times.items()}
    bundle_median, image_median = statistics.median(ms["bundle"]), statistics.median(ms["image"])
    ratio = image_median / bundle_median
    cached_ref = "run --image `true`, cached, median ms"
    once = max(imported)
    return [
        Row(S6, "run --image `true`, cached image, median", image_median, "ms",
            "run --bundle (the image unpacked), median ms", bundle_median),
        Row(S6, "run --image `true`, cached image, p95", p95(ms["image"]), "ms",
            "run --bundle (the image unpacked), p95 ms", p95(ms["bundle"])),
        Row(S6, "ratio of medians, cached image / bundle", ratio, "x", "target", TARGET_RATIO,
            f"<= {TARGET_RATIO:.2f}", ratio <= TARGET_RATIO),
        Row(S6, "first run --image `true` (import + launch), median", statistics.median(first) * 1000, "ms",
            cached_ref, image_median),
        Row(S6, "nodestepctl image import alone, median", statistics.median(alone) * 1000, "ms",
            cached_ref, image_median),
        Row(S6, f"{n} concurrent launches of a new image, wall time, median", statistics.median(many) * 1000, "ms",
            "one launch of a new image, median ms", statistics.median(one) * 1000),
        Row(S6, f"imports for {n} concurrent launches of a new image, most in one run", once,
            "imports", target="= 1", met=imported == [1] * len(imported)),
    ]
