"""The doctor's new checks that need no root: image tool versions, the image cache's free
space, and stage hooks that cannot be used whoever owns them (tests/e2e/test_doctor.py
runs them all for real)."""

from __future__ import annotations

import os

import pytest

from nodestepd.config.settings import DaemonConfig
from nodestepd.ctl.checks import IMAGE_CACHE_MIN_FREE, Level, check_stage_hooks, image_cache_space
from nodestepd.ctl.probes import UMOCI_ZSTD, tool_version
from nodestepd.process.identity import Identity


@pytest.mark.parametrize("line, version", [
    ("umoci version 0.4.7+ds-3+b7", (0, 4)),
    ("umoci version v0.5.0", (0, 5)),
    ("skopeo version 1.9.3", (1, 9)),
    ("skopeo version 1.14.2 commit: abc", (1, 14)),
    ("umoci: unknown option", None),
    ("", None),
])
def test_tool_version(line, version):
    assert tool_version(line) == version


def test_umoci_gets_zstd_at_0_5():
    assert (0, 4) < UMOCI_ZSTD <= (0, 5) < (1, 0)


def test_image_cache_space():
    assert image_cache_space("/c", IMAGE_CACHE_MIN_FREE).level is Level.OK
    low = image_cache_space("/c", IMAGE_CACHE_MIN_FREE - 1)
    assert low.level is Level.WARN and low.fix == "free some space there, or set image_cache_dir to a larger file system."


def test_unset_stage_hooks_are_fine():
    me = Identity("someone", 4242, 4242, (), "/")
    checks = check_stage_hooks(DaemonConfig(), me)
    assert [(c.name, c.level, c.message) for c in checks] == [("stage_in", Level.OK, "not set"),
                                                             ("stage_out", Level.OK, "not set")]


