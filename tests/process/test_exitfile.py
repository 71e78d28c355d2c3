"""process/exitfile.py: the monitors' exit files, parsed and read without ever raising on content."""

from __future__ import annotations

import errno
import os

import pytest

from nodestepd.process.exitfile import parse_exit_records, read_exit_file


def test_exit_records_parse_clean_lines():
    assert parse_exit_records(b"") == ({}, [])
    assert parse_exit_records(b"12 0\n13 137\n4194303 255\n") == ({12: 0, 13: 137, 4194303: 255}, [])


def test_a_torn_last_line_is_ignored_and_reported():
    statuses, problems = parse_exit_records(b"12 0\n13 13")
    assert statuses == {12: 0}
    assert problems == ["incomplete last line ignored: b'13 13'"]


def test_garbage_is_skipped_and_reported_never_raised():
    data = (b"12 0\n\n-1 3\n13 256\n14 3 4\n 15 3\nabc def\n\xff\xfe 1\n0 1\n4194304 1\n16 \xd9\xa3\n"
            b"99999999999999999999 1\n12 5\n17 4\n")
    statuses, problems = parse_exit_records(data)
    assert statuses == {12: 0, 17: 4}  # 12 recorded twice: the first record is the pid's own process
    assert len(problems) == 11  # ten, then a count of the rest
    assert problems[0] == "line 2: not a record: b''"
    assert problems[-1] == "2 more problems"


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_never_raise(seed):
    import random

    data = random.Random(seed).randbytes(4096)
    statuses, problems = parse_exit_records(data)
    assert all(isinstance(p, str) for p in problems)


def test_read_exit_file_by_path_dir_fd_and_fd(new_dir):
    state = new_dir("state-", 0o700)
    (state / "exit").write_bytes(b"5 1\n6 2\n7")
    dir_fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = os.open(state / "exit", os.O_RDONLY | os.O_CLOEXEC)
    try:
        expected = ({5: 1, 6: 2}, ["incomplete last line ignored: b'7'"])
        assert read_exit_file(state / "exit") == expected
        assert read_exit_file("exit", dir_fd=dir_fd) == expected
        assert read_exit_file(fd) == expected
        assert read_exit_file(fd) == expected  # from the start each time
        with pytest.raises(FileNotFoundError):
            read_exit_file("missing", dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
        os.close(fd)


def test_read_exit_file_follows_no_link_and_reads_no_fifo(new_dir):
    state = new_dir("state-", 0o700)
    os.symlink("/etc/passwd", state / "link")
    with pytest.raises(OSError) as failure:
        read_exit_file(state / "link")
    assert failure.value.errno == errno.ELOOP
    os.mkfifo(state / "fifo")
    assert read_exit_file(state / "fifo") == ({}, ["not a regular file"])  # at once: nobody writes it
