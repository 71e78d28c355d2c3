"""The results: one Row per figure, each next to its reference from the same run; table, JSON, PNG."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    section: str
    figure: str
    value: float
    unit: str
    reference: str = ""  # what the reference is
    reference_value: float | None = None
    target: str = ""  # the target, in words ("ratio <= 1.10")
    met: bool | None = None  # None: no target

    def verdict(self) -> str:
        if self.met is None:
            return ""
        return "met" if self.met else "MISSED"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    if isinstance(value, int):  # a count
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"


def table(rows: list[Row], machine: dict) -> str:
    """A Markdown table: printed by the bench, committed as docs/benchmarks/results.md."""
    lines = [
        f"nodestepd benchmarks, {machine['date']}: {machine['cores']} cores ({machine['cpu']}), "
        f"{machine['memory_gib']} GiB, kernel {machine['kernel']}, Python {machine['python']}, {machine['runc']}",
        "",
        "| section | figure | value | reference (same run) | target |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ref = f"{r.reference}: {_number(r.reference_value)}" if r.reference_value is not None else r.reference
        target = f"{r.target} ({r.verdict()})" if r.target else ""
        lines.append(f"| {r.section} | {r.figure} | {_number(r.value)} {r.unit} | {ref} | {target} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, rows: list[Row], machine: dict, settings: dict) -> None:
    data = {"machine": machine, "settings": settings, "figures": [asdict(r) for r in rows]}
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_chart(path: Path, rows: list[Row], machine: dict) -> None:
    """Bars of each figure next to its reference, one panel per section and unit."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    paired = [r for r in rows if r.reference_value is not None and r.unit != "x"]
    panels = list(dict.fromkeys((r.section, r.unit) for r in paired))
    if not panels:  # a run of sections without references: an empty chart, still a chart
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no figure with a reference in this run", ha="center", va="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    heights = [sum(1 for r in paired if (r.section, r.unit) == panel) for panel in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 1.0 + 0.45 * sum(heights) + 0.7 * len(panels)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (section, unit) in zip(axes[:, 0], panels):
        mine = [r for r in paired if (r.section, r.unit) == (section, unit)]
        y = range(len(mine))
        ours = ax.barh([i + 0.2 for i in y], [r.value for r in mine], height=0.4, label="nodestepd",
                       color="#1f77b4")
        refs = ax.barh([i - 0.2 for i in y], [r.reference_value for r in mine], height=0.4, label="reference",
                       color="#bbbbbb")
        # The numbers on the bars: a zero (no CPU, no wake-ups) has no bar to see.
        ax.bar_label(ours, labels=[_number(r.value) for r in mine], fontsize=6, padding=2)
        ax.bar_label(refs, labels=[_number(r.reference_value) for r in mine], fontsize=6, padding=2)
        ax.set_yticks(list(y), [r.figure for r in mine], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{section} [{unit}]", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
        if not any(r.value or r.reference_value for r in mine):
            ax.set_xlim(0, 1)
        else:
            ax.set_xlim(0, 1.15 * max(max(r.value, r.reference_value or 0) for r in mine))  # room for the labels
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle(f"nodestepd benchmarks, {machine['date']}, {machine['cores']} cores, kernel {machine['kernel']}",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))  # below the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
