"""image/launch.py: the command and the config.json an imported image gives a step, pure."""

from __future__ import annotations

import json

import pytest

from nodestepd.image.cache import ImageEntry
from nodestepd.image.launch import ImageOptions, apply_image, command_for, image_config
from nodestepd.process.identity import Identity
from nodestepd.step.spec import LaunchFailed, LaunchInput, StepSpec

UMOCI_CONFIG = json.dumps({
    "ociVersion": "1.0.0", "root": {"path": "rootfs"},
    "process": {"terminal": True, "args": ["/bin/echo", "hi"], "env": ["PATH=/bin", "FOO=bar"], "cwd": "/work"},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "linux": {"uidMappings": [{"containerID": 0, "hostID": 1000, "size": 1}]},
})
ENTRY = ImageEntry("sha256:ab", "/cache/1000/sha256-ab", UMOCI_CONFIG, ("/bin/echo",), ("hi",))


def options(command=(), entrypoint=None, workdir=None, mounts=()) -> ImageOptions:
    return ImageOptions("docker-archive:/x.tar", tuple(command), entrypoint, workdir, tuple(mounts))


@pytest.mark.parametrize("command, entrypoint, args", [
    ((), None, ("/bin/echo", "hi")),  # Entrypoint + Cmd
    (("ls", "-l"), None, ("ls", "-l")),  # a command runs as given (pyxis)
    (("x",), "/bin/env", ("/bin/env", "x")),  # --entrypoint, then the command
    ((), "/bin/pwd", ("/bin/pwd",)),  # --entrypoint replaces the Entrypoint, and the Cmd goes with it
    (("true",), "", ("true",)),
])
def test_the_command(command, entrypoint, args):
    assert command_for(ENTRY, options(command, entrypoint)) == args


def test_an_image_without_entrypoint_or_cmd_needs_a_command():
    bare = ImageEntry("sha256:ab", "/c", UMOCI_CONFIG, None, None)
    with pytest.raises(LaunchFailed, match="has no Entrypoint or Cmd: give a command"):
        command_for(bare, options())
    with pytest.raises(LaunchFailed):
        command_for(ENTRY, options(entrypoint=""))


def test_the_config_read_only_root_tmpfs_binds_and_workdir():
    config = json.loads(image_config(ENTRY, options(mounts=[("/home/u/data", "/data", True), ("/scratch", "/s", False)]),
                                     ["sh"]))
    assert config["root"] == {"path": "rootfs", "readonly": True}
    assert config["process"]["args"] == ["sh"] and config["process"]["cwd"] == "/work"
    assert config["process"]["env"] == ["PATH=/bin", "FOO=bar"]
    assert config["linux"]["uidMappings"][0]["hostID"] == 1000
    assert [m["destination"] for m in config["mounts"]] == ["/proc", "/tmp", "/data", "/s"]
    assert config["mounts"][2] == {"destination": "/data", "type": "bind", "source": "/home/u/data",
                                   "options": ["rbind", "ro"]}
    assert config["mounts"][3]["options"] == ["rbind", "rw"]
    workdir = json.loads(image_config(ENTRY, options(workdir="/data", mounts=[("/h", "/tmp", False)]), ["sh"]))
    assert workdir["process"]["cwd"] == "/data"
    assert [m["destination"] for m in workdir["mounts"]] == ["/proc", "/tmp"]  # the user's /tmp, no tmpfs


def test_a_broken_generated_config_is_a_launch_failure():
    for text in ("[", "[]", json.dumps({"process": {}})):
        with pytest.raises(LaunchFailed, match="config.json generated for image"):
            image_config(ImageEntry("d", "/b", text, None, None), options(), ["sh"])


def test_apply_image_makes_the_entry_the_bundle():
    spec = StepSpec(job_id=1, step_id=0, ntasks=1, identity=Identity("u", 1000, 1000, (1000,), "/home/u"),
                    bundle="", args=(), workdir="/", attached=True)
    given = LaunchInput({}, False, None, None)
    new_spec, new_given = apply_image(spec, given, ENTRY, options(), ignore_config_json=False)
    assert (new_spec.bundle, new_spec.args) == ("/cache/1000/sha256-ab", ("/bin/echo", "hi"))
    assert json.loads(new_given.config_json)["root"]["readonly"] is True
    ignored, same = apply_image(spec, given, ENTRY, options(), ignore_config_json=True)
    assert ignored.bundle == "/cache/1000/sha256-ab/rootfs" and same is given  # %r is the rootfs (ch-run)
