"""The rewritten OCI config.json: pure functions on the parsed JSON object."""

from __future__ import annotations

import copy
import json
import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from nodestepd.protocol.wire import MAX_JSON_DEPTH, json_too_deep
from nodestepd.step.env import validate_env_name

__all__ = ["BundleConfigError", "config_json_bytes", "parse_bundle_config", "rewrite_config", "rootfs_path"]


class BundleConfigError(Exception):
    """The bundle's config.json cannot be used."""


def _config_path(bundle: str) -> str:
    return os.path.join(bundle, "config.json")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_bundle_config(text: str, bundle: str) -> dict:
    """Parse the bundle's config.json text; it must hold a JSON object."""
    if json_too_deep(text):  # before json.loads recurses once per level
        raise BundleConfigError(f"{_config_path(bundle)} nests arrays and objects more than {MAX_JSON_DEPTH} "
                                "levels deep")
    try:
        # NaN/Infinity are Python extensions to JSON: the runtime would reject them later.
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise BundleConfigError(
            f"{_config_path(bundle)} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise BundleConfigError(f"{_config_path(bundle)} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BundleConfigError(
            f"{_config_path(bundle)} must hold a JSON object, not {_json_type(value)}"
        )
    return value


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if value is None:
        return "null"
    return "an object"


def rootfs_path(config: dict | None, bundle: str) -> str:
    """root.path made absolute against the bundle; the bundle itself when config.json is ignored."""
    if not bundle.startswith("/"):
        raise BundleConfigError(f"bundle path {bundle!r} is not absolute")
    if config is None:
        return _normpath(bundle)
    root = config.get("root")
    if not isinstance(root, dict) or "path" not in root:
        raise BundleConfigError(f"{_config_path(bundle)} has no root.path")
    path = root["path"]
    if not isinstance(path, str) or not path:
        raise BundleConfigError(f"{_config_path(bundle)} has a root.path that is not a non-empty string")
    # Lexical, like the OCI runtimes themselves join root.path to the bundle.
    return _normpath(posixpath.join(bundle, path))


def _normpath(path: str) -> str:
    # posixpath.normpath keeps a leading "//" (POSIX leaves it implementation-defined).
    return "/" + posixpath.normpath(path).lstrip("/")


def rewrite_config(
    config: dict,
    *,
    bundle: str,
    terminal: bool,
    args: Sequence[str],
    step_env: Mapping[str, str],
    mount_spool: tuple[str, str] | None,
    disable_hooks: Iterable[str],
) -> dict:
    """A new config for the task spool dir; `config` itself is left untouched.

    step_env must already have EnvExclude applied.
    """
    new = copy.deepcopy(config)
    where = _config_path(bundle)

    process = new.get("process")
    if not isinstance(process, dict):
        raise BundleConfigError(f"{where} has no \"process\" object")
    process["terminal"] = bool(terminal)

    new["root"]["path"] = rootfs_path(new, bundle)

    if mount_spool is not None:
        source, destination = mount_spool
        mounts = new.setdefault("mounts", [])
        if not isinstance(mounts, list):
            raise BundleConfigError(f"{where} has a \"mounts\" value that is not an array")
        mounts.append({"destination": destination, "type": "bind", "source": source, "options": ["rbind", "rw"]})

    hooks = new.get("hooks")
    if hooks is not None:
        if not isinstance(hooks, dict):
            raise BundleConfigError(f"{where} has a \"hooks\" value that is not an object")
        for hook_type in disable_hooks:
            # Tolerate "prestart, createRuntime": a silently kept hook would be worse.
            hooks.pop(hook_type.strip(), None)
        if not hooks:
            del new["hooks"]

    process["env"] = _merge_env(process.get("env", []), step_env, where)

    if args:
        process["args"] = list(args)
    return new


def _merge_env(bundle_env: object, step_env: Mapping[str, str], where: str) -> list[str]:
    if not isinstance(bundle_env, list) or not all(isinstance(e, str) for e in bundle_env):
        raise BundleConfigError(f"{where} has a process.env that is not an array of strings")
    for name in step_env:
        validate_env_name(name)
    merged: list[str] = []
    replaced: set[str] = set()
    for entry in bundle_env:
        name, sep, _ = entry.partition("=")
        if sep and name in step_env:
            # Every occurrence is replaced, so no stale duplicate of the bundle's value survives.
            merged.append(f"{name}={step_env[name]}")
            replaced.add(name)
        else:
            merged.append(entry)
    merged.extend(f"{name}={value}" for name, value in step_env.items() if name not in replaced)
    return merged


def config_json_bytes(config: dict) -> bytes:
    """Serialise a config for writing: one line of ASCII JSON with a trailing newline."""
    return json.dumps(config, allow_nan=False).encode("ascii") + b"\n"
