import re

import pytest

from nodestepd.step.env import env_file_bytes, exclude_env, runtime_environment, validate_env_name


def test_exclude_env_none_keeps_everything_in_a_new_dict():
    env = {"A": "1", "B": "2"}
    out = exclude_env(env, None)
    assert out == {"A": "1", "B": "2"}
    assert out is not env


def test_exclude_env_matches_name_anchored_at_start_of_entry():
    env = {"SLURM_JOB_ID": "5", "MY_SLURM_X": "1", "PATH": "/bin"}
    assert exclude_env(env, re.compile(r"^SLURM_")) == {"MY_SLURM_X": "1", "PATH": "/bin"}


def test_exclude_env_search_is_unanchored_and_sees_the_value():
    env = {"TOKEN": "s3cret", "HOME": "/home/a", "OTHER": "x"}
    assert exclude_env(env, re.compile("cret")) == {"HOME": "/home/a", "OTHER": "x"}
    # The '=' is part of the text searched.
    assert exclude_env(env, re.compile("^HOME=/home")) == {"TOKEN": "s3cret", "OTHER": "x"}


def test_env_file_null():
    assert env_file_bytes({"A": "1", "B": "x\ny"}, "null") == b"A=1\0B=x\ny\0"


def test_env_file_newline_drops_multiline_values():
    assert env_file_bytes({"A": "1", "B": "x\ny", "C": ""}, "newline") == b"A=1\nC=\n"


def test_env_file_empty_env():
    assert env_file_bytes({}, "null") == b""


def test_env_file_keeps_undecodable_bytes():
    value = b"\xff\xfe".decode("utf-8", "surrogateescape")
    assert env_file_bytes({"X": value}, "null") == b"X=\xff\xfe\0"


def test_env_file_utf8():
    assert env_file_bytes({"X": "é"}, "newline") == b"X=\xc3\xa9\n"


@pytest.mark.parametrize("fmt", ["disabled", "true", "NULL", ""])
def test_env_file_other_formats_rejected(fmt):
    with pytest.raises(ValueError):
        env_file_bytes({"A": "1"}, fmt)


def test_env_file_rejects_bad_names_and_nul_values():
    with pytest.raises(ValueError):
        env_file_bytes({"A=B": "1"}, "null")
    with pytest.raises(ValueError):
        env_file_bytes({"A": "1\0"}, "null")


def test_runtime_environment_filters_then_sets_identity():
    daemon_env = {"PATH": "/usr/bin", "HOME": "/root", "USER": "root", "SECRET_KEY": "k", "LANG": "C"}
    out = runtime_environment(daemon_env, re.compile("^SECRET_"), user="alice", home="/home/alice", uid=1234)
    assert out == {
        "PATH": "/usr/bin",
        "HOME": "/home/alice",
        "USER": "alice",
        "LANG": "C",
        "LOGNAME": "alice",
        "XDG_RUNTIME_DIR": "/run/user/1234",
    }
    assert daemon_env["HOME"] == "/root"


def test_runtime_environment_identity_survives_a_regex_that_matches_it():
    out = runtime_environment({"HOME": "/root"}, re.compile("HOME|USER|XDG"), user="bob", home="/h/bob", uid=7)
    assert out == {"HOME": "/h/bob", "USER": "bob", "LOGNAME": "bob", "XDG_RUNTIME_DIR": "/run/user/7"}


def test_runtime_environment_without_regex():
    out = runtime_environment({"A": "1"}, None, user="u", home="/h", uid=0)
    assert out["A"] == "1"
    assert out["XDG_RUNTIME_DIR"] == "/run/user/0"


@pytest.mark.parametrize("name", ["", "A=B", "=", "A\0B"])
def test_validate_env_name_rejects(name):
    with pytest.raises(ValueError):
        validate_env_name(name)


@pytest.mark.parametrize("name", ["A", "_x1", "lower", "WITH SPACE", "a.b"])
def test_validate_env_name_accepts(name):
    assert validate_env_name(name) is None
