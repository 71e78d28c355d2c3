"""Two checkouts of nodestepd side by side, interleaved, on the same machine: not a section of
the bench, a tool for telling what a change did when the machine's load moves more than the
change does (the references of one run absorb the load; two runs apart do not).

    python -m bench.compare --user alice /path/to/before /path/to/after

As root, with the Python of nodestepd's virtualenv (its dependencies serve both trees),
from the repository. Each tree must have its nodestepd-monitor built
(nodestepd/process/_libexec/, root-owned and not writable by others: `pip install .`
builds it; copying an installed one is enough when monitor.c is the same). For each
round and tree: a fresh daemon of that tree (its nodestepd.daemon.main, `--debug-timings`,
the fake runtime of section 4) runs COUNT attached `true` steps back to back (driver.py),
next to `/bin/sh -c true` spawned as often; then COUNT detached `sleep` steps 16 at a
time, cancelled 16 at a time. Prints per tree: request -> runtime spawned and task exit
-> exit event (median, p95), the back-to-back share of the `sh -c true` rate, and the
fan-out and cancel times (medians over the rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from .common import LIMITS_TOML, BenchUser, make_bundle, p95, run_driver, start_daemon
from . import common
from .scale import FAKE_CONF


def _daemon(base: Path, tree: str):
    """A daemon of `tree` (start_daemon with a nodestepd that imports the tree's package)."""
    base.mkdir()
    os.chmod(base, 0o755)
    program = base / "nodestepd"
    program.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {tree!r})\n"
                       "sys.argv[0] = 'nodestepd'\nfrom nodestepd.daemon.main import main\nsys.exit(main())\n")
    program.chmod(0o755)
    saved, common.BIN = common.BIN, base
    try:
        return start_daemon(base, "cmp", FAKE_CONF, "--debug-timings", toml=LIMITS_TOML)
    finally:
        common.BIN = saved


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="checkouts of nodestepd (the directory holding nodestepd/)")
    parser.add_argument("--user", default="nsdtest1", help="the unprivileged user (default nsdtest1)")
    parser.add_argument("--count", type=int, default=100, help="steps per round and tree (default 100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each tree once per round (default 3)")
    args = parser.parse_args()
    user = BenchUser.named(args.user)
    trees = [os.path.abspath(t) for t in args.trees]
    out = {t: {"spawn": [], "exit": [], "share": [], "fan": [], "cancel": []} for t in trees}
    with tempfile.TemporaryDirectory(prefix="nodestepd-compare-") as tmp:
        scratch = Path(tmp)
        os.chmod(scratch, 0o755)
        bundle = make_bundle(user, scratch / "bundle")  # only its path is used: the fake runtime ignores it
        job = 1000
        for r in range(args.rounds):
            for i, tree in enumerate(trees):
                daemon = _daemon(scratch / f"r{r}-t{i}", tree)
                try:
                    ran = run_driver(user, op="launch", socket=str(daemon.socket), bundle=str(bundle), args=["true"],
                                     first_job=job, count=args.count, concurrency=1, detach=False)
                    fan = run_driver(user, op="launch", socket=str(daemon.socket), bundle=str(bundle),
                                     args=["exec", "sleep", "1000"], first_job=job + args.count, count=args.count,
                                     concurrency=16, detach=True)
                    cancel = run_driver(user, op="cancel", socket=str(daemon.socket), first_job=job + args.count,
                                        count=args.count, concurrency=16)
                finally:
                    daemon.stop()
                ref = run_driver(user, op="spawn", command="true", count=args.count, concurrency=1)
                o = out[tree]
                # The back-to-back launches come first; the fan-out's, 16 at a time, are not these figures.
                o["spawn"] += [x["request_to_spawn_ms"] for x in daemon.records("launch timing")][:args.count]
                o["exit"] += [x["exit_to_event_ms"] for x in daemon.records("exit timing")]
                o["share"].append(ref["seconds"] / ran["seconds"])
                o["fan"].append(fan["seconds"])
                o["cancel"].append(cancel["seconds"])
    for tree, o in out.items():
        print(f"{tree}: request -> spawned {statistics.median(o['spawn']):.2f} ms (p95 {p95(o['spawn']):.2f}), "
              f"exit -> event {statistics.median(o['exit']):.2f} ms (p95 {p95(o['exit']):.2f}), "
              f"back to back {100 * statistics.median(o['share']):.1f} % of sh -c true, "
              f"{args.count} launches 16 at a time {statistics.median(o['fan']):.2f} s, "
              f"cancelled {statistics.median(o['cancel']):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
