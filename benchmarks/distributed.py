"""Benchmark (not a test): Phase 1 wall time with 1, 2 and 4 ranks, and Phase 2's bytes exchanged per token.

Runs the real CLI (`starqa ingest --nproc N`, which launches torchrun) on a synthetic document of --tokens tokens
made from the sample contract, in a throw-away store, and reads Phase 1 seconds from each manifest. On a CPU the
ranks share the cores (gloo); on a GPU machine each rank gets a GPU (NCCL).

    .venv/bin/python benchmarks/distributed.py --tokens 16384 --ranks 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def make_document(path: Path, n_tokens: int) -> None:
    # About 1.3 tokens per word in this text; the CLI measures the exact count.
    text = (REPO / "samples" / "contract.txt").read_text(encoding="utf-8")
    words_needed = int(n_tokens / 1.28)
    words = text.split(" ")
    body = " ".join((words * (words_needed // len(words) + 1))[:words_needed])
    path.write_text(body, encoding="utf-8")


def starqa(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, STARQA_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "starqa", *args], capture_output=True, text=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--anchor-size", type=int, default=512)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="starqa-bench-"))
    document = home / "report.txt"
    make_document(document, args.tokens)
    print(f"cpu cores {os.cpu_count()}; document {args.tokens} tokens (approx.); "
          f"block {args.block_size}, anchor {args.anchor_size}")
    baseline = None
    print(f"{'ranks':>5} {'Phase 1 s':>10} {'wall s':>8} {'speed-up':>9}")
    for nproc in [int(x) for x in args.ranks.split(",")]:
        name = f"report{nproc}"
        started = time.perf_counter()
        result = starqa("ingest", str(document), "--name", name, "--nproc", str(nproc), "--allow-long", "-q",
                        "--block-size", str(args.block_size), "--anchor-size", str(args.anchor_size), home=home)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(f"{nproc:>5} failed: {result.stderr.strip()}")
            continue
        manifest = json.loads(starqa("info", name, "--json", home=home).stdout)
        phase1 = manifest["phase1_s"]
        baseline = baseline or phase1
        print(f"{nproc:>5} {phase1:>10.2f} {wall:>8.1f} {baseline / phase1:>8.2f}x", flush=True)

    config = json.loads(next((home / "models").glob("*/config.json")).read_text())
    heads, layers = config["num_attention_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    # Per layer and token, each rank contributes its attention output [heads, head_dim] (model dtype: float32 on a
    # CPU, half that in bfloat16 on GPUs) and its LSE [heads] in float32.
    per_rank = layers * (heads * head_dim + heads) * 4
    print(f"\nPhase 2 exchange per generated token (model: {layers} layers, {heads} heads x {head_dim}):")
    for nproc in (2, 4, 8):
        print(f"  {nproc} ranks: each rank sends {per_rank:,} bytes and receives {per_rank * (nproc - 1):,} "
              f"(+8 bytes for the token); the KV itself never moves")


if __name__ == "__main__":
    main()
