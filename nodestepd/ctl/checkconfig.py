"""`nodestepctl check-config`: validate an oci.conf and show what each command becomes."""

from __future__ import annotations

import dataclasses
import getpass
import os
import socket
import sys

from nodestepd.config.ociconf import OciConfError, load_oci_conf
from nodestepd.config.patterns import expand
from nodestepd.step.layout import shared_step_dir_warning
from nodestepd.step.prepare import task_context
from nodestepd.step.runtime import shell_warnings

SAMPLE_JOB, SAMPLE_STEP, SAMPLE_TASK = 1234, 0, 0
SAMPLE_ARGS = ("/bin/echo", "hello world")
SAMPLE_BUNDLE = "/path/to/bundle"
SAMPLE_SPOOL = "/var/spool/nodestepd"


def check_config(path: str, *, node_name: str | None = None) -> int:
    try:
        oci = load_oci_conf(path)
    except OciConfError as e:
        print(f"{path}: invalid", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    uid = os.getuid()
    user = getpass.getuser()
    node = node_name or socket.gethostname().split(".", 1)[0]
    step_dir = f"{SAMPLE_SPOOL}/oci-job{SAMPLE_JOB}-{SAMPLE_STEP}-uid{uid}"
    task_dir = f"{step_dir}/task-{SAMPLE_TASK}"
    ctx = task_context(
        args=SAMPLE_ARGS, bundle=SAMPLE_BUNDLE, rewritten_config=not oci.ignore_file_config_json,
        rootfs=SAMPLE_BUNDLE if oci.ignore_file_config_json else f"{SAMPLE_BUNDLE}/rootfs",
        job_id=SAMPLE_JOB, step_id=SAMPLE_STEP, task_id=SAMPLE_TASK, node_name=node, user=user, uid=uid,
        workdir=os.getcwd(), step_dir=step_dir, task_dir=task_dir, pid=4242,
    )
    print(f"{path}: valid, {oci.mode} mode")
    if oci.ignore_file_config_json:
        print("IgnoreFileConfigJson: the bundle's config.json is not read; %b and %r are the bundle itself")
    print(
        f"sample step: job {SAMPLE_JOB}, step {SAMPLE_STEP}, task {SAMPLE_TASK}, user {user} ({uid}), node {node},\n"
        f"  bundle {SAMPLE_BUNDLE}, command {' '.join(SAMPLE_ARGS)!r}, task pid (%p) 4242 "
        f"(in RunTimeRun/RunTimeCreate %p is the shell's own pid, $$)"
    )
    patterns = oci.patterns()
    width = max(len(k) for k in patterns)
    for key, pattern in patterns.items():
        # In the commands that start a task, %p is the shell's own pid ($$).
        sample = ctx if key not in ("RunTimeRun", "RunTimeCreate") else dataclasses.replace(ctx, pid=None)
        print(f"  {key + ':':<{width + 1}} {expand(pattern, sample)}")
    if oci.create_env_file != "disabled":
        print(f"  environment file (%e): {task_dir}/environment, {oci.create_env_file}-separated")
    for warning in shell_warnings(patterns):
        print(f"warning: {warning}")
    shared = shared_step_dir_warning(oci.container_path)
    if shared is not None:
        print(f"warning: {shared}")
    return 0

