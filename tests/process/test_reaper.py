"""reaper.py: the daemon as child subreaper adopts the orphans of what it spawned and reaps them.

Each test runs in a fresh Python process: becoming a subreaper is for the life of the process,
and pytest's own process should not adopt other tests' orphans."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap

from conftest import pidfd_pids

PRELUDE = textwrap.dedent("""
    import asyncio, json, os, subprocess, sys
    import uvloop
    from nodestepd.process.kernel import become_subreaper
    from nodestepd.process.reaper import Reaper
    from nodestepd.process.watch import SPAWN_LOCK, CLAIMED, ProcessWatch, children

    def spawn(argv, **kw):
        with SPAWN_LOCK:
            p = subprocess.Popen(argv, process_group=0, **kw)
            w = ProcessWatch.open(p.pid)
        p.returncode = 0
        return w

    def zombies():
        out = []
        for pid in children(os.getpid()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        out.append(pid)
            except FileNotFoundError:
                pass
        return out
""") + inspect.getsource(pidfd_pids)


def run_script(body: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_orphans_become_ours_and_are_reaped_dead_or_alive():
    out = run_script("""
        async def main():
            become_subreaper()
            reaper = Reaper()
            # The shell leaves two background processes behind: one dies at once, one waits for our pipe.
            # (dash gives background jobs /dev/null as stdin: the pipe goes in as fd 3.)
            r, w = os.pipe()
            shell = spawn(["sh", "-c", "exec 3<&0; true & sh -c 'read x <&3' & exit 0"], stdin=r)
            await shell.wait()
            shell.reap()
            while True:  # the short-lived orphan has ended, unreaped: a zombie of ours
                await asyncio.sleep(0.01)
                if zombies():
                    break
            before = {"children": len(children(os.getpid())), "zombies": len(zombies())}
            reaper.sweep()
            after_sweep = {"zombies": len(zombies()), "watched": pidfd_pids(), "children": children(os.getpid())}
            os.write(w, b"x\\n")  # let the live one end; the reaper reaps it when it does
            await asyncio.wait_for(asyncio.gather(*reaper._tasks), 10)
            print(json.dumps({"before": before, "after_sweep": after_sweep,
                              "end": {"children": children(os.getpid()), "watched": pidfd_pids()}}))
        uvloop.run(main())
    """)
    assert out["before"] == {"children": 2, "zombies": 1}
    # The live orphan, and only it, is watched (by pidfd) and still our child.
    assert out["after_sweep"]["zombies"] == 0
    assert len(out["after_sweep"]["watched"]) == 1
    assert out["after_sweep"]["watched"] == out["after_sweep"]["children"]
    assert out["end"] == {"children": [], "watched": []}


def test_the_orphans_of_what_a_worker_thread_spawned_come_to_the_main_thread_and_are_reaped():
    # The sweep reads the main thread's children alone: the kernel hands orphans there,
    # whichever of our threads forked their parent (spawns run in worker threads).
    out = run_script("""
        import threading

        async def main():
            become_subreaper()
            reaper = Reaper()
            shell = await asyncio.to_thread(spawn, ["sh", "-c", "true & exit 0"])
            await shell.wait()
            shell.reap()
            while True:  # the orphan has ended, unreaped
                await asyncio.sleep(0.01)
                if zombies():
                    break
            main_kids = [int(k) for k in open(f"/proc/self/task/{os.getpid()}/children").read().split()]
            before = {"zombies": len(zombies()), "on_main_thread": sorted(main_kids) == sorted(zombies())}
            reaper.sweep()
            print(json.dumps({"before": before, "after": {"zombies": len(zombies()), "children": children(os.getpid())}}))
        uvloop.run(main())
    """)
    assert out == {"before": {"zombies": 1, "on_main_thread": True}, "after": {"zombies": 0, "children": []}}


def test_sweep_leaves_claimed_children_alone_and_reaps_orphans_when_they_end():
    out = run_script("""
        async def main():
            become_subreaper()
            reaper = Reaper()
            ours = spawn(["sh", "-c", "exit 3"])
            await ours.wait()  # a zombie, but a ProcessWatch owns its status
            r, w = os.pipe()
            shell = spawn(["sh", "-c", "exec 3<&0; sh -c 'read x <&3; exit 5' & exit 0"], stdin=r)
            await shell.wait()
            shell.reap()
            reaper.sweep()
            orphans = [pid for pid in children(os.getpid()) if pid != ours.pid]
            watched_orphans = [pid for pid in pidfd_pids() if pid != ours.pid]
            os.write(w, b"x\\n")
            await asyncio.wait_for(asyncio.gather(*reaper._tasks), 10)
            ours_status = ours.status
            ours.reap()
            print(json.dumps({"ours": ours_status, "orphans": orphans, "watched_after_sweep": watched_orphans,
                              "left": children(os.getpid()), "claimed": sorted(CLAIMED), "watched": pidfd_pids()}))
        uvloop.run(main())
    """)
    assert len(out["orphans"]) == 1
    assert out["watched_after_sweep"] == out["orphans"]  # the orphan, by pidfd, besides our own watch
    assert out == {"ours": 3, "orphans": out["orphans"], "watched_after_sweep": out["orphans"], "left": [],
                   "claimed": [], "watched": []}
