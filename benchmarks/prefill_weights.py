"""Benchmark (not a test): what a prefill costs when `--weights auto` keeps one copy of the weights.

Under `auto` a model converted from a GGUF holds its projections only as the GGUF's 4/8-bit integers (the bfloat16
copy it used to keep beside them doubled the weights in memory). A call of up to GEMV_MAX_ROWS rows (a decoding
step) runs the 4/8-bit GEMV kernels on them; a call with more rows (a question's or a block's prefill)
de-quantises each projection to bfloat16 first, into one reused buffer (exactly the converted weights), and
multiplies with torch. Per number of rows this prints the time of one forward pass over the whole model (no stored
context: the projections dominate) with

  bf16 copy      the bfloat16 weights kept in memory (what `auto` did before; `--weights bfloat16` still does)
  integers       the integers only (what `auto` does now)

measured in turn (A B A B ...; medians), and the second as a ratio of the first.

    .venv/bin/python benchmarks/prefill_weights.py --model qwen2.5-coder-1.5b --rows 1,8,16,24,32,48,64,256

Other agents may share the CPU: compare the ratios of one run, not absolute figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import decode_precisions  # noqa: E402  (benchmarks/, the script's own folder)

from starqa.engine.star_engine import StarEngine  # noqa: E402

VARIANTS = ("bf16 copy", "integers")


def forward_seconds(engine, rows: int) -> float:
    ids = torch.arange(1000, 1000 + rows)[None]
    cache = engine._new_cache(batch=1, capacity=rows)
    started = time.perf_counter()
    with torch.inference_mode():
        engine.model.forward(ids, torch.arange(rows)[None], cache)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--rows", default="1,8,16,24,32,48,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", default=None, help="STARQA_HOME holding the converted model")
    args = parser.parse_args()
    engine = StarEngine.load(args.model, device="cpu", dtype="bfloat16", store_root=args.store, weights="bfloat16")
    summaries, states = decode_precisions.attach_all(engine, ["bfloat16", "auto"], engine.store_root)
    if not all(linear.weight is None for key, linear in engine.model.projections() if key != "lm_head"):
        sys.exit(f"{args.model} keeps its bfloat16 weights under auto ({summaries['auto']}): nothing to compare")
    print(f"{args.model}, auto = {summaries['auto']}; one forward pass, median of {args.repeats}")

    def run(variant: str, rows: int) -> float:
        decode_precisions.use(engine, states["bfloat16" if variant == "bf16 copy" else "auto"])
        return forward_seconds(engine, rows)

    print(f"{'rows':>5} | " + " | ".join(f"{v:>12}" for v in VARIANTS) + " | integers/copy")
    for rows in [int(r) for r in args.rows.split(",")]:
        for variant in VARIANTS:
            run(variant, rows)  # warm-up
        times = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                times[variant].append(run(variant, rows))
        median = {variant: statistics.median(values) for variant, values in times.items()}
        print(f"{rows:>5} | " + " | ".join(f"{median[v] * 1000:>9.0f} ms" for v in VARIANTS)
              + f" | {median['integers'] / median['bf16 copy']:>12.2f}x", flush=True)

if __name__ == "__main__":
    main()
