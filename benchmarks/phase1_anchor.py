"""Benchmark (not a test): Phase 1 seconds per block/anchor setting, as ratios to block = anchor = L/4, in one run.

The settings are timed round-robin (setting 1, 2, ..., then again), so a change in the machine's load lands on all of
them alike; the report gives each setting's median and its ratio to the first setting's median. Phase 1 is
`StarEngine.encode_context` over the same context ids (the sample contract repeated to the length), KV kept in the
compute dtype, the default phase1_batch (4).

    .venv/bin/python benchmarks/phase1_anchor.py --model qwen2.5-coder-0.5b --length 8192 \\
        --configs L/4:L/4,1024:1024,512:2048,1024:2048 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from phase1 import context_of  # noqa: E402
from starqa.engine.star_engine import StarEngine  # noqa: E402


def size(text: str, length: int) -> int:
    text = text.strip()
    return length // int(text[2:]) if text.upper().startswith("L/") else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--configs", default="L/4:L/4,1024:1024,512:2048,1024:2048",
                        help="BLOCK:ANCHOR settings, comma-separated; the first is the reference of the ratios")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    engine = StarEngine.load(args.model, device="cpu", dtype=args.dtype, weights="bfloat16")
    ids = context_of(engine, args.length)
    configs = [(size(b, args.length), size(a, args.length))
               for b, a in (part.split(":") for part in args.configs.split(","))]
    engine.encode_context(ids[:64], block_size=16, anchor_size=32)  # warm-up
    seconds: dict[tuple[int, int], list[float]] = {config: [] for config in configs}
    for repeat in range(args.repeats):
        for block, anchor in configs:
            started = time.perf_counter()
            engine.encode_context(ids, block, anchor)
            seconds[(block, anchor)].append(time.perf_counter() - started)
            print(f"repeat {repeat}: {block}/{anchor}: {seconds[(block, anchor)][-1]:.1f} s", flush=True)
    reference = statistics.median(seconds[configs[0]])
    print(f"\n{engine.model_name}, {str(engine.dtype).removeprefix('torch.')}, {len(ids)} context tokens, "
          f"{args.repeats} round(s)")
    print("| block / anchor | Phase 1 s (median) | ratio to " f"{configs[0][0]}/{configs[0][1]} |")
    print("|---|---:|---:|")
    for config in configs:
        median = statistics.median(seconds[config])
        print(f"| {config[0]} / {config[1]} | {median:.1f} | {median / reference:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
