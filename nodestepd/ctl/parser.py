"""nodestepctl's command line: the argparse parsers behind --help, the man page and the bash completion.

Only the parser of the subcommand being run is built (build_parser(only=...)): see SUBCOMMANDS.
What each subcommand does is in run.py and commands.py; main.py connects the two.

The commands on a launch's path (run, signal, cancel, wait) are first read by fast_parse(),
a plain loop over argv that gives what argparse would give, or None whenever it is not
sure (--help, an abbreviation, a value that starts with "-", anything wrong): argparse then
reads the same argv, with its usual help and messages. argparse (with re, gettext and the
rest) is imported only then: it was a third of the client's start-up.
tests/unit/ctl/test_fastparse.py checks that both read every command line alike.
"""

from __future__ import annotations

import posix
import sys

from nodestepd import __version__
from nodestepd.ctl import environ
from nodestepd.protocol import wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

DEFAULT_SOCKET = "/run/nodestepd/nodestepd.sock"
DEFAULT_OCI_CONF = "/etc/slurm/oci.conf"


def __getattr__(name: str):
    if name == "HelpFormatter":
        return help_formatter()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def help_formatter() -> type:
    """HelpFormatter, which subclasses argparse's: made on first use (argparse is imported
    only when a parser is built), then kept in the module as HelpFormatter."""
    if "HelpFormatter" in globals():
        return globals()["HelpFormatter"]
    import argparse

    class HelpFormatter(argparse.RawDescriptionHelpFormatter):
        """argparse's, but finding the terminal's width without importing shutil (and with it
        bz2, lzma, fnmatch): argparse makes a formatter for every option it adds, so that
        import was on every launch's path, for help that a launch never prints."""

        def __init__(self, prog: str, **kwargs) -> None:
            if kwargs.get("width") is None:
                kwargs["width"] = terminal_columns() - 2  # as argparse does with shutil's answer
            super().__init__(prog, **kwargs)

    globals()["HelpFormatter"] = HelpFormatter
    return HelpFormatter


def terminal_columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS if positive, else stdout's terminal's, else 80."""
    try:
        columns = int(environ()["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return posix.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):  # stdout is None, closed or not a terminal
        return 80


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (only=NAME) the same with just that subcommand's parser."""
    import argparse

    raw = help_formatter()
    p = argparse.ArgumentParser(
        prog="nodestepctl",
        description="Run and manage OCI container steps through the local nodestepd.",
        epilog="Examples:\n"
        "  nodestepctl run --bundle ~/images/alpine -- cat /etc/os-release\n"
        "  nodestepctl run --detach --output out.txt --bundle ~/images/alpine -- ./simulate\n"
        "  nodestepctl ps\n"
        "  nodestepctl check-config /etc/slurm/oci.conf",
        formatter_class=raw,
    )
    p.add_argument("--socket", default=environ().get("NODESTEPD_SOCKET", DEFAULT_SOCKET),
                   help=f"daemon socket (default $NODESTEPD_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--version", action="version", version=f"nodestepctl {__version__}")
    sub = p.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    for name, add in SUBCOMMANDS.items():
        if only is None or name == only:
            add(sub, raw)
    return p


def _add_run(sub, raw) -> None:
    run = sub.add_parser(
        "run", formatter_class=raw, help="run a container step and wait for it (or --detach)",
        description="Run COMMAND in a container made from the OCI bundle DIR (or the image REF), one container\n"
        "per task. An image is imported (skopeo copy, umoci unpack --rootless) as you, once per node, into\n"
        "nodestepd's image cache; its rootfs is shared by every step that runs it, read-only, with a tmpfs\n"
        "on /tmp. The image's Env (under your environment), WorkingDir, Entrypoint and Cmd apply.\n"
        "Attached (default): the containers use this terminal's stdin/stdout/stderr, signals sent to\n"
        "nodestepctl (INT, TERM, HUP, USR1, USR2, CONT, TSTP) go to the step, the step is cancelled if\n"
        "nodestepctl dies, and nodestepctl exits with the step's status: the first non-zero task\n"
        "status (128+N for signal N), else 0. 125: the step could not start. When nodestepd restarts\n"
        "meanwhile, output flows on and nodestepctl attaches to the step again on the next nodestepd;\n"
        "signals caught while it is away are forwarded then (255: it did not come back, --reattach-timeout).\n"
        "COMMAND is passed as given; the container resolves it against its own PATH.\n"
        "Under srun (SLURM_JOB_ID, SLURM_STEP_ID, SLURM_PROCID set) each nodestepctl is one task of\n"
        "Slurm's step: %j %s %t are SLURM_JOB_ID, SLURM_STEP_ID, SLURM_PROCID, and the container sees\n"
        "SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID as Slurm gives them to the task.\n"
        "While the daemon prepares a slow launch, a progress line goes to stderr after 1 s.",
        epilog="Examples:\n"
        "  nodestepctl run --bundle /images/alpine -- uname -a\n"
        "  nodestepctl run --image docker-archive:app.tar --mount $HOME/data:/data:ro -- /app/run\n"
        "  nodestepctl run --ntasks 4 --env MODE=fast --bundle /images/app -- /app/run\n"
        "  nodestepctl run --detach --output job.log --bundle /images/app -- /app/run  # prints JOB.STEP\n"
        "  srun -N 64 --ntasks-per-node 2 nodestepctl run --bundle /images/app -- /app/run  # one container per task\n"
        "  nodestepctl run --user alice --detach --output /home/alice/job.log --bundle /home/alice/app -- /app/run"
        "  # operators",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", metavar="DIR", help="OCI bundle (with config.json unless the site ignores it)")
    source.add_argument("--image", metavar="REF",
                        help="container image: docker-archive:PATH, oci-archive:PATH[:TAG], oci:DIR[:TAG], "
                        "docker://NAME[:TAG] or NAME[:TAG]; imported as you into the node's image cache once, "
                        "then reused. Without COMMAND the image's Entrypoint and Cmd run")
    run.add_argument("--mount", action="append", default=[], metavar="SRC:DST[:ro]",
                     help="with --image: bind SRC (a host path you can use) at DST in the container (repeatable)")
    run.add_argument("--workdir", metavar="DIR",
                     help="with --image: the container's working directory (default: the image's WorkingDir, else /)")
    run.add_argument("--entrypoint", metavar="PROGRAM",
                     help="with --image: replaces the image's Entrypoint (\"\": none); COMMAND follows it")
    run.add_argument("--job-id", type=int, metavar="J", help="job id (default $SLURM_JOB_ID, else assigned by the daemon)")
    run.add_argument("--step-id", type=int, metavar="S", help="step id (default $SLURM_STEP_ID, else 0)")
    run.add_argument("--ntasks", type=int, metavar="N",
                     help="containers to run from this one launch, task ids 0..N-1 (default 1; under srun: this task)")
    run.add_argument("--task-id", type=int, metavar="T",
                     help="launch task T of the step only (default under srun: $SLURM_PROCID); "
                     "other launches of the step may run the other tasks")
    run.add_argument("--local-id", type=int, metavar="L",
                     help="with a per-task launch: SLURM_LOCALID of the task (default $SLURM_LOCALID, else T)")
    run.add_argument("--container-id", metavar="ID", help="SLURM_CONTAINER_ID in the container (default $SLURM_CONTAINER_ID)")
    run.add_argument("--chdir", metavar="DIR", help="the step's working directory, %%Z in oci.conf (default: here)")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set a variable in the step (repeatable)")
    run.add_argument("--export", choices=["ALL", "NONE"], default="ALL",
                     help="ALL: pass this environment plus --env (default); NONE: only --env")
    run.add_argument("--pty", action="store_true", help="give the container a terminal (process.terminal)")
    run.add_argument("--detach", action="store_true", help="print JOB.STEP and return at once; the step runs on")
    run.add_argument("--output", metavar="FILE",
                     help="with --detach: stdout (and stderr) to FILE, opened by you (default: the journal, "
                     "with the step's fields, when nodestepd logs there; else discarded)")
    run.add_argument("--error", metavar="FILE", help="with --detach: stderr to FILE (default: same as --output)")
    run.add_argument("--reattach-timeout", type=float, metavar="SECONDS",
                     help="attached: when nodestepd goes away, wait this long for it to come back and attach "
                     "to the step again, then give up with 255 (default $NODESTEPCTL_REATTACH_TIMEOUT, else 60)")
    run.add_argument("--preserve-fds", type=int, default=0, metavar="N",
                     help=f"pass this process's fds 3..3+N-1 to each container, at the same numbers "
                     f"(0..{wire.MAX_PRESERVE_FDS}; the runtime must be runc or crun). Under srun "
                     "--mpi=pmi2, PMI_FD is passed too, after them, and set to its number in the container")
    run.add_argument("--user", metavar="NAME|UID",
                     help="operators only: run the step as this user (config.json and --output/--error are then "
                     "opened by the daemon as that user)")
    run.add_argument("command", nargs="...", metavar="-- COMMAND [ARG...]")  # argparse.REMAINDER


def _add_ps(sub, raw) -> None:
    ps = sub.add_parser("ps", help="list steps (yours; everyone's for operators)",
                        description="List running and recently finished steps.",
                        epilog="Examples:\n  nodestepctl ps\n  nodestepctl ps --json | jq '.[].job_id'", formatter_class=raw)
    ps.add_argument("--json", action="store_true", help="machine-readable output")


def _add_signal(sub, raw) -> None:
    sig = sub.add_parser("signal", help="send a signal to a step's runtimes",
                         description="Send SIGNAL (a name like USR1 or SIGUSR1, or a number) to every task of the step.",
                         epilog="Example:\n  nodestepctl signal 42.0 USR1", formatter_class=raw)
    sig.add_argument("step", metavar="JOB.STEP")
    sig.add_argument("signal", metavar="SIGNAL")
    _add_whose(sig)


def _add_cancel(sub, raw) -> None:
    cancel = sub.add_parser("cancel", help="cancel a step: RunTimeKill, grace period, SIGKILL, RunTimeDelete, cleanup",
                            description="Cancel a step and wait until its containers are gone and its spool removed.",
                            epilog="Example:\n  nodestepctl cancel 42.0", formatter_class=raw)
    cancel.add_argument("step", metavar="JOB.STEP")
    _add_whose(cancel)


def _add_job_end(sub, raw) -> None:
    job_end = sub.add_parser(
        "job-end", formatter_class=raw, help="cancel every step of a job on this node (root; Slurm's Epilog)",
        description="Cancel every step of job JOB on this node, whoever's, as cancel does, and wait until\n"
        "all are ended: containers deleted, spool dirs and records removed. Prints one line per step\n"
        "ended (none: the job had no step here). For Slurm's node Epilog, so that no container outlives\n"
        "its job (docs/admin-guide.md). Only root may run it.",
        epilog='Example (an Epilog script named by slurm.conf\'s Epilog=):\n  nodestepctl job-end "$SLURM_JOB_ID"',
    )
    job_end.add_argument("job", metavar="JOB", help="the job id")
    job_end.add_argument("--json", action="store_true", help="machine-readable output")


def _add_wait(sub, raw) -> None:
    wait = sub.add_parser("wait", help="wait for a step and exit with its status",
                          description="Wait until the step ends; exit with its status (also for a step that already ended).",
                          epilog="Example:\n  nodestepctl wait 42.0; echo $?", formatter_class=raw)
    wait.add_argument("step", metavar="JOB.STEP")
    _add_whose(wait)


def _add_whose(parser) -> None:
    parser.add_argument("--user", metavar="NAME|UID",
                        help="whose step: step ids are per user, so an operator names the user when several "
                        "users have a step JOB.STEP on this node (default: yours, or the only one)")


def _add_status(sub, raw) -> None:
    sub.add_parser("status", help="daemon version, uptime, configuration and step counts",
                   epilog="Example:\n  nodestepctl status", formatter_class=raw)


def _add_image(sub, raw) -> None:
    image = sub.add_parser(
        "image", formatter_class=raw, help="list or remove images in the node's image cache (run --image)",
        description="ls: the images in your image cache on this node (operators: everyone's), with the steps\n"
        "running from each. rm DIGEST: remove one (a unique prefix of its digest will do). prune: remove\n"
        "all of yours. Images a step still runs from are kept. A removed image is imported again by the\n"
        "next launch that needs it. import REF: import an image now (as you), to run it later.",
        epilog="Examples:\n  nodestepctl image ls\n  nodestepctl image rm sha256:3f2a\n"
        "  nodestepctl image import docker-archive:app.tar\n"
        "  nodestepctl image prune --user alice   # operators",
    )
    image.add_argument("action", choices=["ls", "rm", "prune", "import"], help="what to do")
    image.add_argument("digest", nargs="?", metavar="DIGEST|REF",
                       help="with rm: the image's digest, or a unique prefix; with import: the image (as run --image takes it)")
    image.add_argument("--user", metavar="NAME|UID", help="whose images (operators; default: yours, for ls everyone's)")
    image.add_argument("--json", action="store_true", help="machine-readable output")


def _add_reload(sub, raw) -> None:
    sub.add_parser(
        "reload", formatter_class=raw, help="make nodestepd re-read its settings file and oci.conf (root)",
        description="Re-read the daemon's TOML settings file and oci.conf (as SIGHUP does) and wait for the\n"
        "outcome. New steps use the new configuration; running steps keep the one they started with.\n"
        "A file with problems is rejected, every problem printed, and the old configuration stays in use\n"
        "(exit status 1). socket, state_dir, log_format, log_level, no_new_privs, max_connections,\n"
        "image_cache_dir, image_imports_max, image_import_timeout and image_cache_max_bytes change only\n"
        "at restart.",
        epilog="Example:\n  nodestepctl reload   # what systemctl reload nodestepd runs",
    )


def _add_check_config(sub, raw) -> None:
    check = sub.add_parser(
        "check-config", formatter_class=raw, help="validate an oci.conf (no daemon needed)",
        description="Validate an oci.conf the way nodestepd loads it; print the mode and every RunTime*\n"
        "command expanded for a sample step. Exits 1 and lists every problem on an invalid file.",
        epilog="Example:\n  nodestepctl check-config /etc/slurm/oci.conf",
    )
    check.add_argument("file", nargs="?", default=DEFAULT_OCI_CONF, metavar="FILE", help=f"default {DEFAULT_OCI_CONF}")
    check.add_argument("--node-name", help="node name for %%n in the sample (default: this host)")


def _add_doctor(sub, raw) -> None:
    doctor = sub.add_parser(
        "doctor", formatter_class=raw, help="find what keeps containers from running here (no daemon needed)",
        description="Check this node for a user: user namespaces, the daemon's settings and oci.conf, every\n"
        "runtime program (`--version` as the user), /run/user/UID and lingering, the spool and state dirs,\n"
        "your podman containers.conf and docker daemon.json when they name nodestep-oci,\n"
        "the bundle, and finally the Slurm guide's \"test outside Slurm\" with the configured commands.\n"
        "One line per check (ok, warn, fail) with the fix; exits 0 only when nothing fails.\n"
        "An ordinary user checks for themselves. root must name the user with --user: every runtime\n"
        "command then runs as that user (never as root). The runtimes see doctor's environment (PATH)\n"
        "where the daemon's would see the daemon's: run doctor with the daemon's environment.",
        epilog="Examples:\n"
        "  nodestepctl doctor --bundle ~/images/alpine\n"
        "  nodestepctl doctor --user alice --bundle /home/alice/images/alpine   # as root\n"
        "  nodestepctl doctor --oci-conf /etc/slurm/oci.conf --bundle B -- /bin/echo hello",
    )
    doctor.add_argument("--bundle", metavar="DIR", help="OCI bundle to check and to run the test on")
    doctor.add_argument("--user", metavar="NAME", help="as root: the user to check for (default: yourself)")
    doctor.add_argument("--config", metavar="FILE",
                        help="the daemon's TOML settings (default /etc/nodestepd/nodestepd.toml, optional)")
    doctor.add_argument("--oci-conf", metavar="FILE", help="oci.conf to check (default: the daemon's setting)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("command", nargs="...", metavar="-- COMMAND [ARG...]",  # argparse.REMAINDER
                        help="command for the test run (default: true in run mode, sleep 60 in create/start mode)")


def _add_completion(sub, raw) -> None:
    completion = sub.add_parser(
        "completion", formatter_class=raw, help="print the bash completion script",
        description="Print the bash completion script for nodestepctl (the package also installs it\n"
        "in share/bash-completion/completions).",
        epilog="Example:\n  source <(nodestepctl completion bash)",
    )
    completion.add_argument("shell", choices=["bash"], help="the shell (bash)")


# Each subcommand's parser, built only when needed: building them all costs nodestepctl
# a few milliseconds at every start, and `run` is on every launch's path.
SUBCOMMANDS = {
    "run": _add_run,
    "ps": _add_ps,
    "signal": _add_signal,
    "cancel": _add_cancel,
    "wait": _add_wait,
    "job-end": _add_job_end,
    "status": _add_status,
    "image": _add_image,
    "reload": _add_reload,
    "check-config": _add_check_config,
    "doctor": _add_doctor,
    "completion": _add_completion,
}


def named_subcommand(argv: list[str]) -> str | None:
    """The subcommand argv names, read the way argparse reads it; None when unsure.

    Past the global option --socket VALUE (or --socket=VALUE), the first word is the
    subcommand. Anything else starting with "-" (--help, --version, an abbreviation, a
    mistake) gives None, and then the whole parser decides, with its usual messages. The
    global part of the parser is the same either way, so a parser built with only the
    named subcommand reads argv exactly as the whole one would.
    """
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--socket":
            i += 2
        elif word.startswith("--socket="):
            i += 1
        elif word.startswith("-"):
            return None
        else:
            return word if word in SUBCOMMANDS else None
    return None


def remainder(words: list[str]) -> list[str]:
    """The words of a `-- COMMAND [ARG...]` positional, without the "--" argparse leaves in front."""
    return words[1:] if words[:1] == ["--"] else words


# ---- the fast path ------------------------------------------------------------------------------

class Args:
    """A parsed command line, attribute by attribute, as argparse.Namespace holds it."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Args({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


# What fast_parse knows of each subcommand on a launch's path, as _add_* above declares it:
# each option (its dest, its type, choices, APPEND or FLAG, and its default), then the
# positionals' dests or, for run (None), the `-- COMMAND [ARG...]` remainder. An option
# added to a parser above needs its line here too: without it, a command line with the
# option goes to argparse, but one without it would lack the attribute
# (tests/unit/ctl/test_fastparse.py says which line is missing).
APPEND, FLAG = "append", "flag"
_RUN = {
    "--bundle": ("bundle", str, None),
    "--image": ("image", str, None),
    "--mount": ("mount", APPEND, []),
    "--workdir": ("workdir", str, None),
    "--entrypoint": ("entrypoint", str, None),
    "--job-id": ("job_id", int, None),
    "--step-id": ("step_id", int, None),
    "--ntasks": ("ntasks", int, None),
    "--task-id": ("task_id", int, None),
    "--local-id": ("local_id", int, None),
    "--container-id": ("container_id", str, None),
    "--chdir": ("chdir", str, None),
    "--env": ("env", APPEND, []),
    "--export": ("export", ("ALL", "NONE"), "ALL"),
    "--pty": ("pty", FLAG, False),
    "--detach": ("detach", FLAG, False),
    "--output": ("output", str, None),
    "--error": ("error", str, None),
    "--reattach-timeout": ("reattach_timeout", float, None),
    "--user": ("user", str, None),
    "--preserve-fds": ("preserve_fds", int, 0),
}
_WHOSE = {"--user": ("user", str, None)}
FAST = {
    "run": (_RUN, None),
    "signal": (_WHOSE, ("step", "signal")),
    "cancel": (_WHOSE, ("step",)),
    "wait": (_WHOSE, ("step",)),
}


def fast_parse(argv: list[str]) -> Args | None:
    """What build_parser().parse_args(argv) gives, for the plain command lines of FAST's
    subcommands; None for anything else, which argparse then reads (and helps with or refuses)."""
    socket = environ().get("NODESTEPD_SOCKET", DEFAULT_SOCKET)
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--socket" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            socket = argv[i + 1]
            i += 2
        elif word.startswith("--socket="):
            socket = word[len("--socket="):]
            i += 1
        elif word in FAST:
            values = _fast_subcommand(*FAST[word], argv[i + 1:])
            if values is None:
                return None
            return Args(socket=socket, subcommand=word, **values)
        else:
            return None
    return None


def _fast_subcommand(options: dict, positionals: tuple[str, ...] | None, argv: list[str]) -> dict | None:
    values = {dest: list(default) if kind == APPEND else default for dest, kind, default in options.values()}
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word.startswith("-") and (word != "--" or positionals is not None):
            name, eq, value = word.partition("=")
            if name not in options:
                return None  # --help, an abbreviation, a mistake, a negative number: argparse's
            dest, kind, _ = options[name]
            if kind == FLAG:
                if eq:
                    return None
                values[dest] = True
                continue
            if not eq:
                if i == len(argv) or argv[i].startswith("-"):
                    return None
                value = argv[i]
                i += 1
            if kind == APPEND:
                values[dest].append(value)
            elif isinstance(kind, tuple):
                if value not in kind:
                    return None
                values[dest] = value
            else:
                try:
                    values[dest] = kind(value)
                except ValueError:
                    return None
        elif positionals is None:
            values["command"] = argv[i - 1:]  # the remainder: all that follows, "--" included
            return _one_source(values)
        else:
            words.append(word)
    if positionals is None:
        values["command"] = []
        return _one_source(values)
    if len(words) != len(positionals):
        return None
    values.update(zip(positionals, words))
    return values


def _one_source(values: dict) -> dict | None:
    """run's values if they name --bundle or --image (argparse's required exclusive group), else None."""
    return values if (values["bundle"] is None) != (values["image"] is None) else None
