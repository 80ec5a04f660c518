"""docs/performance.md's accuracy tables, as Markdown, from a `starqa eval --json` report of the RULER-style suite.

    python benchmarks/ruler_tables.py                                  # benchmarks/results/ruler.json
    python benchmarks/ruler_tables.py report.json

Prints two tables: per length (accuracy of each mode, retention, Star - full in points with its 95 % interval, how
many samples Star won / lost, speed-up to the first answer token) and per task (accuracy of each mode). A Star
setting whose block and anchor are both a quarter of the length is labelled "L/4", as `--pairs L/4:L/4` asks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_REPORT = Path(__file__).resolve().parent / "results" / "ruler.json"


def series(row: dict) -> str:
    if row["mode"] == "full":
        return "full"
    if row["block_size"] == row["anchor_size"] == row["length"] // 4:
        return "L/4"
    return f"{row['block_size']}/{row['anchor_size']}"


def _value(value, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{fmt}}{suffix}"


def _delta(row: dict) -> str:
    if row["delta"] is None:
        return "–"
    spread = "" if row.get("delta_ci95") is None else f" ± {row['delta_ci95']:.1f}"
    return f"{row['delta']:+.1f}{spread}"


def length_table(report: dict) -> list[str]:
    overall = report["overall"]
    stars = list(dict.fromkeys(series(row) for row in overall if row["mode"] == "star"))
    header = (["length", "samples per task", "full"] + [f"Star {s}" for s in stars]
              + [f"retention {s}" for s in stars] + [f"Star − full {s} (points, 95 %)" for s in stars]
              + [f"won / lost {s}" for s in stars] + [f"speed-up {s}" for s in stars])
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for length in sorted({row["length"] for row in overall}):
        by_series = {series(row): row for row in overall if row["length"] == length}
        full = by_series["full"]
        rows = [by_series.get(s) for s in stars]

        def each(render) -> list[str]:
            return ["–" if row is None else render(row) for row in rows]

        counts = sorted({row["samples"] for row in report["results"] if row["length"] == length})
        samples = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        cells = ([f"{length:,}", samples, f"{full['accuracy']:.1f} %"]
                 + each(lambda row: f"{row['accuracy']:.1f} %"
                        + (f" ({row['block_size']}/{row['anchor_size']})" if series(row) == "L/4" else ""))
                 + each(lambda row: _value(row["retention"], ".0f", " %"))
                 + each(_delta)
                 + each(lambda row: "–" if row["better"] is None else f"{row['better']} / {row['worse']}")
                 + each(lambda row: _value(row["speedup"], ".2f", "x")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def task_table(report: dict) -> list[str]:
    rows = report["results"]
    modes = sorted(dict.fromkeys(series(row) for row in rows), key=lambda mode: (mode != "full", mode != "L/4"))
    lengths = sorted({row["length"] for row in rows})
    by_key = {(row["task"], row["length"], series(row)): row for row in rows}
    lines = ["| task | " + " | ".join(f"{length // 1024}K" for length in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for task in dict.fromkeys(row["task"] for row in rows):
        cells = []
        for length in lengths:
            scores = [by_key.get((task, length, mode)) for mode in modes]
            cells.append(" / ".join("–" if row is None else f"{row['accuracy']:.0f}" for row in scores))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return [f"Accuracy %, {' / '.join(modes)}:", "", *lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", nargs="?", type=Path, default=DEFAULT_REPORT, help="default: %(default)s")
    args = parser.parse_args()
    try:
        report = json.loads(args.report.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: cannot read {args.report}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(length_table(report) + [""] + task_table(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
