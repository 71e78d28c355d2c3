"""authz.py: who may act on whose steps (pure functions; end to end in test_security.py)."""

from __future__ import annotations

import pwd

import pytest

from nodestepd.daemon.authz import Policy, parse_user
from passwd_stub import passwd


def test_policy():
    policy = Policy(frozenset({0, 500}))
    assert policy.may_act_on(1000, 1000) and policy.may_launch_as(1000, 1000)
    assert not policy.may_act_on(1001, 1000) and not policy.may_launch_as(1001, 1000)
    assert policy.may_act_on(500, 1000) and policy.may_launch_as(500, 1000)
    assert policy.may_act_on(0, 1000) and policy.may_launch_as(0, 0)


@pytest.mark.parametrize("text, result", [("alice", 1000), ("0", 0), ("4294967294", 4294967294)])
def test_parse_user(text, result):
    assert parse_user(text, passwd({"alice": 1000})) == result


@pytest.mark.parametrize("text, message", [
    ("bob", "no user 'bob' on this node"),
    ("4294967295", "uid 4294967295 is out of range"),
    ("", "'' is not a user name or uid"),
    ("a\0b", "'a\\x00b' is not a user name or uid"),
    ("١٢", "no user '١٢' on this node"),  # Arabic-Indic digits are not a uid
    ("\ud800", "no user '\\ud800' on this node"),
])
def test_parse_user_refuses(text, message):
    with pytest.raises(ValueError) as e:
        parse_user(text, pwd.getpwnam if text == "\ud800" else passwd({}))
    assert str(e.value) == message
