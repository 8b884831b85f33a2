"""Plot a benchmark run: every tool's time as a ratio to the serial loop, per workload.

Usage: ``python bench/plot.py RESULTS.json OUT.png [--table]``, where RESULTS.json was written
by ``bench/run.py --json`` (or ``bench/run.py --scaling 1,2,4,8,16 --json``, drawn as one panel
per workload against the pool size); ``--table`` also prints the ratios as a Markdown table.
``make bench`` runs both. The dashed line is the serial loop (1.0), the dotted one the hardware
floor measured in the same run (the best ratio the machine allowed then).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def ratios(results: dict[str, Any]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Workload labels, and for each tool its ratio per workload (``None`` where it did not run)."""
    labels = list(results.get("maps", {}))
    tools: list[str] = []
    for row in results.get("maps", {}).values():
        tools += [t for t in row if t != "serial_s" and t not in tools]
    w5 = results.get("w5", {})
    if w5:
        labels.append("W5 200MB array x 50")
    table: dict[str, list[float | None]] = {}
    for tool in tools:
        column: list[float | None] = [results["maps"][label].get(tool) for label in results["maps"]]
        if w5:
            column.append(w5.get(tool, {}).get("ratio"))
        table[tool] = column
    return labels, table


def _tick(label: str) -> str:
    """``"W2 20k x 100us"`` as ``"W2"`` over its description, wrapped to fit under its bars."""
    import textwrap

    row, _, what = label.partition(" ")
    return "\n".join([row, *textwrap.wrap(what, 12)])


def plot(results: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    labels, table = ratios(results)
    if not labels or not table:
        raise SystemExit("no map workloads in the results: nothing to plot")
    width = 0.8 / len(table)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels)), 4.2), layout="constrained")
    for k, (tool, column) in enumerate(table.items()):
        xs = [i + (k - (len(table) - 1) / 2) * width for i in range(len(labels))]
        heights = [r if r is not None else 0.0 for r in column]
        bars = ax.bar(xs, heights, width, label=tool)
        for bar, r in zip(bars, column, strict=True):
            if r is not None and r > 0:
                ax.annotate(
                    f"{r:.2f}",
                    (bar.get_x() + bar.get_width() / 2, r),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                )
    ax.set_yscale("log")
    tallest = max((r for column in table.values() for r in column if r), default=1.0)
    ax.set_ylim(top=tallest * 4)  # room for the value labels
    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8, label="serial loop")
    floor = results.get("hardware_floor")
    if floor:
        ax.axhline(floor, color="grey", linestyle=":", linewidth=1.0, label=f"floor {floor:.2f}")
    ax.set_xticks(range(len(labels)), [_tick(label) for label in labels], fontsize=8)
    ax.set_ylabel("time / serial loop (log; lower is better)")
    ax.set_title(f"shoal and its peers, {results.get('workers', '?')} workers")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_scaling(results: dict[str, Any], out: str) -> None:
    """A ``--scaling`` run: one panel per workload, ratio to serial against pool size, a line per
    tool, with the hardware floor for each size and the ideal ``1/workers``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results["sizes"], key=int)
    first = results["sizes"][sizes[0]]
    labels = [k for k in first if k not in ("floor", "load")]
    fig, axes = plt.subplots(
        1, len(labels), figsize=(4.2 * len(labels), 3.8), layout="constrained", squeeze=False
    )
    xs = [int(n) for n in sizes]
    for ax, label in zip(axes[0], labels, strict=True):
        tools = list(first[label])
        for tool in tools:
            ax.plot(xs, [results["sizes"][n][label][tool] for n in sizes], marker="o", label=tool)
        ax.plot(xs, [results["sizes"][n]["floor"] for n in sizes], ":", color="grey", label="floor")
        ax.plot(xs, [1 / x for x in xs], "--", color="black", linewidth=0.8, label="1/workers")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("workers")
        ax.set_title(label, fontsize=9)
    axes[0][0].set_ylabel("time / serial loop (log; lower is better)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"scaling on {results.get('usable', '?')} usable CPUs", fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def scaling_markdown(results: dict[str, Any]) -> str:
    """A ``--scaling`` run as a Markdown table: a row per pool size."""
    sizes = sorted(results["sizes"], key=int)
    first = results["sizes"][sizes[0]]
    columns = [(w, t) for w in first if w not in ("floor", "load") for t in first[w]]
    lines = [
        "| workers | floor | " + " | ".join(f"{w[:2]} {t}" for w, t in columns) + " |",
        "| ---: | ---: |" + " ---: |" * len(columns),
    ]
    for n in sizes:
        entry = results["sizes"][n]
        cells = [f"{entry[w][t]:.3f}" for w, t in columns]
        lines.append(f"| {n} | {entry['floor']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_markdown(results: dict[str, Any]) -> str:
    """The same ratios as a Markdown table (for docs/performance.md)."""
    labels, table = ratios(results)
    lines = [
        "| workload | " + " | ".join(table) + " |",
        "| --- |" + " ---: |" * len(table),
    ]
    for i, label in enumerate(labels):
        cells = [f"{column[i]:.2f}" if column[i] is not None else "-" for column in table.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="JSON written by bench/run.py --json")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--table", action="store_true", help="also print a Markdown table")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    scaled = "sizes" in results  # written by bench/run.py --scaling
    (plot_scaling if scaled else plot)(results, args.out)
    print(f"wrote {args.out}")
    if args.table:
        print((scaling_markdown if scaled else table_markdown)(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
