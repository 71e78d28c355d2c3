import copy
import json

import pytest

from nodestepd.step.configjson import (
    BundleConfigError,
    config_json_bytes,
    parse_bundle_config,
    rewrite_config,
    rootfs_path,
)

BUNDLE = "/home/alice/bundle"


def sample_config() -> dict:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": True,
            "args": ["sh"],
            "env": ["PATH=/usr/bin:/bin", "TERM=xterm", "NOEQUALS", "LANG=C"],
            "cwd": "/",
        },
        "root": {"path": "rootfs", "readonly": True},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "hooks": {
            "prestart": [{"path": "/usr/bin/nvidia-hook"}],
            "createRuntime": [{"path": "/bin/true"}],
        },
    }


def rewrite(config: dict, **overrides) -> dict:
    kwargs = dict(
        bundle=BUNDLE,
        terminal=False,
        args=[],
        step_env={},
        mount_spool=None,
        disable_hooks=[],
    )
    kwargs.update(overrides)
    return rewrite_config(config, **kwargs)


# --- parse_bundle_config ---


def test_parse_object():
    assert parse_bundle_config('{"a": [1, 2]}', BUNDLE) == {"a": [1, 2]}


def test_parse_invalid_json_names_path_and_position():
    with pytest.raises(BundleConfigError) as e:
        parse_bundle_config('{\n  "a": 1,\n  oops\n}', BUNDLE)
    msg = str(e.value)
    assert "/home/alice/bundle/config.json" in msg
    assert "line 3 column 3" in msg


def test_parse_empty_text():
    with pytest.raises(BundleConfigError, match=r"config.json is not valid JSON.*line 1 column 1"):
        parse_bundle_config("", BUNDLE)


@pytest.mark.parametrize("text,kind", [("[]", "an array"), ('"x"', "a string"), ("3", "a number"), ("null", "null")])
def test_parse_non_object(text, kind):
    with pytest.raises(BundleConfigError, match=f"must hold a JSON object, not {kind}"):
        parse_bundle_config(text, BUNDLE)


def test_parse_rejects_nan():
    with pytest.raises(BundleConfigError, match="NaN"):
        parse_bundle_config('{"a": NaN}', BUNDLE)


# --- rootfs_path ---


@pytest.mark.parametrize(
    "path,expected",
    [
        ("rootfs", "/home/alice/bundle/rootfs"),
        ("./rootfs/", "/home/alice/bundle/rootfs"),
        ("../images/r", "/home/alice/images/r"),
        ("/srv/images/r", "/srv/images/r"),
        ("//srv//r/.", "/srv/r"),
    ],
)
def test_rootfs_path(path, expected):
    assert rootfs_path({"root": {"path": path}}, BUNDLE) == expected


def test_rootfs_path_ignored_config_is_the_bundle():
    assert rootfs_path(None, "/home/alice/bundle/") == "/home/alice/bundle"


@pytest.mark.parametrize("config", [{}, {"root": {}}, {"root": "rootfs"}, {"root": {"path": ""}}, {"root": {"path": 3}}])
def test_rootfs_path_missing(config):
    with pytest.raises(BundleConfigError, match="/home/alice/bundle/config.json"):
        rootfs_path(config, BUNDLE)


def test_rootfs_path_relative_bundle():
    with pytest.raises(BundleConfigError, match="not absolute"):
        rootfs_path({"root": {"path": "rootfs"}}, "bundle")


# --- rewrite_config ---


def test_rewrite_leaves_input_untouched():
    config = sample_config()
    before = copy.deepcopy(config)
    out = rewrite(
        config,
        terminal=False,
        args=["echo", "hi"],
        step_env={"TERM": "dumb", "NEW": "1"},
        mount_spool=("/var/spool/nodestepd/oci-job1-0", "/spool"),
        disable_hooks=["prestart", "createRuntime"],
    )
    assert config == before
    assert out is not config
    # Nested containers are copies too.
    out["process"]["env"].append("X=1")
    out["mounts"].append({})
    assert config == before


def test_rewrite_full():
    out = rewrite(
        sample_config(),
        terminal=False,
        args=["echo", "it's"],
        step_env={"TERM": "dumb", "SLURM_JOB_ID": "1", "NOEQUALS": "v"},
        mount_spool=("/var/spool/nodestepd/oci-job1-0", "/run/spool"),
        disable_hooks=["prestart"],
    )
    assert out == {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "args": ["echo", "it's"],
            "env": ["PATH=/usr/bin:/bin", "TERM=dumb", "NOEQUALS", "LANG=C", "SLURM_JOB_ID=1", "NOEQUALS=v"],
            "cwd": "/",
        },
        "root": {"path": "/home/alice/bundle/rootfs", "readonly": True},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/run/spool",
                "type": "bind",
                "source": "/var/spool/nodestepd/oci-job1-0",
                "options": ["rbind", "rw"],
            },
        ],
        "hooks": {"createRuntime": [{"path": "/bin/true"}]},
    }


def test_rewrite_terminal_true_and_args_empty_keeps_bundle_args():
    out = rewrite(sample_config(), terminal=True, args=())
    assert out["process"]["terminal"] is True
    assert out["process"]["args"] == ["sh"]


def test_rewrite_terminal_added_when_missing():
    config = {"process": {"args": ["x"]}, "root": {"path": "/r"}}
    out = rewrite(config, terminal=False)
    assert out["process"] == {"args": ["x"], "terminal": False, "env": []}


def test_rewrite_disabling_all_hooks_removes_hooks_key():
    out = rewrite(sample_config(), disable_hooks=["prestart", " createRuntime", "poststop"])
    assert "hooks" not in out


def test_rewrite_no_hooks_in_bundle():
    config = sample_config()
    del config["hooks"]
    out = rewrite(config, disable_hooks=["prestart"])
    assert "hooks" not in out


def test_rewrite_hook_names_are_case_sensitive():
    out = rewrite(sample_config(), disable_hooks=["PRESTART"])
    assert sorted(out["hooks"]) == ["createRuntime", "prestart"]


def test_rewrite_mount_without_existing_mounts():
    config = sample_config()
    del config["mounts"]
    out = rewrite(config, mount_spool=("/s/oci-job2-3", "/spool"))
    assert out["mounts"] == [{"destination": "/spool", "type": "bind", "source": "/s/oci-job2-3", "options": ["rbind", "rw"]}]


def test_rewrite_no_mount_leaves_mounts_alone():
    out = rewrite(sample_config())
    assert out["mounts"] == [{"destination": "/proc", "type": "proc", "source": "proc"}]


def test_rewrite_env_duplicates_all_replaced_and_missing_env():
    config = sample_config()
    config["process"]["env"] = ["A=1", "B=2", "A=3"]
    out = rewrite(config, step_env={"A": "x", "C": "y", "B": "z"})
    assert out["process"]["env"] == ["A=x", "B=z", "A=x", "C=y"]
    del config["process"]["env"]
    out = rewrite(config, step_env={"B": "1", "A": "2"})
    assert out["process"]["env"] == ["B=1", "A=2"]


def test_rewrite_env_value_with_equals():
    config = sample_config()
    config["process"]["env"] = ["OPTS=a=b"]
    out = rewrite(config, step_env={"OPTS": "c=d"})
    assert out["process"]["env"] == ["OPTS=c=d"]


def test_rewrite_missing_process():
    config = sample_config()
    del config["process"]
    with pytest.raises(BundleConfigError, match=r'/home/alice/bundle/config.json has no "process" object'):
        rewrite(config)


def test_rewrite_missing_root_path():
    config = sample_config()
    del config["root"]
    with pytest.raises(BundleConfigError, match="root.path"):
        rewrite(config)


def test_rewrite_bad_env_types():
    config = sample_config()
    config["process"]["env"] = "A=1"
    with pytest.raises(BundleConfigError, match="process.env"):
        rewrite(config)
    config["process"]["env"] = ["A=1", 2]
    with pytest.raises(BundleConfigError, match="process.env"):
        rewrite(config)


def test_rewrite_bad_step_env_name():
    with pytest.raises(ValueError):
        rewrite(sample_config(), step_env={"A=B": "1"})


# --- config_json_bytes ---


def test_config_json_bytes_round_trip():
    config = rewrite(sample_config(), step_env={"U": "é\n"})
    data = config_json_bytes(config)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    data.decode("ascii")
    assert json.loads(data) == config


def test_config_json_bytes_exact():
    assert config_json_bytes({"a": [1, "b"]}) == b'{"a": [1, "b"]}\n'


def test_config_json_bytes_rejects_nan():
    with pytest.raises(ValueError):
        config_json_bytes({"a": float("nan")})


def test_config_json_nested_too_deep_is_refused_before_parsing():
    with pytest.raises(BundleConfigError, match=f"^{BUNDLE}/config.json nests arrays and objects more than 64 levels deep$"):
        parse_bundle_config('{"a":' * 100_000 + "1" + "}" * 100_000, BUNDLE)
