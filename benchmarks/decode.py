"""Benchmark (not a test): decoding speed against the memory floor, plain HF generate and batched questions.

A decoding step must read every weight and every stored KV byte once, so bytes per step / read bandwidth is the
fastest a step can be (the floor). In one run, on the bundled model, this prints:

  (1) the read bandwidth measured here, and per context length and precision: bytes per step, the floor in tokens/s,
      starqa's decode tokens/s (one question) and its share of the floor;
  (2) plain HF `generate` (float32, sdpa, its cache grown by concatenation) on the same ids, and starqa's default
      against it;
  (3) batched questions: 1 vs 8 questions over one context, wall time of prefill + decode (each answers
      --new-tokens tokens);
  (4) with --weights-models: per model and --weights (bfloat16, auto, auto with --activations int8, int8, int4:
      --precisions), one question decoded over one
      stored --weights-length context (default 8K; encoded once, the same KV for every precision): the bytes a step
      reads (the weights in the precision decoding reads them + the KV), the floor, starqa's tokens/s and its share
      of the floor, and each precision's speed-up over bfloat16, measured back to back in one run;
  (5) with --weights-models: the 4/8-bit GEMV alone on each model's projections, starqa's kernel (cpu_quant.c)
      against torch's `_weight_int8pack_mm` (per-channel int8) and `_weight_int4pack_mm_for_cpu` (int4, groups of
      32), as gpt-fast uses them, and the bfloat16 GEMV: GB/s of the bytes each reads.

    .venv/bin/python benchmarks/decode.py                       # 512 and 8192 tokens (a few minutes)
    .venv/bin/python benchmarks/decode.py --lengths 8192 --new-tokens 33
    .venv/bin/python benchmarks/decode.py --only-weights --weights-models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b

Other agents may share the CPU: compare the ratios of one run (measured back to back), not absolute figures.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import decode_precisions  # noqa: E402  (benchmarks/, the script's own folder)

from starqa import kernels  # noqa: E402
from starqa.engine.star_engine import StarEngine  # noqa: E402

LLAMA_CPP_8K = 26.7  # tokens/s, llama.cpp on the same GGUF at 8K depth, 2 threads (issue #14; vs_llamacpp.py measures it)


def decode_weight_bytes(engine) -> int:
    """Bytes a decoding step reads of the projections in the precision decoding reads them (4/8-bit parts with
    their scales, else bfloat16), plus the norms; one embedding row is negligible."""
    from starqa.model.quantized_weights import part_bytes

    total = 0
    for _, linear in engine.model.projections():
        total += (sum(part_bytes(part) for part in linear.packed) if linear.packed is not None
                  else linear.weight.numel() * linear.weight.element_size())
        if linear.bias is not None:
            total += linear.bias.numel() * linear.bias.element_size()
    return total


def weights_table(models: list[str], length: int, new_tokens: int, store: str | None, bandwidth: float,
                  precisions: list[str]) -> None:
    from starqa.store.document_store import DocumentStore

    print(f"\n(4) decoding with the weights in their stored precision: one question over a {length:,}-token context "
          f"(bfloat16 KV), {new_tokens} tokens, best of 2; ratios from this one run")
    print(f"{'model':>22} {'weights':>10} {'weights MB':>11} {'KV MB':>7} {'floor tok/s':>12} {'starqa tok/s':>13} "
          f"{'of floor':>9} {'vs bf16':>8}  what decoding reads")
    root = DocumentStore(store).root
    rng = random.Random(1)
    for name in models:
        engine = StarEngine.load(name, device="cpu", store_root=store, weights="bfloat16")
        engine.stop_ids = set()
        summaries, packed = decode_precisions.attach_all(engine, precisions, root, print)
        ctx = engine.encode_context([rng.randrange(100, 30000) for _ in range(length)], 1024, 1024)
        rates = {}
        for mode in packed:
            decode_precisions.use(engine, packed[mode])
            weights = decode_weight_bytes(engine)
            floor = bandwidth / (weights + kv_bytes(ctx))
            rates[mode] = decode_rate(engine, ctx, new_tokens)
            print(f"{Path(name).stem[:22]:>22} {mode:>10} {weights / 1e6:>11.0f} {kv_bytes(ctx) / 1e6:>7.0f} "
                  f"{floor:>12.1f} {rates[mode]:>13.1f} {rates[mode] / floor:>8.0%} "
                  f"{rates[mode] / rates['bfloat16']:>7.2f}x  {summaries[mode]}", flush=True)
        del engine, ctx, packed


def kernels_table(models: list[str], store: str | None, repeat: int = 20) -> None:
    """(5): each kernel on the real projection shapes, GB/s of the bytes it reads, best of 3 x `repeat` calls."""
    from starqa.engine.star_engine import _attach_weights
    from starqa.model.quantized_weights import part_bytes
    from starqa.store.document_store import DocumentStore

    def timed(function) -> float:
        function()
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(repeat):
                function()
            best = min(best, (time.perf_counter() - started) / repeat)
        return best

    print("\n(5) the GEMV alone, one row, GB/s of the bytes each kernel reads (higher is better); per model, the sum "
          "over one layer's projections and the LM head")
    root = DocumentStore(store).root
    for name in models:
        engine = StarEngine.load(name, device="cpu", store_root=store, weights="bfloat16")
        projections = dict(engine.model.projections())
        chosen = {k: v for k, v in projections.items() if k.startswith("layers.0.") or k == "lm_head"}
        totals: dict[str, list[float]] = {}

        def add(label: str, nbytes: int, seconds: float) -> None:
            entry = totals.setdefault(label, [0.0, 0.0])
            entry[0] += nbytes
            entry[1] += seconds

        for mode in ("int8", "int4"):
            _attach_weights(engine.model, mode, engine.model_dir, root, print)
            for activations in kernels.ACTIVATIONS if kernels.quantized_x8_available() else ("bfloat16",):
                label = f"starqa {mode}" + (" (int8 activations)" if activations == "int8" else "")
                for key, linear in chosen.items():
                    x = torch.randn(1, linear.weight.shape[1]).to(torch.bfloat16)
                    add(label, sum(part_bytes(p) for p in linear.packed),
                        timed(lambda: kernels.linear_packed(x, linear.packed, linear.weight, activations=activations)))
        for key, linear in chosen.items():
            weight = linear.weight
            out, features = weight.shape
            x = torch.randn(1, features).to(torch.bfloat16)
            add("starqa bfloat16", weight.numel() * 2, timed(lambda: kernels.linear_bf16(x, weight)))
            q8 = torch.randint(-127, 128, (out, features), dtype=torch.int8)
            scales = torch.rand(out).to(torch.bfloat16)
            add("torch _weight_int8pack_mm", q8.numel() + out * 2,
                timed(lambda: torch.ops.aten._weight_int8pack_mm(x, q8, scales)))
            q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (out, features), dtype=torch.int32), 1)
            scales_zeros = torch.rand(features // 32, out, 2).to(torch.bfloat16)
            add("torch _weight_int4pack_mm_for_cpu", q4.numel() * q4.element_size() + scales_zeros.numel() * 2,
                timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 32, scales_zeros)))
        for label, (nbytes, seconds) in totals.items():
            print(f"{Path(name).stem[:22]:>22} {label:>34}: {nbytes / 1e6:>7.1f} MB in {seconds * 1e3:>7.2f} ms = "
                  f"{nbytes / seconds / 1e9:>5.1f} GB/s", flush=True)
        del engine


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
    parser.add_argument("--weights-models", default="", help="models for (4) and (5), comma-separated")
    parser.add_argument("--weights-length", type=int, default=8192, help="context of (4)")
    parser.add_argument("--only-weights", action="store_true", help="run (4) and (5) only")
    parser.add_argument("--precisions", default="bfloat16,auto,auto+int8,int8,int4",
                        help="(4): --weights modes, MODE+int8 for --activations int8 (default: %(default)s)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    contexts = {n: [rng.randrange(100, 40000) for _ in range(n)] for n in lengths}

    bandwidth = kernels.read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; decode kernels: "
          f"{'on' if kernels.available() else 'off (' + kernels.unavailable_reason() + ')'}")
    print(f"read bandwidth here: {bandwidth / 1e9:.1f} GB/s (streaming read of 1 GiB)\n")
    models = [m for m in args.weights_models.split(",") if m]
    if args.only_weights:
        if models:
            weights_table(models, args.weights_length, args.new_tokens, args.store, bandwidth,
                          args.precisions.split(","))
            kernels_table(models, args.store)
            print(f"\nread bandwidth again: {kernels.read_bandwidth() / 1e9:.1f} GB/s")
        return

    print("(1) one question: decode tokens/s against the floor (bytes per step / read bandwidth)")
    print(f"{'context':>8} {'dtype':>9} {'KV':>9} {'weights MB':>11} {'KV MB':>7} {'floor tok/s':>12} "
          f"{'starqa tok/s':>13} {'of floor':>9}")
    default_rates: dict[int, float] = {}
    for dtype, kv_dtypes in (("bfloat16", ("bfloat16", "int8")), ("float32", ("float32",))):
        engine = StarEngine.load("smollm2-135m", device="cpu", dtype=dtype, store_root=args.store)
        engine.stop_ids = set()  # decode the full count
        weights = decode_weight_bytes(engine)  # as decoding reads them (--weights auto: 4/8-bit parts)
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


    if models:
        weights_table(models, args.weights_length, args.new_tokens, args.store, bandwidth,
                          args.precisions.split(","))
        kernels_table(models, args.store)


if __name__ == "__main__":
    main()
