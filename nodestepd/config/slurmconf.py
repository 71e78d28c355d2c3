"""The two things nodestepd takes from Slurm's slurm.conf: this node's NodeName and SlurmdSpoolDir.

Pure parsing; the only I/O is read_slurm_conf. Only what these two need is understood:
`Key=Value` words (keys case-insensitive, `#` comments, `\\` line continuations),
NodeName lines with NodeHostname, and hostlists such as `node[01-04,07],login1`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SLURM_CONF = "/etc/slurm/slurm.conf"


class SlurmConfError(Exception):
    pass


@dataclass(frozen=True)
class NodeLine:
    names: tuple[str, ...]  # NodeName, expanded
    hostnames: tuple[str, ...]  # NodeHostname, expanded (empty: same as names)


@dataclass(frozen=True)
class SlurmConf:
    path: str
    spool_dir: str | None  # SlurmdSpoolDir as written (%n, %h not yet replaced)
    nodes: tuple[NodeLine, ...]

    def node_name_for(self, hostname: str) -> str | None:
        """This host's NodeName: the node whose NodeHostname (or, without one, NodeName) is hostname."""
        short = hostname.split(".", 1)[0]
        for line in self.nodes:
            hostnames = line.hostnames or line.names
            if len(hostnames) != len(line.names):
                continue  # Slurm pairs them one to one; a mismatch names nothing reliably
            for name, host in zip(line.names, hostnames):
                if host in (hostname, short) and name.upper() != "DEFAULT":
                    return name
        return None

    def spool_dir_for(self, node_name: str, hostname: str) -> str | None:
        """SlurmdSpoolDir with %n (node name) and %h (host name) replaced."""
        if self.spool_dir is None:
            return None
        return self.spool_dir.replace("%n", node_name).replace("%h", hostname.split(".", 1)[0])


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(text: str) -> list[str]:
    """`node[01-03,07],gpu1` -> node01 node02 node03 node07 gpu1 (one bracket group per name)."""
    names: list[str] = []
    for item in _split_top_level(text):
        match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", item)
        if match is None:
            if "[" in item or "]" in item:
                raise SlurmConfError(f"hostlist {text!r}: cannot read {item!r}")
            names.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            r = _RANGE.match(part.strip())
            if r is None:
                raise SlurmConfError(f"hostlist {text!r}: {part!r} is not a number or a range")
            low, high = r[1], r[2] or r[1]
            width = len(low) if low.startswith("0") else 0
            if int(high) < int(low):
                raise SlurmConfError(f"hostlist {text!r}: range {part!r} runs backwards")
            if int(high) - int(low) > 65536:
                raise SlurmConfError(f"hostlist {text!r}: range {part!r} is too large")
            names += [f"{prefix}{n:0{width}d}{suffix}" for n in range(int(low), int(high) + 1)]
    return names


def _split_top_level(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for c in text:
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        if c == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += c
    items.append(current)
    return [i for i in (item.strip() for item in items) if i]


def _logical_lines(text: str) -> list[str]:
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return [line.strip() for line in lines if line.strip()]


def parse_slurm_conf(text: str, path: str = "<string>") -> SlurmConf:
    spool_dir = None
    nodes: list[NodeLine] = []
    for line in _logical_lines(text):
        pairs = {}
        for word in line.split():
            key, eq, value = word.partition("=")
            if eq:
                pairs[key.lower()] = value.strip('"')
        if "nodename" in pairs:
            try:
                names = tuple(expand_hostlist(pairs["nodename"]))
                hosts = tuple(expand_hostlist(pairs["nodehostname"])) if "nodehostname" in pairs else ()
            except SlurmConfError as e:
                raise SlurmConfError(f"{path}: {e}") from None
            nodes.append(NodeLine(names, hosts))
        elif "slurmdspooldir" in pairs:
            spool_dir = pairs["slurmdspooldir"]
    return SlurmConf(path, spool_dir, tuple(nodes))


def read_slurm_conf(path: str) -> SlurmConf | None:
    """The parsed file, or None when there is none (a node without Slurm)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SlurmConfError(f"{path}: cannot read: {e.strerror}") from None
    return parse_slurm_conf(text, path)
