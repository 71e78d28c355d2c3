"""Ending one task of a cancelled step, the same in both modes: RunTimeKill; kill_wait for
the task to end; the mode's SIGKILL (the runtime's process group, or the container's init);
RunTimeDelete once it has ended.

A task whose process cannot be watched (a polled container) has nothing to SIGKILL:
RunTimeDelete (with --force) is what stops it, and its watch sees it go.
"""

from __future__ import annotations

import asyncio

from nodestepd.logs import BoundLogger
from nodestepd.step.modes import Mode
from nodestepd.step.runtime import Runtime
from nodestepd.step.task import Task


async def terminate(task: Task, runtime: Runtime, mode: Mode, kill_wait: float, log: BoundLogger) -> None:
    """End the task and delete its container (or just delete it, when it ended already)."""
    assert task.watch is not None
    if task.running and not await _stop(task, runtime, mode, kill_wait, log.bind(task_id=task.task_id)):
        await runtime.delete(task)
        await task.watch.wait()
        return
    await task.watch.wait()
    await runtime.delete(task)


async def _stop(task: Task, runtime: Runtime, mode: Mode, kill_wait: float, log: BoundLogger) -> bool:
    """RunTimeKill, then kill_wait for the end, then the mode's SIGKILL. False when there was
    no process to kill."""
    assert task.watch is not None
    kill = await runtime.kill(task)
    if not task.running:
        return True
    if kill is None or kill.status != 0:
        if kill is not None:
            log.warning(f"RunTimeKill failed; killing {mode.kill_target} now", status=kill.status, output=kill.output)
        return mode.kill(task)
    try:
        await asyncio.wait_for(task.watch.wait(), kill_wait)
        return True
    except TimeoutError:
        log.warning(f"task still running after kill_wait; killing {mode.kill_target}", kill_wait=kill_wait)
        return mode.kill(task)
