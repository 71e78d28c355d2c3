"""The site's stage hooks (nodestepd.toml `stage_in`, `stage_out`), like scrun.lua's
slurm_scrun_stage_in and slurm_scrun_stage_out, as programs.

Once per launch, as the step's user (never as root: process/spawn.run_program), with
the step's runtime environment and the NODESTEPD_* variables below, in the step's
spool dir, bounded by runtime_timeout (then killed with its process group):

- stage_in after the spool and the task files are prepared, before any runtime command.
  It may point the step at another bundle by printing a line `bundle=PATH` on its
  stdout (scrun's set_bundle_path); the daemon then treats PATH as it treats a bundle
  the user gave (prepare.redirect_to). A non-zero exit or a timeout fails the launch.
- stage_out after the step's containers are deleted, before the spool dir is removed,
  for every launch whose stage_in succeeded (or that has none). Its failure is logged
  and kept with the step's result.

Root reads only the first STDOUT_CAP bytes of the hook's stdout (for the `bundle=`
line) and the last MESSAGE_CAP characters of its stderr (for the message).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from nodestepd.process.identity import Identity
from nodestepd.process.spawn import ProgramResult, run_program
from nodestepd.step.spec import StepSpec

STDOUT_CAP = 4096
MESSAGE_CAP = 1000
MAX_PATH_BYTES = 4096  # as admission's for a bundle the user gives
BUNDLE_PREFIX = b"bundle="


class StageOutputError(Exception):
    """The hook's stdout asks for something that cannot be done; the text says why."""


def hook_env(base: Mapping[str, str], *, stage: str, spec: StepSpec, orig_bundle: str, rootfs: str,
             spool_dir: str, config_json: str, status: str | None = None) -> dict[str, str]:
    """The hook's environment: the step's runtime environment and what it is run for."""
    ident = spec.identity
    env = dict(base)
    env.update({
        "NODESTEPD_STAGE": stage,
        "NODESTEPD_JOB_ID": str(spec.job_id),
        "NODESTEPD_STEP_ID": str(spec.step_id),
        "NODESTEPD_TASK_IDS": ",".join(str(t) for t in spec.task_ids),
        "NODESTEPD_BUNDLE": spec.bundle,
        "NODESTEPD_ORIG_BUNDLE": orig_bundle,
        "NODESTEPD_ROOTFS": rootfs,
        "NODESTEPD_SPOOL_DIR": spool_dir,
        "NODESTEPD_CONFIG_JSON": config_json,
        "NODESTEPD_UID": str(ident.uid),
        "NODESTEPD_GID": str(ident.gid),
        "NODESTEPD_USER": ident.user,
    })
    if status is not None:
        env["NODESTEPD_STEP_STATUS"] = status
    return env


async def run_hook(path: str, env: Mapping[str, str], *, identity: Identity, cwd: str,
                   timeout: float) -> ProgramResult:
    """Run the hook as the user. Raises OSError when it cannot be started."""
    return await run_program([path], identity=identity, cwd=cwd, env=env, timeout=timeout,
                             stdout_cap=STDOUT_CAP + 1, stderr_cap=MESSAGE_CAP)


def failure(name: str, path: str, result: ProgramResult, timeout: float) -> str | None:
    """One sentence saying how the hook failed, with the end of its stderr; None if it did not."""
    if result.timed_out:
        what = f"did not finish within {timeout:g} s (runtime_timeout) and was killed"
    elif result.status != 0:
        what = f"failed with exit status {result.status}"
    else:
        return None
    # On one line: the client prints the launch error as one line.
    tail = " / ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
    said = f": {tail}" if tail else " (it wrote nothing on stderr)"
    return f"{name} {path} {what}{said}"


def requested_bundle(stdout: bytes) -> str | None:
    """The bundle a stage_in asks for (its last `bundle=PATH` line within STDOUT_CAP bytes),
    normalised; None when it asks for none. Raises StageOutputError for a path that a
    user could not give either (relative, NUL, too long, not UTF-8)."""
    requested = None
    lines = stdout[:STDOUT_CAP].split(b"\n")
    if len(stdout) > STDOUT_CAP and lines.pop().startswith(BUNDLE_PREFIX):
        # Never a path cut short, nor the bundle before it: the hook asked for something.
        raise StageOutputError(f"its bundle= line is cut at the first {STDOUT_CAP} bytes of its output, "
                               "all that is read")
    for line in lines:
        if line.startswith(BUNDLE_PREFIX):
            requested = line[len(BUNDLE_PREFIX):].rstrip(b"\r")
    if requested is None:
        return None
    shown = requested[:200].decode("utf-8", "replace")
    try:
        text = requested.decode("utf-8")
    except UnicodeDecodeError:
        raise StageOutputError(f"the bundle it printed ({shown!r}) is not UTF-8") from None
    if "\0" in text or not os.path.isabs(text):
        raise StageOutputError(f"the bundle it printed ({shown!r}) is not an absolute path")
    if len(requested) > MAX_PATH_BYTES:
        raise StageOutputError(f"the bundle it printed is longer than {MAX_PATH_BYTES} bytes")
    return os.path.normpath(text)
