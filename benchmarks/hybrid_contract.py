"""Hybrid answering on a stored document's QA file: Star, full and hybrid accuracy, share escalated, seconds per answer.

    python benchmarks/hybrid_contract.py --doc contract --qa samples/contract-qa.jsonl --model M --out DIR

Runs `starqa ask --json --no-server` once with --attention star and once with --attention full (each in its own
process; a finished one is kept in DIR and not run again), scores both (a reference answer in the answer), and
composes hybrid from them: a question whose Star answer is grounded keeps it, the others take full attention's
answer and cost both passes (greedy decoding is deterministic, so this is what `--attention hybrid` returns; its
seconds are Star's plus full attention's, as a hybrid ask spends them). Prints one Markdown table; the figures are
ratios of one run's measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starqa.eval.poc_report import _answer_seconds, _half_width, run_process  # noqa: E402
from starqa.eval.qa_file import load_qa_file  # noqa: E402
from starqa.eval.scoring import score  # noqa: E402
from starqa.answer.hybrid import escalation_reason  # noqa: E402


def ask(mode: str, args, questions_file: Path) -> list[dict]:
    path = args.out / f"{mode}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    code, out, err, wall, peak = run_process(["-m", "starqa", "ask", "--doc", args.doc, "--questions",
                                              str(questions_file), "--attention", mode, "--json", "--no-server",
                                              "--model", args.model])
    if code != 0:
        raise SystemExit(f"{mode}: {err.strip().splitlines()[-1]}")
    (args.out / f"{mode}.meta.json").write_text(json.dumps({"wall_s": wall, "peak_rss_mb": peak}))
    path.write_text(out)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--doc", required=True)
    parser.add_argument("--qa", required=True, type=Path)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = load_qa_file(args.qa)
    questions_file = args.out / "questions.txt"
    questions_file.write_text("".join(pair.question + "\n" for pair in pairs))
    runs = {mode: ask(mode, args, questions_file) for mode in ("star", "full")}
    scored = {mode: [score("part", a["answer"], pair.answers) for a, pair in zip(answers, pairs)]
              for mode, answers in runs.items()}
    seconds = {mode: [_answer_seconds(a) for a in answers] for mode, answers in runs.items()}
    escalated = [escalation_reason(a["grounded"], a["answer"]) is not None for a in runs["star"]]
    scored["hybrid"] = [f if up else s for s, f, up in zip(scored["star"], scored["full"], escalated)]
    seconds["hybrid"] = [s + (f if up else 0.0) for s, f, up in zip(seconds["star"], seconds["full"], escalated)]
    n = len(pairs)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"{args.doc}: {n} questions, model {args.model}\n")
    print("| mode | accuracy % | Δ vs full (±95 %) | escalated | s / answer | × full |")
    print("|---|---|---|---|---|---|")
    for mode in ("full", "star", "hybrid"):
        diffs = [a - b for a, b in zip(scored[mode], scored["full"])]
        delta = "–" if mode == "full" else f"{100 * mean(diffs):+.1f} ± {100 * _half_width(diffs):.1f}"
        share = f"{sum(escalated)} of {n}" if mode == "hybrid" else "–"
        print(f"| {mode} | {100 * mean(scored[mode]):.1f} | {delta} | {share} | {mean(seconds[mode]):.2f} | "
              f"{mean(seconds[mode]) / mean(seconds['full']):.2f} |")
    print("\nper question (star correct / grounded, full correct):")
    for index, pair in enumerate(pairs):
        star = runs["star"][index]
        print(f"  {index + 1:2}. star {'✓' if scored['star'][index] else '✗'} grounded={star['grounded']!s:5} "
              f"full {'✓' if scored['full'][index] else '✗'}  {pair.question[:60]}")
    # Cost per answer: each ask process's wall time (model load included) over its questions; Star decodes its
    # questions in batches, so one answer's latency (the table's s / answer) overstates what each answer costs.
    walls = {mode: json.loads((args.out / f"{mode}.meta.json").read_text())["wall_s"] for mode in ("star", "full")}
    hybrid_wall = walls["star"] + sum(f for f, up in zip(seconds["full"], escalated) if up)
    print(f"\nprocess wall per answer: star {walls['star'] / n:.1f} s, full {walls['full'] / n:.1f} s, hybrid "
          f"{hybrid_wall / n:.1f} s (star's process plus the escalated questions' full-attention seconds) = "
          f"{hybrid_wall / walls['full']:.2f}x full; star {walls['star'] / walls['full']:.2f}x full")
    wrong = [i for i in range(n) if not scored["star"][i]]
    caught = [i for i in wrong if escalated[i]]
    print(f"\nStar wrong: {len(wrong)}; of those not grounded (escalated): {len(caught)}; "
          f"Star right but escalated: {sum(1 for i in range(n) if scored['star'][i] and escalated[i])}")


if __name__ == "__main__":
    main()
