"""Run every benchmark, print the table, write docs/benchmarks/results.{md,json,png}.

As root, from the repository, with the Python of nodestepd's virtualenv (the one
scripts/setup.sh makes, with the `bench` extra for matplotlib):

    /opt/nodestepd/venv/bin/python -m bench            # about 4 minutes on 2 cores
    /opt/nodestepd/venv/bin/python -m bench --quick --out /tmp/b   # seconds: proves it works

Every step, runtime and reference runs as the unprivileged user (--user, default nsdtest1),
with real rootless runc; the daemons are this checkout's nodestepd, each on a private socket.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import common, create_start_watch, engines, images, launch_overhead, scale, throughput
from .common import REPO, BenchUser, Context, machine, make_bundle
from .report import table, write_chart, write_json

SECTIONS = {
    "launch": launch_overhead,  # sections 1 and 2
    "exit-notice": create_start_watch,
    "scale": scale,
    "throughput": throughput,
    "images": images,  # section 6
    "engines": engines,  # section 7: podman with runc, and through nodestep-oci
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny counts and short windows (the CI smoke)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks",
                        help="where results.md, results.json and results.png go (default docs/benchmarks)")
    parser.add_argument("--user", default="nsdtest1", help="the unprivileged user (default nsdtest1)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default all)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: the daemon is root, steps run as --user")
    user = BenchUser.named(args.user)
    chosen = args.sections.split(",")
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    base = Path(tempfile.mkdtemp(prefix="nodestepd-bench-", dir="/tmp"))
    base.chmod(0o755)  # the user's runtimes traverse it
    began = time.monotonic()
    try:
        ctx = Context(user, base, make_bundle(user, base / "bundle"), args.quick)
        rows, settings = [], {}
        for name in chosen:
            module = SECTIONS[name]
            params = module.QUICK if args.quick else module.FULL
            settings[name] = {k: {str(d): n for d, n in v.items()} if isinstance(v, dict) else v
                              for k, v in params.items()}
            started = time.monotonic()
            rows += module.run(ctx, params)
            print(f"# {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    info = machine()
    settings["user"] = user.name
    settings["quick"] = args.quick
    settings["seconds"] = round(time.monotonic() - began, 1)
    settings["retaken"] = common.retaken  # samples runc failed transiently (common.RUNC_CLONE_BUSY)
    text = table(rows, info)
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    write_json(args.out / "results.json", rows, info, settings)
    write_chart(args.out / "results.png", rows, info)
    print(f"wrote {args.out}/results.md, results.json, results.png ({settings['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
