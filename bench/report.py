"""Pairing each figure with its ceiling, and printing or writing the tables."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.registry import Figure

MAIN_SECTION = "results"
BEGIN = "<!-- bench:results:begin -->"
END = "<!-- bench:results:end -->"

# A pipeline figure and the ceiling it is held against, as issue 4 states them.
# The ceiling key is filled from the figure key's named groups, so a figure
# is only ever compared with a ceiling of the same queue type and size.
RATIO_TARGETS: list[tuple[str, str, float]] = [
    (r"^pipeline/video/(?P<queue>\w+)/(?P<size>\d+)$", "bare/{queue}/{size}", 1.0),
    (r"^pipeline/video/(?P<queue>\w+)/(?P<size>\d+)$", "nats/putget", 3.0),
    (r"^pipeline/text/(?P<queue>\w+)/(?P<size>\d+)$", "bare/{queue}/{size}", 8.0),
    (
        r"^outbox/accept/(?P<queue>\w+)/(?P<size>\d+)$",
        "outbox/normal/{queue}/{size}",
        0.8,
    ),
    (
        r"^outbox/drain/(?P<queue>\w+)/(?P<size>\d+)$",
        "bare-publish/{queue}/{size}",
        0.8,
    ),
]
# Not targets: a figure set beside the rate of a shared resource (the disk),
# beside the bare client's own figure (payload per CPU second), or beside the
# rate the pipeline's least possible work allows (bench/floor.py), to show
# what bounds the run.
BOUND_RATIOS: list[tuple[str, str]] = [
    (r"^disk/pipeline/\w+/\d+$", "disk/write"),
    (r"^cpu/pipeline/(?P<queue>\w+)/(?P<size>\d+)$", "cpu/bare/{queue}/{size}"),
    (r"^floor/video/(?P<queue>\w+)/(?P<size>\d+)$", "bare/{queue}/{size}"),
    (r"^pipeline/video/(?P<queue>\w+)/(?P<size>\d+)$", "floor/video/{queue}/{size}"),
    (r"^least/video/(?P<queue>\w+)/(?P<size>\d+)$", "bare/{queue}/{size}"),
    (r"^pipeline/video/(?P<queue>\w+)/(?P<size>\d+)$", "least/video/{queue}/{size}"),
    (r"^cpu/least/(?P<queue>\w+)/(?P<size>\d+)$", "cpu/bare/{queue}/{size}"),
]
# A figure that must stay under a limit, in the figure's own unit.
LIMIT_TARGETS: list[tuple[str, float, str]] = [
    (r"^mem/worker/", 150.0, "MB"),
    (r"^mem/gateway/", 200.0, "MB"),
    (r"^latency/text/p99$", 100.0, "ms"),
]


@dataclass(frozen=True)
class Comparison:
    figure: Figure
    ceiling: Figure | None
    ratio: float | None
    target: str
    met: bool


def comparisons(figures: list[Figure]) -> list[Comparison]:
    """Every target that the figures of this run allow to be checked."""
    by_key = {figure.key: figure for figure in figures}
    found = []
    for figure in figures:
        for pattern, ceiling_key, minimum in RATIO_TARGETS:
            match = re.match(pattern, figure.key)
            ceiling = (
                by_key.get(ceiling_key.format(**match.groupdict())) if match else None
            )
            if ceiling is not None and ceiling.value > 0:
                ratio = figure.value / ceiling.value
                found.append(
                    Comparison(
                        figure, ceiling, ratio, f">= {minimum:g}x", ratio >= minimum
                    )
                )
        for pattern, ceiling_key in BOUND_RATIOS:
            match = re.match(pattern, figure.key)
            ceiling = (
                by_key.get(ceiling_key.format(**match.groupdict())) if match else None
            )
            if ceiling is not None and ceiling.value > 0:
                ratio = figure.value / ceiling.value
                found.append(Comparison(figure, ceiling, ratio, "", True))
        for pattern, limit, unit in LIMIT_TARGETS:
            if re.match(pattern, figure.key):
                met = figure.value < limit
                found.append(Comparison(figure, None, None, f"< {limit:g} {unit}", met))
    return found


def value_text(figure: Figure) -> str:
    """Counts per second are whole numbers; MB, MB/s and ms keep a decimal."""
    if figure.unit.endswith("/s") and figure.unit != "MB/s":
        return f"{figure.value:,.0f} {figure.unit}"
    return f"{figure.value:,.1f} {figure.unit}"


def print_tables(figures: list[Figure], console: Console) -> None:
    table = Table(title="Figures", show_lines=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("how it was measured")
    for figure in figures:
        table.add_row(figure.label, value_text(figure), figure.detail)
    console.print(table)

    checks = comparisons(figures)
    if not checks:
        return
    targets = Table(title="Against the targets (ceilings measured in this run)")
    for column in ("figure", "value", "ceiling", "ratio", "target", "met"):
        targets.add_column(column, justify="right" if column != "figure" else "left")
    for check in checks:
        targets.add_row(*comparison_cells(check))
    console.print(targets)


def comparison_cells(check: Comparison) -> list[str]:
    ceiling = (
        f"{check.ceiling.label}: {value_text(check.ceiling)}" if check.ceiling else ""
    )
    ratio = f"{check.ratio:.2f}x" if check.ratio is not None else ""
    met = ("yes" if check.met else "NO") if check.target else "(no target)"
    return [
        check.figure.label,
        value_text(check.figure),
        ceiling,
        ratio,
        check.target,
        met,
    ]


def markers(section: str) -> tuple[str, str]:
    """The comments that enclose a generated section of the doc."""
    return f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"


def markdown(
    figures: list[Figure],
    header: list[str],
    failures: dict[str, str],
    section: str = MAIN_SECTION,
) -> str:
    """A generated section of docs/benchmarks.md, between its markers."""
    begin, end = markers(section)
    title = "Latest run" if section == MAIN_SECTION else f"Latest run: {section}"
    lines = [begin, "", f"## {title}", "", *header]
    lines += [
        f"- Part `{name}` failed: {' '.join(error.split())}"
        for name, error in failures.items()
    ]
    lines += ["", "### Figures", ""]
    lines += ["| figure | value | how it was measured |", "|---|---:|---|"]
    for figure in figures:
        lines.append(f"| {figure.label} | {value_text(figure)} | {figure.detail} |")
    checks = comparisons(figures)
    if checks:
        lines += ["", "### Against the targets of issue 4", ""]
        lines += [
            "| figure | value | ceiling (same run) | ratio | target | met |",
            "|---|---:|---|---:|---|---|",
        ]
        lines += ["| " + " | ".join(comparison_cells(c)) + " |" for c in checks]
    lines += ["", end]
    return "\n".join(lines)


INTRO = """# Benchmarks

`uv run python -m bench` measures datahaul end to end and, in the same run,
the ceilings it is judged against: a minimal aio-pika client on the same
broker, and the NATS JetStream object store. `--help` lists the parts and
sizes; `--quick` is a smoke run; `--write-doc` rewrites only the section
between the markers below.
"""


def write_doc(path: Path, section: str) -> None:
    """Replace the generated section; everything outside the markers stays.

    A section that is not in the doc yet goes right after the main one, or
    at the end when there is no main section either.
    """
    text = path.read_text() if path.exists() else INTRO
    begin = section.split("\n", 1)[0]
    end = begin.replace(":begin -->", ":end -->")
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1]
        text = before + section + after
    elif END in text:
        before, after = text.split(END, 1)
        text = before + END + "\n\n" + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
