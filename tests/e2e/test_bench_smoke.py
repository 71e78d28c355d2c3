"""The benchmark suite in its quick mode: it runs end to end and reports every figure.

Nothing about speed is asserted (CI machines vary); only that `python -m bench --quick`
completes, prints the table with every section and every figure it wrote to the JSON, and
writes the table, the JSON and the PNG chart where it is told (never into docs/).
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SECTIONS = ["1 launch overhead", "2 daemon-side latency", "3 exit notice, create/start", "4 idle cost and scale",
            "5 throughput", "6 images"]
# One figure of each kind the issue asks for; the JSON must have them all and the table print them all.
FIGURES = [
    "nodestepctl run `true`, median", "CLI: ratio of medians, nodestepctl / direct",
    "API run `true` (nodestepd.client, one running process), median", "ratio of medians, API / direct",
    "nodestepctl alone (run path, no daemon), median",
    "request received -> runtime spawned, median", "task exit -> exit event sent, median",
    "exit notice, 0.1 s container, pidfd, median", "RunTimeQuery calls per task, 0.1 s container, pidfd",
    "exit notice, 0.1 s container, pidfd / direct create-start-delete",
    "exit notice, 0.1 s container, run mode (RunTimeRun), median",
    "fake runtime (sleep): daemon RSS, 20 steps running", "fake runtime (sleep): daemon CPU while 20 steps run",
    "fake runtime (sleep): daemon wake-ups while 20 steps run", "fake runtime (sleep): launch 20 steps, 4 at a time",
    "fake runtime (sleep): cancel 20 steps, 4 at a time", "runc: launch 2 steps, 4 at a time",
    "runc: cancel 2 steps, 4 at a time",
    "fake runtime, back to back", "fake runtime, 2 in parallel", "runc, back to back", "runc, 2 in parallel",
    "run --image `true`, cached image, median", "ratio of medians, cached image / bundle",
    "first run --image `true` (import + launch), median", "nodestepctl image import alone, median",
    "4 concurrent launches of a new image, wall time, median",
    "imports for 4 concurrent launches of a new image, most in one run",
]


def test_quick_bench_completes_and_reports_every_figure(user, tmp_path):
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--user", user.name, "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((out / "results.json").read_text())
    figures = [f["figure"] for f in data["figures"]]
    assert [s for s in SECTIONS if s not in {f["section"] for f in data["figures"]}] == []
    assert [f for f in FIGURES if f not in figures] == []
    table_rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table_rows) == len(figures)
    for row, figure in zip(table_rows, data["figures"]):
        assert row.startswith(f"| {figure['section']} | {figure['figure']} | "), row
    assert {"cores", "kernel", "date"} <= data["machine"].keys()
    assert (out / "results.md").read_text() in result.stdout
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
