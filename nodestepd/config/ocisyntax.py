"""oci.conf's line syntax, as Slurm reads it: `Key=Value` pairs separated by blanks, any
number per line; `#` outside double quotes starts a comment; a value is either
double-quoted (may contain blanks and `#`, cannot contain `"`; no escapes) or runs to the
next blank; no blanks around `=`; ASCII only. What the keys mean is ociconf.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

BLANKS = " \t"


@dataclass
class Pair:
    line: int
    key: str  # as written
    value: str | None  # None: the value could not be read (a problem was already recorded)


def non_ascii(line: str) -> str | None:
    for column, ch in enumerate(line, start=1):
        if ord(ch) > 0x7F:
            if 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte, see ociconf.load_oci_conf
                return f"byte 0x{ord(ch) - 0xDC00:02x} at column {column} is not ASCII (oci.conf is an ASCII file)"
            return f"character {ch!r} (U+{ord(ch):04X}) at column {column} is not ASCII (oci.conf is an ASCII file)"
    return None


def split_line(line: str, lineno: int, pairs: list[Pair]) -> list[tuple[str | None, str]]:
    """Append the line's Key=Value pairs to `pairs`; return its syntax problems as (key, message).

    After a syntax problem the rest of the line is not trusted, so parsing of the line stops.
    """
    i = 0
    n = len(line)
    while True:
        while i < n and line[i] in BLANKS:
            i += 1
        if i >= n or line[i] == "#":
            return []
        start = i
        while i < n and line[i] not in ' \t=#"':
            i += 1
        key = line[start:i]
        if i >= n or line[i] != "=":
            rest = line[i:].lstrip(BLANKS)
            if key and rest.startswith("="):
                return [(key, "blanks around '=' are not allowed (write Key=Value)")]
            word = line[start:].split()[0]
            return [(None, f"expected Key=Value at column {start + 1}, found {word!r}")]
        if not key:
            return [(None, f"missing key name before '=' at column {i + 1}")]
        i += 1
        if i < n and line[i] == '"':
            close = line.find('"', i + 1)
            if close < 0:
                pairs.append(Pair(lineno, key, None))
                return [(key, f"missing closing '\"' (the value opened at column {i + 1} runs to the end of the line)")]
            value = line[i + 1 : close]
            i = close + 1
            if i < n and line[i] not in BLANKS + "#":
                pairs.append(Pair(lineno, key, None))
                return [(key, f"unexpected {line[i]!r} right after the closing quote at column {i + 1}")]
        else:
            value_start = i
            while i < n and line[i] not in BLANKS + "#":
                if line[i] == '"':
                    pairs.append(Pair(lineno, key, None))
                    return [(key, f"'\"' inside an unquoted value at column {i + 1} (quote the whole value)")]
                i += 1
            value = line[value_start:i]
        pairs.append(Pair(lineno, key, value))
