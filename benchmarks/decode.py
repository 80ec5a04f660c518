"""Benchmark (not a test): decoding speed against the memory floor, plain HF generate and batched questions.

A decoding step must read every weight and every stored KV byte once, so bytes per step / read bandwidth is the
fastest a step can be (the floor). In one run, on the bundled model, this prints:

  (1) the read bandwidth measured here, and per context length and precision: bytes per step, the floor in tokens/s,
      starqa's decode tokens/s (one question) and its share of the floor;
  (2) plain HF `generate` (float32, sdpa, its cache grown by concatenation) on the same ids, and starqa's default
      against it;
  (3) batched questions: 1 vs 8 questions over one context, wall time of prefill + decode (each answers
      --new-tokens tokens).

    .venv/bin/python benchmarks/decode.py                       # 512 and 8192 tokens (a few minutes)
    .venv/bin/python benchmarks/decode.py --lengths 8192 --new-tokens 33
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starqa import kernels  # noqa: E402
from starqa.engine import StarEngine  # noqa: E402

LLAMA_CPP_8K = 26.7  # tokens/s, llama.cpp on the same GGUF at 8K depth, 2 threads (issue #14; vs_llamacpp.py measures it)


def weight_bytes(engine) -> int:
    """Bytes a step reads of the weights: every matrix once (the tied embedding as the LM head; one embedding row
    is negligible)."""
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def kv_bytes(ctx) -> int:
    return ctx.nbytes()


def decode_rate(engine, ctx, new_tokens: int, repeat: int = 2) -> float:
    best = 0.0
    for _ in range(repeat):
        engine.generate(ctx, [5, 6, 7], max_new_tokens=new_tokens)
        best = max(best, engine.last_stats.decode_tokens_per_s)
    return best


def hf_decode_rate(model, ids: list[int], new_tokens: int) -> float:
    """Plain HF generate: (time for new_tokens) - (time for 1 token), per token after the first."""
    prompt = torch.tensor([ids])

    def run(count: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=count, min_new_tokens=count, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started

    run(2)
    return (new_tokens - 1) / (run(new_tokens) - run(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,8192")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--questions", type=int, default=8, help="batch of (3) (default: %(default)s)")
    parser.add_argument("--store", default=None, help="STARQA_HOME holding the converted model")
    parser.add_argument("--no-hf", action="store_true", help="skip (2)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    contexts = {n: [rng.randrange(100, 40000) for _ in range(n)] for n in lengths}

    bandwidth = kernels.read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; decode kernels: "
          f"{'on' if kernels.available() else 'off (' + kernels.unavailable_reason() + ')'}")
    print(f"read bandwidth here: {bandwidth / 1e9:.1f} GB/s (streaming read of 1 GiB)\n")

    print("(1) one question: decode tokens/s against the floor (bytes per step / read bandwidth)")
    print(f"{'context':>8} {'dtype':>9} {'KV':>9} {'weights MB':>11} {'KV MB':>7} {'floor tok/s':>12} "
          f"{'starqa tok/s':>13} {'of floor':>9}")
    default_rates: dict[int, float] = {}
    for dtype, kv_dtypes in (("bfloat16", ("bfloat16", "int8")), ("float32", ("float32",))):
        engine = StarEngine.load("smollm2-135m", device="cpu", dtype=dtype, store_root=args.store)
        engine.stop_ids = set()  # decode the full count
        weights = weight_bytes(engine)
        for n in lengths:
            for kv_dtype in kv_dtypes:
                ctx = engine.encode_context(contexts[n], 1024, 1024, kv_dtype=kv_dtype)
                step_bytes = weights + kv_bytes(ctx)
                floor = bandwidth / step_bytes
                rate = decode_rate(engine, ctx, args.new_tokens)
                if dtype == "bfloat16" and kv_dtype == "bfloat16":
                    default_rates[n] = rate
                print(f"{n:>8,} {dtype:>9} {kv_dtype:>9} {weights / 1e6:>11.0f} {kv_bytes(ctx) / 1e6:>7.0f} "
                      f"{floor:>12.1f} {rate:>13.1f} {rate / floor:>8.0%}")
        del engine

    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        engine = StarEngine.load("smollm2-135m", device="cpu", dtype="float32", store_root=args.store)
        reference = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32,
                                                         attn_implementation="sdpa").eval()
        print("\n(2) plain HF generate (float32, sdpa) on the same ids, and starqa's default (bfloat16) against it")
        for n in lengths:
            hf = hf_decode_rate(reference, contexts[n] + [5, 6, 7], args.new_tokens)
            line = f"{n:>8,} tokens: HF {hf:.1f} tokens/s; starqa {default_rates[n]:.1f} ({default_rates[n] / hf:.2f}x)"
            if n >= 8000:
                line += f"; llama.cpp {LLAMA_CPP_8K} (issue #14; starqa {default_rates[n] / LLAMA_CPP_8K:.2f}x)"
            print(line)
        del reference, engine

    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="bfloat16", store_root=args.store)
    engine.stop_ids = set()
    n = max(lengths)
    ctx = engine.encode_context(contexts[n], 1024, 1024)
    queries = [[5, 6, 7, 8 + i % 5] for i in range(args.questions)]
    engine.generate_batch(ctx, queries[:1], max_new_tokens=2)  # warm-up
    timings = {}
    for count in (1, args.questions):
        started = time.perf_counter()
        engine.generate_batch(ctx, queries[:count], max_new_tokens=args.new_tokens)
        timings[count] = time.perf_counter() - started
    print(f"\n(3) {args.questions} questions vs 1 over a {n:,}-token context, {args.new_tokens} tokens each: "
          f"{timings[1]:.2f} s vs {timings[args.questions]:.2f} s ({timings[args.questions] / timings[1]:.2f}x the "
          "wall time of one)")


if __name__ == "__main__":
    main()
