"""POSIX ERE translation: concrete translations, errors with columns, and glibc as an oracle."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from nodestepd.config.posix_ere import EreError, compile_ere, translate_ere


def matches(source: str, subject: str) -> bool:
    return compile_ere(source).search(subject) is not None


def ere_error(source: str) -> EreError:
    with pytest.raises(EreError) as info:
        compile_ere(source)
    return info.value


# --- meaning of the published EnvExclude value ---------------------------------------


def test_published_env_exclude() -> None:
    rx = compile_ere("^(SLURM_CONF|SLURM_CONF_SERVER)=")
    assert rx.search("SLURM_CONF=/etc/slurm/slurm.conf")
    assert rx.search("SLURM_CONF_SERVER=ctl:6817")
    assert not rx.search("SLURM_CONFX=1")
    assert not rx.search("MY_SLURM_CONF=1")
    assert not rx.search("SLURM_JOB_ID=3")


def test_search_is_unanchored() -> None:
    assert matches("CONF", "SLURM_CONF=1")
    assert not matches("^CONF", "SLURM_CONF=1")


# --- translations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "python"),
    [
        ("^(a|b)=", r"\A(a|b)="),
        ("x$", r"x\Z"),
        ("a{2,3}", "a{2,3}"),
        ("a{,3}", "a{0,3}"),
        ("a{2,}", "a{2,}"),
        ("a*?", "(?:a*)?"),  # not Python's lazy star
        ("a*+", "(?:a*)+"),  # not Python's possessive star
        ("a{1}{2}", "(?:a{1}){2}"),
        ("[]a]", r"[\]a]"),
        ("[^]a]", r"[^\]a]"),
        ("[\\]", r"[\\]"),
        ("[\\d]", r"[\\d]"),  # backslash and 'd', not a digit class
        ("[a-]", r"[a\-]"),
        ("[[:alpha:][:digit:]_]", "[A-Za-z0-9_]"),
        ("[[.a.]-c]", "[a-c]"),
        ("[[=e=]]", "[e]"),
        ("a)", r"a\)"),  # an unmatched ')' is ordinary in POSIX
        ("a}", r"a\}"),
        ("\\.", r"\."),
        ("\\/", "/"),
    ],
)
def test_translation(source: str, python: str) -> None:
    assert translate_ere(source) == python


def test_all_twelve_classes() -> None:
    members = {
        "alnum": ("a", "Z", "5"),
        "alpha": ("a", "Z"),
        "blank": (" ", "\t"),
        "cntrl": ("\x00", "\x1f", "\x7f"),
        "digit": ("0", "9"),
        "graph": ("!", "~", "a"),
        "lower": ("a", "z"),
        "print": (" ", "~"),
        "punct": ("!", "/", ":", "@", "[", "`", "{", "~"),
        "space": (" ", "\t", "\n", "\r", "\f", "\v"),
        "upper": ("A", "Z"),
        "xdigit": ("0", "a", "F"),
    }
    non_members = {
        "alnum": ("_", " "),
        "alpha": ("1", "_"),
        "blank": ("\n", "a"),
        "cntrl": (" ", "a"),
        "digit": ("a", "/"),
        "graph": (" ", "\x7f"),
        "lower": ("A",),
        "print": ("\x7f", "\n"),
        "punct": ("a", "0", " "),
        "space": ("a", "\x00"),
        "upper": ("a",),
        "xdigit": ("g", "G"),
    }
    assert set(members) == set(non_members)
    assert len(members) == 12
    for name, chars in members.items():
        rx = compile_ere(f"^[[:{name}:]]$")
        for ch in chars:
            assert rx.search(ch), (name, ch)
        for ch in non_members[name]:
            assert not rx.search(ch), (name, ch)


def test_classes_are_c_locale() -> None:
    # Documented choice: POSIX classes have their C-locale (ASCII) members.
    assert not matches("[[:alpha:]]", "é")
    assert not matches("[[:digit:]]", "٣")
    assert matches("^[^[:alpha:]]$", "é")


def test_dollar_does_not_match_before_trailing_newline() -> None:
    # Python's `$` would match "A=x\n"; regexec's `$` only matches at the very end.
    assert not matches("^A=x$", "A=x\n")
    assert matches("^A=x$", "A=x")


def test_dot_and_negated_bracket_match_newline() -> None:
    assert matches("^A=.*b$", "A=a\nb")
    assert matches("^a[^x]b$", "a\nb")


def test_caret_only_anchors_at_start_of_string() -> None:
    assert not matches("^B", "A=1\nB=2")


def test_interval_semantics() -> None:
    rx = compile_ere("^a{2,3}$")
    assert [bool(rx.search("a" * n)) for n in range(5)] == [False, False, True, True, False]
    assert matches("^(ab){2}$", "abab")
    assert not matches("^(ab){2}$", "ab")


def test_alternation_and_groups() -> None:
    rx = compile_ere("^(FOO|BAR)_[[:upper:]]+=")
    assert rx.search("FOO_X=1")
    assert rx.search("BAR_YZ=")
    assert not rx.search("BAZ_X=1")
    assert not rx.search("FOO_x=1")


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "column", "fragment"),
    [
        ("(?i)abc", 2, "'(?' is Python/Perl syntax"),
        ("a(?:b)", 3, "'(?' is Python/Perl syntax"),
        ("*a", 1, "'*' repeats nothing"),
        ("a|+b", 3, "'+' repeats nothing"),
        ("^*", 2, "'*' repeats an anchor"),
        ("{2}", 1, "'{' repeats nothing"),
        ("ab(c", 3, "unmatched '('"),
        ("a[bc", 2, "unmatched '['"),
        ("[]", 1, "unmatched '['"),
        ("a{2", 2, "unmatched '{'"),
        ("a{x}", 2, "invalid interval '{x}'"),
        ("a{3,2}", 2, "maximum below minimum"),
        ("a{40000}", 2, "above 32767"),
        ("ab\\", 3, "trailing backslash"),
        ("x\\d", 2, "unknown escape '\\d'"),
        ("\\w+", 1, "unknown escape '\\w'"),
        ("\\s", 1, "unknown escape '\\s'"),
        ("\\n", 1, "unknown escape '\\n'"),
        ("(a)\\1", 4, "back-reference"),
        ("\\<word", 1, "GNU extension"),
        ("[[:alfa:]]", 2, "unknown character class '[:alfa:]'"),
        ("[[:alpha]", 2, "unterminated '[:'"),
        ("[[.space.]]", 2, "collating element '[.space.]' is not supported"),
        ("[[=ab=]]", 2, "equivalence class '[=ab=]' is not supported"),
        ("[z-a]", 2, "invalid range 'z-a'"),
        ("[a-c-e]", 5, "'-' in a bracket expression must be first, last"),
        ("[[:digit:]-z]", 2, "a class cannot start a range"),
        ("[a-[:digit:]]", 4, "a class cannot end a range"),
    ],
)
def test_errors_name_problem_and_column(source: str, column: int, fragment: str) -> None:
    err = ere_error(source)
    assert isinstance(err, ValueError)
    assert err.column == column
    assert fragment in str(err)
    assert str(err).endswith(f"at column {column}")
    assert "\n" not in str(err)


def test_escaped_punctuation_is_literal() -> None:
    for ch in "^.[]$()|*+?{}\\/-=\"#%&,:;@_~!":
        assert matches(f"^\\{ch}$", ch), ch
        assert not matches(f"^\\{ch}$", "a"), ch


# --- glibc regcomp(REG_EXTENDED) as an oracle ---------------------------------------

_REG_EXTENDED = 1
_REG_NOSUB = 8


def _glibc():
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return None
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _glibc()


def glibc_search(source: str, subject: str) -> bool | None:
    """regexec's verdict, or None if regcomp rejects `source`."""
    assert _LIBC is not None
    regex = ctypes.create_string_buffer(1024)  # larger than any regex_t
    if _LIBC.regcomp(regex, source.encode(), _REG_EXTENDED | _REG_NOSUB) != 0:
        return None
    try:
        return _LIBC.regexec(regex, subject.encode(), 0, None, 0) == 0
    finally:
        _LIBC.regfree(regex)


ORACLE_CASES = [
    ("^(SLURM_CONF|SLURM_CONF_SERVER)=", ["SLURM_CONF=1", "SLURM_CONF_SERVER=1", "XSLURM_CONF=1", "SLURM_CONFX=1"]),
    ("^SLURM_", ["SLURM_JOB_ID=1", "MY_SLURM=1"]),
    ("a**", ["", "b"]),
    ("a*?b", ["aab", "c"]),
    ("a+*", ["aaa", ""]),
    ("a{1}{2}", ["a", "aa"]),
    ("a{1,2}{3}", ["aa", "aaa"]),
    ("x*{2}", [""]),
    ("()", [""]),
    ("(|)+", [""]),
    ("a||b", ["c"]),
    ("(a|)", [""]),
    ("a)", ["a)", "a"]),
    ("(a))", ["a)", "a"]),
    ("a{,3}", ["", "b"]),
    ("a{0}b", ["b"]),
    ("a{01}", ["a"]),
    ("[!--]", ["-", ",", "."]),
    ("[[.a.]]", ["a", "b"]),
    ("[[=a=]]", ["a", "b"]),
    ("[]a]", ["]", "b"]),
    ("[^]a]", ["]", "b"]),
    ("[\\]", ["\\", "a"]),
    ("[\\n]", ["n", "\\", "\n"]),
    ("[]-a]", ["^", "b"]),
    ("[%--]", [",", "."]),
    ("[[.-.]-z]", ["x", "."]),
    ("[[:alpha:]-]", ["-", "1"]),
    ("[a-]]", ["-]", "a", "a]"]),
    ("[--]", ["-"]),
    ("[---]", ["-"]),
    ("[[]", ["["]),
    ("[[a]", ["a", "["]),
    ("[a[]", ["["]),
    ("[[:alpha:][:digit:]]", ["5", "_"]),
    ("[[:upper:]]+=[[:digit:]]{2,3}$", ["AB=123", "AB=1234", "ab=12"]),
    ("[[:punct:]]", ["~", "a", "_"]),
    ("[[:print:]]", [" ", "\x01"]),
    ("[[:graph:]]", [" ", "#"]),
    ("[[:xdigit:]]+$", ["beef", "beefy"]),
    ("[[:space:]]", ["a", "\v"]),
    ("(^a)", ["a", "ba"]),
    ("a^", ["a"]),
    ("^^a", ["a"]),
    ("a$b", ["ab"]),
    ("$$", [""]),
    ("\\.", ["a", "."]),
    ("[.]", ["a", "."]),
    ("a.c", ["abc", "a\nc", "ac"]),
    ("a$", ["a\n", "a"]),
    ("\\{|\\}|\\(|\\)", ["{", "x"]),
    # rejected by both
    ("*a", []),
    ("^*a", []),
    ("a|*b", []),
    ("(*a)", []),
    ("(?:a)", []),
    ("(a", []),
    ("((a)", []),
    ("a{", []),
    ("a{x", []),
    ("a{2,1}", []),
    ("a{32768}", []),
    ("a{1,2,3}", []),
    ("a{}", []),
    ("a{ 1}", []),
    ("[a-c-e]", []),
    ("[[:foo:]]", []),
    ("[[:ALPHA:]]", []),
    ("[[:alpha:]", []),
    ("[[:alpha]", []),
    ("[[.hyphen.]]", []),
    ("[z-a]", []),
    ("[]", []),
    ("[^]", []),
    ("[[=a=]-c]", []),
    ("[[:alpha:]-a]", []),
    ("a\\", []),
    ("\\1", []),
    ("$*", []),
    ("x|^*", []),
]


@pytest.mark.skipif(_LIBC is None, reason="needs glibc's regcomp as the oracle")
@pytest.mark.parametrize(("source", "subjects"), ORACLE_CASES)
def test_agrees_with_glibc(source: str, subjects: list[str]) -> None:
    if not subjects:
        assert glibc_search(source, "") is None, "glibc accepts it"
        with pytest.raises(EreError):
            compile_ere(source)
        return
    rx = compile_ere(source)
    for subject in subjects:
        assert glibc_search(source, subject) == (rx.search(subject) is not None), subject


@pytest.mark.skipif(_LIBC is None, reason="needs glibc's regcomp as the oracle")
@pytest.mark.parametrize("source", ["\\d", "\\w", "\\<a", "(a)\\1", "\\n"])
def test_stricter_than_glibc_on_purpose(source: str) -> None:
    # glibc accepts these with GNU (or no) meaning; they mean something else in Python and
    # POSIX leaves them undefined, so we refuse them instead of guessing.
    assert glibc_search(source, "") is not None
    with pytest.raises(EreError):
        compile_ere(source)
