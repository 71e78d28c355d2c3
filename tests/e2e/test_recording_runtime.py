"""End to end with a recording runtime: what exactly the daemon hands to the RunTime* commands.

The oci.conf's RunTimeRun, RunTimeKill and RunTimeDelete call tests/runtimes/record.py,
which writes a JSON record of its argv, identity, cwd, environment, the config.json and
environment file it is pointed at, and the spool dirs' ownership, then exits with a code
chosen on its command line. Everything goes through the real daemon and the real client.
Job ids 1000-1999 belong to this file.
"""

from __future__ import annotations

import base64
import grp
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, SYSTEM_PATH, read_line_from, spool_entries

REC = REPO / "tests" / "runtimes" / "record.py"
SUPPLEMENTARY_GROUP = "nsdtestsupp"

# Every replacement, one word each (none of the values used here contains a blank), then
# "@" and %@ last. "%%t" must stay the literal text "%t": "%%" is never half of another pair.
REPLACEMENTS = "pct=%% lit=%%t b=%b e=%e j=%j m=%m n=%n p=%p r=%r s=%s t=%t u=%u U=%U Z=%Z"
INSPECT = "--bundle %b --env-file %e --step-dir %m"


def oci_conf(out: Path, *, run: str = "", kill: str = "--killpg %p", delete: str = "", extra: str = "") -> str:
    """An oci.conf whose RunTimeRun/Kill/Delete record into out/{run,kill,delete}-TASK.json."""
    lines = [
        f'RunTimeRun="{REC} --out {out}/run-%t.json {INSPECT} {run} -- {REPLACEMENTS} @ %@"',
        f'RunTimeKill="{REC} --out {out}/kill-%t.json --proc %p {INSPECT} {kill} -- {REPLACEMENTS}"',
        f'RunTimeDelete="{REC} --out {out}/delete-%t.json --proc %p {INSPECT} {delete} -- {REPLACEMENTS}"',
        *extra.strip().splitlines(),
    ]
    return "\n".join(line.strip() for line in lines) + "\n"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def records(out: Path) -> list[str]:
    return sorted(name for name in os.listdir(out) if not name.startswith("."))


def replacements(record: dict) -> tuple[dict[str, str], list[str]]:
    """(the NAME=value words before "@", the %@ arguments after it) of a record's REST."""
    rest = record["rest"]
    cut = rest.index("@") if "@" in rest else len(rest)
    values = dict(word.split("=", 1) for word in rest[:cut])
    return values, rest[cut + 1:]


def env_file_bytes(record: dict) -> bytes | None:
    info = record["env_file"]
    return base64.b64decode(info["raw_b64"]) if info["exists"] else None


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def recorder_is_usable_by_everyone():
    st = REC.stat()
    assert st.st_mode & 0o555 == 0o555, f"{REC} must be readable and executable by all (chmod 755)"
    assert REC.read_text().startswith("#!/usr/bin/python3\n")


@pytest.fixture(scope="session")
def supplementary_group(user) -> int:
    """Give the test user a supplementary group, so the groups check means something."""
    created = added = False
    try:
        gid = grp.getgrnam(SUPPLEMENTARY_GROUP).gr_gid
    except KeyError:
        subprocess.run(["groupadd", SUPPLEMENTARY_GROUP], check=True)
        created = True
        gid = grp.getgrnam(SUPPLEMENTARY_GROUP).gr_gid
    if user.name not in grp.getgrnam(SUPPLEMENTARY_GROUP).gr_mem:
        subprocess.run(["gpasswd", "-a", user.name, SUPPLEMENTARY_GROUP], check=True, capture_output=True)
        added = True
    yield gid
    if added:
        subprocess.run(["gpasswd", "-d", user.name, SUPPLEMENTARY_GROUP], check=False, capture_output=True)
    if created:
        subprocess.run(["groupdel", SUPPLEMENTARY_GROUP], check=False)


@pytest.fixture
def out(user_dir) -> Path:
    """Where record.py writes: owned by the test user (the runtime runs as that user)."""
    return user_dir("records-")


@pytest.fixture
def scratch(new_dir) -> Path:
    """A root-owned, world-traversable dir for ContainerPath and %Z."""
    return new_dir("scratch-")


def plain_bundle(path: Path, owner, config: dict | None) -> Path:
    """A bundle for the recording runtime: an empty rootfs and (optionally) the given config.json."""
    (path / "rootfs").mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    for p in (path, path / "rootfs", *path.glob("*.json")):
        os.chown(p, owner.uid, owner.gid)
    return path


BUNDLE_CONFIG = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": True,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": ["PATH=/bundle/bin", "BUNDLE_ONLY=1", "OVERRIDE=bundle"],
        "cwd": "/",
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "bundle-host",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
    ],
    "hooks": {
        "prestart": [{"path": "/bin/true", "args": ["true", "prestart"]}],
        "createRuntime": [{"path": "/bin/true", "args": ["true", "createRuntime"]}],
        "createContainer": [{"path": "/bin/true", "args": ["true", "createContainer"]}],
        "poststop": [{"path": "/bin/true", "args": ["true", "poststop"]}],
    },
    "linux": {"namespaces": [{"type": "mount"}, {"type": "user"}], "uidMappings": [{"containerID": 0, "hostID": 4242, "size": 1}]},
    "annotations": {"org.example.keep": "yes"},
}


# ---- replacements, identity, environment of the runtime ------------------------------


def test_every_replacement_in_run_kill_and_delete(start_daemon, user, bundle, out, scratch):
    """Run sees %p as its shell's $$; Kill and Delete (from cancel) see that same pid as a number."""
    daemon = start_daemon(oci_conf(out, run="--say recorded-%t --block", extra="CreateEnvFile=null"))
    chdir = scratch / "step-cwd"
    chdir.mkdir()
    client = daemon.ctl_popen(user, "run", "--job-id", "1001", "--step-id", "7", "--chdir", str(chdir),
                              "--bundle", str(bundle), "--", "the-command", "its arg")
    read_line_from(client.stdout, b"recorded-0")
    run = load(out / "run-0.json")
    step_dir = os.path.join(os.path.realpath(daemon.spool_dir), f"oci-job1001-7-uid{user.uid}")
    task_dir = os.path.join(step_dir, "task-0")
    values, args = replacements(run)
    assert values == {
        "pct": "%", "lit": "%t",
        "b": task_dir, "e": os.path.join(task_dir, "environment"), "j": "1001", "m": step_dir, "n": "testnode",
        "p": str(run["pgid"]), "r": str(bundle / "rootfs"), "s": "7", "t": "0", "u": user.name,
        "U": str(user.uid), "Z": str(chdir),
    }
    assert args == ["the-command", "its arg"]
    # %p in RunTimeRun is the shell's $$: the task's first process, which leads the task's
    # process group and is record.py's parent (dash does not exec the last command).
    assert run["ppid"] == run["pgid"] != run["pid"]
    assert run["cwd"] == task_dir

    cancelled = daemon.ctl(user, "cancel", "1001.7")
    assert cancelled.returncode == 0, cancelled.stderr
    # Kill's record.py sent SIGTERM to the task's group: the shell died of it.
    assert cancelled.stdout == b"step 1001.7 cancelled (status 143)\n"
    client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGTERM

    assert records(out) == ["delete-0.json", "kill-0.json", "run-0.json"]  # each ran exactly once
    kill, delete = load(out / "kill-0.json"), load(out / "delete-0.json")
    for helper in (kill, delete):
        assert replacements(helper)[0] == values  # a real %p: the same number the task's shell had
        assert f"p={run['pgid']}" in helper["argv"]
        assert helper["ppid"] != run["pgid"]  # not their own shell's $$
        assert (helper["cwd"], helper["uid"], helper["gid"], helper["groups"]) == (
            run["cwd"], run["uid"], run["gid"], run["groups"])
        assert helper["env"] == run["env"]
    # Kill while the task ran (its shell alive, sleeping in wait); Delete after it ended.
    assert kill["proc"]["state"] == "S"
    assert delete["proc"]["state"] in ("Z", None)
    assert run["monotonic_ns"] < kill["monotonic_ns"] < delete["monotonic_ns"]
    assert spool_entries(daemon) == []


@pytest.mark.parametrize("how", ["client killed", "daemon shutdown"])
def test_other_terminations_also_kill_then_delete_with_the_real_pid(start_daemon, user, bundle, out, how):
    daemon = start_daemon(oci_conf(out, run="--say recorded --block"))
    client = daemon.ctl_popen(user, "run", "--job-id", "1018", "--bundle", str(bundle), "--", "x")
    read_line_from(client.stdout, b"recorded")
    if how == "client killed":
        client.kill()
        client.wait()
        assert daemon.ctl(user, "wait", "1018.0").returncode == 128 + signal.SIGTERM
    else:
        assert daemon.stop() == 0, daemon.log()
    assert records(out) == ["delete-0.json", "kill-0.json", "run-0.json"]
    pgid = str(load(out / "run-0.json")["pgid"])
    assert [replacements(load(out / f"{name}-0.json"))[0]["p"] for name in ("kill", "delete")] == [pgid, pgid]
    assert spool_entries(daemon) == []


def test_cancel_of_three_tasks_kills_each_with_its_own_pid(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, run="--say recorded --block"))
    client = daemon.ctl_popen(user, "run", "--job-id", "1019", "--ntasks", "3", "--bundle", str(bundle), "--", "x")
    seen = b""
    while seen.count(b"recorded\n") < 3:
        seen += read_line_from(client.stdout, b"recorded")
    assert daemon.ctl(user, "cancel", "1019.0").returncode == 0
    client.communicate(timeout=30)
    assert records(out) == sorted(f"{name}-{t}.json" for name in ("delete", "kill", "run") for t in range(3))
    pgids = set()
    for t in range(3):
        run = replacements(load(out / f"run-{t}.json"))[0]
        assert run["p"] == str(load(out / f"run-{t}.json")["pgid"])
        for name in ("kill", "delete"):
            helper = load(out / f"{name}-{t}.json")
            assert replacements(helper)[0] == run  # same %t, %b, %e, %p as the task it is for
            assert helper["cwd"] == load(out / f"run-{t}.json")["cwd"]
        pgids.add(run["p"])
    assert len(pgids) == 3
    assert spool_entries(daemon) == []


def test_failed_runtime_kill_escalates_to_sigkill_and_still_deletes(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, run="--say recorded --block", kill="--exit 1"))
    client = daemon.ctl_popen(user, "run", "--job-id", "1002", "--bundle", str(bundle), "--", "x")
    read_line_from(client.stdout, b"recorded")
    assert daemon.ctl(user, "cancel", "1002.0").returncode == 0
    client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGKILL
    assert "RunTimeKill failed" in daemon.log()
    assert records(out) == ["delete-0.json", "kill-0.json", "run-0.json"]
    pgid = load(out / "run-0.json")["pgid"]
    assert replacements(load(out / "delete-0.json"))[0]["p"] == str(pgid)
    assert spool_entries(daemon) == []


def test_percent_at_quotes_every_argument_byte_for_byte(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out))
    nasty = [
        "a b", "it's", "''", "'\"'\"'", 'say "hi"', "$HOME", "${PATH}", "`id`", "$(id)", "back\\slash", "\\",
        "line1\nline2", "\n", "", " ", "\t", "*", "?", "[a]", "~", "!", ";", "&", "|", ">x", "-n", "--", "%t", "%@",
        "%%", "é", "日本語", "emoji-\U0001f600", "\x01ctl",
    ]
    result = daemon.ctl(user, "run", "--job-id", "1003", "--bundle", str(bundle), "--", *nasty)
    assert result.returncode == 0, result.stderr
    run = load(out / "run-0.json")
    args = replacements(run)[1]
    assert args == nasty
    cut = run["rest"].index("@") + 1
    assert run["rest_b64"][cut:] == [base64.b64encode(a.encode()).decode() for a in nasty]
    # And the config.json's process.args carries them unchanged too.
    assert run["bundle_config"]["content"]["process"]["args"] == nasty


def test_runtime_identity_cwd_and_environment(start_daemon, user, bundle, out, supplementary_group):
    daemon_env = {
        "DAEMON_SECRET": "s3", "DAEMON_KEEP": "kept", "DAEMON_VALUE": "drop-me",
        "HOME": "/root", "USER": "root", "LOGNAME": "root", "XDG_RUNTIME_DIR": "/run/user/0",
    }
    conf = oci_conf(out, extra='RunTimeEnvExclude="^(DAEMON_SECRET|HOME|USER)=|=drop-me$"\nCreateEnvFile=null')
    daemon = start_daemon(conf, env=daemon_env)
    client_env = {**user.env, "FROM_CLIENT": "c", "DAEMON_SECRET": "from-client"}
    result = daemon.ctl(user, "run", "--job-id", "1004", "--bundle", str(bundle), "--", "true", env=client_env)
    assert result.returncode == 0, result.stderr
    run = load(out / "run-0.json")
    assert (run["uid"], run["euid"], run["gid"], run["egid"]) == (user.uid, user.uid, user.gid, user.gid)
    assert run["groups"] == sorted(os.getgrouplist(user.name, user.gid))
    assert supplementary_group in run["groups"]
    assert run["cwd"] == os.path.join(os.path.realpath(daemon.spool_dir), f"oci-job1004-0-uid{user.uid}", "task-0")
    env = run["env"]
    # The step user's, whatever the daemon had and whatever RunTimeEnvExclude matches.
    assert (env["HOME"], env["USER"], env["LOGNAME"], env["XDG_RUNTIME_DIR"]) == (
        user.home, user.name, user.name, f"/run/user/{user.uid}")
    # The daemon's own environment minus RunTimeEnvExclude (matched on NAME=value)...
    assert env["DAEMON_KEEP"] == "kept"
    assert "DAEMON_SECRET" not in env and "DAEMON_VALUE" not in env
    assert env["PATH"] == SYSTEM_PATH
    # ...and nothing of the step's environment. (PWD: /bin/sh sets it.)
    assert "FROM_CLIENT" not in env
    assert set(env) - {"PWD"} == {
        "PATH", "LANG", "DAEMON_KEEP", "HOME", "USER", "LOGNAME", "XDG_RUNTIME_DIR"}
    # RunTimeEnvExclude does not touch the container's environment.
    container_env = run["bundle_config"]["content"]["process"]["env"]
    assert "DAEMON_SECRET=from-client" in container_env and "FROM_CLIENT=c" in container_env
    assert b"DAEMON_SECRET=from-client\0" in env_file_bytes(run)


# ---- spool dirs ------------------------------------------------------------------------


def test_spool_dirs_are_the_users_and_private_then_removed(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, extra="CreateEnvFile=newline"))
    result = daemon.ctl(user, "run", "--job-id", "1005", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    run = load(out / "run-0.json")
    private_dir = {"uid": user.uid, "gid": user.gid, "mode": 0o700, "type": "dir"}
    assert run["step_dir_stat"] == private_dir
    assert run["cwd_stat"] == private_dir
    assert run["cwd_entries"] == {
        "config.json": {"uid": user.uid, "gid": user.gid, "mode": 0o750, "type": "file"},
        "environment": {"uid": user.uid, "gid": user.gid, "mode": 0o600, "type": "file"},
    }
    assert not os.path.exists(run["step_dir"])
    assert spool_entries(daemon) == []


def test_disable_cleanup_keeps_the_spool_dir(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, extra="DisableCleanup=true\nCreateEnvFile=null"))
    result = daemon.ctl(user, "run", "--job-id", "1006", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    step_dir = Path(os.path.realpath(daemon.spool_dir)) / f"oci-job1006-0-uid{user.uid}"
    assert spool_entries(daemon) == [f"oci-job1006-0-uid{user.uid}"]
    assert sorted(os.listdir(step_dir / "task-0")) == ["config.json", "environment"]
    st = step_dir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o700)
    kept = json.loads((step_dir / "task-0" / "config.json").read_text())
    assert kept == load(out / "run-0.json")["bundle_config"]["content"]
    # The same step again finds the leftover and says why.
    again = daemon.ctl(user, "run", "--job-id", "1006", "--bundle", str(bundle), "--", "true")
    assert again.returncode == 125
    assert b"DisableCleanup" in again.stderr


def test_container_path_without_task_id(start_daemon, user, bundle, out, scratch):
    daemon = start_daemon(oci_conf(out, extra=f"ContainerPath={scratch}/cp-%u-%j"))
    result = daemon.ctl(user, "run", "--job-id", "1007", "--step-id", "2", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    run = load(out / "run-0.json")
    step_dir = f"{scratch}/cp-{user.name}-1007/oci-job1007-2"
    values = replacements(run)[0]
    assert (values["m"], values["b"], run["cwd"]) == (step_dir, f"{step_dir}/task-0", f"{step_dir}/task-0")
    assert values["e"] == f"{step_dir}/task-0/environment"
    assert run["step_dir_stat"] == {"uid": user.uid, "gid": user.gid, "mode": 0o700, "type": "dir"}
    assert not os.path.exists(step_dir)
    assert spool_entries(daemon) == []


def test_container_path_with_task_id(start_daemon, user, bundle, out, scratch):
    daemon = start_daemon(oci_conf(out, extra=f"ContainerPath={scratch}/cpt-%j/t%t-%u"))
    result = daemon.ctl(user, "run", "--job-id", "1008", "--ntasks", "2", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    step_dir = f"{scratch}/cpt-1008"  # cut before the first component with %t
    for t in (0, 1):
        run = load(out / f"run-{t}.json")
        task_dir = f"{step_dir}/t{t}-{user.name}"
        values = replacements(run)[0]
        assert (values["m"], values["b"], values["t"], run["cwd"]) == (step_dir, task_dir, str(t), task_dir)
        assert run["cwd_stat"] == {"uid": user.uid, "gid": user.gid, "mode": 0o700, "type": "dir"}
        assert sorted(run["cwd_entries"]) == ["config.json"]
    assert not os.path.exists(step_dir)


# ---- tasks and exit status -------------------------------------------------------------


def test_three_tasks_have_their_own_ids_dirs_and_processes(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, extra="CreateEnvFile=null"))
    result = daemon.ctl(user, "run", "--job-id", "1009", "--ntasks", "3", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    assert records(out) == ["run-0.json", "run-1.json", "run-2.json"]
    runs = [load(out / f"run-{t}.json") for t in range(3)]
    step_dir = os.path.join(os.path.realpath(daemon.spool_dir), f"oci-job1009-0-uid{user.uid}")
    for t, run in enumerate(runs):
        values = replacements(run)[0]
        task_dir = f"{step_dir}/task-{t}"
        assert (values["t"], values["m"], values["b"], values["e"], run["cwd"]) == (
            str(t), step_dir, task_dir, f"{task_dir}/environment", task_dir)
        assert run["bundle_config"]["exists"] and run["env_file"]["exists"]
        assert values["p"] == str(run["pgid"])
    assert len({run["pgid"] for run in runs}) == 3


@pytest.mark.parametrize(("codes", "status"), [("0,5,7", 5), ("3,0,9", 3), ("0,0,0", 0), ("42", 42)])
def test_step_status_is_the_runtimes_first_nonzero_exit_code(start_daemon, user, bundle, out, codes, status):
    daemon = start_daemon(oci_conf(out, run=f"--task %t --exit {codes}"))
    ntasks = str(len(codes.split(",")))
    result = daemon.ctl(user, "run", "--job-id", "1010", "--ntasks", ntasks, "--bundle", str(bundle), "--", "x")
    assert result.returncode == status, result.stderr
    assert daemon.ctl(user, "wait", "1010.0").returncode == status
    # Tasks that end on their own are not killed.
    assert records(out) == [f"run-{t}.json" for t in range(int(ntasks))]


# ---- the environment file and EnvExclude -----------------------------------------------


STEP_ENV = [
    ("PLAIN", "1"), ("SPACES", "a b"), ("MULTI", "line1\nline2"), ("EQ", "x=y"), ("UNI", "é"),
    ("SECRET_TOKEN", "t0ken"), ("VALUE_MATCH", "drop-me"), ("OVERRIDE", "step"), ("EMPTY", ""),
]
EXCLUDE = 'EnvExclude="^SECRET_|=drop-me$"'


# What reaches the container: the bundle's env with the step's values in place, then the
# step's new variables, minus what EnvExclude matches (by name and by value).
CONTAINER_ENV = [
    "PATH=/bundle/bin", "BUNDLE_ONLY=1", "OVERRIDE=step",
    "PLAIN=1", "SPACES=a b", "MULTI=line1\nline2", "EQ=x=y", "UNI=é", "EMPTY=",
]


def slurm_vars(job: int, bundle, step: int = 0, task: int = 0, local: int | None = None) -> list[str]:
    """What the daemon adds for a task, as Slurm gives it to a task (after the step's own variables)."""
    return [f"SLURM_JOB_ID={job}", f"SLURM_JOBID={job}", f"SLURM_STEP_ID={step}", f"SLURM_STEPID={step}",
            f"SLURM_PROCID={task}", f"SLURM_LOCALID={task if local is None else local}", f"SLURM_CONTAINER={bundle}"]


def _run_with_step_env(daemon, user, bundle, out, job: int) -> dict:
    env_args = [a for name, value in STEP_ENV for a in ("--env", f"{name}={value}")]
    result = daemon.ctl(user, "run", "--job-id", str(job), "--export", "NONE", *env_args, "--bundle", str(bundle),
                        "--", "true")
    assert result.returncode == 0, result.stderr
    return load(out / "run-0.json")


@pytest.fixture
def env_bundle(workdir, user) -> Path:
    path = plain_bundle(Path(tempfile.mkdtemp(prefix="env-bundle-", dir=workdir)), user, BUNDLE_CONFIG)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_env_file_null_and_env_exclude(start_daemon, user, env_bundle, out):
    daemon = start_daemon(oci_conf(out, extra=f"CreateEnvFile=null\n{EXCLUDE}"))
    run = _run_with_step_env(daemon, user, env_bundle, out, 1011)
    process_env = run["bundle_config"]["content"]["process"]["env"]
    assert process_env == CONTAINER_ENV + slurm_vars(1011, env_bundle)
    assert env_file_bytes(run) == b"".join(e.encode() + b"\0" for e in process_env)
    assert b"MULTI=line1\nline2\0" in env_file_bytes(run)


def test_env_file_newline_drops_multiline_values(start_daemon, user, env_bundle, out):
    daemon = start_daemon(oci_conf(out, extra=f"CreateEnvFile=newline\n{EXCLUDE}"))
    run = _run_with_step_env(daemon, user, env_bundle, out, 1012)
    process_env = run["bundle_config"]["content"]["process"]["env"]
    assert process_env == CONTAINER_ENV + slurm_vars(1012, env_bundle)
    assert "MULTI=line1\nline2" in process_env  # config.json can carry it, the file cannot
    data = env_file_bytes(run)
    assert data == b"".join(e.encode() + b"\n" for e in process_env if "\n" not in e)
    assert b"MULTI" not in data and b"line2" not in data and b"\0" not in data
    assert b"SECRET_" not in data and b"drop-me" not in data


@pytest.mark.parametrize("setting", ["", "CreateEnvFile=disabled", "CreateEnvFile=no"])
def test_env_file_disabled_writes_no_file(start_daemon, user, bundle, out, setting):
    daemon = start_daemon(oci_conf(out, extra=setting))
    result = daemon.ctl(user, "run", "--job-id", "1013", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    run = load(out / "run-0.json")
    assert run["env_file"]["exists"] is False
    assert replacements(run)[0]["e"] == os.path.join(run["cwd"], "environment")  # %e still names the path
    assert sorted(run["cwd_entries"]) == ["config.json"]


# ---- the rewritten config.json ------------------------------------------------------------


def test_rewritten_config_json(start_daemon, user, env_bundle, out):
    conf = oci_conf(out, extra="DisableHooks=prestart,createRuntime\nMountSpoolDir=/var/run/slurm-%j-%t")
    daemon = start_daemon(conf)
    before = (env_bundle / "config.json").read_bytes()
    command = ["/app/run", "--flag", "two words"]
    result = daemon.ctl(user, "run", "--job-id", "1014", "--export", "NONE", "--env", "OVERRIDE=step",
                        "--env", "NEW=n", "--bundle", str(env_bundle), "--", *command)
    assert result.returncode == 0, result.stderr
    run = load(out / "run-0.json")
    step_dir = os.path.join(os.path.realpath(daemon.spool_dir), f"oci-job1014-0-uid{user.uid}")
    values = replacements(run)[0]
    assert (values["b"], values["r"]) == (f"{step_dir}/task-0", str(env_bundle / "rootfs"))
    assert run["bundle_config"]["path"] == f"{step_dir}/task-0/config.json"
    new = run["bundle_config"]["content"]
    assert new["process"]["terminal"] is False  # no --pty, whatever the bundle said
    assert new["process"]["args"] == command
    assert new["process"]["env"] == ["PATH=/bundle/bin", "BUNDLE_ONLY=1", "OVERRIDE=step", "NEW=n",
                                     *slurm_vars(1014, env_bundle)]
    assert new["root"] == {"path": str(env_bundle / "rootfs"), "readonly": True}
    assert new["mounts"] == BUNDLE_CONFIG["mounts"] + [
        {"destination": "/var/run/slurm-1014-0", "type": "bind", "source": step_dir, "options": ["rbind", "rw"]}
    ]
    assert new["hooks"] == {k: v for k, v in BUNDLE_CONFIG["hooks"].items() if k not in ("prestart", "createRuntime")}
    # Nothing else changed.
    changed = {"process", "root", "mounts", "hooks"}
    assert {k: v for k, v in new.items() if k not in changed} == {
        k: v for k, v in BUNDLE_CONFIG.items() if k not in changed}
    keep = lambda p: {k: v for k, v in p.items() if k not in ("terminal", "args", "env")}  # noqa: E731
    assert keep(new["process"]) == keep(BUNDLE_CONFIG["process"])
    # The bundle itself is untouched.
    assert (env_bundle / "config.json").read_bytes() == before
    assert sorted(os.listdir(env_bundle)) == ["config.json", "rootfs"]

    # --pty sets process.terminal (detached: no terminal needed on the client side).
    detached = daemon.ctl(user, "run", "--detach", "--pty", "--job-id", "1015", "--bundle", str(env_bundle), "--", "x")
    assert detached.returncode == 0, detached.stderr
    assert daemon.ctl(user, "wait", "1015.0").returncode == 0
    assert load(out / "run-0.json.1")["bundle_config"]["content"]["process"]["terminal"] is True


def test_without_mount_spool_dir_no_mount_is_added(start_daemon, user, env_bundle, out):
    daemon = start_daemon(oci_conf(out))
    result = daemon.ctl(user, "run", "--job-id", "1016", "--bundle", str(env_bundle), "--", "x")
    assert result.returncode == 0, result.stderr
    new = load(out / "run-0.json")["bundle_config"]["content"]
    assert new["mounts"] == BUNDLE_CONFIG["mounts"]
    assert new["hooks"] == BUNDLE_CONFIG["hooks"]  # no DisableHooks: every hook stays


def test_ignore_file_config_json(start_daemon, user, workdir, out):
    bundle = plain_bundle(Path(tempfile.mkdtemp(prefix="no-config-", dir=workdir)), user, None)
    bundle.chmod(0o755)
    try:
        daemon = start_daemon(oci_conf(out, extra="IgnoreFileConfigJson=true\nCreateEnvFile=newline"))
        result = daemon.ctl(user, "run", "--job-id", "1017", "--export", "NONE", "--env", "A=1", "--env", "B=x y",
                            "--bundle", str(bundle), "--", "cmd")
        assert result.returncode == 0, result.stderr
        run = load(out / "run-0.json")
        values = replacements(run)[0]
        assert (values["b"], values["r"]) == (str(bundle), str(bundle))
        assert run["bundle_config"]["exists"] is False
        assert sorted(run["cwd_entries"]) == ["environment"]  # no config.json written
        # Only the step's env and Slurm's task variables: there is no bundle env.
        assert env_file_bytes(run) == "".join(f"{e}\n" for e in ["A=1", "B=x y", *slurm_vars(1017, bundle)]).encode()
        assert sorted(os.listdir(bundle)) == ["rootfs"]
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


# ---- known product bugs ------------------------------------------------------------------


def test_a_non_utf8_environment_value_does_not_crash_the_client(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out, extra="IgnoreFileConfigJson=true\nCreateEnvFile=null"))
    env = {k.encode(): v.encode() for k, v in user.env.items()}
    env[b"LEGACY_BYTES"] = b"caf\xe9"  # Latin-1, as an old profile might set it
    result = subprocess.run(user.command(daemon.ctl_argv("run", "--job-id", "1020", "--bundle", str(bundle),
                                                         "--", "true")), env=env, cwd="/", capture_output=True)
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    # The protocol carries text: refused in one sentence that names the variable, nothing launched.
    assert result.returncode == 125, result.stderr
    assert result.stderr.startswith(b"nodestepctl: environment variable 'LEGACY_BYTES' is not valid UTF-8")
    assert result.stderr.count(b"\n") == 1
    assert not (out / "run-0.json").exists()


def test_the_daemons_notify_socket_does_not_reach_the_runtime(start_daemon, user, bundle, out):
    daemon = start_daemon(oci_conf(out))  # start_daemon sets NOTIFY_SOCKET, as systemd does
    result = daemon.ctl(user, "run", "--job-id", "1021", "--bundle", str(bundle), "--", "true")
    assert result.returncode == 0, result.stderr
    assert "NOTIFY_SOCKET" not in load(out / "run-0.json")["env"]


# ---- the privilege drop is total -----------------------------------------------------------


NO_CAPS = ["0000000000000000"]


@pytest.mark.parametrize("no_new_privs", [True, False])
def test_the_runtime_has_the_users_ids_no_capabilities_and_only_stdio(
    start_daemon, user, bundle, out, workdir, supplementary_group, no_new_privs
):
    """/proc/PID/status and /proc/PID/fd of the runtime (and of the shell that started it)."""
    settings = workdir / f"nnp-{no_new_privs}.toml"
    settings.write_text(f"no_new_privs = {str(no_new_privs).lower()}\n")
    daemon = start_daemon(oci_conf(out, run="--say recorded --block"), "--config", str(settings))
    client = daemon.ctl_popen(user, "run", "--job-id", "1030", "--bundle", str(bundle), "--", "x")
    read_line_from(client.stdout, b"recorded")
    run = load(out / "run-0.json")
    with open(f"/proc/{daemon.proc.pid}/status") as f:
        daemon_bounding = next(line.split()[1:] for line in f if line.startswith("CapBnd:"))
    groups = sorted(os.getgrouplist(user.name, user.gid))
    assert supplementary_group in groups
    for status in (run["status"], run["parent_status"]):
        assert status["Uid"] == [str(user.uid)] * 4 and status["Gid"] == [str(user.gid)] * 4, status
        assert sorted(int(g) for g in status["Groups"]) == groups
        assert (status["CapInh"], status["CapPrm"], status["CapEff"], status["CapAmb"]) == (NO_CAPS,) * 4
        # The bounding set stays the system's (a rootless runtime needs it inside its user
        # namespace); with NoNewPrivs no execve on the host can raise privileges through it.
        assert status["CapBnd"] == daemon_bounding
        assert status["NoNewPrivs"] == ["1" if no_new_privs else "0"]
    # stdin, stdout, stderr from the client and nothing of the daemon's (socket, pidfds, spool dir fds).
    assert sorted(run["fds"]) == ["0", "1", "2"], run["fds"]
    assert sorted(run["parent_fds"]) == ["0", "1", "2"], run["parent_fds"]
    assert run["umask"] == 0o022
    assert daemon.ctl(user, "cancel", "1030.0").returncode == 0
    client.communicate(timeout=30)
