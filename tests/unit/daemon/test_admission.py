"""daemon/admission.py: a run request becomes a StepSpec and LaunchInput, or a refusal (no root needed)."""

from __future__ import annotations

from nodestepd.daemon import admission


def test_sizes_count_bytes_as_the_kernel_does():
    assert admission.args_size(["ab", "é"]) == 3 + 3
    assert admission.env_size({"A": "1", "B": ""}) == 4 + 3
