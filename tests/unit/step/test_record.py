import asyncio
import errno
import os
import stat

import pytest

from nodestepd.step import record as steprecord
from nodestepd.step.record import RecordError, RecordStore, StepRecord


def make_record(job_id=7, step_id=0, state="running") -> StepRecord:
    return StepRecord(
        format=steprecord.FORMAT, version=steprecord.VERSION, job_id=job_id, step_id=step_id, first_task=0,
        ntasks=1, task_offset=None, local_offset=None, node_id=None, container_id=None,
        user=steprecord.UserRecord("alice", 1000, 1000, [1000, 27], "/home/alice"),
        bundle="/b", args=["sleep", "3"], workdir="/w", attached=False, started_at=1.5, state=state,
        settings=steprecord.SettingsRecord(
            oci_conf="/etc/slurm/oci.conf", runtime_run="runc run %n", runtime_create=None, runtime_start=None,
            runtime_query=None, runtime_kill="runc kill %n", runtime_delete="runc delete %n",
            disable_cleanup=False, spool_dir="/s", node_name="n1", kill_wait=30.0, runtime_timeout=60.0,
            runtime_env={"PATH": "/usr/bin"},
        ),
        tasks=[steprecord.TaskRecord(0, "/s/oci-job7-0/task-0", {"task_id": 0},
                                     monitor=steprecord.ProcRecord(10, 100), process=steprecord.ProcRecord(11, 101))],
    )


def test_round_trip():
    record = make_record()
    assert steprecord.decode(steprecord.encode(record)) == record


def test_a_pending_spool_round_trips_and_an_older_record_reads_as_not_pending():
    import msgspec
    record = make_record(state="launching")
    record.spool = steprecord.SpoolRecord("/s/oci-job7-0", ["/s/oci-job7-0/task-0"], [], pending=True)
    assert steprecord.decode(steprecord.encode(record)) == record
    data = msgspec.json.decode(steprecord.encode(record))
    del data["spool"]["pending"]
    assert steprecord.decode(msgspec.json.encode(data)).spool.pending is False


def test_a_record_keeps_the_stage_hooks_and_the_bundle_a_stage_in_replaced():
    record = make_record()
    record.settings.stage_in, record.settings.stage_out = "/hooks/in", "/hooks/out"
    record.orig_bundle, record.stage_out_due = "/given", True
    assert steprecord.decode(steprecord.encode(record)) == record
    settings = steprecord.settings_of(record)
    assert (settings.stage_in, settings.stage_out) == ("/hooks/in", "/hooks/out")


def test_a_record_written_before_stage_hooks_reads_as_without_them():
    import msgspec
    data = msgspec.json.decode(steprecord.encode(make_record()))
    for key in ("orig_bundle", "stage_out_due"):
        del data[key]
    for key in ("stage_in", "stage_out"):
        del data["settings"][key]
    record = steprecord.decode(msgspec.json.encode(data))
    assert (record.orig_bundle, record.stage_out_due, record.settings.stage_out) == (None, False, None)


@pytest.mark.parametrize("data, reason", [
    (b"", "not JSON"),
    (b'{"format": "nodestepd-step", "version": 1, "job_', "not JSON"),
    (b"\x00\xff garbage", "not JSON"),
    (b"[1, 2]", "not JSON"),
    (b'{"format": "something-else"}', "not a nodestepd-step file"),
    (b'{"format": "nodestepd-step", "version": 0}', "record version 0"),
    (b'{"format": "nodestepd-step", "version": 1}', "invalid record"),
])
def test_decode_refuses(data, reason):
    with pytest.raises(RecordError, match=reason):
        steprecord.decode(data)


def test_decode_refuses_truncation_at_every_length():
    data = steprecord.encode(make_record())
    for n in range(len(data) - 1):  # every prefix short of the closing brace
        with pytest.raises(RecordError):
            steprecord.decode(data[:n])


def test_decode_refuses_bad_state_and_task_count():
    import msgspec
    raw = msgspec.json.decode(steprecord.encode(make_record()))
    raw["state"] = "sleeping"
    with pytest.raises(RecordError, match="unknown state"):
        steprecord.decode(msgspec.json.encode(raw))
    raw["state"] = "running"
    raw["ntasks"] = 2
    with pytest.raises(RecordError, match="1 tasks for ntasks=2"):
        steprecord.decode(msgspec.json.encode(raw))


def test_store_write_load_remove(tmp_path):
    store = RecordStore(str(tmp_path))
    a, b = make_record(7), make_record(8, state="terminating")
    store.write(a)
    store.write(b)
    path = tmp_path / "steps" / "1000.7.0.0.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "steps").stat().st_mode) == 0o700
    records, problems = store.load_all()
    assert (records, problems) == ([a, b], [])
    b.state = "running"
    store.write(b)
    assert store.load_all()[0][1].state == "running"
    assert sorted(os.listdir(tmp_path / "steps")) == ["1000.7.0.0.json", "1000.8.0.0.json"]  # no temporary left
    store.remove("1000.7.0.0")
    assert [r.job_id for r in store.load_all()[0]] == [8]


def test_exit_file(tmp_path):
    store = RecordStore(str(tmp_path))
    assert store.read_exits("7.0.0") == ({}, [])
    fd = store.open_exits("7.0.0")
    os.write(fd, b"11 4\n")
    os.close(fd)
    fd = store.open_exits("7.0.0")  # a second monitor appends
    os.write(fd, b"12 137\n13 1")  # the last write cut short
    os.close(fd)
    assert store.read_exits("7.0.0") == ({11: 4, 12: 137}, ["incomplete last line ignored: b'13 1'"])
    store.remove("7.0.0")
    assert store.read_exits("7.0.0") == ({}, [])


def test_bad_files_are_quarantined_and_the_rest_load(tmp_path):
    store = RecordStore(str(tmp_path))
    good = make_record(7)
    store.write(good)
    full = steprecord.encode(make_record(8))
    (tmp_path / "steps" / "8.0.0.json").write_bytes(full[: len(full) // 2])  # truncated
    (tmp_path / "steps" / "8.0.0.exits").write_bytes(b"11 0\n")
    (tmp_path / "steps" / "9.0.0.json").write_bytes(b"\x00garbage")
    (tmp_path / "steps" / "1000.10.0.0.json").write_bytes(steprecord.encode(make_record(11)))  # misnamed
    (tmp_path / "steps" / ".12.0.0.json.tmp").write_bytes(b"half")  # an unfinished write
    records, problems = store.load_all()
    assert records == [good]
    by_name = {p.name: p.reason for p in problems}
    assert set(by_name) == {"8.0.0.json", "9.0.0.json", "1000.10.0.0.json"}
    assert "not JSON" in by_name["8.0.0.json"] and "quarantine" in by_name["8.0.0.json"]
    assert "names step 1000.11.0.0" in by_name["1000.10.0.0.json"]
    assert sorted(os.listdir(tmp_path / "steps")) == ["1000.7.0.0.json"]
    kept = sorted(os.listdir(tmp_path / "quarantine"))
    assert len(kept) == 4 and any(k.endswith(".exits") for k in kept)
    assert any((tmp_path / "quarantine" / k).read_bytes() == full[: len(full) // 2] for k in kept)


def test_a_record_under_its_name_before_step_names_were_per_user_is_renamed(tmp_path):
    """Records an older nodestepd wrote as JOB.STEP.FIRSTTASK.json recover under UID.JOB.STEP.FIRSTTASK."""
    store = RecordStore(str(tmp_path))
    old = make_record(7)
    (tmp_path / "steps" / "7.0.0.json").write_bytes(steprecord.encode(old))
    (tmp_path / "steps" / "7.0.0.exits").write_bytes(b"11 0\n")
    assert store.load_all() == ([old], [])
    assert sorted(os.listdir(tmp_path / "steps")) == ["1000.7.0.0.exits", "1000.7.0.0.json"]
    assert store.read_exits(old.name).statuses == {11: 0}


@pytest.mark.parametrize("with_spares", [False, True], ids=["created", "spare"])
def test_a_write_that_fails_leaves_the_record_before_it_and_no_temporary_file(tmp_path, monkeypatch, with_spares):
    # Through a spare too: the spare taken as the temporary file is gone, not left behind.
    store = RecordStore(str(tmp_path))
    first = make_record(7)
    store.write(first)
    if with_spares:
        store.make_spares()

    def full(fd):  # the temporary file is there; its data cannot reach the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        store.write(make_record(7, state="terminating"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "steps")) == ["1000.7.0.0.json"]
    if with_spares:
        assert len(spares(tmp_path)) == 11
    assert store.load_all() == ([first], [])


@pytest.mark.parametrize("with_spares", [False, True], ids=["created", "spare"])
def test_store_never_writes_through_a_symlink(tmp_path, with_spares):
    # With spares, the exit file is a spare linked into place: never through a planted link either.
    store = RecordStore(str(tmp_path))
    if with_spares:
        store.write(make_record(7))
        store.make_spares()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "steps" / "7.0.0.exits")
    with pytest.raises(OSError):
        store.open_exits("7.0.0")
    assert victim.read_text() == "precious"
    if with_spares:
        assert len(spares(tmp_path)) == 11


@pytest.mark.skipif(os.geteuid() != 0, reason="the ownership check applies to root")
def test_store_refuses_a_steps_dir_others_can_write(tmp_path):
    (tmp_path / "steps").mkdir()
    (tmp_path / "steps").chmod(0o777)
    with pytest.raises(OSError, match="writable by root only"):
        RecordStore(str(tmp_path))


# ---- spare files: what a launch takes instead of creating a file while it waits ----------


def spares(tmp_path) -> list[str]:
    """The spare files (the spare directories are the spool's: test_spool.py)."""
    return sorted(n for n in os.listdir(tmp_path / "spare") if (tmp_path / "spare" / n).is_file())


def test_spares_made_are_taken_by_the_next_writes_and_exit_files(tmp_path):
    store = RecordStore(str(tmp_path))
    assert spares(tmp_path) == []  # none before the first acknowledged launch makes them
    store.write(make_record(7))
    store.make_spares()
    made = spares(tmp_path)
    assert len(made) == 12
    assert stat.S_IMODE((tmp_path / "spare").stat().st_mode) == 0o700
    assert all(stat.S_IMODE((tmp_path / "spare" / n).stat().st_mode) == 0o600 for n in made)
    ino = {(tmp_path / "spare" / n).stat().st_ino for n in made}

    second = make_record(8, state="launching")
    store.write(second, durable=False)  # a launch's first write: a spare becomes the record
    assert (tmp_path / "steps" / "1000.8.0.0.json").stat().st_ino in ino
    fd = store.open_exits(second.name)  # and another its exit file
    os.write(fd, b"11 4\n")
    os.close(fd)
    assert (tmp_path / "steps" / "1000.8.0.0.exits").stat().st_ino in ino
    assert len(spares(tmp_path)) == 10
    assert sorted(os.listdir(tmp_path / "steps")) == ["1000.7.0.0.json", "1000.8.0.0.exits", "1000.8.0.0.json"]
    assert store.load_all() == ([make_record(7), second], [])
    assert store.read_exits(second.name).statuses == {11: 4}
    store.make_spares()  # once a launch is acknowledged: topped up again
    assert len(spares(tmp_path)) == 12


def test_an_exit_file_already_there_is_appended_to_and_the_spare_is_not_left(tmp_path):
    store = RecordStore(str(tmp_path))
    store.write(make_record(7))
    store.make_spares()
    (tmp_path / "steps" / "1000.7.0.0.exits").write_bytes(b"11 0\n")
    fd = store.open_exits("1000.7.0.0")
    os.write(fd, b"12 1\n")
    os.close(fd)
    assert store.read_exits("1000.7.0.0").statuses == {11: 0, 12: 1}
    assert len(spares(tmp_path)) == 11


def test_spares_a_daemon_left_are_removed_when_the_next_opens_the_store(tmp_path):
    store = RecordStore(str(tmp_path))
    store.write(make_record(7))
    store.make_spares()
    assert len(spares(tmp_path)) == 12  # the daemon dies: nobody closes the store
    RecordStore(str(tmp_path))
    assert os.listdir(tmp_path / "spare") == []  # files and directories


def test_without_a_spare_left_a_launch_creates_its_files_as_before(tmp_path):
    store = RecordStore(str(tmp_path))
    store.write(make_record(7))
    store.make_spares()
    for job in range(8, 20):  # more launches than spares before they are made again
        store.write(make_record(job, state="launching"), durable=False)
    assert spares(tmp_path) == []
    store.write(make_record(20, state="launching"), durable=False)
    fd = store.open_exits("1000.20.0.0")
    os.close(fd)
    assert sorted(r.job_id for r in store.load_all()[0]) == list(range(7, 21))
    assert not [n for n in os.listdir(tmp_path / "steps") if n.endswith(".tmp")]


def test_closing_the_store_removes_its_spares(tmp_path):
    store = RecordStore(str(tmp_path))
    store.write(make_record(7))
    store.make_spares()
    store.close()
    assert os.listdir(tmp_path / "spare") == []


# ---- recycled records: an inode used again instead of one freed and one allocated ----------


def inodes(path) -> set[int]:
    return {(path / n).stat().st_ino for n in os.listdir(path) if (path / n).is_file()}


def test_a_replaced_record_becomes_a_spare_emptied(tmp_path):
    store = RecordStore(str(tmp_path))
    store.write(make_record(7, state="launching"), durable=False)  # a launch's first write
    store.make_spares()
    pending = (tmp_path / "steps" / "1000.7.0.0.json").stat().st_ino
    store.write(make_record(7))  # its durable write takes a spare, and gives the pending record back
    assert (tmp_path / "steps" / "1000.7.0.0.json").stat().st_ino != pending
    assert pending in inodes(tmp_path / "spare")
    assert len(spares(tmp_path)) == 12
    assert all((tmp_path / "spare" / n).stat().st_size == 0 for n in spares(tmp_path))
    assert store.load_all() == ([make_record(7)], [])
    for job in range(8, 20):  # the recycled spare is taken like any other
        store.write(make_record(job, state="launching"), durable=False)
    assert spares(tmp_path) == []
    assert pending in {(tmp_path / "steps" / n).stat().st_ino for n in os.listdir(tmp_path / "steps")}
    assert sorted(r.job_id for r in store.load_all()[0]) == list(range(7, 20))


def test_a_removed_record_becomes_a_spare_and_its_exit_file_goes(tmp_path):
    store = RecordStore(str(tmp_path))
    store.write(make_record(7))
    store.make_spares()
    fd = store.open_exits("1000.7.0.0")
    os.close(fd)
    record = (tmp_path / "steps" / "1000.7.0.0.json").stat().st_ino
    store.remove("1000.7.0.0")
    assert os.listdir(tmp_path / "steps") == []
    assert record in inodes(tmp_path / "spare")
    assert len(spares(tmp_path)) == 12  # 11 after the exit file took one, and the record
    assert all((tmp_path / "spare" / n).stat().st_size == 0 for n in spares(tmp_path))
    store.remove("1000.7.0.0")  # removed again (a release retried): nothing there, no error


def test_records_are_kept_as_spares_only_while_launches_have_taken_some(tmp_path):
    store = RecordStore(str(tmp_path))
    for job in range(30):
        store.write(make_record(job))
    store.remove("1000.0.0.0")  # no spares made yet (a daemon that only recovers steps): unlinked
    assert spares(tmp_path) == []
    store.make_spares()
    for job in range(30, 35):  # five launches take five spares
        store.write(make_record(job, state="launching"), durable=False)
    assert len(spares(tmp_path)) == 7
    removed = {(tmp_path / "steps" / f"1000.{job}.0.0.json").stat().st_ino for job in range(1, 30)}
    for job in range(1, 30):
        store.remove(f"1000.{job}.0.0")
    assert len(spares(tmp_path)) == 12  # five of them taken back; the rest unlinked as before
    assert len(removed & inodes(tmp_path / "spare")) == 5
    assert sorted(os.listdir(tmp_path / "steps")) == [f"1000.{job}.0.0.json" for job in range(30, 35)]


def test_a_link_where_the_record_was_is_swapped_out_and_removed_never_written_through(tmp_path):
    store = RecordStore(str(tmp_path))
    store.write(make_record(8))
    store.make_spares()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "steps" / "1000.7.0.0.json")
    store.write(make_record(7))
    assert victim.read_text() == "precious"
    assert not (tmp_path / "steps" / "1000.7.0.0.json").is_symlink()
    assert not [n for n in os.listdir(tmp_path / "spare") if (tmp_path / "spare" / n).is_symlink()]
    assert len(spares(tmp_path)) == 11
    assert store.load_all() == ([make_record(7), make_record(8)], [])


def test_launches_acknowledged_together_share_a_refill_and_ask_for_one_more(tmp_path, monkeypatch):
    store = RecordStore(str(tmp_path))
    store.write(make_record(7))
    made = []
    top_up = store.spares.top_up
    monkeypatch.setattr(store.spares, "top_up", lambda: (made.append(1), top_up()))

    async def launches():
        first = store.make_spares_soon()
        assert store.make_spares_soon() is first  # while it runs: the same one, and one more after it
        assert store.make_spares_soon() is first
        await first
        while store._refill is not first and not store._refill.done():
            await store._refill
        await asyncio.sleep(0)
        assert store._refill.done()
    asyncio.run(launches())
    assert len(made) == 2
    assert len(spares(tmp_path)) == 12
