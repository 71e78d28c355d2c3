"""Daemon settings (config.py), the nodestepd command line, and the job id state file (state.py)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import re

import pytest

from conftest import NODESTEPD, RUNC_RUN_CONF, SYSTEM_PATH
from nodestepd import __version__
from nodestepd.config import settings as config_module
from nodestepd.config.settings import ConfigError, DaemonConfig, load_config
from nodestepd.daemon.jobids import FIRST_DAEMON_JOB_ID, JobIdAllocator

KNOWN = ("client_timeout, connection_max_lifetime, debug_timings, image_cache_dir, image_cache_max_bytes, image_import_timeout, image_imports_max, kill_wait, log_format, log_level, max_args_bytes, max_connections, max_connections_per_user, "
         "max_env_bytes, max_message_size, max_steps, max_steps_per_user, mpi_mounts, mpi_network_namespace, "
         "mpi_user_namespace, no_new_privs, node_name, oci_conf, operators, "
         "reattach_grace, results_max, results_max_age, results_max_per_user, runtime_timeout, slurm_conf, socket, spool_dir, stage_in, stage_out, state_dir, steps_on_stop")
EX_CONFIG = 78


@pytest.fixture(autouse=True)
def default_file(monkeypatch, tmp_path) -> Path:
    """The default settings file, moved somewhere it does not exist (tests may create it)."""
    path = tmp_path / "etc" / "nodestepd.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_FILE", str(path))
    return path


@pytest.fixture(autouse=True)
def hostname(monkeypatch, tmp_path) -> str:
    monkeypatch.setattr(config_module.socket, "gethostname", lambda: "node17.cluster.example")
    # This machine's own slurm.conf, if it has one, must not change the defaults tested here
    # (tests/unit/config/test_slurmconf.py tests that path).
    monkeypatch.setattr(config_module, "DEFAULT_SLURM_CONF", str(tmp_path / "no-slurm.conf"))
    return "node17"


def toml(tmp_path: Path, text: str, name: str = "nodestepd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- defaults, file, overrides -----------------------------------------------------------


def test_defaults_without_any_file():
    assert load_config(None, {}) == DaemonConfig(
        socket="/run/nodestepd/nodestepd.sock",
        oci_conf="/etc/slurm/oci.conf",
        spool_dir="/var/spool/nodestepd",
        state_dir="/var/lib/nodestepd",
        node_name="node17",  # the short host name
        kill_wait=30.0,
        runtime_timeout=60.0,
        log_format="auto",  # the journal when stderr is journald's, else console
        log_level="info",
        steps_on_stop="leave",
        config_file=None,
    )


def test_unset_overrides_are_ignored():
    overrides = {name: None for name in ("socket", "oci_conf", "spool_dir", "state_dir", "node_name", "kill_wait",
                                         "runtime_timeout", "log_format", "log_level", "steps_on_stop")}
    assert load_config(None, overrides) == load_config(None, {})


def test_values_from_toml(tmp_path):
    path = toml(tmp_path, """
        socket = "/run/x/x.sock"
        oci_conf = "/etc/x/oci.conf"
        spool_dir = "/var/spool/x"
        state_dir = "/var/lib/x"
        node_name = "cn042"
        kill_wait = 5
        runtime_timeout = 7
        log_format = "json"
        log_level = "debug"
    """.replace("\n        ", "\n"))
    config = load_config(path, {})
    assert config == DaemonConfig(
        socket="/run/x/x.sock", oci_conf="/etc/x/oci.conf", spool_dir="/var/spool/x", state_dir="/var/lib/x",
        node_name="cn042", kill_wait=5.0, runtime_timeout=7.0, log_format="json", log_level="debug", config_file=path,
    )
    assert type(config.kill_wait) is float and type(config.runtime_timeout) is float


def test_default_file_is_read_when_present(default_file):
    default_file.parent.mkdir()
    default_file.write_text('log_level = "warning"\nkill_wait = 2.5\n')
    config = load_config(None, {})
    assert (config.log_level, config.kill_wait, config.config_file) == ("warning", 2.5, str(default_file))


def test_command_line_overrides_win(tmp_path):
    path = toml(tmp_path, 'socket = "/run/a.sock"\nkill_wait = 5\nlog_format = "json"\nnode_name = "fromfile"\n')
    config = load_config(path, {"socket": "/run/b.sock", "kill_wait": 7.0, "log_format": None, "node_name": "fromcli"})
    assert (config.socket, config.kill_wait, config.log_format, config.node_name) == ("/run/b.sock", 7.0, "json", "fromcli")


def test_empty_node_name_means_the_short_host_name(tmp_path):
    assert load_config(toml(tmp_path, 'node_name = ""\n'), {}).node_name == "node17"


# ---- errors ---------------------------------------------------------------------------------


def test_unknown_setting(tmp_path):
    path = toml(tmp_path, 'socket = "/run/a.sock"\nspool = "/var/spool"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    assert str(e.value) == f"{path}: unknown setting 'spool' (known: {KNOWN})"


def test_tables_are_unknown_settings(tmp_path):
    path = toml(tmp_path, '[daemon]\nsocket = "/run/a.sock"\n')
    with pytest.raises(ConfigError, match=r"unknown setting 'daemon'"):
        load_config(path, {})


@pytest.mark.parametrize("name", ["socket", "oci_conf", "spool_dir", "state_dir"])
def test_relative_paths(tmp_path, name):
    path = toml(tmp_path, f'{name} = "relative/dir"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    assert str(e.value) == f"{path}: {name}: must be an absolute path, got 'relative/dir'"


def test_relative_path_from_the_command_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, {"spool_dir": "spool"})
    assert str(e.value) == "--spool-dir: spool_dir: must be an absolute path, got 'spool'"


def test_a_bad_command_line_value_is_not_blamed_on_a_missing_file(default_file):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"spool_dir": "spool"})
    assert str(default_file) not in str(e.value)


@pytest.mark.parametrize(
    "line, message",
    [
        # wrong types
        ("socket = 5", "socket: expected str, got int"),
        ('kill_wait = "30"', "kill_wait: expected int, got str"),
        ("kill_wait = true", "kill_wait: expected int, got bool"),
        ('log_level = ["info"]', "log_level: expected str, got list"),
        ("node_name = 1.5", "node_name: expected str, got float"),
        ("spool_dir = {path = '/x'}", "spool_dir: expected str, got dict"),
        # right types, unusable values
        ('log_format = "xml"', "log_format: must be one of auto, console, json, journal, got 'xml'"),
        ('log_format = "JSON"', "log_format: must be one of auto, console, json, journal, got 'JSON'"),
        ('log_level = "trace"', "log_level: must be debug, info, warning or error, got 'trace'"),
        ("kill_wait = 0", "kill_wait: must be between 0 and 3600 seconds, got 0.0"),
        ("kill_wait = -1", "kill_wait: must be between 0 and 3600 seconds, got -1.0"),
        ('steps_on_stop = "kill"', "steps_on_stop: must be 'leave' or 'cancel', got 'kill'"),
        ("kill_wait = 3600.5", "kill_wait: must be between 0 and 3600 seconds, got 3600.5"),
        ("kill_wait = nan", "kill_wait: must be between 0 and 3600 seconds, got nan"),
        ("kill_wait = inf", "kill_wait: must be between 0 and 3600 seconds, got inf"),
        ('runtime_timeout = "60"', "runtime_timeout: expected int, got str"),
        ("runtime_timeout = 0", "runtime_timeout: must be between 0 and 3600 seconds, got 0.0"),
        ("reattach_grace = 0.5", "reattach_grace: must be between 1 and 3600 seconds, got 0.5"),
        ("reattach_grace = nan", "reattach_grace: must be between 1 and 3600 seconds, got nan"),
        ('reattach_grace = "60"', "reattach_grace: expected int, got str"),
        ('node_name = "cn 1"', "node_name: 'cn 1' is not a usable node name"),
        ('node_name = "cn/1"', "node_name: 'cn/1' is not a usable node name"),
        ("results_max_age = 59", "results_max_age: must be between 60 and 31622400 seconds, got 59.0"),
        ("results_max_age = nan", "results_max_age: must be between 60 and 31622400 seconds, got nan"),
        ("results_max = 0", "results_max: must be between 1 and 100000, got 0"),
        ("results_max_per_user = 2000", "results_max_per_user: must not exceed results_max (1024)"),
    ],
)
def test_wrong_types_and_bad_values(tmp_path, line, message):
    path = toml(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    assert str(e.value) == f"{path}: {message}"


def test_results_retention_defaults():
    c = load_config(None, {})
    assert (c.results_max_age, c.results_max, c.results_max_per_user) == (86400.0, 1024, 256)


@pytest.mark.parametrize("kill_wait", [0.001, 3600])
def test_kill_wait_bounds_are_inclusive_above(tmp_path, kill_wait):
    assert load_config(toml(tmp_path, f"kill_wait = {kill_wait}\n"), {}).kill_wait == kill_wait


def test_invalid_toml(tmp_path):
    path = toml(tmp_path, 'socket = "/run/a.sock\n')
    with pytest.raises(ConfigError, match=rf"^{path}: invalid TOML: "):
        load_config(path, {})


def test_explicit_missing_file_is_an_error(tmp_path):
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    assert str(e.value) == f"{path}: no such file"


def test_default_missing_file_is_fine(default_file):
    assert not default_file.exists()
    assert load_config(None, {}).config_file is None


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(str(tmp_path), {})
    assert str(e.value) == f"{tmp_path}: cannot read: Is a directory"


# ---- the nodestepd command line ----------------------------------------------------------------


def run_nodestepd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    argv = [str(NODESTEPD), "--socket", str(tmp_path / "sock"), "--spool-dir", str(tmp_path / "spool"),
            "--state-dir", str(tmp_path / "state"), *args]
    return subprocess.run(argv, env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def test_help():
    result = subprocess.run([str(NODESTEPD), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: nodestepd ")
    for option in ("--config FILE", "--socket PATH", "--oci-conf FILE", "--spool-dir DIR", "--state-dir DIR",
                   "--node-name NAME", "--kill-wait SECONDS", "--log-format", "--log-level"):
        assert option in result.stdout


def test_version():
    result = subprocess.run([str(NODESTEPD), "--version"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"nodestepd {__version__}\n")


def test_invalid_oci_conf_exits_78_naming_the_problem(tmp_path):
    conf = tmp_path / "oci.conf"
    conf.write_text('RunTimeRun="runc run %q"\n')
    settings = toml(tmp_path, "")
    result = run_nodestepd(tmp_path, "--config", settings, "--oci-conf", str(conf))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "invalid oci.conf" in result.stderr
    assert f"{conf}:1: RunTimeRun: unknown replacement '%q'" in result.stderr
    assert "missing: RunTimeKill, RunTimeDelete" in result.stderr
    assert not (tmp_path / "sock").exists() and not (tmp_path / "state").exists()


def test_missing_oci_conf_exits_78(tmp_path):
    result = run_nodestepd(tmp_path, "--config", toml(tmp_path, ""), "--oci-conf", str(tmp_path / "none.conf"))
    assert result.returncode == EX_CONFIG, result.stderr
    assert f"{tmp_path}/none.conf: cannot read file: No such file or directory" in result.stderr


def test_missing_explicit_config_exits_78(tmp_path):
    result = run_nodestepd(tmp_path, "--config", str(tmp_path / "none.toml"))
    assert result.returncode == EX_CONFIG
    assert result.stderr == f"nodestepd: {tmp_path}/none.toml: no such file\n"


def test_bad_settings_file_exits_78(tmp_path):
    settings = toml(tmp_path, 'log_format = "xml"\n')
    result = run_nodestepd(tmp_path, "--config", settings)
    assert result.returncode == EX_CONFIG
    assert result.stderr == f"nodestepd: {settings}: log_format: must be one of auto, console, json, journal, got 'xml'\n"


def test_relative_directory_on_the_command_line_exits_78(tmp_path):
    result = run_nodestepd(tmp_path, "--config", toml(tmp_path, ""), "--spool-dir", "spool")
    assert result.returncode == EX_CONFIG
    assert "spool_dir: must be an absolute path, got 'spool'" in result.stderr


def test_corrupt_job_id_file_stops_the_daemon_with_the_reason(tmp_path):
    conf = tmp_path / "oci.conf"
    conf.write_text(RUNC_RUN_CONF)
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "next-job-id").write_text("garbage\n")
    result = run_nodestepd(tmp_path, "--config", toml(tmp_path, ""), "--oci-conf", str(conf))
    assert result.returncode == 1, result.stderr
    assert "cannot start" in result.stderr
    assert f"{tmp_path}/state/next-job-id: not a job id" in result.stderr
    assert not (tmp_path / "sock").exists()


# ---- JobIdAllocator ----------------------------------------------------------------------------


def test_job_ids_start_at_100000000(tmp_path):
    assert FIRST_DAEMON_JOB_ID == 100_000_000
    ids = JobIdAllocator(str(tmp_path))
    assert [ids.allocate() for _ in range(3)] == [100_000_000, 100_000_001, 100_000_002]
    assert (tmp_path / "next-job-id").read_text() == "100000003\n"
    assert sorted(os.listdir(tmp_path)) == ["next-job-id"]  # no temporary file left


def test_job_ids_persist_across_instances(tmp_path):
    assert JobIdAllocator(str(tmp_path)).allocate() == 100_000_000
    assert JobIdAllocator(str(tmp_path)).allocate() == 100_000_001
    again = JobIdAllocator(str(tmp_path))
    assert [again.allocate(), again.allocate()] == [100_000_002, 100_000_003]


@pytest.mark.parametrize("content, first", [("5\n", 100_000_000), ("123456789\n", 123_456_789), ("100000000", 100_000_000)])
def test_job_id_file_below_the_floor_is_raised_to_it(tmp_path, content, first):
    (tmp_path / "next-job-id").write_text(content)
    assert JobIdAllocator(str(tmp_path)).allocate() == first


@pytest.mark.parametrize("content", ["", "garbage\n", "1.5\n", "100000000 100000001\n"])
def test_corrupt_job_id_file(tmp_path, content):
    path = tmp_path / "next-job-id"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        JobIdAllocator(str(tmp_path))
    assert str(e.value) == f"{path}: not a job id; remove the file to start again at 100000000"
    assert path.read_text() == content  # left for the operator to look at


def test_job_ids_are_unique_across_threads(tmp_path):
    ids = JobIdAllocator(str(tmp_path))
    got: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(25):
            job_id = ids.allocate()
            with lock:
                got.append(job_id)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(100_000_000, 100_000_100))
    assert JobIdAllocator(str(tmp_path)).allocate() == 100_000_100


# ---- stage hooks ----------------------------------------------------------------------------


def test_stage_hooks_default_to_none_and_take_absolute_paths(tmp_path):
    assert (load_config(None, {}).stage_in, load_config(None, {}).stage_out) == ("", "")
    path = toml(tmp_path, 'stage_in = "/usr/local/libexec/stage-in"\nstage_out = ""\n')
    config = load_config(path, {})
    assert (config.stage_in, config.stage_out) == ("/usr/local/libexec/stage-in", "")


@pytest.mark.parametrize("name", ["stage_in", "stage_out"])
@pytest.mark.parametrize("value", ["stage-in", "./hooks/stage", "/a\\u0000b"])
def test_stage_hooks_must_be_absolute_paths(tmp_path, name, value):
    path = toml(tmp_path, f'{name} = "{value}"\n')
    with pytest.raises(ConfigError) as e:
        load_config(path, {})
    assert str(e.value).startswith(f"{path}: {name}: must be the absolute path of a program (or \"\" for none), got ")


def test_stage_hooks_are_strings(tmp_path):
    path = toml(tmp_path, 'stage_in = ["/bin/true"]\n')
    with pytest.raises(ConfigError, match="stage_in: expected str, got list"):
        load_config(path, {})


def test_mpi_settings(tmp_path):
    config = load_config(toml(tmp_path, 'mpi_mounts = ["/dev/shm", "pmix-server-dir", "/scratch"]\n'
                                        'mpi_user_namespace = "never"\nmpi_network_namespace = "warn"\n'), {})
    assert (config.mpi_mounts, config.mpi_user_namespace, config.mpi_network_namespace) == (
        ("/dev/shm", "pmix-server-dir", "/scratch"), "never", "warn")
    assert load_config(None, {}).mpi_mounts == ("/dev/shm", "pmix-server-dir", "pmix-app-dir")


@pytest.mark.parametrize("text, message", [
    ('mpi_mounts = ["scratch"]', "mpi_mounts: 'scratch' is neither a normalised absolute path nor one of "
                                 "pmix-server-dir, pmix-app-dir"),
    ('mpi_mounts = ["/a/../b"]', "mpi_mounts: '/a/../b' is neither"),
    ('mpi_user_namespace = "always"', "mpi_user_namespace: must be 'auto' or 'never', got 'always'"),
    ('mpi_network_namespace = "drop"', "mpi_network_namespace: must be 'refuse' or 'warn', got 'drop'"),
])
def test_bad_mpi_settings(tmp_path, text, message):
    path = toml(tmp_path, text + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, {})
