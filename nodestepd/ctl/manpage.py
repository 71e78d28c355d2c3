"""nodestepd(8) and nodestepctl(1), generated from the argparse parsers that make --help.

The package installs the generated pages (share/man/man1, share/man/man8) and the bash
completion; `python -m nodestepd.ctl.manpage DIR` rewrites all three under DIR (the
repository root), and a test checks that the installed files are the current output.
"""

from __future__ import annotations

import argparse
import os
import sys

from nodestepd import __version__
from nodestepd.ctl.argparse_walk import help_text, option_actions, positional_actions, subcommand_help, subparsers

DATE = "2026"

ENVIRONMENT_CTL = [
    ("NODESTEPD_SOCKET", "the daemon's socket, unless --socket is given."),
    ("SLURM_JOB_ID, SLURM_STEP_ID", "default job and step ids of run (%j, %s)."),
    ("SLURM_PROCID, SLURM_LOCALID", "under srun (with SLURM_STEP_ID): run launches this one task of the step; "
     "%t is SLURM_PROCID."),
    ("SLURM_NODEID, SLURM_CONTAINER_ID", "passed to the container's SLURM_NODEID and SLURM_CONTAINER_ID."),
]

FILES_DAEMON = [
    ("/etc/nodestepd/nodestepd.toml", "settings (optional): socket, oci_conf, spool_dir, state_dir, node_name, "
     "kill_wait, log_format, log_level."),
    ("/etc/slurm/oci.conf", "the site's Slurm oci.conf, read unchanged with Slurm's meaning."),
    ("/etc/slurm/slurm.conf", "when present: the default node name (this host's NodeName) and spool parent "
     "(SlurmdSpoolDir), unless the TOML file sets them."),
    ("/run/nodestepd/nodestepd.sock", "the socket, mode 0666: callers are identified by SO_PEERCRED."),
]


def _escape(text: str) -> str:
    """roff-safe text: backslashes and hyphens escaped, no line starting with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            line = "\\&" + line
        lines.append(line)
    return "\n".join(lines)


def _option_label(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_escape(opt)}\\fR" for opt in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or (action.dest.upper() if not action.choices else "{" + ",".join(map(str, action.choices)) + "}")
    return f"{names} \\fI{_escape(str(metavar))}\\fR"


def _paragraphs(text: str) -> list[str]:
    """Description text as roff paragraphs: --help breaks lines for an 80-column terminal, man fills them."""
    out = []
    for paragraph in text.strip().split("\n\n"):
        out += [".PP", _escape(" ".join(line.strip() for line in paragraph.split("\n")))]
    return out


def _examples(epilog: str | None) -> list[str]:
    if not epilog:
        return []
    lines = [line for line in epilog.strip().split("\n") if not line.rstrip().endswith(":")]
    out = [".PP", "Examples:", ".RS", ".nf"]
    out += [_escape(line.strip()) for line in lines]
    out += [".fi", ".RE"]
    return out


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in option_actions(parser):
        out += [".TP", _option_label(action), _escape(help_text(action))]
    for action in positional_actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            continue
        text = help_text(action)
        if text:
            out += [".TP", f"\\fI{_escape(str(action.metavar or action.dest))}\\fR", _escape(text)]
    return out


def _synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    parts = [f"\\fB{_escape(name)}\\fR"]
    if option_actions(parser):
        parts.append("[\\fIoptions\\fR]")
    for action in positional_actions(parser):
        if isinstance(action, argparse._SubParsersAction):
            parts.append("\\fICOMMAND\\fR [\\fIargs\\fR]")
        elif action.choices:
            parts.append("{" + ",".join(map(str, action.choices)) + "}")
        else:
            parts.append(f"\\fI{_escape(str(action.metavar or action.dest))}\\fR")
    return " ".join(parts)


def _header(name: str, section: int, summary: str) -> list[str]:
    return [
        f'.TH {name.upper()} {section} "{DATE}" "nodestepd {__version__}" "nodestepd"',
        ".SH NAME",
        f"{name} \\- {_escape(summary)}",
    ]


def _definitions(title: str, items: list[tuple[str, str]]) -> list[str]:
    out = [f".SH {title}"]
    for term, text in items:
        out += [".TP", f"\\fB{_escape(term)}\\fR", _escape(text)]
    return out


def nodestepctl_page(parser: argparse.ArgumentParser) -> str:
    out = _header("nodestepctl", 1, "run and manage OCI container steps through the local nodestepd")
    out += [".SH SYNOPSIS", _synopsis("nodestepctl", parser), ".SH DESCRIPTION"]
    out += _paragraphs(parser.description or "")
    out += [".SH OPTIONS"] + _options(parser)
    out += [".SH COMMANDS"]
    helps = subcommand_help(parser)
    for name, sub in subparsers(parser).items():
        out += [f".SS {name}", _synopsis(f"nodestepctl {name}", sub)]
        out += _paragraphs(sub.description or helps.get(name, ""))
        out += _options(sub)
        out += _examples(sub.epilog)
    out += [".SH EXIT STATUS", ".PP",
            "run and wait: the step's status (the first non\\-zero task status, 128+N for signal N), "
            "125 when the step could not start, 255 when the connection to the daemon was lost. "
            "doctor: 0 when no check failed, else 1. Other commands: 0, or 1 on an error, 2 on a usage error."]
    out += _definitions("ENVIRONMENT", ENVIRONMENT_CTL)
    out += _examples(parser.epilog)
    out += [".SH SEE ALSO", "\\fBnodestepd\\fR(8), \\fBoci.conf\\fR(5), \\fBsrun\\fR(1)"]
    return "\n".join(out) + "\n"


def nodestepd_page(parser: argparse.ArgumentParser) -> str:
    out = _header("nodestepd", 8, "node-side OCI container step daemon for Slurm's oci.conf")
    out += [".SH SYNOPSIS", _synopsis("nodestepd", parser), ".SH DESCRIPTION"]
    out += _paragraphs(parser.description or "")
    out += [".SH OPTIONS"] + _options(parser)
    out += _examples(parser.epilog)
    out += [".SH EXIT STATUS", ".PP", "0 after SIGTERM; 78 (EX_CONFIG) when the settings or the oci.conf are invalid."]
    out += _definitions("FILES", FILES_DAEMON)
    out += [".SH SEE ALSO", "\\fBnodestepctl\\fR(1), \\fBoci.conf\\fR(5), \\fBslurm.conf\\fR(5)"]
    return "\n".join(out) + "\n"


def generated_files() -> dict[str, str]:
    """Relative path (as installed under the prefix) -> content."""
    from nodestepd.ctl.parser import build_parser as ctl_parser
    from nodestepd.ctl.completion import bash_completion
    from nodestepd.daemon.main import build_parser as daemon_parser

    return {
        "share/man/man1/nodestepctl.1": nodestepctl_page(ctl_parser()),
        "share/man/man8/nodestepd.8": nodestepd_page(daemon_parser()),
        "share/bash-completion/completions/nodestepctl": bash_completion(ctl_parser()),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m nodestepd.ctl.manpage REPO_DIR  (rewrites the man pages and the bash completion)",
              file=sys.stderr)
        return 2
    for relative, content in generated_files().items():
        path = os.path.join(argv[0], relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(content)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
