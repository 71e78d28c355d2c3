#!/usr/bin/python3
"""A recording "runtime" for end-to-end tests: oci.conf's RunTime* commands call it.

    record.py --version
    record.py --out FILE [--exit N | --exit N0,N1,... --task T] [--bundle B] [--env-file E]
              [--step-dir M] [--stat PATH]... [--proc PID] [--say TEXT] [--block]
              [--killpg PGID] -- REST...

It writes one JSON record about the process it runs as (argv, REST, cwd, ids, groups,
environment, pid/ppid/process group, umask, a monotonic timestamp, the bundle's
config.json, the raw environment file, stat of its cwd, of the step dir and of every
--stat path, the entries of its cwd) to FILE, then:
  --say TEXT     writes TEXT and a newline to stdout (after the record is in place);
  --killpg PGID  sends SIGTERM to process group PGID (a RunTimeKill that really kills);
  --block        waits for SIGTERM, SIGINT or SIGHUP (a runtime whose container runs on);
and exits with N (with a list, the entry for task T; the last entry beyond the list).

The record is written to a temporary file and hard-linked into place, so a reader never
sees half a record and no record is overwritten: when FILE exists, FILE.1, FILE.2, ...
is used, which shows a command that ran more than once.

Runs with the system Python, standard library only; the daemon runs it as the step's user.
"""

import base64
import json
import os
import signal
import stat
import sys
import time

VALUE_OPTIONS = ("--out", "--exit", "--task", "--bundle", "--env-file", "--step-dir", "--stat", "--proc", "--say",
                 "--killpg")
FLAG_OPTIONS = ("--block",)


def parse(argv):
    opts = {"--stat": []}
    rest = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest = argv[i + 1:]
            break
        if arg in FLAG_OPTIONS:
            opts[arg] = True
            i += 1
            continue
        if arg in VALUE_OPTIONS:
            if i + 1 >= len(argv):
                sys.exit(f"record.py: {arg} needs a value")
            if arg == "--stat":
                opts[arg].append(argv[i + 1])
            else:
                opts[arg] = argv[i + 1]
            i += 2
            continue
        sys.exit(f"record.py: unknown argument {arg!r} (options go before --)")
    if "--out" not in opts:
        sys.exit("record.py: --out FILE is required")
    return opts, rest if rest is not None else []


def b64(data):
    return base64.b64encode(data).decode("ascii")


def stat_of(path):
    try:
        st = os.lstat(path)
    except OSError as e:
        return {"error": e.strerror}
    return {"uid": st.st_uid, "gid": st.st_gid, "mode": stat.S_IMODE(st.st_mode),
            "type": "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"}


def bundle_config(bundle):
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {"path": path, "exists": False, "error": e.strerror}
    try:
        content = json.loads(data)
    except ValueError as e:
        return {"path": path, "exists": True, "raw_b64": b64(data), "error": str(e)}
    return {"path": path, "exists": True, "content": content, "stat": stat_of(path)}


def env_file(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return {"path": path, "exists": False, "error": e.strerror}
    return {"path": path, "exists": True, "raw_b64": b64(data), "stat": stat_of(path)}


def proc_state(pid):
    """The kernel's one-letter state of pid ("S", "Z", ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()[0]


STATUS_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs")


def proc_status(pid):
    """The identity, capability and no_new_privs lines of /proc/PID/status, as lists of words."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    return {name: fields.get(name, "").split() for name in STATUS_FIELDS}


def open_fds(pid):
    """{fd: target} of a process; the fd listing /proc itself is gone by readlink time and left out."""
    fds = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return fds


def exit_code(opts):
    codes = [int(c) for c in opts.get("--exit", "0").split(",")]
    if len(codes) == 1:
        return codes[0]
    task = int(opts["--task"])
    return codes[task] if task < len(codes) else codes[-1]


def write_record(out, record):
    directory = os.path.dirname(out) or "."
    tmp = os.path.join(directory, f".{os.path.basename(out)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    try:
        n = 0
        while True:
            target = out if n == 0 else f"{out}.{n}"
            try:
                os.link(tmp, target)
                return target
            except FileExistsError:
                n += 1
    finally:
        os.unlink(tmp)


def main():
    argv = sys.argv[1:]
    if argv == ["--version"]:  # what `nodestepctl doctor` asks every runtime program
        print("record.py (nodestepd test runtime)")
        return 0
    opts, rest = parse(argv)
    fds = open_fds("self")  # first: before this program opens anything of its own
    umask = os.umask(0)
    os.umask(umask)
    cwd = os.getcwd()
    record = {
        "argv": argv,
        "argv_b64": [b64(os.fsencode(a)) for a in argv],
        "rest": rest,
        "rest_b64": [b64(os.fsencode(a)) for a in rest],
        "cwd": cwd,
        "cwd_stat": stat_of(cwd),
        "cwd_entries": {name: stat_of(os.path.join(cwd, name)) for name in sorted(os.listdir(cwd))},
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "egid": os.getegid(),
        "groups": sorted(os.getgroups()),
        "env": dict(os.environ),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgrp(),
        "sid": os.getsid(0),
        "umask": umask,
        "fds": fds,
        "status": proc_status("self"),
        # The /bin/sh that started us (dash does not exec): the task's first process.
        "parent_fds": open_fds(os.getppid()),
        "parent_status": proc_status(os.getppid()),
        "monotonic_ns": time.monotonic_ns(),
        "stat": {path: stat_of(path) for path in opts["--stat"]},
    }
    if "--bundle" in opts:
        record["bundle"] = opts["--bundle"]
        record["bundle_config"] = bundle_config(opts["--bundle"])
    if "--env-file" in opts:
        record["env_file"] = env_file(opts["--env-file"])
    if "--step-dir" in opts:
        record["step_dir"] = opts["--step-dir"]
        record["step_dir_stat"] = stat_of(opts["--step-dir"])
    if "--proc" in opts:
        record["proc"] = {"pid": int(opts["--proc"]), "state": proc_state(int(opts["--proc"]))}

    code = exit_code(opts)
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    if opts.get("--block"):
        # Blocked before the record exists: a signal sent once the record is seen is never lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    write_record(opts["--out"], record)
    if "--say" in opts:
        sys.stdout.write(opts["--say"] + "\n")
        sys.stdout.flush()
    if "--killpg" in opts:
        os.killpg(int(opts["--killpg"]), signal.SIGTERM)
    if opts.get("--block"):
        signal.sigwait(stop)
    return code


if __name__ == "__main__":
    sys.exit(main())
