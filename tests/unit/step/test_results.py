"""step/results.py: finished steps' results in the state dir (no root needed)."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from nodestepd.process.identity import Identity
from nodestepd.step import results as stepresults
from nodestepd.step.results import Finished, ResultError, ResultStore, how_it_ended, result_record
from nodestepd.step.spec import StepResult, StepSpec

ALICE = Identity("alice", 1000, 1000, (1000, 27), "/home/alice")


def record(job_id: int = 7, result: StepResult = StepResult(3, (0, 3), False), ended_at: float = 1700000100.5):
    spec = StepSpec(job_id=job_id, step_id=1, ntasks=2, identity=ALICE, bundle="/b", args=("app", "x"),
                    workdir="/", attached=False, task_offset=4)
    return result_record(spec, [301, None], result, started_at=1700000000.25, ended_at=ended_at)


def test_how_a_step_ended():
    assert how_it_ended(StepResult(0, (0,), False)) == "exited"
    assert how_it_ended(StepResult(3, (0, 3), False)) == "exited"
    assert how_it_ended(StepResult(137, (137,), False)) == "signalled"
    assert how_it_ended(StepResult(143, (143,), True)) == "cancelled"
    assert how_it_ended(StepResult.launch_failed(2)) == "launch-failed"
    assert how_it_ended(StepResult(125, (125,), False)) == "exited"  # a task's own 125
    assert how_it_ended(StepResult(None, (0, None), False)) == "unknown"


def test_a_kept_result_is_the_finished_step_as_it_was():
    rec = record()
    assert rec.name == "1000.7.1.4"
    back = Finished.of(stepresults.decode(stepresults.encode(rec)))
    assert back == Finished.of(rec)
    assert (back.ref, back.spec.task_ids, back.spec.identity, back.pids) == ("7.1", range(4, 6), ALICE, (301, None))
    assert back.result == StepResult(3, (0, 3), False) and back.how == "exited"


def test_write_load_remove(tmp_path):
    store = ResultStore(str(tmp_path))
    newer, older = record(7, ended_at=200.0), record(8, ended_at=100.0)
    store.write(newer)
    store.write(older)
    assert stat.S_IMODE((tmp_path / "results" / "1000.7.1.4.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "results").stat().st_mode) == 0o700
    assert store.load_all() == ([older, newer], [])  # oldest end first
    store.remove(["1000.8.1.4", "1000.9.9.9"])
    assert store.load_all() == ([newer], [])


def test_bad_files_are_quarantined_and_the_rest_load(tmp_path):
    store = ResultStore(str(tmp_path))
    good = record(7)
    store.write(good)
    folder = tmp_path / "results"
    full = stepresults.encode(record(8))
    (folder / "1000.8.1.4.json").write_bytes(full[: len(full) // 2])
    (folder / "1000.9.1.4.json").write_bytes(stepresults.encode(record(10)))  # misnamed
    (folder / "stray").write_bytes(b"x")
    (folder / ".1000.11.1.4.json.tmp").write_bytes(b"half")  # a write cut short
    results, problems = store.load_all()
    assert results == [good]
    reasons = {p.name: p.reason for p in problems}
    assert set(reasons) == {"1000.8.1.4.json", "1000.9.1.4.json", "stray"}
    assert "not JSON" in reasons["1000.8.1.4.json"] and "names step 1000.10.1.4" in reasons["1000.9.1.4.json"]
    assert sorted(os.listdir(folder)) == ["1000.7.1.4.json"]
    assert sorted(n.rsplit(".", 2)[0] for n in os.listdir(tmp_path / "quarantine")) == [
        "result.1000.8.1.4.json", "result.1000.9.1.4.json", "result.stray"]


@pytest.mark.parametrize("text, reason", [
    (b'{"format": "nodestepd-step", "version": 1}', "not a nodestepd-result file"),
    (b'{"format": "nodestepd-result", "version": 2}', "result version 2"),
])
def test_other_formats_are_refused(text, reason):
    with pytest.raises(ResultError, match=reason):
        stepresults.decode(text)


def test_a_write_that_fails_leaves_nothing(tmp_path, monkeypatch):
    store = ResultStore(str(tmp_path))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        store.write(record())
    monkeypatch.undo()
    assert os.listdir(tmp_path / "results") == []
