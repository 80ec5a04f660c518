"""Decode speed with answer sources on the CPU: scores taken from the prefix attention vs a separate scoring pass.

    python benchmarks/sources_decode.py            # bundled model, 8K-token context, 16 decoded tokens, 2 rounds

`ask` scores every layer's query against the stored keys to find the pages an answer came from. On CPU decoding steps
those scores come from the prefix attention itself (starqa.hf_hook); the separate pass (what GPUs and the prompt's
pass still use) reads the stored keys a second time. Prints tokens/s without sources, with the separate pass, and
with the scores from the attention, in one run.
"""

from __future__ import annotations

import argparse
import random

from starqa import hf_hook
from starqa.engine import StarEngine
from starqa.sources import AttentionShares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="Context length (default: %(default)s).")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="float32")
    engine.stop_ids = set()  # decode the full count
    rng = random.Random(0)
    ctx = engine.encode_context([rng.randrange(100, 40000) for _ in range(args.tokens)], 1024, 1024)
    from_attention = hf_hook._scores_from_attention

    def rate(sources: str) -> float:
        hf_hook._scores_from_attention = from_attention if sources != "separate" else (lambda query: False)
        shares = AttentionShares(ctx.spans, 0, engine.head_dim ** -0.5) if sources != "none" else None
        engine.generate(ctx, [5, 6, 7], max_new_tokens=17, observe_prefix=shares)
        return engine.last_stats.decode_tokens_per_s

    print(f"decode tokens/s over a {args.tokens}-token context (bundled model, CPU, float32)")
    for _ in range(args.rounds):
        none, separate, fused = rate("none"), rate("separate"), rate("attention")
        print(f"  no sources {none:.1f}   sources, separate pass {separate:.1f}   sources from the attention "
              f"{fused:.1f}   ({fused / separate:.2f}x)")
    hf_hook._scores_from_attention = from_attention


if __name__ == "__main__":
    main()
