"""oci.conf loading: every published example, and every class of error."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from nodestepd.config.ociconf import KEYS, OciConf, OciConfError, Problem, load_oci_conf, parse_oci_conf

EXAMPLES = Path(__file__).resolve().parents[2] / "oci-conf-examples"

ENV_EXCLUDE = "^(SLURM_CONF|SLURM_CONF_SERVER)="
RUN_MODE = 'RunTimeRun="r %b" RunTimeKill="k" RunTimeDelete="d"\n'


def problems_of(text: str, path: str = "oci.conf") -> list[Problem]:
    with pytest.raises(OciConfError) as info:
        parse_oci_conf(text, path)
    return info.value.problems


def only_problem(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


# --- the published examples ------------------------------------------------------------


def test_every_example_file_is_covered() -> None:
    names = {p.name for p in EXAMPLES.iterdir()}
    assert names == set(EXPECTED_MODES) | {"invalid-singularity-3.8-as-published.conf"}


EXPECTED_MODES = {
    "charliecloud.conf": "run",
    "crun-create-start.conf": "create-start",
    "crun-run.conf": "run",
    "enroot.conf": "run",
    "multiple-runtimes.conf": "run",
    "nvidia-create-start.conf": "create-start",
    "nvidia-run.conf": "run",
    "runc-create-start.conf": "create-start",
    "runc-run-one-line.conf": "run",
    "runc-run.conf": "run",
    "singularity-native.conf": "run",
    "singularity-oci.conf": "run",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_MODES))
def test_example_loads_with_expected_mode(name: str) -> None:
    conf = load_oci_conf(str(EXAMPLES / name))
    assert conf.path == str(EXAMPLES / name)
    assert conf.mode == EXPECTED_MODES[name]
    # Every published example excludes SLURM_CONF from both environments, or nothing.
    if conf.env_exclude is not None:
        assert conf.env_exclude == ENV_EXCLUDE
        assert conf.runtime_env_exclude == ENV_EXCLUDE
        assert conf.env_exclude_re is not None and conf.env_exclude_re.search("SLURM_CONF=/etc/slurm.conf")
        assert conf.runtime_env_exclude_re is not None and conf.runtime_env_exclude_re.search("SLURM_CONF_SERVER=x")
        assert not conf.env_exclude_re.search("SLURM_JOB_ID=1")


def test_runc_run_values() -> None:
    conf = load_oci_conf(str(EXAMPLES / "runc-run.conf"))
    root = "runc --rootless=true --root=/run/user/%U/"
    assert conf.runtime_query == f"{root} state %n.%u.%j.%s.%t"
    assert conf.runtime_kill == f"{root} kill -a %n.%u.%j.%s.%t"
    assert conf.runtime_delete == f"{root} delete --force %n.%u.%j.%s.%t"
    assert conf.runtime_run == f"{root} run %n.%u.%j.%s.%t -b %b"
    assert conf.runtime_create is None and conf.runtime_start is None
    assert conf.ignore_file_config_json is False
    assert conf.create_env_file == "disabled"
    assert conf.disable_cleanup is False
    assert conf.disable_hooks == ()
    assert conf.srun_args == ()
    assert conf.patterns() == {
        "RunTimeDelete": conf.runtime_delete,
        "RunTimeKill": conf.runtime_kill,
        "RunTimeQuery": conf.runtime_query,
        "RunTimeRun": conf.runtime_run,
    }


def test_one_line_example_equals_multi_line_twin() -> None:
    one = load_oci_conf(str(EXAMPLES / "runc-run-one-line.conf"))
    many = load_oci_conf(str(EXAMPLES / "runc-run.conf"))
    assert one != many  # the paths differ...
    assert dataclasses.replace(one, path=many.path) == many  # ...and nothing else


def test_create_start_values() -> None:
    conf = load_oci_conf(str(EXAMPLES / "crun-create-start.conf"))
    root = "crun --rootless=true --root=/run/user/%U/"
    assert conf.runtime_create == f"{root} create --bundle %b %n.%u.%j.%s.%t"
    assert conf.runtime_start == f"{root} start %n.%u.%j.%s.%t"
    assert conf.runtime_run is None
    assert set(conf.patterns()) == {"RunTimeCreate", "RunTimeStart", "RunTimeQuery", "RunTimeKill", "RunTimeDelete"}


def test_charliecloud_values() -> None:
    conf = load_oci_conf(str(EXAMPLES / "charliecloud.conf"))
    assert conf.ignore_file_config_json is True
    assert conf.create_env_file == "newline"
    assert conf.runtime_run is not None
    assert conf.runtime_run.startswith("env -i PATH=/usr/local/bin:")
    assert "USER=$(whoami) HOME=/home/$(whoami)/ ch-run -w" in conf.runtime_run
    assert conf.runtime_run.endswith("--set-env=%e --no-passwd %r -- %@")
    assert conf.runtime_kill == "kill -s SIGTERM %p"
    assert conf.runtime_delete == "kill -s SIGKILL %p"
    assert conf.runtime_query is None


def test_enroot_and_singularity_native_values() -> None:
    enroot = load_oci_conf(str(EXAMPLES / "enroot.conf"))
    assert enroot.runtime_run == "/usr/local/bin/enroot-start-wrapper %b %m %e -- %@"
    assert (enroot.runtime_kill, enroot.runtime_delete) == ("kill -s SIGINT %p", "kill -s SIGTERM %p")
    native = load_oci_conf(str(EXAMPLES / "singularity-native.conf"))
    assert native.runtime_run == "singularity exec --userns %r %@"
    assert native.create_env_file == "disabled"
    assert native.ignore_file_config_json is True


def test_multiple_runtimes_values() -> None:
    conf = load_oci_conf(str(EXAMPLES / "multiple-runtimes.conf"))
    assert conf.runtime_run == "/opt/slurm-oci/run %b %m %u %U %n %j %s %t %@"
    assert conf.env_exclude is None and conf.env_exclude_re is None


def test_invalid_singularity_example_reports_both_problems() -> None:
    path = str(EXAMPLES / "invalid-singularity-3.8-as-published.conf")
    with pytest.raises(OciConfError) as info:
        load_oci_conf(path)
    problems = info.value.problems
    legacy = [p for p in problems if "OCIRunTime* is the old spelling" in p.message]
    assert [(p.line, p.key) for p in legacy] == [
        (3, "OCIRunTimeQuery"),
        (4, "OCIRunTimeCreate"),
        (5, "OCIRunTimeStart"),
        (6, "OCIRunTimeKill"),
        (7, "OCIRunTimeDelete"),
    ]
    assert all(p.file == path for p in problems)
    assert "did you mean RunTimeQuery?" in legacy[0].message
    assert "did you mean RunTimeDelete?" in legacy[4].message
    quote = [p for p in problems if "missing closing '\"'" in p.message]
    assert [(p.line, p.key) for p in quote] == [(7, "OCIRunTimeDelete")]
    text = str(info.value)
    assert f"{path}:3: OCIRunTimeQuery: unknown key; did you mean RunTimeQuery?" in text
    assert f"{path}:7: OCIRunTimeDelete: missing closing '\"'" in text
    assert len(text.splitlines()) == len(problems)


# --- syntax --------------------------------------------------------------------------


def test_keys_are_case_insensitive_and_comments_ignored() -> None:
    conf = parse_oci_conf(
        "# a comment\n"
        "\n"
        "   runtimerun=\"r %@\"   # trailing comment\n"
        "RUNTIMEKILL=k\tRunTimeDelete=d#comment right after a value\n"
        "ignorefileconfigjson=YES\n"
    )
    assert conf.runtime_run == "r %@"
    assert conf.runtime_kill == "k"
    assert conf.runtime_delete == "d"
    assert conf.ignore_file_config_json is True


def test_quoted_value_keeps_blanks_and_hash() -> None:
    conf = parse_oci_conf(RUN_MODE + 'DebugFlags="a # b  c"\n')
    assert conf.debug_flags == "a # b  c"


def test_crlf_line_endings() -> None:
    conf = parse_oci_conf(RUN_MODE.replace("\n", "\r\n") + "DisableCleanup=y\r\n")
    assert conf.runtime_delete == "d"
    assert conf.disable_cleanup is True


def test_line_without_equals() -> None:
    p = only_problem(RUN_MODE + "DisableCleanup\n")
    assert (p.line, p.key) == (2, None)
    assert p.message == "expected Key=Value at column 1, found 'DisableCleanup'"


def test_trailing_word_without_equals_on_a_pair_line() -> None:
    p = only_problem(RUN_MODE + "DisableCleanup=yes garbage\n")
    assert (p.line, p.message) == (2, "expected Key=Value at column 20, found 'garbage'")


def test_blanks_around_equals() -> None:
    p = only_problem(RUN_MODE + "DisableCleanup = yes\n")
    assert (p.line, p.key) == (2, "DisableCleanup")
    assert "blanks around '=' are not allowed" in p.message


def test_missing_key_name() -> None:
    p = only_problem(RUN_MODE + "=yes\n")
    assert (p.line, p.key, p.message) == (2, None, "missing key name before '=' at column 1")


def test_missing_closing_quote_names_line_and_key() -> None:
    p = only_problem('RunTimeRun="r %@\nRunTimeKill=k\nRunTimeDelete=d\n')
    assert (p.line, p.key) == (1, "RunTimeRun")
    assert p.message.startswith("missing closing '\"'")
    assert str(p) == "oci.conf:1: RunTimeRun: " + p.message


def test_text_glued_after_closing_quote() -> None:
    p = only_problem(RUN_MODE + 'DebugFlags="a"b\n')
    assert (p.line, p.key) == (2, "DebugFlags")
    assert p.message == "unexpected 'b' right after the closing quote at column 15"


def test_quote_inside_unquoted_value() -> None:
    p = only_problem(RUN_MODE + 'DebugFlags=a"b c"\n')
    assert (p.line, p.key) == (2, "DebugFlags")
    assert "inside an unquoted value at column 13" in p.message


def test_non_ascii_bytes_reported_with_line(tmp_path: Path) -> None:
    conf = tmp_path / "oci.conf"
    conf.write_bytes(RUN_MODE.encode() + b'DebugFlags="caf\xc3\xa9"\n')
    with pytest.raises(OciConfError) as info:
        load_oci_conf(str(conf))
    [p] = info.value.problems
    assert (p.file, p.line, p.key) == (str(conf), 2, None)
    assert p.message == "byte 0xc3 at column 16 is not ASCII (oci.conf is an ASCII file)"


def test_non_ascii_text_reported_with_line() -> None:
    p = only_problem(RUN_MODE + "DebugFlags=é\n")
    assert (p.line, p.message) == (2, "character 'é' (U+00E9) at column 12 is not ASCII (oci.conf is an ASCII file)")


def test_unreadable_file_names_os_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.conf")
    with pytest.raises(OciConfError) as info:
        load_oci_conf(missing)
    [p] = info.value.problems
    assert (p.file, p.line, p.key) == (missing, None, None)
    assert p.message == "cannot read file: No such file or directory (ENOENT)"
    assert str(info.value) == f"{missing}: cannot read file: No such file or directory (ENOENT)"
    with pytest.raises(OciConfError, match=r"Is a directory \(EISDIR\)"):
        load_oci_conf(str(tmp_path))


# --- keys ------------------------------------------------------------------------------


def test_keys_constant() -> None:
    assert len(KEYS) == 20
    assert KEYS == tuple(sorted(KEYS, key=str.lower))
    assert {"RunTimeQuery", "SrunArgs", "StdIODebug", "IgnoreFileConfigJson"} <= set(KEYS)


def test_legacy_key_suggestion() -> None:
    p = only_problem(RUN_MODE + "OCIRunTimeQuery=q\n")
    assert (p.line, p.key) == (2, "OCIRunTimeQuery")
    assert p.message == (
        "unknown key; did you mean RunTimeQuery? (OCIRunTime* is the old spelling of these keys, as in the guide's Singularity 3.8 example)"
    )


def test_typo_suggestion() -> None:
    p = only_problem(RUN_MODE + "RunTimeQeury=q\n")
    assert (p.line, p.key, p.message) == (2, "RunTimeQeury", "unknown key; did you mean RunTimeQuery?")
    p = only_problem(RUN_MODE + "IgnoreFileConfigJSN=true\n")
    assert p.message == "unknown key; did you mean IgnoreFileConfigJson?"


def test_unknown_key_without_suggestion_lists_keys() -> None:
    p = only_problem(RUN_MODE + "Banana=1\n")
    assert p.key == "Banana"
    assert p.message.startswith("unknown key (known keys: ContainerPath, CreateEnvFile,")


def test_repeated_scalar_names_both_lines() -> None:
    p = only_problem(RUN_MODE + "DisableCleanup=no\n\nDISABLECLEANUP=yes\n")
    assert (p.line, p.key) == (4, "DisableCleanup")
    assert p.message == "set twice: first on line 2, again on line 4 (only SrunArgs may repeat)"


def test_srun_args_repeat() -> None:
    conf = parse_oci_conf(RUN_MODE + 'SrunPath=/usr/bin/srun SrunArgs=--mpi=none\nsrunargs="--cpu-bind=none -v"\n')
    assert conf.srun_path == "/usr/bin/srun"
    assert conf.srun_args == ("--mpi=none", "--cpu-bind=none -v")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("YES", True), ("y", True), ("1", True), ("False", False), ("no", False), ("N", False), ("0", False)],
)
def test_booleans(value: str, expected: bool) -> None:
    conf = parse_oci_conf(RUN_MODE + f"DisableCleanup={value}\n")
    assert conf.disable_cleanup is expected


def test_invalid_boolean() -> None:
    p = only_problem(RUN_MODE + "DisableCleanup=maybe\n")
    assert (p.line, p.key) == (2, "DisableCleanup")
    assert p.message == "invalid boolean 'maybe' (use true/false, yes/no, y/n or 1/0)"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("null", "null"),
        ("NULL", "null"),
        ("true", "null"),
        ("yes", "null"),
        ("y", "null"),
        ("1", "null"),
        ("newline", "newline"),
        ("Newline", "newline"),
        ("disabled", "disabled"),
        ("false", "disabled"),
        ("no", "disabled"),
        ("n", "disabled"),
        ("0", "disabled"),
    ],
)
def test_create_env_file(value: str, expected: str) -> None:
    assert parse_oci_conf(RUN_MODE + f"CreateEnvFile={value}\n").create_env_file == expected


def test_invalid_create_env_file() -> None:
    p = only_problem(RUN_MODE + "CreateEnvFile=nul\n")
    assert (p.key, p.message) == ("CreateEnvFile", "invalid value 'nul' (use null, newline or disabled)")


def test_disable_hooks_canonical_spelling() -> None:
    conf = parse_oci_conf(RUN_MODE + 'DisableHooks="PRESTART, createruntime,poststop,prestart"\n')
    assert conf.disable_hooks == ("prestart", "createRuntime", "poststop")
    conf = parse_oci_conf(RUN_MODE + "DisableHooks=createContainer,startContainer,poststart\n")
    assert conf.disable_hooks == ("createContainer", "startContainer", "poststart")


def test_disable_hooks_unknown() -> None:
    p = only_problem(RUN_MODE + "DisableHooks=prestart,poststrat\n")
    assert (p.line, p.key) == (2, "DisableHooks")
    assert p.message.startswith("unknown OCI hook type 'poststrat' (did you mean poststart? known: prestart,")


def test_log_levels() -> None:
    conf = parse_oci_conf(RUN_MODE + "StdIODebug=DEBUG2 FileDebug=info SyslogDebug=0 DebugFlags=Steps,Cgroup\n")
    assert (conf.stdio_debug, conf.file_debug, conf.syslog_debug) == ("debug2", "info", "quiet")
    assert conf.debug_flags == "Steps,Cgroup"
    p = only_problem(RUN_MODE + "FileDebug=loud\n")
    assert (p.key, p.message.split(" (")[0]) == ("FileDebug", "invalid log level 'loud'")


def test_invalid_regex_carries_ere_message() -> None:
    p = only_problem(RUN_MODE + 'EnvExclude="^(SLURM_CONF"\n')
    assert (p.line, p.key) == (2, "EnvExclude")
    assert p.message == "invalid POSIX extended regex '^(SLURM_CONF': unmatched '(' at column 2"
    p = only_problem(RUN_MODE + "RunTimeEnvExclude=^\\d+\n")
    assert p.key == "RunTimeEnvExclude"
    assert "unknown escape '\\d'" in p.message and p.message.endswith("at column 2")


def test_regex_is_compiled_posix() -> None:
    conf = parse_oci_conf(RUN_MODE + 'EnvExclude="^[[:upper:]_]+_SECRET=" RunTimeEnvExclude=^LD_\n')
    assert conf.env_exclude_re is not None and conf.runtime_env_exclude_re is not None
    assert conf.env_exclude_re.search("AWS_SECRET=x")
    assert not conf.env_exclude_re.search("aws_SECRET=x")
    assert conf.runtime_env_exclude_re.search("LD_PRELOAD=/x.so")


def test_invalid_pattern_is_reported_at_load_time() -> None:
    p = only_problem('RunTimeRun="r %x" RunTimeKill=k RunTimeDelete=d\n')
    assert (p.line, p.key) == (1, "RunTimeRun")
    assert p.message.startswith("unknown replacement '%x' at column 3 (known: %% %@")
    p = only_problem(RUN_MODE + "ContainerPath=/spool/%\n")
    assert (p.key, p.message.split(" (")[0]) == ("ContainerPath", "lone '%' at end of value")
    p = only_problem(RUN_MODE + "MountSpoolDir=/var/run/%k\n")
    assert p.key == "MountSpoolDir"


def test_percent_p_allowed_anywhere() -> None:
    conf = parse_oci_conf('RunTimeRun="r %p %@" RunTimeKill="kill %p" RunTimeDelete="kill -9 %p" ContainerPath=/s/%p\n')
    assert conf.container_path == "/s/%p"


@pytest.mark.parametrize("key", ["RunTimeQuery", "ContainerPath", "MountSpoolDir", "EnvExclude", "SrunPath", "SrunArgs"])
def test_empty_value_is_an_error(key: str) -> None:
    problems = problems_of(RUN_MODE + f'{key}=""\n')
    assert [(p.line, p.key) for p in problems] == [(2, key)]
    assert problems[0].message.startswith("empty value")


def test_unquoted_empty_value_is_an_error() -> None:
    problems = problems_of("RunTimeRun= RunTimeKill=k RunTimeDelete=d\n")
    assert [(p.line, p.key, p.message) for p in problems] == [
        (1, "RunTimeRun", "empty value (remove the line to leave RunTimeRun unset)")
    ]


def test_patterns_method() -> None:
    conf = parse_oci_conf(RUN_MODE + "ContainerPath=/spool/%u MountSpoolDir=/var/run/slurm\n")
    assert conf.patterns() == {
        "ContainerPath": "/spool/%u",
        "MountSpoolDir": "/var/run/slurm",
        "RunTimeDelete": "d",
        "RunTimeKill": "k",
        "RunTimeRun": "r %b",
    }


# --- modes -----------------------------------------------------------------------------

CREATE_START = "RunTimeCreate=c RunTimeStart=s RunTimeQuery=q RunTimeKill=k RunTimeDelete=d\n"


def test_run_mode_query_optional() -> None:
    assert parse_oci_conf(RUN_MODE).mode == "run"
    assert parse_oci_conf(RUN_MODE + "RunTimeQuery=q\n").mode == "run"


def test_create_start_mode() -> None:
    assert parse_oci_conf(CREATE_START).mode == "create-start"


def test_nothing_set() -> None:
    p = only_problem("# empty\nDisableCleanup=no\n")
    assert (p.line, p.key) == (None, None)
    assert p.message.startswith("no RunTime* command is set: run mode needs RunTimeRun, RunTimeKill, RunTimeDelete;")
    assert str(p) == "oci.conf: " + p.message


def test_run_mode_missing_keys() -> None:
    p = only_problem("RunTimeRun=r RunTimeQuery=q\n")
    assert p.message == (
        "run mode (RunTimeRun is set) needs RunTimeRun, RunTimeKill, RunTimeDelete; missing: RunTimeKill, RunTimeDelete"
    )


def test_create_start_mode_missing_keys() -> None:
    p = only_problem("RunTimeCreate=c RunTimeKill=k RunTimeDelete=d\n")
    assert p.message == (
        "create/start mode (RunTimeCreate set) needs RunTimeCreate, RunTimeStart, RunTimeQuery, RunTimeKill, "
        "RunTimeDelete; missing: RunTimeStart, RunTimeQuery"
    )


def test_run_and_create_start_together() -> None:
    problems = problems_of(RUN_MODE + "RunTimeStart=s\nRunTimeQuery=q\nRunTimeCreate=c\n")
    assert [(p.line, p.key) for p in problems] == [(2, "RunTimeStart"), (4, "RunTimeCreate")]
    assert all(p.message.startswith("extra: cannot be combined with RunTimeRun (line 1);") for p in problems)


def test_only_query_kill_delete() -> None:
    p = only_problem("RunTimeQuery=q RunTimeKill=k RunTimeDelete=d\n")
    assert p.message.startswith(
        "neither RunTimeRun nor RunTimeCreate/RunTimeStart is set (only RunTimeDelete, RunTimeKill, RunTimeQuery)"
    )


def test_ignore_config_json_rejects_start() -> None:
    problems = problems_of("IgnoreFileConfigJson=true\nRunTimeRun=r\nRunTimeStart=s\n")
    assert [(p.line, p.key) for p in problems] == [(3, "RunTimeStart")]
    assert problems[0].message == "cannot be used with IgnoreFileConfigJson=true (use RunTimeRun)"


def test_ignore_config_json_requires_run() -> None:
    problems = problems_of("IgnoreFileConfigJson=1\nRunTimeKill=k\n")
    assert [(p.line, p.key, p.message) for p in problems] == [
        (1, "IgnoreFileConfigJson", "true requires RunTimeRun to be set")
    ]


def test_ignore_config_json_skips_other_mode_checks() -> None:
    conf = parse_oci_conf("IgnoreFileConfigJson=yes RunTimeRun=r\n")
    assert conf.mode == "run"
    assert conf.runtime_kill is None


def test_ignore_false_keeps_mode_checks() -> None:
    p = only_problem("IgnoreFileConfigJson=no RunTimeRun=r\n")
    assert "missing: RunTimeKill, RunTimeDelete" in p.message


# --- all problems at once ----------------------------------------------------------------


def test_all_problems_collected_in_file_order() -> None:
    text = (
        "RunTimeRun=\"r %q\"\n"  # 1 bad pattern
        "DisableCleanup=perhaps\n"  # 2 bad bool
        "OCIRunTimeKill=k\n"  # 3 legacy key
        "EnvExclude=(\n"  # 4 bad regex
        "oops\n"  # 5 no '='
        "RunTimeDelete=d RunTimeDelete=e\n"  # 6 repeated
    )
    problems = problems_of(text, "/etc/slurm/oci.conf")
    assert [(p.line, p.key) for p in problems] == [
        (1, "RunTimeRun"),
        (2, "DisableCleanup"),
        (3, "OCIRunTimeKill"),
        (4, "EnvExclude"),
        (5, None),
        (6, "RunTimeDelete"),
        (None, None),  # run mode misses RunTimeKill
    ]
    assert problems[-1].message.endswith("missing: RunTimeKill")
    err = OciConfError(problems)
    lines = str(err).splitlines()
    assert len(lines) == 7
    assert lines[0].startswith("/etc/slurm/oci.conf:1: RunTimeRun: unknown replacement '%q' at column 3")
    assert lines[4] == "/etc/slurm/oci.conf:5: expected Key=Value at column 1, found 'oops'"


def test_problem_str_formats() -> None:
    assert str(Problem("f", 3, "K", "m")) == "f:3: K: m"
    assert str(Problem("f", None, "K", "m")) == "f: K: m"
    assert str(Problem("f", 3, None, "m")) == "f:3: m"
    assert str(Problem("f", None, None, "m")) == "f: m"


def test_oci_conf_is_hashable_and_frozen() -> None:
    conf = parse_oci_conf(RUN_MODE)
    assert isinstance(conf, OciConf)
    assert hash(conf) == hash(parse_oci_conf(RUN_MODE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        conf.runtime_run = "x"  # type: ignore[misc]


def test_load_reads_file(tmp_path: Path) -> None:
    path = tmp_path / "oci.conf"
    path.write_text(RUN_MODE)
    conf = load_oci_conf(os.fspath(path))
    assert conf == parse_oci_conf(RUN_MODE, os.fspath(path))


# ---- issue 19.1: the letters a user chooses, in the keys that say where the spool goes --------


@pytest.mark.parametrize("key", ["ContainerPath", "MountSpoolDir"])
@pytest.mark.parametrize("letter,what", [
    ("Z", "the working directory (--chdir)"),
    ("r", "the rootfs path (from the user's config.json)"),
    ("b", "the bundle path"),
    ("@", "the command"),
])
def test_a_user_chosen_letter_in_a_spool_path_is_refused(key, letter, what):
    problem = only_problem(RUN_MODE + f"{key}=/scratch/%{letter}/.oci\n")
    assert (problem.line, problem.key) == (2, key)
    why = {
        "ContainerPath": "the daemon creates the spool dirs there as root, and the user could point it at a directory"
        " that only root may write",
        "MountSpoolDir": "the spool dir would be mounted wherever the user says",
    }[key]
    assert problem.message == (
        f"uses %{letter} ({what}), which the user chooses: {why}; use letters the user cannot choose (such as %u, %U,"
        " %j, %s, %t, %n) and fixed text"
    )


def test_user_chosen_letters_stay_allowed_in_runtime_commands_and_literal_in_paths():
    oci = parse_oci_conf(RUN_MODE + "ContainerPath=/scratch/%%Z/%u\nMountSpoolDir=/var/spool/%j\n")
    assert oci.container_path == "/scratch/%%Z/%u"
    assert parse_oci_conf('RunTimeRun="r %Z %r %b %@" RunTimeKill="k" RunTimeDelete="d"\n').runtime_run == "r %Z %r %b %@"
