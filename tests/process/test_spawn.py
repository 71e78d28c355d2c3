"""Starting processes, with real processes and a real user: spawn, spawn_shell, run_helper, group
signalling, the doctor's probes; and find_program."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import proc_state

from nodestepd.ctl import probes
from nodestepd.process import spawn as spawn_module
from nodestepd.process.identity import Identity
from nodestepd.process.spawn import (
    HELPER_OUTPUT_LIMIT,
    HelperResult,
    ProgramResult,
    group_members,
    run_helper,
    run_program,
    signal_group_except_leader,
    spawn,
    spawn_shell,
)
from nodestepd.process.watch import CLAIMED, Pidfd
from nodestepd.step.runtime import RuntimeNotFound, find_program
from uvloop_fixtures import OVERRIDE_WARNING, event_loop_policy, identity, on_uvloop  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings(OVERRIDE_WARNING)


@pytest.fixture
def home(workdir, user, request) -> Path:
    """A directory only the test user may enter."""
    path = workdir / f"home-{request.node.name}"
    path.mkdir()
    os.chown(path, user.uid, user.gid)
    path.chmod(0o700)
    return path


@pytest.fixture
async def spawned():
    """Watches to clean up: their groups are killed and the leaders reaped after the test."""
    watches = []
    yield watches
    for watch in watches:
        if watch._pidfd is not None:
            watch.kill_group(signal.SIGKILL)
            await asyncio.wait_for(watch.wait(), 10)
            watch.reap()


def memfd() -> int:
    return os.memfd_create("test-output", os.MFD_CLOEXEC)


def read_all(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data.decode()


async def run_shell(command: str, identity: Identity, cwd: str, env: dict, spawned: list, stdin: int | None = None):
    """spawn_shell, wait, reap: (status, pid, output)."""
    out = memfd()
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        watch = spawn_shell(command, identity=identity, cwd=cwd, env=env, stdin=null if stdin is None else stdin,
                            stdout=out, stderr=out, start_timeout=30)
        spawned.append(watch)
        status = await asyncio.wait_for(watch.wait(), 30)
        watch.reap()
        return status, watch.pid, read_all(out)
    finally:
        os.close(out)
        os.close(null)


def uid_exists(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def our_children() -> set[int]:
    kids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            kids.update(int(k) for k in f.read().split())
    return kids


def assert_exits(pid: int, timeout: float = 10) -> None:
    """Wait on a pidfd (no polling) until a process, not necessarily our child, has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} ({proc_state(pid)}) still alive after {timeout} s: {describe(pid)}"
    finally:
        os.close(fd)


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode()
        with open(f"/proc/{pid}/status") as f:
            status = [l.strip() for l in f if l.startswith(("Sig", "PPid", "NSpgid", "Uid"))]
    except FileNotFoundError:
        return "gone"
    return f"{cmdline!r} {status}"


async def read_lines_until(fd: int, predicate, timeout: float = 10) -> list[str]:
    """Lines from a pipe until predicate(lines) holds, woken by the loop on readability."""
    loop = asyncio.get_running_loop()
    data = b""
    deadline = loop.time() + timeout
    while True:
        lines = data.decode().splitlines()
        if data.endswith(b"\n") and predicate(lines):
            return lines
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise AssertionError(f"timed out; got {data!r}") from None
        finally:
            loop.remove_reader(fd)
        chunk = os.read(fd, 4096)
        assert chunk, f"end of stream; got {data!r}"
        data += chunk


# ---- Identity -------------------------------------------------------------------------


def test_identity_for_uid(user):
    identity = Identity.for_uid(user.uid)
    assert (identity.user, identity.uid, identity.gid, identity.home) == (user.name, user.uid, user.gid, user.home)
    assert user.gid in identity.groups
    assert sorted(identity.groups) == sorted(set(os.getgrouplist(user.name, user.gid)))


def test_identity_for_an_unknown_uid():
    uid = 54321
    while uid_exists(uid):
        uid += 1
    with pytest.raises(LookupError, match=f"^uid {uid} has no passwd entry on this node$"):
        Identity.for_uid(uid)


# ---- spawn -----------------------------------------------------------------------------


def status_fields(text: str) -> dict[str, list[str]]:
    return {k: v.split() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


async def test_spawn_as_the_user_with_the_fds_it_is_given(identity, home, shell_ignored_signals):
    """Only 0-2 and pass_fds reach it (at their own numbers); the user's ids; our process group
    unless asked; our umask unless given; default signal dispositions."""
    out = memfd()
    talk_r, talk_w = os.pipe2(os.O_CLOEXEC)  # close-on-exec here: pass_fds still hands it over
    leak_r, leak_w = os.pipe()  # inheritable, but not passed: must not reach it
    os.set_inheritable(leak_w, True)
    passed = talk_w
    old_umask = os.umask(0o027)
    try:
        watch = spawn(
            ["/bin/bash", "-c", f"echo hello >&{passed}; echo fds; ls /proc/$$/fd; echo end; "  # bash: dash takes fds 0-9 only
             "exec grep -E '^(Uid|Gid|Groups|Umask|SigIgn|SigBlk|NSpgid):' /proc/self/status"],
            identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
            stdout=out, stderr=out, process_group=False, pass_fds=(passed,),
        )
        os.close(talk_w)
        talk_w = -1
        assert await asyncio.wait_for(watch.wait(), 30) == 0
        watch.reap()
        assert os.read(talk_r, 100) == b"hello\n"
        text = read_all(out)
    finally:
        os.umask(old_umask)
        for fd in (out, talk_r, talk_w, leak_r, leak_w):
            if fd >= 0:
                os.close(fd)
    lines = text.splitlines()
    fds = lines[lines.index("fds") + 1:lines.index("end")]
    assert sorted(int(fd) for fd in fds) == sorted([0, 1, 2, passed])
    fields = status_fields(text)
    assert fields["Uid"] == [str(identity.uid)] * 4
    assert fields["Gid"] == [str(identity.gid)] * 4
    assert sorted(int(g) for g in fields["Groups"]) == sorted(identity.groups)
    assert fields["Umask"] == ["0027"]  # ours: none was given
    assert int(fields["SigIgn"][0], 16) == 0 and int(fields["SigBlk"][0], 16) == 0
    assert fields["NSpgid"] == [str(os.getpgid(0))]  # ours: no group of its own was asked for


async def test_spawn_in_a_group_of_its_own_with_a_umask(identity, home):
    out = memfd()
    try:
        watch = spawn(["/bin/sh", "-c", "exec grep -E '^(Umask|NSpgid):' /proc/self/status"], identity=identity,
                      cwd=str(home), env={}, stdin=subprocess.DEVNULL, stdout=out, stderr=out, process_group=True,
                      umask=0o077)
        assert await asyncio.wait_for(watch.wait(), 30) == 0
        watch.reap()
        fields = status_fields(read_all(out))
    finally:
        os.close(out)
    assert fields == {"Umask": ["0077"], "NSpgid": [str(watch.pid)]}


def test_spawn_working_directory_rules(identity, home, new_dir):
    """Entered as root before the switch: the user's own directory, or /; any other is refused
    before anything starts. Without an identity (the process stays root) any directory goes."""
    roots = new_dir("roots-", 0o755)
    out = memfd()

    def run(cwd: str, who: Identity | None) -> tuple[int | None, list[str]]:
        os.ftruncate(out, 0)
        os.lseek(out, 0, os.SEEK_SET)  # the shared offset: the last run left it at its end
        watch = spawn(["/bin/sh", "-c", "pwd; id -u"], identity=who, cwd=cwd, env={"PATH": "/usr/bin:/bin"},
                      stdin=subprocess.DEVNULL, stdout=out, stderr=out, process_group=True)
        status = watch.wait_blocking(30)
        watch.reap()
        return status, read_all(out).split()

    try:
        assert run(str(home), identity) == (0, [str(home), str(identity.uid)])
        assert run("/", identity) == (0, ["/", str(identity.uid)])
        assert run(str(roots), None) == (0, [str(roots), "0"])
        children = our_children()
        with pytest.raises(PermissionError) as refused:
            run(str(roots), identity)
        assert refused.value.errno == errno.EACCES
        assert str(refused.value) == (f"[Errno {errno.EACCES}] working directory {roots} is not owned by "
                                      f"{identity.user}")
        assert our_children() == children  # nothing was started
    finally:
        os.close(out)


def test_spawn_of_a_program_that_does_not_exist_leaves_nothing(identity, home):
    children, claimed = our_children(), set(CLAIMED)
    with pytest.raises(FileNotFoundError):
        spawn(["/nonexistent/program"], identity=identity, cwd=str(home), env={}, stdin=subprocess.DEVNULL,
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=True)
    assert our_children() == children
    assert CLAIMED == claimed


def test_spawn_as_a_user_switches_every_id_drops_every_capability_and_leaks_no_fd(identity, home):
    """Through nodestepd-monitor --exec-as (vforked as root, the switch at its exec): the program
    has the user's uids, gids and groups, no capability, the PATH of its env searched for it,
    and only 0-2 and the fds passed (its report pipe closed at the exec)."""
    out = memfd()
    r, w = os.pipe()
    try:
        script = ("grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapAmb):' /proc/self/status; "
                  "ls /proc/self/fd; exit 0")
        watch = spawn(["sh", "-c", script], identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"},
                      stdin=subprocess.DEVNULL, stdout=out, stderr=out, process_group=True, pass_fds=(w,))
        assert watch.wait_blocking(30) == 0
        watch.reap()
        lines = read_all(out).splitlines()
    finally:
        for fd in (out, r, w):
            os.close(fd)
    fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in lines if ":" in line}
    assert fields["Uid"] == [str(identity.uid)] * 4 and fields["Gid"] == [str(identity.gid)] * 4
    assert sorted(map(int, fields["Groups"])) == sorted(set(identity.groups))
    assert fields["CapPrm"] == fields["CapEff"] == fields["CapAmb"] == ["0000000000000000"]
    fds = {int(x) for x in lines if x.isdigit()}
    assert {0, 1, 2, w} <= fds and len(fds - {0, 1, 2, w}) == 1, fds  # the one more: ls's own of /proc/self/fd


def dump_env_program(home: Path) -> Path:
    """A copy of cat in a directory of the user's that only an env's PATH names."""
    bindir = home / "bin"
    bindir.mkdir(exist_ok=True)
    program = bindir / "nsd-dump-env"
    program.write_bytes(Path("/bin/cat").read_bytes())
    program.chmod(0o755)
    return program


def spawned_env(identity: Identity, home: Path, env: dict[str, str], monkeypatch) -> tuple[list, dict, bytes]:
    """spawn the env dumper as the user: (argv and env the daemon's Popen got, what the program found in
    its /proc/self/environ)."""
    started = []
    real = spawn_module._spawn

    def recording(argv, **kwargs):
        started.append((list(argv), dict(kwargs["env"])))
        return real(argv, **kwargs)

    monkeypatch.setattr(spawn_module, "_spawn", recording)
    out = memfd()
    try:
        watch = spawn([dump_env_program(home).name, "/proc/self/environ"], identity=identity, cwd=str(home),
                      env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, process_group=True,
                      start_timeout=30)
        assert watch.wait_blocking(30) == 0
        watch.reap()
        os.lseek(out, 0, os.SEEK_SET)
        found = b""
        while chunk := os.read(out, 1 << 20):
            found += chunk
    finally:
        os.close(out)
    [(argv, popen_env)] = started
    return argv, popen_env, found


def test_spawn_as_a_user_starts_the_switch_as_root_with_no_environment_and_the_program_with_exactly_env(
        identity, home, monkeypatch):
    """The step's environment (built from what the user sent) is read by nothing running as root:
    nodestepd-monitor --exec-as starts with none at all (the C library's start-up would read
    GLIBC_TUNABLES, MALLOC_* there), and it is not in its argv either (world-readable in /proc).
    The program gets exactly env, in order, found through env's PATH."""
    env = {"PATH": f"/nonexistent:{home}/bin", "GLIBC_TUNABLES": "glibc.malloc.check=3", "EMPTY": "",
           "SPACES AND\nLINES": "a b\nc=d", "UNICODE": "é☃"}
    argv, popen_env, found = spawned_env(identity, home, env, monkeypatch)
    assert popen_env == {}
    assert argv[:2] == [spawn_module.EXEC_AS_PROGRAM, "--exec-as"]
    assert argv[argv.index("--") + 1:] == ["nsd-dump-env", "/proc/self/environ"]
    assert not any(value in arg for arg in argv for value in ("glibc.malloc", "a b\nc=d", "é☃"))
    assert found == b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items())


def test_spawn_as_a_user_passes_a_large_environment_intact(identity, home, monkeypatch):
    """200 KB of environment (one value of 100 KB, 100 of 1 KB): every byte reaches the program."""
    env = {"PATH": f"{home}/bin", "BIG": "x" * 100_000, **{f"V{i}": chr(ord("a") + i % 26) * 1000 for i in range(100)}}
    _, _, found = spawned_env(identity, home, env, monkeypatch)
    assert len(found) > 200_000
    assert found == b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items())


def test_spawn_as_a_user_refuses_an_environment_beyond_what_exec_takes_and_leaves_nothing(identity, home):
    """7 MiB of environment (more than execve ever takes): the switch reads none of it (E2BIG, said
    as such), exits, and is reaped."""
    children, claimed = our_children(), set(CLAIMED)
    with pytest.raises(OSError) as refused:
        spawn(["/bin/true"], identity=identity, cwd=str(home), env={f"V{i}": "x" * 100_000 for i in range(70)},
              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=True,
              start_timeout=30)
    assert refused.value.errno == errno.E2BIG
    assert str(refused.value) == (f"[Errno {errno.E2BIG}] {os.strerror(errno.E2BIG)} "
                                  "(taking in its environment as the user)")
    assert our_children() == children
    assert CLAIMED == claimed


@pytest.mark.parametrize("name, value", [("", "x"), ("A=B", "x"), ("A\0B", "x"), ("A", "x\0y")])
def test_spawn_as_a_user_refuses_what_cannot_be_an_environment_variable_before_starting_anything(
        identity, home, name, value):
    children = our_children()
    with pytest.raises(ValueError):
        spawn(["/bin/true"], identity=identity, cwd=str(home), env={"PATH": "/bin", name: value},
              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=True)
    assert our_children() == children


@pytest.mark.parametrize("env_fd, expected", [
    ("closed", f"{errno.EBADF} env"),
    ("pipe", f"{errno.EINVAL} env"),  # not a file (nor sealed): not what the daemon hands in
    (b"A=1\0B=2", f"{errno.EINVAL} env"),  # the last entry not ended
    (b"A=1\0B\0", f"{errno.EINVAL} env"),  # an entry without "="
    (b"A=1\0=2\0", f"{errno.EINVAL} env"),  # nor a name
])
def test_exec_as_reports_an_environment_it_cannot_take(user, env_fd, expected):
    """nodestepd-monitor --exec-as itself, given a bad ENV_FD: "ERRNO env" on the report pipe, exit 127,
    the program never run."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    extra = []
    if env_fd == "closed":
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
    elif env_fd == "pipe":
        fd, w = os.pipe()
        extra.append(w)
    else:
        fd = memfd()
        os.write(fd, env_fd)
    try:
        passed = (report_w,) if env_fd == "closed" else (report_w, fd)
        result = subprocess.run(
            [spawn_module.EXEC_AS_PROGRAM, "--exec-as", str(report_w), str(fd), str(user.uid), str(user.gid),
             str(user.gid), "--", "/bin/echo", "ran"],
            env={}, pass_fds=passed, capture_output=True, timeout=30)
        os.close(report_w)
        report_w = -1
        assert (result.returncode, result.stdout) == (127, b"")
        assert os.read(report_r, 64).decode() == expected
    finally:
        for f in (report_r, report_w, *extra, *(() if env_fd == "closed" else (fd,))):
            if f >= 0:
                os.close(f)


def test_spawn_without_a_pidfd_stops_the_child_and_leaves_nothing(identity, home, monkeypatch):
    """Out of fds right after the fork: the child would run on unwatched, and nobody would reap it."""
    def no_pidfd(cls, pid):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(Pidfd, "open", classmethod(no_pidfd))
    children, claimed = our_children(), set(CLAIMED)
    with pytest.raises(OSError) as failure:
        spawn(["/bin/sleep", "1000"], identity=identity, cwd=str(home), env={}, stdin=subprocess.DEVNULL,
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=True)
    assert failure.value.errno == errno.EMFILE
    assert our_children() == children  # killed and reaped, not left running or a zombie
    assert CLAIMED == claimed


# ---- the doctor's probes (ctl/probes.py), through spawn ------------------------------------


def test_doctor_run_as_reports_status_and_output(identity):
    outcome = probes.run_as(identity, ["/bin/sh", "-c", "id -u; echo err >&2; exit 3"],
                            env={"PATH": "/usr/bin:/bin"}, cwd="/", timeout=30)
    assert outcome == probes.Outcome(3, f"{identity.uid}\nerr")
    assert probes.run_as(identity, ["/bin/sh", "-c", "kill -TERM $$"], env={}, cwd="/", timeout=30) == \
        probes.Outcome(128 + signal.SIGTERM, "")
    assert probes.run_as(identity, ["/nonexistent/program"], env={}, cwd="/", timeout=30) == \
        probes.Outcome(-1, "cannot start /nonexistent/program: No such file or directory")


def test_doctor_run_as_kills_the_group_at_the_timeout(identity, home):
    pids = home / "pids"
    children = our_children()
    started = time.monotonic()
    outcome = probes.run_as(identity, ["/bin/sh", "-c", f"sleep 1000 & echo $! > {shlex.quote(str(pids))}; wait"],
                            env={"PATH": "/usr/bin:/bin"}, cwd=str(home), timeout=0.5)
    elapsed = time.monotonic() - started
    assert outcome == probes.Outcome(-1, "timed out after 0.5 s; killed")
    assert 0.5 <= elapsed < 10
    assert_exits(int(pids.read_text()))  # in the group: killed too
    assert our_children() == children  # and the shell was reaped


def test_doctor_never_runs_a_command_as_root(home):
    children = our_children()
    with pytest.raises(ValueError, match="never runs runtime commands as root"):
        probes.run_as(Identity.for_uid(0), ["true"], env={}, cwd="/", timeout=30)
    assert our_children() == children


# ---- spawn_shell ----------------------------------------------------------------------


async def test_spawn_shell_runs_as_the_identity(identity, home, spawned, shell_ignored_signals):
    old_umask = os.umask(0o077)  # the child must get RUNTIME_UMASK, not ours
    try:
        status, pid, out = await run_shell(
            # exec: the shell's own process reads its status (a shell busy forking or waiting blocks signals).
            "exec grep -E '^(Uid|Gid|Groups|Umask|SigIgn|SigBlk|NSpgid|NSsid):' /proc/self/status",
            identity, str(home), {"PATH": "/usr/bin:/bin"}, spawned,
        )
    finally:
        os.umask(old_umask)
    assert status == 0, out
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k: v.split() for k, v in fields.items()}
    assert fields["Uid"] == [str(identity.uid)] * 4
    assert fields["Gid"] == [str(identity.gid)] * 4
    assert sorted(int(g) for g in fields["Groups"]) == sorted(identity.groups)
    assert fields["Umask"] == ["0022"]
    # Neither Python's SIG_IGN for SIGPIPE nor the shell's for SIGINT, SIGQUIT, SIGHUP is inherited.
    assert int(fields["SigIgn"][0], 16) == 0
    assert int(fields["SigBlk"][0], 16) == 0
    # Its own process group, led by the shell; our session (no setsid).
    assert fields["NSpgid"] == [str(pid)]
    assert int(fields["NSpgid"][0]) != os.getpgid(0)
    assert fields["NSsid"] == [str(os.getsid(0))]


async def test_spawn_shell_is_its_own_process_group_while_running(identity, home, spawned):
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        watch = spawn_shell("echo ready; exec sleep 1000", identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"},
                            stdin=r, stdout=w, stderr=w, start_timeout=30)
        spawned.append(watch)
        os.close(w)
        w = -1
        assert await read_lines_until(r, lambda lines: "ready" in lines) == ["ready"]
        assert os.getpgid(watch.pid) == watch.pid
        assert watch.pid in our_children()
        watch.kill_group(signal.SIGKILL)
        assert await asyncio.wait_for(watch.wait(), 10) == 128 + signal.SIGKILL
        watch.reap()
        assert watch.pid not in our_children()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


async def test_spawn_shell_cwd_env_and_stdio(identity, home, spawned):
    env = {"PATH": "/usr/bin:/bin", "ODD": "a b\tc", "EMPTY": "", "UNI": "\u00e9"}
    status, _, out = await run_shell(
        'readlink /proc/$$/cwd; readlink /proc/$$/fd/0; tr "\\0" "\\n" < /proc/$$/environ; true',
        identity, str(home), env, spawned,
    )
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0] == str(home)
    assert lines[1] == "/dev/null"
    assert sorted(lines[2:]) == sorted(f"{k}={v}" for k, v in env.items())  # exactly the given env


async def test_spawn_shell_passes_no_fds_beyond_stdio(identity, home, spawned):
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    os.set_inheritable(leak_w, True)
    try:
        status, _, out = await run_shell("ls /proc/$$/fd; true", identity, str(home), {"PATH": "/usr/bin:/bin"}, spawned)
    finally:
        os.close(leak_r)
        os.close(leak_w)
    assert status == 0, out
    assert sorted(int(fd) for fd in out.split()) == [0, 1, 2]


async def test_spawn_shell_in_a_directory_the_user_cannot_enter(identity, workdir, spawned):
    closed = workdir / "root-only"
    closed.mkdir(exist_ok=True)
    closed.chmod(0o700)
    children = our_children()
    try:
        watch = spawn_shell("true", identity=identity, cwd=str(closed), env={}, stdin=0, stdout=1, stderr=2, start_timeout=30)
    except PermissionError:
        pass
    else:
        spawned.append(watch)
        pytest.fail(f"the shell was started as uid {identity.uid} in {closed} (mode 0700, owned by root)")
    assert our_children() == children  # nothing left behind, not even a zombie


async def test_spawn_shell_status_of_a_command(identity, home, spawned):
    assert (await run_shell("exit 42", identity, str(home), {}, spawned))[0] == 42
    assert (await run_shell("kill -TERM $$", identity, str(home), {}, spawned))[0] == 128 + signal.SIGTERM


# ---- run_helper ----------------------------------------------------------------------


async def test_run_helper_collects_output_and_status(identity, home):
    result = await run_helper("echo out; echo err >&2; printf '  tail  \\n\\n'; exit 3",
                              identity=identity, cwd=str(home), env={}, timeout=30)
    assert result == HelperResult(3, "out\nerr\n  tail")


async def test_run_program_keeps_the_start_of_stdout_and_the_end_of_stderr(identity, home):
    """A stage hook's output: root reads only the capped bytes, stdout and stderr apart."""
    script = 'echo "$(id -u) $(pwd) $X"; seq 1 1000; seq 1 1000 >&2; echo last words >&2; exit 4'
    result = await run_program(["/bin/sh", "-c", script], identity=identity, cwd=str(home),
                               env={"X": "x", "PATH": "/usr/bin:/bin"}, timeout=30, stdout_cap=40, stderr_cap=14)
    assert result == ProgramResult(4, f"{identity.uid} {home} x\n1\n2\n3\n".encode()[:40], "000\nlast words")


async def test_run_program_timeout_kills_its_group(identity, home):
    pids = home / "pids"
    started = time.monotonic()
    result = await run_program(["/bin/sh", "-c", f"sleep 1000 & echo $! > {shlex.quote(str(pids))}; wait"],
                               identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"}, timeout=0.5,
                               stdout_cap=10, stderr_cap=10)
    assert (result.status, result.timed_out) == (128 + signal.SIGKILL, True)
    assert 0.5 <= time.monotonic() - started < 10
    assert_exits(int(pids.read_text()))


async def test_run_helper_runs_as_the_user_with_env_and_cwd(identity, home):
    result = await run_helper('echo "$(id -u):$(id -g):$(pwd):$X"', identity=identity, cwd=str(home),
                              env={"X": "x", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert result == HelperResult(0, f"{identity.uid}:{identity.gid}:{home}:x")


async def test_run_helper_does_not_wait_for_end_of_file(identity, home):
    """A process the helper leaves behind keeps its output open: the helper returns at its
    exit anyway, and the leftover (still in the helper's process group) is killed."""
    started = time.monotonic()
    result = await run_helper("sleep 1000 & echo $!", identity=identity, cwd=str(home),
                              env={"PATH": "/usr/bin:/bin"}, timeout=30)
    leftover = int(result.output)
    assert result.status == 0
    assert time.monotonic() - started < 10
    assert_exits(leftover)
    assert proc_state(leftover) in (None, "Z")


async def test_run_helper_timeout_kills_the_group(identity, home):
    pids = home / "pids"
    children = our_children()
    started = time.monotonic()
    result = await run_helper(f"sleep 1000 & echo $$ $! > {shlex.quote(str(pids))}; wait",
                              identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"}, timeout=0.5)
    elapsed = time.monotonic() - started
    assert result == HelperResult(128 + signal.SIGKILL, "timed out after 0.5 s; killed", timed_out=True)
    assert 0.5 <= elapsed < 10
    leader, grandchild = map(int, pids.read_text().split())
    assert_exits(grandchild)  # in the group: killed too
    assert our_children() == children  # and the shell was reaped
    with pytest.raises(ChildProcessError):
        os.waitid(os.P_PID, leader, os.WEXITED | os.WNOHANG)


async def test_run_helper_keeps_the_tail_of_its_output(identity, home):
    result = await run_helper("head -c 200000 /dev/zero | tr '\\0' x; echo; echo the end", identity=identity,
                              cwd=str(home), env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert result.status == 0
    kept = "x" * (HELPER_OUTPUT_LIMIT - len("\nthe end\n")) + "\nthe end"
    assert result.output == f"[{200009 - HELPER_OUTPUT_LIMIT} bytes of output before this were dropped] {kept}"


def shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


async def shmem_peak_kib(run):
    """(run's result, the machine's Shmem peak above where it was while run ran, in KiB)."""
    before = shmem_kib()
    peak = before
    done = asyncio.Event()

    async def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, shmem_kib())
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        return await run, peak - before
    finally:
        done.set()
        await sampler


async def test_run_helper_writing_100_mb_costs_no_more_than_its_tail(identity, home):
    """Issue 14.5: a RunTimeQuery writing 100 MB to stderr cost 91 MB of Shmem (its memfd). Its output
    now goes through a pipe of which only the tail is kept: the machine's Shmem, sampled while it runs,
    stays near where it was (other work on the machine moves it a little), and the message ends with
    what the helper wrote last."""
    started = time.monotonic()
    result, grown = await shmem_peak_kib(run_helper(
        "head -c 100000000 /dev/zero >&2; echo 'state: no such container' >&2; exit 1",
        identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"}, timeout=60))
    elapsed = time.monotonic() - started
    print(f"100 MB helper: {elapsed:.2f} s, Shmem peak +{grown / 1024:.1f} MiB")
    assert result.status == 1
    assert result.output.startswith(f"[{100_000_025 - HELPER_OUTPUT_LIMIT} bytes of output before this were dropped]")
    assert result.output.endswith("\0" * 100 + "state: no such container")
    assert grown < 20 * 1024  # KiB: the memfd held all 100 MB (97,656 KiB)


# ---- a child stopped before its exec (issue 19.2) ---------------------------------------------

STOPPED_SCRIPT = textwrap.dedent("""
    import asyncio, json, os, subprocess, sys, threading, time
    import uvloop
    from nodestepd.process.identity import Identity
    from nodestepd.process.spawn import run_helper, spawn_shell
    from nodestepd.process.watch import SPAWN_LOCK

    args = json.loads(sys.argv[1])
    identity = Identity.for_uid(args["uid"])
    stopper = subprocess.Popen([args["stopper"], str(os.getpid()), "1", "exec"], stdout=subprocess.PIPE)
    assert stopper.stdout.readline() == b"ready\\n"
    out = {}

    def lock_probe():  # once the child is stopped: the lock the reaper's sweep takes must be free
        out["stopped"] = int(stopper.stdout.readline())
        free = SPAWN_LOCK.acquire(timeout=0.25)
        if free:
            SPAWN_LOCK.release()
        out["lock_free"] = free

    probe = threading.Thread(target=lock_probe)
    probe.start()
    started = time.monotonic()
    try:
        spawn_shell("true", identity=identity, cwd=args["home"], env={}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_timeout=0.5)
        out["spawn"] = "started"
    except OSError as e:
        out["spawn"] = [e.errno, e.strerror, time.monotonic() - started]
    probe.join()

    async def main():  # run_helper: the event loop runs on while the helper is held
        loop = asyncio.get_running_loop()
        gaps = []

        async def ticker():
            last = loop.time()
            while True:
                await asyncio.sleep(0.01)
                gaps.append(loop.time() - last)
                last = loop.time()

        tick = asyncio.create_task(ticker())
        started = time.monotonic()
        try:
            out["helper"] = repr(await run_helper("true", identity=identity, cwd=args["home"], env={}, timeout=0.5))
        except OSError as e:
            out["helper"] = [e.errno, e.strerror, time.monotonic() - started]
        tick.cancel()
        out["loop_max_gap"] = max(gaps)

    uvloop.run(main())
    stopper.kill()
    stopper.wait()
    out["children"] = [int(p) for t in os.listdir("/proc/self/task")
                       for p in open(f"/proc/self/task/{t}/children").read().split()]
    print(json.dumps(out))
""")


def test_a_child_stopped_before_its_exec_is_killed_at_its_start_deadline(user, home, stopper_program):
    """Issue 19.2: once a spawned child has switched to the user, any process of that user can
    SIGSTOP it before its exec, and Popen waited for that exec for ever, holding SPAWN_LOCK (which
    the reaper's sweep takes on the event loop), run_helper doing so on the loop itself. A child
    for a user is now root's until it execs nodestepd-monitor --exec-as (vfork: nobody but root
    can stop it there), which switches to the user and only then execs the program: that is
    where the user can stop it. Here the stopper (root, tracing the script) stops every child
    right after that first exec, every time (the user's own SIGSTOP must win a race of
    microseconds). Each start fails with ETIMEDOUT at its deadline, the lock stays free, the
    loop runs on, and nothing is left."""
    result = subprocess.run([sys.executable, "-c", STOPPED_SCRIPT,
                             json.dumps({"uid": user.uid, "home": str(home), "stopper": stopper_program})],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    message = "the runtime did not start within 0.5 s (stopped or stuck before exec); killed"
    for what in ("spawn", "helper"):
        err, strerror, elapsed = out[what]
        assert (err, strerror) == (errno.ETIMEDOUT, message)
        assert 0.5 <= elapsed < 2.5, (what, elapsed)
    assert out["lock_free"] is True
    assert out["loop_max_gap"] < 0.25
    assert out["children"] == []  # killed and reaped
    assert proc_state(out["stopped"]) is None


# ---- group_members / signal_group_except_leader ------------------------------------------------


async def test_signal_reaches_the_leaders_descendants_but_not_the_leader(identity, home, spawned):
    """The leader shell runs an inner shell that exits 7 on USR1. If the leader got USR1 it would die
    by the signal (status 138) and never report the inner shell's status."""
    inner = (
        'trap "exit 7" USR1; echo ready $$; '
        # Each child reports once it is a fresh program: a signal that came between fork and exec
        # would hit the inner shell's trap in the child, and be lost.
        "sh -c 'echo sleeper $$; exec sleep 1000' & "
        "setsid sh -c 'echo other $$; exec sleep 1000' & "  # another session: not in the group
        "wait"
    )
    command = f"sh -c {shlex.quote(inner)}; echo inner=$?"
    r, w = os.pipe2(os.O_CLOEXEC)
    other = None
    try:
        watch = spawn_shell(command, identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"},
                            stdin=r, stdout=w, stderr=w, start_timeout=30)
        spawned.append(watch)
        os.close(w)
        w = -1
        lines = await read_lines_until(r, lambda ls: {l.split()[0] for l in ls} >= {"ready", "sleeper", "other"})
        pid_of = {l.split()[0]: int(l.split()[1]) for l in lines}
        inner_pid, sleep_pid, other = pid_of["ready"], pid_of["sleeper"], pid_of["other"]
        assert os.getpgid(other) != watch.pid

        members = group_members(watch.pid)
        assert sorted(members) == sorted([inner_pid, sleep_pid])
        assert watch.pid not in members and other not in members

        assert signal_group_except_leader(watch.pid, signal.SIGUSR1) == 2
        assert await asyncio.wait_for(watch.wait(), 10) == 0
        rest = await read_lines_until(r, lambda ls: any(l.startswith("inner=") for l in ls))
        assert "inner=7" in rest
        assert_exits(sleep_pid)
        assert proc_state(other) in ("S", "R")  # outside the group: untouched
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        if other is not None and proc_state(other) not in (None, "Z"):
            fd = os.pidfd_open(other)
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
            assert_exits(other)


async def test_a_lone_leader_has_no_members(identity, home, spawned):
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        watch = spawn_shell("echo ready; exec sleep 1000", identity=identity, cwd=str(home),
                            env={"PATH": "/usr/bin:/bin"}, stdin=r, stdout=w, stderr=w, start_timeout=30)
        spawned.append(watch)
        os.close(w)
        w = -1
        await read_lines_until(r, lambda ls: "ready" in ls)
        assert group_members(watch.pid) == []
        assert signal_group_except_leader(watch.pid, signal.SIGTERM) == 0
        assert proc_state(watch.pid) in ("S", "R")
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_group_members_of_a_vanished_process():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert group_members(pid) == []
    assert signal_group_except_leader(pid, signal.SIGTERM) == 0


# ---- find_program ------------------------------------------------------------------------


@pytest.fixture
def bindir(tmp_path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("myruntime", "other"):
        p = d / name
        p.write_text("#!/bin/sh\necho hi\n")
        p.chmod(0o755)
    (d / "not-executable").write_text("data\n")
    (d / "subdir").mkdir()
    return d


def test_find_program_searches_path(bindir):
    assert find_program("myruntime --root=/run/user/1/ run x -b /b", {"PATH": f"/nonexistent:{bindir}"}) == f"{bindir}/myruntime"


def test_find_program_uses_the_runtime_environments_path_not_ours(bindir, monkeypatch):
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(RuntimeNotFound):
        find_program("myruntime run", {"PATH": "/usr/bin:/bin"})


def test_find_program_without_path_uses_the_default_path():
    assert find_program("sh -c true", {}) == "/bin/sh"


def test_find_program_env_with_its_own_path(bindir):
    env = {"PATH": "/usr/bin:/bin"}
    assert find_program(f"env -i PATH={bindir} USER=$(whoami) myruntime -w %r", env) == f"{bindir}/myruntime"
    assert find_program(f"/usr/bin/env PATH={bindir} other", env) == f"{bindir}/other"
    # env itself is found in the runtime environment's PATH; the program in env's.
    with pytest.raises(RuntimeNotFound, match=f"PATH={bindir}"):
        find_program(f"env -i PATH={bindir} runc run", env)


def test_find_program_skips_leading_assignments(bindir):
    env = {"PATH": str(bindir)}
    assert find_program("FOO=1 BAR='a b' other --flag", env) == f"{bindir}/other"
    assert find_program("env -i A=1 other", env) == f"{bindir}/other"


def test_find_program_absolute_paths(bindir):
    assert find_program(f"{bindir}/myruntime run", {"PATH": ""}) == f"{bindir}/myruntime"
    for missing in (f"{bindir}/nope", f"{bindir}/subdir"):
        with pytest.raises(RuntimeNotFound) as e:
            find_program(f"{missing} run", {"PATH": str(bindir)})
        assert str(e.value) == f"runtime program {missing} does not exist"
    with pytest.raises(RuntimeNotFound) as e:
        find_program(f"{bindir}/not-executable run", {"PATH": str(bindir)})
    assert str(e.value) == f"runtime program {bindir}/not-executable is not executable by anyone"


def test_find_program_checks_execute_permission_as_the_user(bindir, identity):
    # Root may execute anything with an x bit; the user the shell runs as may not.
    private = bindir / "root-only-runtime"
    private.write_text("#!/bin/sh\n")
    private.chmod(0o700)
    with pytest.raises(RuntimeNotFound) as e:
        find_program("root-only-runtime run", {"PATH": str(bindir)}, identity)
    assert str(e.value) == f"runtime program {private} is not executable by {identity.user}"
    assert find_program("myruntime run", {"PATH": str(bindir)}, identity) == f"{bindir}/myruntime"
    # A later PATH entry the user may run wins, as in the shell.
    later = bindir / "later"
    later.mkdir()
    (later / "root-only-runtime").write_text("#!/bin/sh\n")
    (later / "root-only-runtime").chmod(0o755)
    found = find_program("root-only-runtime run", {"PATH": f"{bindir}:{later}"}, identity)
    assert found == f"{later}/root-only-runtime"


def test_find_program_missing_program(bindir):
    with pytest.raises(RuntimeNotFound) as e:
        find_program("nosuch-runtime run %n", {"PATH": f"{bindir}:/usr/bin"})
    assert str(e.value) == f"runtime program 'nosuch-runtime' is not found in PATH={bindir}:/usr/bin"


@pytest.mark.parametrize(
    "command",
    [
        "$RUNTIME run x",
        "`which runc` run",
        "exec runc run x",
        "cd /tmp && runc run",
        "if true; then runc; fi",
        "{ runc run; }",
        "(runc run)",
        "2>/dev/null runc run",
        "'unterminated",
        "env -u HOME runc run",
        "env -C /tmp runc run",
        "",
        "FOO=1",
        "env -i",
    ],
)
def test_find_program_gives_up_on_shell_syntax(command):
    assert find_program(command, {"PATH": "/nonexistent"}) is None


@pytest.mark.parametrize("command", [
    "export X=1; runc run x", "unset X; runc run x", "umask 077; runc run x", "ulimit -c 0; exec runc run x",
    "readonly X; runc run x", "! runc run x",
])
def test_find_program_gives_up_on_builtins(command):
    assert find_program(command, {"PATH": "/usr/bin:/bin"}) is None


def test_find_program_honours_a_leading_path_assignment(bindir):
    assert find_program(f"PATH={bindir} myruntime run", {"PATH": "/usr/bin:/bin"}) == f"{bindir}/myruntime"


def test_find_program_tilde(bindir):
    assert find_program("~/myruntime run", {"PATH": "/usr/bin", "HOME": str(bindir)}) in (None, f"{bindir}/myruntime")


async def test_run_program_writing_100_mb_on_each_stream_costs_no_more_than_its_caps(identity, home):
    """A stage hook's output went to memfds without a cap: 100 MB on stdout and on stderr would
    have held 200 MB of Shmem. Now the pipes are read as they come, keeping the caps only."""
    script = ("echo 'bundle=/b'; head -c 100000000 /dev/zero; head -c 100000000 /dev/zero >&2; "
              "echo 'last words' >&2; exit 2")
    result, grown = await shmem_peak_kib(run_program(
        ["/bin/sh", "-c", script], identity=identity, cwd=str(home), env={"PATH": "/usr/bin:/bin"}, timeout=60,
        stdout_cap=4096, stderr_cap=20))
    assert (result.status, result.timed_out) == (2, False)
    assert result.stdout == b"bundle=/b\n" + b"\0" * (4096 - 10)
    assert result.stderr.endswith("last words")
    assert grown < 20 * 1024  # KiB: the memfds held all 200 MB


async def test_off_loop_reuses_idle_threads_and_never_queues_a_call_behind_a_busy_one():
    from nodestepd.process.spawn import off_loop

    first = await off_loop(threading.get_ident)
    assert await off_loop(threading.get_ident) == first  # the idle thread, not a new one
    blocked, release = threading.Event(), threading.Event()

    def hold() -> int:
        blocked.set()
        assert release.wait(10)
        return threading.get_ident()

    held = asyncio.ensure_future(off_loop(hold))
    assert await asyncio.to_thread(blocked.wait, 10)
    # The kept thread is busy (as if waiting for a stopped process): another call runs at once elsewhere.
    other = await asyncio.wait_for(off_loop(threading.get_ident), 10)
    release.set()
    assert await held == first and other != first
    with pytest.raises(ZeroDivisionError):
        await off_loop(lambda: 1 / 0)
