"""`nodestepctl doctor`: the checks one by one, and whole runs through the real CLI with real runc.

The CLI runs are made as root with --user (doctor switches to the user for every runtime
command) and as the user themselves. No daemon is started: doctor reads the settings and
oci.conf itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import NODESTEPCTL, REPO, RUNC_RUN_CONF, make_bundle, runc_containers
from nodestepd.ctl import doctor, probes
from nodestepd.config.ociconf import parse_oci_conf
from nodestepd.ctl.checks import Level, check_container_path, check_daemon_dirs, check_user_namespaces
from nodestepd.ctl.doctor import DoctorOptions, DoctorUsageError
from nodestepd.config.settings import DaemonConfig
from nodestepd.process.identity import Identity


def _installed_umoci_is_old() -> bool:
    out = subprocess.run(["umoci", "--version"], capture_output=True, text=True, check=True).stdout
    version = probes.tool_version(out)
    return version is not None and version < probes.UMOCI_ZSTD


# The one warning a healthy node here has besides lingering: Debian 12's umoci is 0.4.7.
UMOCI_WARNING = [("image tool umoci", Level.WARN)] if _installed_umoci_is_old() else []


@pytest.fixture
def site(workdir) -> Path:
    """A site directory: the daemon's TOML (spool and state dirs inside) and the guide's run-mode oci.conf."""
    path = Path(tempfile.mkdtemp(prefix="doctor-", dir=workdir))
    path.chmod(0o755)
    (path / "oci.conf").write_text(RUNC_RUN_CONF)
    (path / "nodestepd.toml").write_text(
        f'oci_conf = "{path}/oci.conf"\nspool_dir = "{path}/spool"\nstate_dir = "{path}/state"\n'
        f'node_name = "doctornode"\nslurm_conf = "{path}/no-slurm.conf"\n'
    )
    yield path
    shutil.rmtree(path, ignore_errors=True)


def doctor_cli(*args: str, as_user=None, env=None) -> subprocess.CompletedProcess:
    argv = [str(NODESTEPCTL), "doctor", *args]
    if as_user is not None:
        argv = as_user.command(argv)
        env = env or as_user.env
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd="/")


def lines(result: subprocess.CompletedProcess, level: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(level + " ")]


def by_name(result: subprocess.CompletedProcess) -> dict[str, list[dict]]:
    checks: dict[str, list[dict]] = {}
    for check in json.loads(result.stdout):
        checks.setdefault(check["name"], []).append(check)
    return checks


# ---- the checks on their own -------------------------------------------------------------


def sysctls(tmp_path: Path, values: dict[str, str]) -> str:
    for key, value in values.items():
        path = tmp_path.joinpath(*key.split("."))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return str(tmp_path)


def test_user_namespaces_allowed(tmp_path):
    checks = check_user_namespaces(sysctls(tmp_path, {
        "user.max_user_namespaces": "1000", "kernel.unprivileged_userns_clone": "1",
        "kernel.apparmor_restrict_unprivileged_userns": "0",
    }))
    assert [c.level for c in checks] == [Level.OK] * 3
    assert "user.max_user_namespaces = 1000" in checks[0].message


@pytest.mark.parametrize("key,value,fix", [
    ("user.max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=15000"),
    ("kernel.unprivileged_userns_clone", "0", "sysctl -w kernel.unprivileged_userns_clone=1"),
    ("kernel.apparmor_restrict_unprivileged_userns", "1", "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"),
    ("kernel.apparmor_restrict_unprivileged_unconfined", "1",
     "sysctl -w kernel.apparmor_restrict_unprivileged_unconfined=0"),
])
def test_user_namespaces_forbidden_names_the_sysctl_and_the_fix(tmp_path, key, value, fix):
    checks = check_user_namespaces(sysctls(tmp_path, {"user.max_user_namespaces": "1000", key: value}))
    failed = [c for c in checks if c.level is Level.FAIL]
    assert len(failed) == 1 and key in failed[0].message and failed[0].fix.startswith(fix)


def test_a_kernel_without_those_sysctls_is_fine(tmp_path):
    checks = check_user_namespaces(str(tmp_path))
    assert [c.level for c in checks] == [Level.OK]


def test_this_machine_allows_user_namespaces():
    # The real /proc/sys: rootless runc works here, so nothing may fail.
    assert all(c.level is Level.OK for c in check_user_namespaces())


def test_daemon_dirs_must_be_roots_and_not_writable_by_others(tmp_path, user):
    base = Path(tempfile.mkdtemp(prefix="dirs-", dir="/tmp"))
    try:
        base.chmod(0o755)
        good, loose, users = base / "good", base / "loose", base / "users"
        good.mkdir(0o755)
        loose.mkdir()
        loose.chmod(0o777)
        users.mkdir(0o755)
        os.chown(users, user.uid, user.gid)
        checks = check_daemon_dirs(DaemonConfig(spool_dir=str(good), state_dir=str(base / "new")))
        assert [c.level for c in checks] == [Level.OK, Level.OK]
        assert "creates it" in checks[1].message
        checks = check_daemon_dirs(DaemonConfig(spool_dir=str(loose / "spool"), state_dir=str(users)))
        assert [c.level for c in checks] == [Level.FAIL, Level.FAIL]
        assert str(loose) in checks[0].message and "mode 0777" in checks[0].message
        assert f"owner {user.name}" in checks[1].message and f"chown root {users}" in checks[1].fix
    finally:
        shutil.rmtree(base)


def test_container_path_parents_must_be_roots_and_not_writable_by_others(new_dir, user):
    """Issue 19.1: a launch refuses such a parent, so the doctor says so before any launch."""
    def check(container_path: str):
        (result,) = check_container_path(parse_oci_conf(RUNC_RUN_CONF + f"ContainerPath={container_path}\n"))
        return result

    sticky, users = new_dir("sticky-", 0o1777), new_dir("users-", 0o755, owner=user)
    assert check(f"{sticky}/%u/oci").level is Level.OK  # on the way, a sticky dir is fine
    assert check(f"{sticky}/new/%u").level is Level.OK
    loose = check(str(sticky))  # but not as the step dirs' own parent
    assert loose.level is Level.FAIL and loose.message.startswith(f"{sticky} is writable by others (mode 1777): every")
    owned = check(f"{users}/%u")
    assert owned.level is Level.FAIL
    assert owned.message == (f"{users} is owned by uid {user.uid}, not root: every launch under ContainerPath"
                             f" {users}/%u would be refused, since another user could swap the step dirs there")
    assert check_container_path(parse_oci_conf(RUNC_RUN_CONF)) == []


def test_a_user_chosen_letter_in_container_path_fails_the_oci_conf_check(site, user):
    (site / "oci.conf").write_text(RUNC_RUN_CONF + "ContainerPath=%Z/.oci\n")
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--json")
    assert result.returncode == 1
    (oci,) = by_name(result)["oci.conf"]
    assert oci["level"] == "fail" and "ContainerPath: uses %Z (the working directory (--chdir))" in oci["message"]


def test_root_must_name_an_unprivileged_user():
    with pytest.raises(DoctorUsageError, match="--user"):
        doctor.target_identity(None)
    with pytest.raises(DoctorUsageError, match="never|not run runtimes as root"):
        doctor.target_identity("root")
    with pytest.raises(DoctorUsageError, match="no user"):
        doctor.target_identity("no-such-user-nsd")


# ---- whole runs -----------------------------------------------------------------------------


def test_healthy_setup_is_all_ok(site, user, bundle, tmp_path):
    linger = tmp_path / "linger"
    linger.mkdir()
    (linger / user.name).touch()
    options = DoctorOptions(user=user.name, bundle=str(bundle), config_file=str(site / "nodestepd.toml"),
                            oci_conf=None, linger_dir=str(linger))
    checks = doctor.run_doctor(options)
    assert [(c.name, c.level) for c in checks if c.level is not Level.OK] == UMOCI_WARNING
    names = [c.name for c in checks]
    for expected in ("user namespaces", "daemon settings", "oci.conf", "runtime dir", "lingering", "spool dir",
                     "state dir", "image cache", "stage_in", "stage_out", "runtime /usr/sbin/runc",
                     "image tool skopeo", "image tool umoci", "bundle", "test outside Slurm"):
        assert expected in names
    assert runc_containers(user) == []  # the test container was deleted


def test_healthy_setup_through_the_cli(site, user, bundle):
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(bundle))
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines(result, "fail") == []
    (test,) = [line for line in result.stdout.splitlines() if "test outside Slurm" in line]
    assert test.startswith("ok ") and "RunTimeRun, RunTimeDelete succeeded as " + user.name in test
    assert "runc version" in result.stdout
    # lingering is off here (and this Debian's umoci may be older than 0.5)
    assert result.stdout.splitlines()[-1].endswith(f"0 failed, {1 + len(UMOCI_WARNING)} warnings")


def test_an_ordinary_user_checks_for_themselves(site, user, bundle):
    result = doctor_cli("--config", str(site / "nodestepd.toml"), "--bundle", str(bundle), "--json", as_user=user)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = by_name(result)
    assert checks["test outside Slurm"][0]["level"] == "ok"
    assert user.name in checks["test outside Slurm"][0]["message"]


def test_another_user_is_only_for_root(site, user, other_user):
    result = doctor_cli("--user", other_user.name, "--config", str(site / "nodestepd.toml"), as_user=user)
    assert result.returncode == 2
    assert "only root can check for another user" in result.stderr


def test_root_without_user_is_refused():
    result = doctor_cli()
    assert result.returncode == 2 and "as root, name the user to check for with --user" in result.stderr


def test_missing_runtime_is_named(site, user, bundle):
    (site / "oci.conf").write_text(RUNC_RUN_CONF.replace("runc ", "nsd-no-such-runtime "))
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(bundle),
                        "--json")
    assert result.returncode == 1
    checks = by_name(result)
    (missing,) = [c for name, cs in checks.items() if name.startswith("runtime of") for c in cs]
    assert missing["level"] == "fail"
    assert "'nsd-no-such-runtime' is not found in PATH=" in missing["message"]
    assert "RunTimeRun" in missing["name"] and "RunTimeDelete" in missing["name"]
    assert checks["test outside Slurm"][0]["level"] == "fail"
    assert "not run" in checks["test outside Slurm"][0]["message"]


def test_missing_run_user_dir_is_named(site, other_user, workdir):
    parent = Path(tempfile.mkdtemp(prefix="bundle-", dir=workdir))
    parent.chmod(0o755)
    bundle = make_bundle(other_user, parent / "b")
    runtime_dir = Path(f"/run/user/{other_user.uid}")
    shutil.rmtree(runtime_dir)
    try:
        result = doctor_cli("--user", other_user.name, "--config", str(site / "nodestepd.toml"),
                            "--bundle", str(bundle), "--json")
        assert result.returncode == 1
        checks = by_name(result)
        (runtime_check,) = checks["runtime dir"]
        assert runtime_check["level"] == "fail"
        assert f"{runtime_dir} does not exist" in runtime_check["message"]
        assert f"loginctl enable-linger {other_user.name}" in runtime_check["fix"]
        # runc really fails without it, and doctor shows runc's own words.
        (test,) = checks["test outside Slurm"]
        assert test["level"] == "fail" and "RunTimeRun failed" in test["message"]
        assert "runtime said:" in test["message"] and "runtime said: (nothing)" not in test["message"]
    finally:
        runtime_dir.mkdir(mode=0o700)
        os.chown(runtime_dir, other_user.uid, other_user.gid)
        shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize("config_json,expected", [
    ('{"ociVersion": "1.0.2", "process": ', "config.json is not valid JSON: Expecting value at line 1 column"),
    ("[1, 2]", "config.json must hold a JSON object, not an array"),
    ('{"process": {"args": ["sh"]}}', "config.json has no root.path"),
])
def test_broken_config_json_is_named(site, user, workdir, config_json, expected):
    path = Path(tempfile.mkdtemp(prefix="broken-", dir=workdir))
    try:
        (path / "rootfs").mkdir()
        (path / "config.json").write_text(config_json)
        for p in (path, path / "rootfs", path / "config.json"):
            os.chown(p, user.uid, user.gid)
        path.chmod(0o755)
        result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(path),
                            "--json")
        assert result.returncode == 1
        (bundle_check,) = by_name(result)["bundle"]
        assert bundle_check["level"] == "fail" and expected in bundle_check["message"]
    finally:
        shutil.rmtree(path)


def test_unreadable_config_json_is_read_as_the_user(site, user, bundle, workdir):
    """root could read it; the user cannot, and the daemon would not get it either."""
    path = Path(tempfile.mkdtemp(prefix="private-", dir=workdir))
    try:
        shutil.copytree(bundle / "rootfs", path / "rootfs", symlinks=True)
        shutil.copy(bundle / "config.json", path / "config.json")
        (path / "config.json").chmod(0o600)  # root's
        path.chmod(0o755)
        result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(path),
                            "--json")
        (bundle_check,) = by_name(result)["bundle"]
        assert bundle_check["level"] == "fail"
        assert f"{user.name} cannot read {path}/config.json" in bundle_check["message"]
        assert "Permission denied" in bundle_check["message"]
    finally:
        shutil.rmtree(path)


def test_missing_rootfs_is_named(site, user, workdir, bundle):
    path = Path(tempfile.mkdtemp(prefix="no-rootfs-", dir=workdir))
    try:
        shutil.copy(bundle / "config.json", path / "config.json")
        os.chown(path / "config.json", user.uid, user.gid)
        path.chmod(0o755)
        result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(path),
                            "--json")
        (bundle_check,) = by_name(result)["bundle"]
        assert bundle_check["level"] == "fail" and f"the rootfs {path}/rootfs" in bundle_check["message"]
    finally:
        shutil.rmtree(path)


def test_the_first_failing_runtime_command_is_reported_with_the_runtimes_message(site, user, bundle):
    (site / "oci.conf").write_text(RUNC_RUN_CONF.replace(" run %n", " run --nsd-bogus-flag %n"))
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(bundle))
    assert result.returncode == 1
    (failed,) = lines(result, "fail")
    assert failed.startswith("fail  test outside Slurm: RunTimeRun failed (status ")
    assert "run --nsd-bogus-flag doctornode." in failed  # the command, expanded as for a step
    assert "flag provided but not defined: -nsd-bogus-flag" in result.stdout  # runc's own words
    assert runc_containers(user) == []


def test_invalid_oci_conf_fails_with_every_problem(site, user):
    (site / "oci.conf").write_text('RunTimeRun="runc run %q"\nOCIRunTimeQuery=x\n')
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--json")
    assert result.returncode == 1
    (oci,) = by_name(result)["oci.conf"]
    assert oci["level"] == "fail" and "'%q'" in oci["message"] and "RunTimeQuery" in oci["message"]


def test_the_test_outside_slurm_uses_the_given_command(site, user, bundle):
    # A command that fails inside the container: the runtime passes its status through.
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(bundle),
                        "--", "sh", "-c", "echo from-the-container; exit 3")
    assert result.returncode == 1
    (failed,) = lines(result, "fail")
    assert "RunTimeRun failed (status 3)" in failed
    assert "runtime said: from-the-container" in result.stdout


def test_identity_switch_runs_as_the_user(user):
    outcome = probes.run_as(Identity.for_uid(user.uid), ["id", "-u"], env={"PATH": "/usr/bin:/bin"}, cwd="/",
                            timeout=30)
    assert outcome == probes.Outcome(0, str(user.uid))
    with pytest.raises(ValueError, match="never runs runtime commands as root"):
        probes.run_as(Identity.for_uid(0), ["true"], env={}, cwd="/", timeout=30)


def test_create_start_sequence_in_order_and_the_first_failure(site, user, bundle, user_dir):
    """create, start, query, kill, then delete whatever happened, each as the user (recording runtime)."""
    from test_recording_runtime import REC

    out = user_dir("records-")

    def conf(start_options: str) -> str:
        rec = f"{REC} --out {out}"
        return (f'RunTimeCreate="{rec}/create.json --bundle %b -- %n.%u.%j.%s.%t %b"\n'
                f'RunTimeStart="{rec}/start.json {start_options} -- %n.%u.%j.%s.%t"\n'
                f'RunTimeQuery="{rec}/query.json -- %n.%u.%j.%s.%t"\n'
                f'RunTimeKill="{rec}/kill.json -- %n.%u.%j.%s.%t"\n'
                f'RunTimeDelete="{rec}/delete.json -- %n.%u.%j.%s.%t"\n')

    (site / "oci.conf").write_text(conf(""))
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(bundle),
                        "--json")
    checks = by_name(result)
    (test,) = checks["test outside Slurm"]
    assert test["level"] == "ok", test
    assert test["message"].startswith("RunTimeCreate, RunTimeStart, RunTimeQuery, RunTimeKill, RunTimeDelete ")
    records = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("create", "start", "query", "kill", "delete")}
    times = [records[n]["monotonic_ns"] for n in ("create", "start", "query", "kill", "delete")]
    assert times == sorted(times)
    assert {r["uid"] for r in records.values()} == {user.uid}
    name, task_bundle = records["create"]["rest"]
    assert name.startswith(f"doctornode.{user.name}.4294967000.")
    assert {r["rest"][0] for r in records.values()} == {name}  # one container name throughout
    # The bundle the runtime got: the user's config.json rewritten like a step's, in doctor's own
    # task dir (removed afterwards), running the create/start default command without a terminal.
    process = records["create"]["bundle_config"]["content"]["process"]
    assert (process["args"], process["terminal"]) == (["sleep", "60"], False)
    assert records["create"]["bundle_config"]["stat"]["uid"] == user.uid
    assert not Path(task_bundle).exists()

    for record in out.iterdir():
        record.unlink()
    (site / "oci.conf").write_text(conf("--exit 7 --say the-runtime-said-no"))
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(bundle),
                        "--json")
    assert result.returncode == 1
    (test,) = by_name(result)["test outside Slurm"]
    assert test["level"] == "fail"
    assert test["message"].startswith("RunTimeStart failed (status 7): ")
    assert test["message"].endswith("runtime said: the-runtime-said-no")
    # Nothing after the failure but the delete that cleans up.
    assert sorted(p.name for p in out.iterdir()) == ["create.json", "delete.json", "start.json"]


def test_guide_create_start_with_a_failing_kill_is_a_warning_not_a_failure(site, user, bundle):
    """Real runc, the guide's create/start config with a RunTimeKill that fails: steps still
    work (nodestepd SIGKILLs the init at once), so doctor warns, names it, and exits 0."""
    conf = (REPO / "tests" / "oci-conf-examples" / "runc-create-start.conf").read_text()
    kill = 'RunTimeKill="runc --rootless=true --root=/run/user/%U/ kill %n.%u.%j.%s.%t NOSUCHSIGNAL"'
    lines_ = [kill if line.startswith("RunTimeKill=") else line for line in conf.splitlines()]
    (site / "oci.conf").write_text("\n".join(lines_) + "\n")
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--bundle", str(bundle),
                        "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = by_name(result)["test outside Slurm"]
    assert [t["level"] for t in tests] == ["ok", "warn"], tests
    assert tests[0]["message"].startswith("RunTimeCreate, RunTimeStart, RunTimeQuery, RunTimeDelete succeeded ")
    assert tests[1]["message"].startswith("RunTimeKill failed (status 1): runc ")
    assert "NOSUCHSIGNAL" in tests[1]["message"] and "SIGKILL at once" in tests[1]["message"]
    assert runc_containers(user) == []  # deleted all the same


# ---- image tools, image cache, stage hooks -------------------------------------------------


def fake_tools(directory: Path, versions: dict[str, str]) -> str:
    """A PATH whose first dir holds fake skopeo/umoci printing the given --version lines."""
    for tool, line in versions.items():
        (directory / tool).write_text(f"#!/bin/sh\necho '{line}'\n")
        (directory / tool).chmod(0o755)
    return f"{directory}:/usr/bin:/bin:/usr/sbin:/sbin"


def test_image_tools_are_found_and_their_versions_run_as_the_user(site, user, new_dir):
    tools = new_dir("tools-")
    path = fake_tools(tools, {"skopeo": "skopeo version 1.14.2", "umoci": "umoci version 0.5.0"})
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--json",
                        env={"PATH": path, "LANG": "C.UTF-8"})
    checks = by_name(result)
    assert checks["image tool skopeo"] == [{"name": "image tool skopeo", "level": "ok",
                                            "message": f"skopeo version 1.14.2 ({tools}/skopeo)", "fix": None}]
    assert checks["image tool umoci"][0]["level"] == "ok"


def test_an_old_umoci_warns_of_zstd_and_a_missing_tool_is_named(site, user, new_dir):
    tools = new_dir("tools-")
    fake_tools(tools, {"umoci": "umoci version 0.4.7+ds-3+b7"})
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--json",
                        env={"PATH": f"{tools}:/nonexistent", "LANG": "C.UTF-8"})
    checks = by_name(result)
    [umoci] = checks["image tool umoci"]
    assert umoci["level"] == "warn"
    assert umoci["message"].startswith("umoci version 0.4.7+ds-3+b7: umoci before 0.5 cannot unpack zstd-compressed")
    [skopeo] = checks["image tool skopeo"]
    assert skopeo["level"] == "warn"
    assert skopeo["message"] == (f"skopeo is not found in PATH={tools}:/nonexistent: "
                                 "`nodestepctl run --image` cannot work")


def test_the_real_image_tools(site, user):
    result = doctor_cli("--user", user.name, "--config", str(site / "nodestepd.toml"), "--json")
    checks = by_name(result)
    assert checks["image tool skopeo"][0]["message"].startswith("skopeo version ")
    assert checks["image tool umoci"][0]["message"].startswith("umoci version ")
    assert [checks["image tool umoci"][0]["level"]] == (["warn"] if UMOCI_WARNING else ["ok"])


def test_the_image_cache_must_be_roots_and_have_room(new_dir, user):
    from types import SimpleNamespace
    from nodestepd.ctl.checks import check_image_cache, image_cache_space

    base = new_dir("cache-")
    cache = base / "images"
    # Not yet made: judged by the directory it will be made in.
    [owner, space] = check_image_cache(SimpleNamespace(image_cache_dir=str(cache)))
    assert (owner.level, space.level) == (Level.OK, Level.OK), (owner, space)
    assert "GiB free on the file system of" in space.message
    cache.mkdir(mode=0o755)
    assert check_image_cache(SimpleNamespace(image_cache_dir=str(cache)))[0].message == \
        f"{cache} is root's and not writable by others"
    cache.chmod(0o777)
    [bad] = check_image_cache(SimpleNamespace(image_cache_dir=str(cache)))
    assert bad.level is Level.FAIL and f"{cache} (owner root, mode 0777) can be changed by someone" in bad.message
    cache.chmod(0o755)
    os.chown(cache, user.uid, user.gid)
    [bad] = check_image_cache(SimpleNamespace(image_cache_dir=str(cache)))
    assert bad.level is Level.FAIL and f"(owner {user.name}, mode 0755)" in bad.message
    low = image_cache_space(str(cache), 512 << 20)
    assert (low.level, low.message) == (Level.WARN, f"0.5 GiB free on the file system of {cache}: images may not fit")
    # Without the setting, its default place is checked.
    assert DaemonConfig().image_cache_dir in " ".join(c.message for c in check_image_cache(DaemonConfig()))


def test_stage_hooks_are_checked(site, user, new_dir):
    hooks = new_dir("hooks-")
    good, private = hooks / "stage-in", hooks / "stage-out"
    for hook, mode in ((good, 0o755), (private, 0o700)):
        hook.write_text("#!/bin/sh\n")
        hook.chmod(mode)
    toml = site / "nodestepd.toml"
    base = toml.read_text()
    toml.write_text(base + f'stage_in = "{good}"\nstage_out = "{private}"\n')
    result = doctor_cli("--user", user.name, "--config", str(toml), "--json")
    checks = by_name(result)
    assert checks["stage_in"][0] == {"name": "stage_in", "level": "ok", "fix": None,
                                     "message": f"{good} is root's, executable, and runs as {user.name} at every launch"}
    assert checks["stage_out"][0]["level"] == "fail"
    assert checks["stage_out"][0]["message"] == (f"{private} is not executable by {user.name}: every launch of "
                                                 "theirs would fail")
    assert result.returncode == 1

    shared = new_dir("shared-", mode=0o777)
    (shared / "hook").write_text("#!/bin/sh\n")
    (shared / "hook").chmod(0o755)
    toml.write_text(base + f'stage_out = "{shared}/hook"\n')
    checks = by_name(doctor_cli("--user", user.name, "--config", str(toml), "--json"))
    assert checks["stage_in"][0]["message"] == "not set"
    assert checks["stage_out"][0]["level"] == "fail"
    assert checks["stage_out"][0]["message"] == (f"{shared}/hook cannot be used: {shared} is writable by others "
                                                 "(mode 0777); the daemon refuses to start with it")
