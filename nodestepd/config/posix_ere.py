"""POSIX Extended Regular Expressions (the dialect of regcomp(REG_EXTENDED)) for Python.

oci.conf's EnvExclude and RunTimeEnvExclude are POSIX EREs. Python's `re` looks similar
but differs in ways that silently change meaning (`\\d`, `(?...)`, `*?`, `$` before a
trailing newline, `\\` inside brackets, `[[:alpha:]]`), so an ERE is translated token by
token into an equivalent Python pattern instead of being handed to `re` as is.

Dialect accepted (what glibc's regcomp(REG_EXTENDED) accepts, with the exceptions below):
- `.` matches any character, newline included; `^` and `$` anchor at the start and end
  of the whole string only, anywhere in the expression (no REG_NEWLINE).
- `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`, `{,n}` (= `{0,n}`); counts up to 32767 (RE_DUP_MAX).
  A repetition of a repetition (`a**`, `a*?`, `a{2}{3}`) repeats the repeated atom, as in
  glibc; it is never Python's lazy or possessive form.
- A repetition with nothing before it (start, after `(`, `|`, `^` or `$`) is an error;
  in particular `(?` is an error, so Python's `(?...)` extensions cannot slip through.
- `(`...`)` groups, `|` alternation (empty alternatives and `()` allowed); an unmatched
  `)` is an ordinary character, as POSIX specifies.
- Bracket expressions: `[^...]`, `]` first is literal, `-` first or last is literal,
  ranges by code point (C locale), `\\` is an ordinary character, the 12 classes
  `[:alnum:]` ... `[:xdigit:]` with their C-locale (ASCII) members, `[=c=]` and `[.c.]`
  for a single character only (multi-character collating elements are an error).
- Outside brackets, `\\` followed by ASCII punctuation is that character literally.

Deliberately rejected although glibc accepts them, because they are not POSIX and mean
something else in Python or GNU: `\\` followed by a letter or digit (`\\d`, `\\w`, `\\s`,
`\\b`, `\\n`, back-references `\\1`), the GNU anchors `\\<`, `\\>`, `` \\` ``, `\\'`, and a
trailing `\\`.

Only match/no-match is guaranteed to agree with regexec: POSIX picks the leftmost-longest
match and Python the leftmost-first, so spans and group contents may differ. Callers use
`.search()` (regexec is an unanchored search). Strings are matched as characters: a
non-ASCII character is one character (glibc in the C locale would see its UTF-8 bytes) and
is never a member of a POSIX class.
"""

from __future__ import annotations

import re
import string

__all__ = ["EreError", "compile_ere", "translate_ere", "POSIX_CLASSES", "RE_DUP_MAX"]

# glibc's limit; POSIX only guarantees 255, and nobody needs more for an env filter.
RE_DUP_MAX = 32767

# C-locale members, written as Python character-set ranges.
POSIX_CLASSES: dict[str, str] = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "blank": r" \t",
    "cntrl": r"\x00-\x1f\x7f",
    "digit": "0-9",
    "graph": r"\x21-\x7e",
    "lower": "a-z",
    "print": r"\x20-\x7e",
    "punct": r"\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e",
    "space": r" \t\n\r\f\v",
    "upper": "A-Z",
    "xdigit": "0-9A-Fa-f",
}

# GNU gives these escapes a meaning (word and buffer anchors); POSIX leaves them undefined.
_GNU_ANCHOR_ESCAPES = "<>`'"
_LITERAL_ESCAPES = frozenset(c for c in string.punctuation if c not in _GNU_ANCHOR_ESCAPES)

_LETTER_ESCAPE_HINTS = {
    "d": "use [[:digit:]]",
    "D": "use [^[:digit:]]",
    "w": "use [[:alnum:]_]",
    "W": "use [^[:alnum:]_]",
    "s": "use [[:space:]]",
    "S": "use [^[:space:]]",
    "n": "put the character itself in the expression",
    "t": "put the character itself in the expression, or use [[:blank:]]",
}


class EreError(ValueError):
    """An invalid POSIX ERE. str() is one line: what is wrong and at which column (1-based)."""

    def __init__(self, reason: str, column: int) -> None:
        super().__init__(f"{reason} at column {column}")
        self.reason = reason
        self.column = column


def compile_ere(source: str) -> re.Pattern[str]:
    """Compile a POSIX ERE into an equivalent Python pattern; use `.search()` on it."""
    translated = translate_ere(source)
    try:
        return re.compile(translated, re.DOTALL)
    except re.error as err:  # a translation bug, not a user error; still report it usefully
        raise EreError(f"cannot be represented in Python ({err})", 1) from err


def translate_ere(source: str) -> str:
    """The Python `re` source (for use with re.DOTALL) equivalent to the POSIX ERE `source`."""
    return _Translator(source).translate()


class _Atom:
    """One translated piece of a branch, remembered so a following repetition can check it."""

    __slots__ = ("text", "repeatable", "repeated")

    def __init__(self, text: str, repeatable: bool, repeated: bool = False) -> None:
        self.text = text
        self.repeatable = repeatable
        self.repeated = repeated


class _Translator:
    def __init__(self, source: str) -> None:
        self.src = source
        self.pos = 0

    def error(self, reason: str, pos: int | None = None) -> EreError:
        return EreError(reason, (self.pos if pos is None else pos) + 1)

    def peek(self, offset: int = 0) -> str | None:
        i = self.pos + offset
        return self.src[i] if i < len(self.src) else None

    def translate(self) -> str:
        result = self.alternation(depth=0)
        # An unmatched ')' at depth 0 is consumed as a literal by branch(), so the whole
        # source is always used here.
        assert self.pos == len(self.src)
        return result

    def alternation(self, depth: int) -> str:
        branches = [self.branch(depth)]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.branch(depth))
        return "|".join(branches)

    def branch(self, depth: int) -> str:
        atoms: list[_Atom] = []
        while True:
            c = self.peek()
            if c is None or c == "|" or (c == ")" and depth > 0):
                break
            if c in "*+?{":
                self.repeat(atoms)
            elif c == "(":
                atoms.append(self.group(depth))
            elif c == "^":
                self.pos += 1
                atoms.append(_Atom(r"\A", repeatable=False))
            elif c == "$":
                # Python's `$` also matches before a trailing newline; regexec's does not.
                self.pos += 1
                atoms.append(_Atom(r"\Z", repeatable=False))
            elif c == ".":
                self.pos += 1
                atoms.append(_Atom(".", repeatable=True))
            elif c == "[":
                atoms.append(_Atom(self.bracket(), repeatable=True))
            elif c == "\\":
                atoms.append(_Atom(re.escape(self.escape()), repeatable=True))
            else:
                self.pos += 1
                atoms.append(_Atom(re.escape(c), repeatable=True))
        return "".join(a.text for a in atoms)

    def group(self, depth: int) -> _Atom:
        start = self.pos
        self.pos += 1
        inner = self.alternation(depth + 1)
        if self.peek() != ")":
            raise self.error("unmatched '('", start)
        self.pos += 1
        return _Atom(f"({inner})", repeatable=True)

    def repeat(self, atoms: list[_Atom]) -> None:
        start = self.pos
        c = self.src[start]
        if c == "{":
            quantifier = self.interval()
        else:
            self.pos += 1
            quantifier = c
        if not atoms or not atoms[-1].repeatable:
            if c == "?" and start > 0 and self.src[start - 1] == "(":
                raise self.error("'(?' is Python/Perl syntax, not POSIX ERE ('?' has nothing to repeat)", start)
            what = "an anchor" if atoms else "nothing"
            raise self.error(f"'{c}' repeats {what} (put a character or group before it, or escape it)", start)
        prev = atoms[-1]
        if prev.repeated:
            # Python would read `a*?` as lazy and `a*+` as possessive; POSIX (glibc) repeats
            # the repetition, which a non-capturing group expresses exactly.
            prev.text = f"(?:{prev.text})"
        prev.text += quantifier
        prev.repeated = True

    def interval(self) -> str:
        start = self.pos
        end = self.src.find("}", start)
        if end < 0:
            raise self.error("unmatched '{'", start)
        body = self.src[start + 1 : end]
        m = re.fullmatch(r"([0-9]*)(,([0-9]*))?", body)
        if m is None or (m.group(1) == "" and m.group(2) is None):
            raise self.error(f"invalid interval '{{{body}}}' (use {{m}}, {{m,}} or {{m,n}})", start)
        low = int(m.group(1) or "0")
        high = None if m.group(2) is None else (int(m.group(3)) if m.group(3) else -1)
        if low > RE_DUP_MAX or (high is not None and high > RE_DUP_MAX):
            raise self.error(f"interval count above {RE_DUP_MAX} in '{{{body}}}'", start)
        if high is not None and high >= 0 and high < low:
            raise self.error(f"invalid interval '{{{body}}}' (maximum below minimum)", start)
        self.pos = end + 1
        if high is None:
            return f"{{{low}}}"
        if high < 0:
            return f"{{{low},}}"
        return f"{{{low},{high}}}"

    def escape(self) -> str:
        """The literal character an escape outside brackets stands for."""
        start = self.pos
        c = self.peek(1)
        if c is None:
            raise self.error("trailing backslash", start)
        if c in _LITERAL_ESCAPES:
            self.pos += 2
            return c
        if c.isdigit():
            raise self.error(f"back-reference '\\{c}' is not part of POSIX ERE", start)
        if c in _GNU_ANCHOR_ESCAPES:
            raise self.error(f"'\\{c}' is a GNU extension (word/buffer anchor), not POSIX ERE", start)
        hint = _LETTER_ESCAPE_HINTS.get(c, "escape only punctuation characters")
        raise self.error(f"unknown escape '\\{c}' (not POSIX ERE; {hint})", start)

    def bracket(self) -> str:
        start = self.pos
        self.pos += 1
        negate = self.peek() == "^"
        if negate:
            self.pos += 1
        members: list[str] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unmatched '['", start)
            if c == "]" and not first:
                self.pos += 1
                break
            element_pos = self.pos
            kind, value = self.bracket_element()
            first = False
            # A '-' that is neither first nor last nor a range end is undefined in POSIX
            # and an error in glibc ("[a-c-e]").
            if kind == "char" and value == "-" and element_pos != start + 1 + negate and self.peek() != "]":
                raise self.error("'-' in a bracket expression must be first, last or a range end", element_pos)
            if self.peek() == "-" and self.peek(1) not in (None, "]"):
                if kind != "char" and kind != "collating":
                    raise self.error("a class cannot start a range", element_pos)
                self.pos += 1
                end_pos = self.pos
                end_kind, end_value = self.bracket_element()
                if end_kind != "char" and end_kind != "collating":
                    raise self.error("a class cannot end a range", end_pos)
                if ord(end_value) < ord(value):
                    raise self.error(f"invalid range '{value}-{end_value}' (end before start)", element_pos)
                members.append(f"{re.escape(value)}-{re.escape(end_value)}")
            elif kind == "class":
                members.append(value)
            else:
                members.append(re.escape(value))
        return ("[^" if negate else "[") + "".join(members) + "]"

    def bracket_element(self) -> tuple[str, str]:
        """One element: ("char", c), ("collating", c), ("equivalence", c) or ("class", set text)."""
        c = self.src[self.pos]
        opener = self.peek(1)
        if c == "[" and opener is not None and opener in ":=.":
            start = self.pos
            close = self.src.find(opener + "]", start + 2)
            if close < 0:
                raise self.error(f"unterminated '[{opener}' (no matching '{opener}]')", start)
            name = self.src[start + 2 : close]
            self.pos = close + 2
            if opener == ":":
                if name not in POSIX_CLASSES:
                    raise self.error(
                        f"unknown character class '[:{name}:]' (known: {', '.join(POSIX_CLASSES)})", start
                    )
                return "class", POSIX_CLASSES[name]
            if len(name) != 1:
                what = "collating element" if opener == "." else "equivalence class"
                raise self.error(
                    f"{what} '[{opener}{name}{opener}]' is not supported (only a single character is)", start
                )
            # In the C locale an equivalence class or collating symbol is the character itself.
            return ("collating" if opener == "." else "equivalence"), name
        self.pos += 1
        return "char", c
