"""Fixtures for tests that drive the daemon's process code on uvloop, as the daemon runs it
(uvloop owns SIGCHLD and reaps only what libuv spawned). Import them into a test module:

    from uvloop_fixtures import event_loop_policy, identity, on_uvloop  # noqa: F401 (fixtures)

Overriding pytest-asyncio's event_loop_policy is deprecated there but still the way to
choose the loop: such modules filter that warning.
"""

import asyncio

import pytest
import uvloop

from nodestepd.process.identity import Identity

OVERRIDE_WARNING = 'ignore:Overriding the "event_loop_policy" fixture is deprecated:pytest.PytestDeprecationWarning'


@pytest.fixture(scope="module")
def event_loop_policy():
    return uvloop.EventLoopPolicy()


@pytest.fixture(autouse=True)
async def on_uvloop():
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.fixture
def identity(user) -> Identity:
    return Identity.for_uid(user.uid)
