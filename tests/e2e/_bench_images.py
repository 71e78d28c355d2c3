"""Figures for issue 15 (run explicitly): cached image vs bundle launches, first import, 16 at once."""
import statistics
import time

from conftest import make_bundle
import test_images
from test_images import refs, status

images = test_images.images  # the fixture


def timed(daemon, user, *args):
    t = time.monotonic()
    r = daemon.ctl(user, "run", *args)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t


def test_figures(start_daemon, user, images, workdir):
    bundle = make_bundle(user, workdir / "bench-bundle")
    daemon = start_daemon()
    ref = refs(images)["docker-archive"]
    first = timed(daemon, user, "--image", ref, "--", "true")
    b, i = [], []
    for _ in range(10):
        b.append(timed(daemon, user, "--bundle", str(bundle), "--", "true"))
        i.append(timed(daemon, user, "--image", ref, "--", "true"))
    mb, mi = statistics.median(b), statistics.median(i)
    one_new = start_daemon()
    one = timed(one_new, user, "--image", refs(images)["oci-archive"], "--", "true")
    sixteen = start_daemon()
    t = time.monotonic()
    clients = [sixteen.ctl_popen(user, "run", "--image", refs(images)["oci-archive"], "--", "true") for _ in range(16)]
    for c in clients:
        c.communicate(timeout=120)
        assert c.returncode == 0
    many = time.monotonic() - t
    print(f"\nFIRST import+launch (docker-archive): {first*1000:.0f} ms")
    print(f"median bundle {mb*1000:.1f} ms, cached image {mi*1000:.1f} ms, ratio {mi/mb:.3f}")
    print(f"one launch of a new image: {one*1000:.0f} ms; 16 concurrent: {many*1000:.0f} ms, imports="
          f"{status(sixteen, user)['images_imported']}")
