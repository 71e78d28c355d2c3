"""Load and validate Slurm's oci.conf, with the same syntax and meaning as Slurm.

Everything wrong with a file is collected and reported at once (OciConfError.problems),
each problem naming the file, line and key, so a site fixes its file in one pass.

The line syntax (Key=Value pairs, quotes, comments) is ocisyntax.py's; here, what the
keys mean: key names are case-insensitive, each value is checked for its key, and the
run and create/start mode rules apply.
"""

from __future__ import annotations

import difflib
import errno
import re
from dataclasses import dataclass

from nodestepd.config.posix_ere import EreError, compile_ere
from nodestepd.config.ocisyntax import BLANKS, Pair, non_ascii, split_line
from nodestepd.config.patterns import USER_CHOSEN, check_pattern, user_chosen_letters

__all__ = [
    "KEYS",
    "PATTERN_KEYS",
    "REGEX_KEYS",
    "HOOK_TYPES",
    "LOG_LEVELS",
    "Problem",
    "OciConfError",
    "OciConf",
    "parse_oci_conf",
    "load_oci_conf",
]

KEYS: tuple[str, ...] = (
    "ContainerPath",
    "CreateEnvFile",
    "DebugFlags",
    "DisableCleanup",
    "DisableHooks",
    "EnvExclude",
    "FileDebug",
    "IgnoreFileConfigJson",
    "MountSpoolDir",
    "RunTimeCreate",
    "RunTimeDelete",
    "RunTimeEnvExclude",
    "RunTimeKill",
    "RunTimeQuery",
    "RunTimeRun",
    "RunTimeStart",
    "SrunArgs",
    "SrunPath",
    "StdIODebug",
    "SyslogDebug",
)

RUNTIME_KEYS = ("RunTimeCreate", "RunTimeDelete", "RunTimeKill", "RunTimeQuery", "RunTimeRun", "RunTimeStart")
PATTERN_KEYS: tuple[str, ...] = ("ContainerPath", "MountSpoolDir") + RUNTIME_KEYS
REGEX_KEYS: tuple[str, ...] = ("EnvExclude", "RunTimeEnvExclude")
_BOOL_KEYS = ("DisableCleanup", "IgnoreFileConfigJson")
_LEVEL_KEYS = ("FileDebug", "StdIODebug", "SyslogDebug")

RUN_MODE_KEYS = ("RunTimeRun", "RunTimeKill", "RunTimeDelete")
CREATE_START_MODE_KEYS = ("RunTimeCreate", "RunTimeStart", "RunTimeQuery", "RunTimeKill", "RunTimeDelete")

HOOK_TYPES: tuple[str, ...] = (
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
)

# Slurm's log level names, in order; a digit is accepted as the index into this tuple.
LOG_LEVELS: tuple[str, ...] = (
    "quiet",
    "fatal",
    "error",
    "info",
    "verbose",
    "debug",
    "debug2",
    "debug3",
    "debug4",
    "debug5",
)

_KEY_BY_LOWER = {k.lower(): k for k in KEYS}
_HOOK_BY_LOWER = {h.lower(): h for h in HOOK_TYPES}
_TRUE = ("true", "yes", "y", "1")
_FALSE = ("false", "no", "n", "0")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class OciConfError(Exception):
    """An unusable oci.conf; `problems` holds every problem found, str() one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class OciConf:
    path: str
    container_path: str | None = None
    create_env_file: str = "disabled"  # "disabled" | "null" | "newline"
    debug_flags: str | None = None
    file_debug: str | None = None  # a LOG_LEVELS name
    stdio_debug: str | None = None
    syslog_debug: str | None = None
    disable_cleanup: bool = False
    disable_hooks: tuple[str, ...] = ()  # canonical HOOK_TYPES spellings
    env_exclude: str | None = None
    runtime_env_exclude: str | None = None
    env_exclude_re: re.Pattern[str] | None = None
    runtime_env_exclude_re: re.Pattern[str] | None = None
    ignore_file_config_json: bool = False
    mount_spool_dir: str | None = None
    runtime_create: str | None = None
    runtime_start: str | None = None
    runtime_run: str | None = None
    runtime_query: str | None = None
    runtime_kill: str | None = None
    runtime_delete: str | None = None
    srun_path: str | None = None
    srun_args: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        """"run" (one RunTimeRun) or "create-start"; validation guarantees exactly one fits."""
        return "run" if self.runtime_run is not None else "create-start"

    def patterns(self) -> dict[str, str]:
        """Canonical key name -> pattern, for every pattern key that is set."""
        values = {
            "ContainerPath": self.container_path,
            "MountSpoolDir": self.mount_spool_dir,
            "RunTimeCreate": self.runtime_create,
            "RunTimeDelete": self.runtime_delete,
            "RunTimeKill": self.runtime_kill,
            "RunTimeQuery": self.runtime_query,
            "RunTimeRun": self.runtime_run,
            "RunTimeStart": self.runtime_start,
        }
        return {k: v for k, v in values.items() if v is not None}


# Dataclass field for each key (SrunArgs is handled apart: it repeats).
_FIELD = {
    "ContainerPath": "container_path",
    "CreateEnvFile": "create_env_file",
    "DebugFlags": "debug_flags",
    "DisableCleanup": "disable_cleanup",
    "DisableHooks": "disable_hooks",
    "EnvExclude": "env_exclude",
    "FileDebug": "file_debug",
    "IgnoreFileConfigJson": "ignore_file_config_json",
    "MountSpoolDir": "mount_spool_dir",
    "RunTimeCreate": "runtime_create",
    "RunTimeDelete": "runtime_delete",
    "RunTimeEnvExclude": "runtime_env_exclude",
    "RunTimeKill": "runtime_kill",
    "RunTimeQuery": "runtime_query",
    "RunTimeRun": "runtime_run",
    "RunTimeStart": "runtime_start",
    "SrunPath": "srun_path",
    "StdIODebug": "stdio_debug",
    "SyslogDebug": "syslog_debug",
}


def load_oci_conf(path: str) -> OciConf:
    """Read and validate the oci.conf at `path`; OciConfError lists every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        name = errno.errorcode.get(err.errno, "") if err.errno is not None else ""
        detail = f"{err.strerror} ({name})" if name else str(err)
        raise OciConfError([Problem(path, None, None, f"cannot read file: {detail}")]) from err
    # surrogateescape keeps undecodable bytes visible to the parser, which reports them
    # with their line, instead of failing the whole file without a position.
    return parse_oci_conf(data.decode("ascii", errors="surrogateescape"), path)


def parse_oci_conf(text: str, path: str = "<string>") -> OciConf:
    """Parse and validate oci.conf text; `path` is only used in messages and OciConf.path."""
    problems: list[Problem] = []

    def problem(line: int | None, key: str | None, message: str) -> None:
        problems.append(Problem(path, line, key, message))

    pairs: list[Pair] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        bad = non_ascii(line)
        if bad:
            problem(lineno, None, bad)
        for key, message in split_line(line, lineno, pairs):
            problem(lineno, _canonical(key) or key, message)

    # Collect values by key; report unknown and repeated keys.
    raw: dict[str, str | None] = {}
    line_of: dict[str, int] = {}
    srun_args: list[str] = []
    for pair in pairs:
        key = _canonical(pair.key)
        if key is None:
            problem(pair.line, pair.key, _unknown_key_message(pair.key))
            continue
        if key == "SrunArgs":
            if pair.value == "":
                problem(pair.line, key, "empty value (remove the line, or give the argument)")
            elif pair.value is not None:
                srun_args.append(pair.value)
            continue
        if key in line_of:
            problem(
                pair.line, key, f"set twice: first on line {line_of[key]}, again on line {pair.line} (only SrunArgs may repeat)"
            )
            continue
        line_of[key] = pair.line
        raw[key] = pair.value

    # Convert values; a value of None already has a problem recorded.
    fields: dict[str, object] = {}
    for key, value in raw.items():
        if value is None:
            continue
        if value == "":
            problem(line_of[key], key, f"empty value (remove the line to leave {key} unset)")
            continue
        try:
            fields[_FIELD[key]] = _convert(key, value)
            if key in REGEX_KEYS:
                fields[_FIELD[key] + "_re"] = _compile_regex(value)
        except ValueError as err:
            problem(line_of[key], key, str(err))

    if "IgnoreFileConfigJson" in line_of:
        value = raw["IgnoreFileConfigJson"]
        ignore = _parse_bool(value) if value else None
    else:
        ignore = False
    if ignore is not None:  # an unusable IgnoreFileConfigJson is reported; guessing the mode would add noise
        for line, key, message in _mode_problems(line_of, ignore):
            problem(line, key, message)

    if problems:
        # File order reads best; problems about the file as a whole go last.
        problems.sort(key=lambda p: (p.line is None, p.line or 0))
        raise OciConfError(problems)
    return OciConf(path=path, srun_args=tuple(srun_args), **fields)  # type: ignore[arg-type]


def _canonical(key: str | None) -> str | None:
    return None if key is None else _KEY_BY_LOWER.get(key.lower())


def _unknown_key_message(key: str) -> str:
    lower = key.lower()
    legacy = _KEY_BY_LOWER.get(lower.removeprefix("oci")) if lower.startswith("ociruntime") else None
    if legacy is not None:
        return f"unknown key; did you mean {legacy}? (OCIRunTime* is the old spelling of these keys, as in the guide's Singularity 3.8 example)"
    close = difflib.get_close_matches(lower, list(_KEY_BY_LOWER), n=1, cutoff=0.75)
    if close:
        return f"unknown key; did you mean {_KEY_BY_LOWER[close[0]]}?"
    return f"unknown key (known keys: {', '.join(KEYS)})"


def _parse_bool(value: str) -> bool | None:
    lower = value.lower()
    if lower in _TRUE:
        return True
    if lower in _FALSE:
        return False
    return None


# Why the path keys must not use a letter the user chooses (USER_CHOSEN).
_USER_CHOSEN_WHY = {
    "ContainerPath": "the daemon creates the spool dirs there as root, and the user could point it at a directory"
    " that only root may write",
    "MountSpoolDir": "the spool dir would be mounted wherever the user says",
}


def _convert(key: str, value: str) -> object:
    """The typed field value for a non-empty `value`; ValueError(message) if invalid."""
    if key in PATTERN_KEYS:
        problems = check_pattern(value)
        if problems:
            raise ValueError("; ".join(problems))
        chosen = user_chosen_letters(value) if key in _USER_CHOSEN_WHY else []
        if chosen:
            what = ", ".join(f"%{c} ({USER_CHOSEN[c]})" for c in chosen)
            raise ValueError(
                f"uses {what}, which the user chooses: {_USER_CHOSEN_WHY[key]}; use letters the user cannot"
                " choose (such as %u, %U, %j, %s, %t, %n) and fixed text"
            )
        return value
    if key in REGEX_KEYS:
        return value  # compiled by the caller with _compile_regex
    if key in _BOOL_KEYS:
        parsed = _parse_bool(value)
        if parsed is None:
            raise ValueError(f"invalid boolean {value!r} (use true/false, yes/no, y/n or 1/0)")
        return parsed
    if key == "CreateEnvFile":
        lower = value.lower()
        if lower in ("null",) + _TRUE:
            return "null"
        if lower == "newline":
            return "newline"
        if lower in ("disabled",) + _FALSE:
            return "disabled"
        raise ValueError(f"invalid value {value!r} (use null, newline or disabled)")
    if key == "DisableHooks":
        return _parse_hooks(value)
    if key in _LEVEL_KEYS:
        lower = value.lower()
        if lower in LOG_LEVELS:
            return lower
        if lower.isdigit() and int(lower) < len(LOG_LEVELS):
            return LOG_LEVELS[int(lower)]
        raise ValueError(f"invalid log level {value!r} (use one of {', '.join(LOG_LEVELS)})")
    return value  # DebugFlags, SrunPath: free text


def _compile_regex(value: str) -> re.Pattern[str]:
    try:
        return compile_ere(value)
    except EreError as err:
        raise ValueError(f"invalid POSIX extended regex {value!r}: {err}") from None


def _parse_hooks(value: str) -> tuple[str, ...]:
    hooks: list[str] = []
    for item in value.split(","):
        name = item.strip(BLANKS)
        if not name:
            raise ValueError(f"empty hook type in {value!r} (write a comma-separated list such as prestart,poststop)")
        canonical = _HOOK_BY_LOWER.get(name.lower())
        if canonical is None:
            close = difflib.get_close_matches(name.lower(), list(_HOOK_BY_LOWER), n=1)
            hint = f"did you mean {_HOOK_BY_LOWER[close[0]]}? " if close else ""
            raise ValueError(f"unknown OCI hook type {name!r} ({hint}known: {', '.join(HOOK_TYPES)})")
        if canonical not in hooks:
            hooks.append(canonical)
    return tuple(hooks)


def _mode_problems(line_of: dict[str, int], ignore_config_json: bool) -> list[tuple[int | None, str | None, str]]:
    """Problems with the set of RunTime* keys, as (line, key, message)."""
    present = {k for k in RUNTIME_KEYS if k in line_of}
    problems: list[tuple[int | None, str | None, str]] = []
    if ignore_config_json:
        # Without config.json there is no OCI state to create and then start.
        if "RunTimeStart" in present:
            problems.append(
                (line_of["RunTimeStart"], "RunTimeStart", "cannot be used with IgnoreFileConfigJson=true (use RunTimeRun)")
            )
        if "RunTimeRun" not in present:
            problems.append((line_of["IgnoreFileConfigJson"], "IgnoreFileConfigJson", "true requires RunTimeRun to be set"))
        return problems

    run_mode = ", ".join(RUN_MODE_KEYS)
    create_start_mode = ", ".join(CREATE_START_MODE_KEYS)
    both_modes = f"run mode needs {run_mode}; create/start mode needs {create_start_mode}"
    creates = [k for k in ("RunTimeCreate", "RunTimeStart") if k in present]
    if not present:
        problems.append((None, None, f"no RunTime* command is set: {both_modes}"))
    elif "RunTimeRun" in present and creates:
        for key in creates:
            problems.append(
                (
                    line_of[key],
                    key,
                    f"extra: cannot be combined with RunTimeRun (line {line_of['RunTimeRun']}); {both_modes}",
                )
            )
    elif "RunTimeRun" in present:
        missing = [k for k in RUN_MODE_KEYS if k not in present]
        if missing:
            problems.append((None, None, f"run mode (RunTimeRun is set) needs {run_mode}; missing: {', '.join(missing)}"))
    elif creates:
        missing = [k for k in CREATE_START_MODE_KEYS if k not in present]
        if missing:
            problems.append(
                (
                    None,
                    None,
                    f"create/start mode ({' and '.join(creates)} set) needs {create_start_mode}; missing: {', '.join(missing)}",
                )
            )
    else:
        only = ", ".join(sorted(present))
        problems.append(
            (None, None, f"neither RunTimeRun nor RunTimeCreate/RunTimeStart is set (only {only}): {both_modes}")
        )
    return problems
