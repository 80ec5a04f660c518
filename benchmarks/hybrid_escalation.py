"""Hybrid answering's two escalation targets on one document's QA, from `starqa ask --json` outputs.

    python benchmarks/hybrid_escalation.py --qa QA.jsonl --small-star S.jsonl --small-full F.jsonl \
        --large-star LS.jsonl --large-full LF.jsonl [--hybrid H.jsonl] [--small NAME --large NAME]

Each file is one `ask --json` run (answers joined to the QA file by question; a run may hold only some questions,
e.g. the larger model's full attention only on the escalated ones). Composes, from the small model's Star answers
and their `grounded` flag (starqa.answer.hybrid.escalation_reason): hybrid→full (the small model's full attention answers
again), hybrid→LARGE star and hybrid→LARGE full (the larger model answers again with Star Attention from its stored
copy, or with full attention). `--hybrid` adds the rows of a real `ask --attention hybrid --escalate-to` run.
Prints one Markdown table: accuracy, the paired difference (±95 %) from each model's full attention on the
questions both have, the share escalated, and mean seconds per answer (prefill to last token, both passes for an
escalated answer; Phase 1 is paid once per document and not in it) with its ratio to each full attention.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starqa.eval.poc_report import _answer_seconds, _half_width  # noqa: E402
from starqa.eval.qa_file import load_qa_file  # noqa: E402
from starqa.eval.scoring import score  # noqa: E402
from starqa.answer.hybrid import escalation_reason  # noqa: E402


def _load(path: Path | None) -> dict[str, dict]:
    if path is None or not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["question"]: row for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--qa", required=True, type=Path)
    for flag in ("small-star", "small-full", "large-star", "large-full", "hybrid"):
        parser.add_argument(f"--{flag}", type=Path)
    parser.add_argument("--small", default="0.5B")
    parser.add_argument("--large", default="1.5B")
    args = parser.parse_args()
    pairs = load_qa_file(args.qa)
    runs = {name: _load(getattr(args, name.replace("-", "_"))) for name in
            ("small-star", "small-full", "large-star", "large-full", "hybrid")}
    answers = {pair.question: pair.answers for pair in pairs}
    questions = [pair.question for pair in pairs]

    def outcome(run: dict, question: str):
        row = run.get(question)
        return None if row is None else (score("part", row["answer"], answers[question]), _answer_seconds(row))

    star = runs["small-star"]
    escalated = {q: escalation_reason(star[q]["grounded"], star[q]["answer"]) is not None for q in questions if q in star}
    table: dict[str, dict[str, tuple | None]] = {
        f"{args.small} full": {q: outcome(runs["small-full"], q) for q in questions},
        f"{args.small} star": {q: outcome(star, q) for q in questions},
        f"{args.large} full": {q: outcome(runs["large-full"], q) for q in questions},
        f"{args.large} star": {q: outcome(runs["large-star"], q) for q in questions},
    }
    for label, second in (("hybrid→full", f"{args.small} full"), (f"hybrid→{args.large} star", f"{args.large} star"),
                          (f"hybrid→{args.large} full", f"{args.large} full")):
        rows = {}
        for q in questions:
            first = table[f"{args.small} star"][q]
            if first is None:
                rows[q] = None
            elif not escalated[q]:
                rows[q] = first
            else:
                again = table[second][q]
                rows[q] = None if again is None else (again[0], first[1] + again[1])
        table[label] = rows
    if runs["hybrid"]:
        table[f"hybrid→{args.large} (real ask)"] = {q: outcome(runs["hybrid"], q) for q in questions}
    references = [f"{args.small} full", f"{args.large} full"]
    print(f"{len(questions)} questions; escalated (the {args.small}'s Star answer not grounded): "
          f"{sum(escalated.values())} of {len(escalated)}\n")
    print("| row | n | accuracy % | Δ vs " + " | Δ vs ".join(references) + " | escalated | s / answer | "
          + " | ".join(f"× {r}" for r in references) + " |")
    print("|---" * (5 + 2 * len(references)) + "|")
    for label, rows in table.items():
        done = [q for q in questions if rows[q] is not None]
        if not done:
            continue
        accuracy = 100 * sum(rows[q][0] for q in done) / len(done)
        seconds = sum(rows[q][1] for q in done) / len(done)
        cells = [label, str(len(done)), f"{accuracy:.1f}"]
        for reference in references:
            both = [q for q in done if table[reference][q] is not None]
            if label == reference or not both:
                cells.append("–")
                continue
            diffs = [rows[q][0] - table[reference][q][0] for q in both]
            cells.append(f"{100 * sum(diffs) / len(diffs):+.1f} ± {100 * _half_width(diffs):.1f} (n={len(both)})")
        share = (f"{sum(escalated[q] for q in done)} of {len(done)}" if label.startswith("hybrid") else "–")
        cells += [share, f"{seconds:.1f}"]
        for reference in references:
            both = [q for q in done if table[reference][q] is not None]
            ratio = (sum(rows[q][1] for q in both) / sum(table[reference][q][1] for q in both)) if both else None
            cells.append("–" if ratio is None else f"{ratio:.2f}")
        print("| " + " | ".join(cells) + " |")
    print("\nper question (✓ right, ✗ wrong, · not run; E: escalated):")
    for index, q in enumerate(questions):
        marks = " ".join("·" if table[label][q] is None else ("✓" if table[label][q][0] else "✗")
                         for label in table)
        print(f"  {index + 1:2}. {'E' if escalated.get(q) else ' '} {marks}  {q[:60]}")
    print("  columns: " + ", ".join(table))


if __name__ == "__main__":
    main()
