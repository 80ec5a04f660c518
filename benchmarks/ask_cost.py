"""Benchmark (not a test): what a user waits for, command by command, with the real `starqa` CLI.

Prints, each a median of --repeat runs (alternated), wall time measured around the process:
  (1) `starqa ask --doc contract "Which law governs this agreement?"` on the sample contract (4,795 tokens);
  (2) the fixed cost of an ask — wall time minus the Phase 2 prefill and decoding it reports in --json — on the
      contract and on a 7.9K-token document;
  (3) one `ask` over 5 stored documents vs 5 separate `ask` calls (one question each);
  (4) 8 questions vs 1 question in one `ask --questions` over the 7.9K-token document.

    .venv/bin/python benchmarks/ask_cost.py                 # a temporary store (converts the model once, ~1 min)
    .venv/bin/python benchmarks/ask_cost.py --store ~/.cache/starqa --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Which law governs this agreement?"
QUESTIONS = ["Which law governs this agreement?", "What are the termination clauses?", "Who are the parties?",
             "What is the monthly fee?", "Where is the data stored?", "How long is the notice period?",
             "What happens to the data at the end?", "Which court has jurisdiction?"]


def starqa(home: Path, *args: str, stdin: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, STARQA_HOME=str(home))
    if args[0] == "ask":  # in its own process, even if a server runs on this store (benchmarks/serve.py measures that)
        args = (*args, "--no-server")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "starqa", *args], capture_output=True, text=True, env=env,
                            input=stdin, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"starqa {' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return wall, result


def fixed_cost(home: Path, doc: str, repeat: int) -> tuple[float, float, str]:
    """(median wall, median fixed cost, answer): fixed = wall - prefill - decode, per the --json figures."""
    walls, fixed, answer = [], [], ""
    for _ in range(repeat):
        wall, result = starqa(home, "ask", "--doc", doc, QUESTION, "--json", "--max-new-tokens", "48")
        row = json.loads(result.stdout.splitlines()[0])
        decode_s = (row["answer_tokens"] - 1) / row["decode_tokens_per_s"] if row["decode_tokens_per_s"] else 0.0
        walls.append(wall)
        fixed.append(wall - row["ttft_s"] - decode_s)
        answer = row["answer"]
    return statistics.median(walls), statistics.median(fixed), answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default=None, help="STARQA_HOME to use (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(args.store).expanduser() if args.store else Path(scratch) / "home"
        contract = (REPO / "samples" / "contract.txt").read_text(encoding="utf-8")
        long_doc = Path(scratch) / "long-contract.txt"
        long_doc.write_text(contract + "\n\n" + contract[: int(len(contract) * 0.65)], encoding="utf-8")
        copies = []
        for index in range(5):
            copy = Path(scratch) / f"bench-copy-{index}.txt"
            copy.write_text(f"Copy {index}.\n\n" + contract, encoding="utf-8")
            copies.append(str(copy))
        print("ingesting the documents (not timed) ...", file=sys.stderr)
        starqa(home, "ingest", str(REPO / "samples" / "contract.pdf"), "--quiet")
        starqa(home, "ingest", str(long_doc), "--quiet")
        starqa(home, "ingest", *copies, "--quiet")
        info = json.loads(starqa(home, "info", "long-contract", "--json")[1].stdout)
        starqa(home, "ask", "--doc", "contract", QUESTION, "--quiet")  # warm the page cache and kernel build

        wall, fixed, answer = fixed_cost(home, "contract", args.repeat)
        print(f"(1) ask on the contract: {wall:.2f} s wall (median of {args.repeat}); answer: {answer!r}")
        long_wall, long_fixed, _ = fixed_cost(home, "long-contract", args.repeat)
        print(f"(2) fixed cost (wall - prefill - decode): contract {fixed:.2f} s; "
              f"{info['context_tokens']:,}-token document {long_fixed:.2f} s (wall {long_wall:.2f} s)")

        together, separate = [], []
        for _ in range(args.repeat):
            together.append(starqa(home, "ask", *[arg for i in range(5) for arg in ("--doc", f"bench-copy-{i}")],
                                   QUESTION, "--max-new-tokens", "24", "--quiet")[0])
            separate.append(sum(starqa(home, "ask", "--doc", f"bench-copy-{i}", QUESTION, "--max-new-tokens", "24",
                                       "--quiet")[0] for i in range(5)))
        print(f"(3) 5 documents: one ask {statistics.median(together):.2f} s vs 5 asks "
              f"{statistics.median(separate):.2f} s ({statistics.median(together) / statistics.median(separate):.2f}x)")

        one, eight = [], []
        for _ in range(args.repeat):
            one.append(starqa(home, "ask", "--doc", "long-contract", "--questions", "-", "--max-new-tokens", "32",
                              "--quiet", stdin=QUESTIONS[0] + "\n")[0])
            eight.append(starqa(home, "ask", "--doc", "long-contract", "--questions", "-", "--max-new-tokens", "32",
                                "--quiet", stdin="\n".join(QUESTIONS) + "\n")[0])
        print(f"(4) {info['context_tokens']:,}-token document, 8 questions vs 1: {statistics.median(eight):.2f} s vs "
              f"{statistics.median(one):.2f} s ({statistics.median(eight) / statistics.median(one):.2f}x)")


if __name__ == "__main__":
    main()
