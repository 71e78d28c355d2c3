"""The `operators` setting: resolved to uids, every bad entry refused with a sentence."""

from __future__ import annotations

import pytest
from passwd_stub import passwd

from nodestepd.config.settings import resolve_operators


def test_default_operators_are_root_and_slurm_when_it_exists():
    assert resolve_operators(None, passwd({"root": 0, "slurm": 64030})) == {0, 64030}
    assert resolve_operators(None, passwd({"root": 0})) == {0}


def test_explicit_operators_replace_the_default():
    assert resolve_operators(["alice", 4242], passwd({"alice": 1000, "slurm": 64030})) == {1000, 4242}
    assert resolve_operators([], passwd({})) == frozenset()  # nobody, not even root


@pytest.mark.parametrize("entries, message", [
    (["bob"], "no user 'bob' on this node"),
    ([-1], "uid -1 is out of range"),
    ([2**32], "uid 4294967296 is out of range"),
    ([True], "True is neither a user name nor a uid"),
    ([1.5], "1.5 is neither a user name nor a uid"),
])
def test_bad_operator_entries(entries, message):
    with pytest.raises(ValueError) as e:
        resolve_operators(entries, passwd({}))
    assert str(e.value) == message
