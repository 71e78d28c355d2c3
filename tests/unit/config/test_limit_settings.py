"""The limit and security settings: bounds, types and defaults from TOML (the daemon's side is tests/e2e/test_limits.py)."""

from __future__ import annotations

import pytest

from nodestepd.config.settings import ConfigError, load_config


@pytest.mark.parametrize("line, message", [
    ("max_connections = 0", "max_connections: must be between 1 and 1000000, got 0"),
    ("max_message_size = 100", "max_message_size: must be between 4096 and 16777216, got 100"),
    ("max_args_bytes = 200000", "max_args_bytes: must be between 256 and 98304, got 200000"),
    ("max_steps = 10\nmax_steps_per_user = 20", "max_steps_per_user: must not exceed max_steps (10)"),
    ("max_connections_per_user = 0", "max_connections_per_user: must be between 1 and 1000000, got 0"),
    ("client_timeout = 0", "client_timeout: must be between 0.1 and 3600 seconds, got 0.0"),
    ("connection_max_lifetime = 0.5", "connection_max_lifetime: must be between 1 and 86400 seconds, got 0.5"),
    ("connection_max_lifetime = 100000", "connection_max_lifetime: must be between 1 and 86400 seconds, got 100000.0"),
    ("operators = [-1]", "operators: uid -1 is out of range"),
    ("operators = [true]", "operators: True is neither a user name nor a uid"),
    ("no_new_privs = 1", "no_new_privs: expected bool, got int"),
    ("max_steps = 1.5", "max_steps: expected int, got float"),
])
def test_bad_limit_settings_are_config_errors(tmp_path, line, message):
    path = tmp_path / "n.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), {})
    assert str(e.value) == f"{path}: {message}"


def test_limit_settings_from_toml(tmp_path):
    path = tmp_path / "n.toml"
    path.write_text('operators = ["root", 4242]\nno_new_privs = false\nmax_connections = 10\nclient_timeout = 2\n')
    config = load_config(str(path), {"node_name": "n1"})
    assert (config.operators, config.no_new_privs, config.max_connections, config.client_timeout) == (
        ("root", 4242), False, 10, 2.0)
