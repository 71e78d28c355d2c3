"""What an imported image makes of a launch, as pure functions: the command, the bundle
(the cache entry), and the config.json the step is prepared from, as a `--bundle` step's.

The image's rootfs is shared by every step that runs it, so the container gets it
read-only, with a tmpfs on /tmp; the user's --mount binds are added, and the working
directory is --workdir, else the image's WorkingDir, else /.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

from nodestepd.image.cache import ImageEntry
from nodestepd.step.spec import LaunchFailed, LaunchInput, StepSpec

TMP_MOUNT = {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777"]}


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """The image step's own options, from the request (checked by admission)."""

    ref: str
    command: tuple[str, ...]  # empty: the image's Entrypoint and Cmd
    entrypoint: str | None  # None: the image's; "": none
    workdir: str | None
    mounts: tuple[tuple[str, str, bool], ...]  # (source, destination, readonly)


def command_for(entry: ImageEntry, options: ImageOptions) -> tuple[str, ...]:
    """The container's argv. A command given runs as given (as with pyxis), after --entrypoint
    when one is given; without one, the entrypoint (--entrypoint's or the image's) and,
    unless --entrypoint replaced the image's, the image's Cmd (as docker run)."""
    override = None if options.entrypoint is None else ((options.entrypoint,) if options.entrypoint else ())
    if options.command:
        args = (override or ()) + options.command
    elif override is not None:
        args = override
    else:
        args = (entry.entrypoint or ()) + (entry.cmd or ())
    if not args:
        raise LaunchFailed(f"image {options.ref} has no Entrypoint or Cmd: give a command to run")
    return args


def image_config(entry: ImageEntry, options: ImageOptions, args: Sequence[str]) -> str:
    """The bundle config.json text for the step: umoci's rootless one, with args, cwd, a
    read-only root, a tmpfs /tmp and the user's binds."""
    try:
        config = json.loads(entry.config_json)
    except (ValueError, RecursionError):
        raise LaunchFailed(f"the config.json generated for image {options.ref} is not valid JSON") from None
    if not isinstance(config, dict) or not isinstance(config.get("process"), dict) \
            or not isinstance(config.get("root"), dict):
        raise LaunchFailed(f"the config.json generated for image {options.ref} has no process or root")
    process = config["process"]
    process["args"] = list(args)
    cwd = options.workdir or process.get("cwd") or "/"
    process["cwd"] = cwd if isinstance(cwd, str) and cwd.startswith("/") else "/"
    config["root"]["readonly"] = True
    mounts = config.get("mounts")
    if not isinstance(mounts, list):
        mounts = config["mounts"] = []
    taken = {m.get("destination") for m in mounts if isinstance(m, dict)}
    if "/tmp" not in taken and all(os.path.normpath(d) != "/tmp" for _, d, _ in options.mounts):
        mounts.append(dict(TMP_MOUNT, options=list(TMP_MOUNT["options"])))
    for source, destination, readonly in options.mounts:
        mounts.append({"destination": destination, "type": "bind", "source": source,
                       "options": ["rbind", "ro" if readonly else "rw"]})
    return json.dumps(config)


def apply_image(spec: StepSpec, given: LaunchInput, entry: ImageEntry, options: ImageOptions, *,
                ignore_config_json: bool) -> tuple[StepSpec, LaunchInput]:
    """The step's spec and launch input once its image is there: the bundle is the cache
    entry (its rootfs where the site ignores config.json: %r is then the bundle)."""
    args = command_for(entry, options)
    if ignore_config_json:
        return dataclasses.replace(spec, bundle=os.path.join(entry.bundle, "rootfs"), args=args), given
    text = image_config(entry, options, args)
    return (dataclasses.replace(spec, bundle=entry.bundle, args=args),
            dataclasses.replace(given, config_json=text, config_json_error=None))
