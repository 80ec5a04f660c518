"""Decode speed with and without the answer's sources, in one run.

    python benchmarks/sources_decode.py            # bundled model, 8K-token context, 16 decoded tokens, 2 rounds

`ask` scores every layer's query against the stored keys to find the pages an answer came from. On a CPU with the
decode kernels (starqa.kernels) the scores come out of the same pass that reads the keys for the attention; elsewhere
the observer scores the keys itself. Prints tokens/s without and with sources, and their ratio.
"""

from __future__ import annotations

import argparse
import random

from starqa.engine import StarEngine
from starqa.sources import AttentionShares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="Context length (default: %(default)s).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    engine = StarEngine.load("smollm2-135m", device="cpu", dtype=args.dtype)
    engine.stop_ids = set()  # decode the full count
    rng = random.Random(0)
    ctx = engine.encode_context([rng.randrange(100, 40000) for _ in range(args.tokens)], 1024, 1024)

    def rate(sources: bool) -> float:
        shares = AttentionShares(ctx.spans, 0, engine.head_dim ** -0.5) if sources else None
        engine.generate(ctx, [5, 6, 7], max_new_tokens=17, observe_prefix=shares)
        return engine.last_stats.decode_tokens_per_s

    print(f"decode tokens/s over a {args.tokens}-token context (bundled model, CPU, {engine.dtype})")
    for _ in range(args.rounds):
        none, with_sources = rate(False), rate(True)
        print(f"  no sources {none:.1f}   with sources {with_sources:.1f}   ({with_sources / none:.2f}x)")


if __name__ == "__main__":
    main()
