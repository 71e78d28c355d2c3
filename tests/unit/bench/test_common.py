"""bench.common.sample: runc's transient clone failure is taken again and counted; nothing else is."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import common


@pytest.fixture(autouse=True)
def _count_from_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "retaken", 0)


def _failing_times(tmp_path: Path, times: int, message: str) -> list[str]:
    """A command that fails `times` times with `message` on stderr, then succeeds."""
    counter = tmp_path / "count"
    script = (f"import sys, pathlib\np = pathlib.Path({str(counter)!r})\n"
              "n = int(p.read_text()) if p.exists() else 0\np.write_text(str(n + 1))\n"
              f"if n < {times}:\n    sys.stderr.write({message!r})\n    sys.exit(1)\n")
    return [sys.executable, "-c", script]


def test_a_sample_runc_failed_to_clone_itself_for_is_taken_again_and_counted(tmp_path: Path) -> None:
    done, seconds = common.sample(_failing_times(tmp_path, 2, f"nsexec: {common.RUNC_CLONE_BUSY}\n"), env={})
    assert done.returncode == 0
    assert common.retaken == 2
    assert (tmp_path / "count").read_text() == "3"
    assert seconds > 0


def test_retakes_are_bounded(tmp_path: Path) -> None:
    done, _ = common.sample(_failing_times(tmp_path, 99, common.RUNC_CLONE_BUSY), env={})
    assert done.returncode == 1
    assert common.retaken == common.RETAKES
    assert (tmp_path / "count").read_text() == str(common.RETAKES + 1)


def test_any_other_failure_is_not_taken_again(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited 1: some other error"):
        common.timed(_failing_times(tmp_path, 1, "some other error"), env={})
    assert common.retaken == 0
    assert (tmp_path / "count").read_text() == "1"
