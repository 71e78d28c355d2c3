"""nodestepctl's subcommands other than run: one request to the daemon each (ps, signal,
cancel, job-end, wait, status, reload), and the entry points of those that need no daemon
(check-config, doctor, completion).
"""

from __future__ import annotations

import posix  # os's C half (nodestepd/ctl/__init__.py says why)
import sys
import time

from nodestepd.ctl.exits import EXIT_USAGE, ClientError, step_exit_status
from nodestepd.ctl.parser import build_parser, remainder
from nodestepd.ctl.transport import request
from nodestepd.protocol import wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

PS_COLUMNS = ("STEP", "USER", "STATE", "TASKS", "STATUS", "AGE", "CONTAINER", "COMMAND")
CONTAINER_WIDTH = 12  # an engine's 64-hex-digit container id, shortened as `podman ps` does


def _ref(text: str) -> tuple[int, int]:
    try:
        return wire.parse_step_ref(text)
    except ValueError as e:
        raise ClientError(str(e), EXIT_USAGE) from None


def _whose(args: argparse.Namespace) -> dict:
    return {} if args.user is None else {"user": args.user}


def cmd_signal(args: argparse.Namespace) -> int:
    job_id, step_id = _ref(args.step)
    request(args.socket, {"op": "signal", "signal": args.signal, "job_id": job_id, "step_id": step_id,
                          **_whose(args)}, "ok")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job_id, step_id = _ref(args.step)
    reply = request(args.socket, {"op": "cancel", "job_id": job_id, "step_id": step_id, **_whose(args)}, "exit")
    status = "unknown" if reply["status"] is None else reply["status"]
    print(f"step {job_id}.{step_id} cancelled (status {status})")
    return 0


def cmd_job_end(args: argparse.Namespace) -> int:
    if not (args.job.isascii() and args.job.isdigit()) or len(args.job) > 10:
        raise ClientError(f"job-end: {args.job!r} is not a job id", EXIT_USAGE)
    job_id = int(args.job)
    reply = request(args.socket, {"op": "job-end", "job_id": job_id}, "job-end")
    if args.json:
        import json

        print(json.dumps(reply["ended"], indent=2))
        return 0
    if not reply["ended"]:
        print(f"job {job_id}: no steps on this node")
    for step in reply["ended"]:
        print(f"job {job_id}: ended step {step['job_id']}.{step['step_id']} of {step['user']} "
              f"(status {_status_column(step)})")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    job_id, step_id = _ref(args.step)
    reply = request(args.socket, {"op": "wait", "job_id": job_id, "step_id": step_id, **_whose(args)}, "exit")
    if reply.get("stage_out_error"):
        print(f"nodestepctl: warning: {reply['stage_out_error']}", file=sys.stderr)
    return step_exit_status(reply)


def cmd_ps(args: argparse.Namespace) -> int:
    steps = request(args.socket, {"op": "ps"}, "steps")["steps"]
    if args.json:
        import json  # not at the top: signal, cancel and wait are on a launch's path

        print(json.dumps(steps, indent=2))
        return 0
    for line in ps_table(steps, time.time()):
        print(line)
    return 0


def ps_table(steps: list[dict], now: float) -> list[str]:
    """The lines of `ps`: each column as wide as its widest cell, the command last and unpadded.
    A CONTAINER column (an engine's container id, nodestep-oci) only when some step has one."""
    containers = any(s.get("container_id") for s in steps)
    headings = PS_COLUMNS if containers else tuple(c for c in PS_COLUMNS if c != "CONTAINER")
    rows = [headings]
    for s in steps:
        row = [f"{s['job_id']}.{s['step_id']}", s["user"], _state_column(s), str(len(s["tasks"])),
               _status_column(s), _age(now - s["started_at"])]
        if containers:
            row.append((s.get("container_id") or "-")[:CONTAINER_WIDTH])
        rows.append((*row, " ".join(s["args"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(headings) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def _state_column(step: dict) -> str:
    """The state, and how many containers the runtime may still hold (RunTimeDelete hung)."""
    left = sum(1 for task in step["tasks"] if task.get("not_deleted"))
    marks = [f"{left} not deleted"] if left else []
    if step.get("stage_out_failed"):
        marks.append("stage_out failed")
    return f"{step['state']} ({', '.join(marks)})" if marks else step["state"]


def _status_column(step: dict) -> str:
    if step["status"] is not None:
        return str(step["status"])
    return "unknown" if step["state"] == "finished" else "-"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def cmd_image(args: argparse.Namespace) -> int:
    message: dict = {"op": "images", **_whose(args)}
    if args.action == "import":
        return _image_import(args, message)
    if args.action == "rm":
        if not args.digest:
            raise ClientError("image rm needs the image's DIGEST (nodestepctl image ls shows them)", EXIT_USAGE)
        message["remove"] = args.digest
    elif args.digest:
        raise ClientError(f"image {args.action} takes no DIGEST", EXIT_USAGE)
    message["prune"] = args.action == "prune"
    reply = request(args.socket, message, "images")
    if args.json:
        import json

        print(json.dumps({"images": reply["images"], "kept": reply["kept"]} if args.action != "ls"
                         else reply["images"], indent=2))
        return 0
    if args.action == "ls":
        print(f"{'USER':<12} {'DIGEST':<19} {'IN USE':>6}  REFERENCES")
        for image in reply["images"]:
            print(f"{image['user']:<12} {image['digest'][:19]:<19} {image['in_use']:>6}  {' '.join(image['refs'])}")
        return 0
    for image in reply["images"]:
        print(f"removed {image['digest']} ({image['user']})")
    for image in reply["kept"]:
        print(f"kept {image['digest']} ({image['user']}): {image['in_use']} steps run from it", file=sys.stderr)
    return 0


def _image_import(args: argparse.Namespace, message: dict) -> int:
    from nodestepd.image.refs import RefError, fingerprint, parse_ref

    if not args.digest:
        raise ClientError("image import needs the image REF (as run --image takes it)", EXIT_USAGE)
    if args.user is not None:
        raise ClientError("image import imports for yourself: no --user", EXIT_USAGE)
    try:
        ref = parse_ref(args.digest, posix.getcwd())
    except RefError as e:
        raise ClientError(str(e), wire.STATUS_LAUNCH_FAILED) from None
    reply = request(args.socket, {**message, "import": ref.canonical, "image_fingerprint": fingerprint(ref)}, "images")
    if args.json:
        import json

        print(json.dumps(reply["images"], indent=2))
    else:
        print(f"{ref.canonical}: {reply['images'][0]['digest']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    r = request(args.socket, {"op": "status"}, "status")
    print(f"nodestepd {r['version']} on {r['node_name']}, up {_age(r['uptime'])}")
    print(f"config file:  {r['config_file'] or '(none, built-in defaults)'}")
    print(f"oci.conf:     {r['oci_conf']} ({r['oci_mode']} mode)")
    print(f"socket:       {r['socket']}")
    print(f"spool dir:    {r['spool_dir']}")
    print(f"state dir:    {r['state_dir']}")
    if r.get("image_cache_dir"):
        print(f"image cache:  {r['image_cache_dir']} ({r.get('images_imported', 0)} images imported since the start)")
    print(f"steps:        {r['steps_running']} running, {r['steps_finished']} finished")
    print(f"journal:      {r['journal_queued']} records waiting, {r['journal_dropped']} dropped")
    if r["containers_not_deleted"]:
        print(f"containers:   {r['containers_not_deleted']} not deleted (RunTimeDelete hung; the log has the command)")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    request(args.socket, {"op": "reload"}, "ok")
    print("nodestepd reloaded its settings file and oci.conf")
    return 0


# These import their modules when they run: whatever is imported at the top is loaded
# at every launch, and check-config and doctor bring nodestepd's config, step and
# process modules (asyncio among them).


def cmd_check_config(args: argparse.Namespace) -> int:
    from nodestepd.ctl.checkconfig import check_config

    return check_config(args.file, node_name=args.node_name)


def cmd_doctor(args: argparse.Namespace) -> int:
    from nodestepd.ctl.doctor import DoctorOptions, DoctorUsageError, print_report, run_doctor

    options = DoctorOptions(user=args.user, bundle=args.bundle, config_file=args.config, oci_conf=args.oci_conf,
                            args=tuple(remainder(args.command)))
    try:
        checks = run_doctor(options)
    except DoctorUsageError as e:
        raise ClientError(str(e), EXIT_USAGE) from None
    return print_report(checks, as_json=args.json)


def cmd_completion(args: argparse.Namespace) -> int:
    from nodestepd.ctl.completion import bash_completion

    sys.stdout.write(bash_completion(build_parser()))
    return 0
