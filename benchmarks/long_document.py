"""Benchmark (not a test): a document of about 30K tokens, near a Qwen catalogue model's 32K context, with one
planted fact, answered with Star Attention and with full attention, through the real CLI.

The document is the suite's essay prose (no digits of its own) with one sentence planted at --depth; the question
asks for the planted value. Prints, per mode: the answer, whether it holds the value, Phase 1 (Star), time to first
token and decode speed, and the process's peak memory.

    .venv/bin/python benchmarks/long_document.py --model qwen2.5-coder-0.5b --tokens 30000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from peak_process import PeakPopen  # noqa: E402
from starqa.eval.haystack import essay_paragraphs  # noqa: E402

FACT = "The combination of the archive safe in the east wing is 4817-2093."
QUESTION = "What is the combination of the archive safe in the east wing?"
VALUE = "4817-2093"


def run(home: Path, *args: str) -> tuple[float, int, str]:
    env = dict(os.environ, STARQA_HOME=str(home))
    env.pop("STARQA_MODEL", None)
    started = time.perf_counter()
    process = PeakPopen([sys.executable, "-m", "starqa", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True, env=env, cwd=REPO)
    out, err = process.communicate()
    if process.returncode != 0:
        sys.exit(f"starqa {' '.join(args[:3])} failed: {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - started, process.peak_rss, out


def document(words: int, depth: float, seed: int) -> str:
    paragraphs = essay_paragraphs(words, random.Random(seed))
    at = int(len(paragraphs) * depth)
    return "\n\n".join(paragraphs[:at] + [FACT] + paragraphs[at:]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--tokens", type=int, default=30000, help="Aim for about this many context tokens.")
    parser.add_argument("--depth", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--store", type=Path, help="A store that already holds the converted model.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="starqa-long-") as temporary:
        home = args.store or Path(temporary)
        path = Path(temporary) / "long.txt"
        path.write_text(document(int(args.tokens / 1.3), args.depth, args.seed))
        wall, rss, _ = run(home, "ingest", str(path), "--name", "long", "--model", args.model, "--force", "--quiet")
        info = json.loads(run(home, "info", "long", "--json")[2])
        print(f"{args.model}: {info['context_tokens']:,} context tokens, {len(info['blocks'])} blocks of "
              f"{info['block_size']} (anchor {info['anchor_size']}); ingest {wall:.1f} s (Phase 1 "
              f"{info['phase1_s']:.1f} s), peak {rss / 2**30:.2f} GiB", flush=True)
        for mode in ("star", "full"):
            wall, rss, out = run(home, "ask", "--doc", "long", QUESTION, "--attention", mode, "--json",
                                 "--no-server", "--max-new-tokens", "24")
            row = json.loads(out.splitlines()[0])
            print(json.dumps({"mode": mode, "correct": VALUE in row["answer"], "answer": row["answer"],
                              "wall_s": round(wall, 1), "ttft_s": row["ttft_s"],
                              "decode_tokens_per_s": row["decode_tokens_per_s"], "peak_rss_gib": round(rss / 2**30, 2),
                              "grounded": row["grounded"]}), flush=True)


if __name__ == "__main__":
    main()
