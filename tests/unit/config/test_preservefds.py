"""The RunTimeRun/RunTimeCreate rewrite of `run --preserve-fds N` (config/preservefds.py)."""

import pytest

from nodestepd.config.preservefds import PreserveFdsUnsupported, with_preserve_fds

RUN = "runc --rootless=true --root=/run/user/%U/ run %n.%u.%j.%s.%t -b %b"
CREATE = "runc --rootless=true --root=/run/user/%U/ create %n.%u.%j.%s.%t -b %b"


@pytest.mark.parametrize("pattern, count, expected", [
    (RUN, 1, "runc --rootless=true --root=/run/user/%U/ run --preserve-fds 1 %n.%u.%j.%s.%t -b %b"),
    (CREATE, 8, "runc --rootless=true --root=/run/user/%U/ create --preserve-fds 8 %n.%u.%j.%s.%t -b %b"),
    (RUN, 0, RUN),
    ("exec /usr/sbin/runc --root /run/user/%U run --bundle %b x",  3,
     "exec /usr/sbin/runc --root /run/user/%U run --preserve-fds 3 --bundle %b x"),
    ("XDG_RUNTIME_DIR=/run/user/%U crun run --bundle %b %n",  2,
     "XDG_RUNTIME_DIR=/run/user/%U crun run --preserve-fds 2 --bundle %b %n"),
    ("runc\trun\t%n", 1, "runc\trun --preserve-fds 1\t%n"),
])
def test_the_option_goes_right_after_run_or_create(pattern, count, expected):
    assert with_preserve_fds(pattern, count) == expected


@pytest.mark.parametrize("pattern, message", [
    ("ch-run -w %r -- %@", "needs runc or crun, whose `run`/`create` pass fds into the container; RunTimeRun "
                           "starts with 'ch-run'"),
    ("singularity exec --userns %r %@", "starts with 'singularity'"),
    ("", "starts with 'nothing'"),
    ("runc --root \"$X\" run %n", "found no plain `run` or `create` word of runc"),
    ("runc state %n", "found no plain `run` or `create` word of runc"),
])
def test_other_runtimes_and_unclear_commands_are_refused(pattern, message):
    with pytest.raises(PreserveFdsUnsupported) as e:
        with_preserve_fds(pattern, 1)
    assert message in str(e.value)


def test_the_count_is_bounded():
    with pytest.raises(PreserveFdsUnsupported, match="between 0 and 8, got 9"):
        with_preserve_fds(RUN, 9)
