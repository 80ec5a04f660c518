"""Benchmark (not a test): Star Attention vs HF full attention on the bundled model, in one run, same threads/dtype.

Prints (1) Phase 1 seconds per context length: Star (block 1024 / anchor 512, and block = anchor = n/4) vs HF's
full-attention prefill of the same ids, and vs Phase 1 done through HF's default attention (each [anchor, block]
encoded in full, the plain way, at 1024/512 and at the default 1024/1024) to show what starqa's path (anchor KV reused
as a prefix, LSE kernels) adds; (2) time to first token of a question over a stored document vs a cold full-attention
prefill of document + question; (3) decode tokens/s at a short vs a long context.

    .venv/bin/python benchmarks/phase1.py                      # 2K, 4K, 8K, 16K (takes a while on a CPU)
    .venv/bin/python benchmarks/phase1.py --lengths 2048 --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from starqa.engine.star_engine import StarEngine  # noqa: E402
from starqa.documents.tokens import context_ids_for, encode_document, prompt_template, query_ids_for  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "contract.txt"
QUESTION = "How many days of written notice are needed to terminate for convenience?"


def context_of(engine, n_tokens: int) -> list[int]:
    tokenizer = engine.hf_tokenizer
    text = SAMPLE.read_text(encoding="utf-8")
    ids = encode_document(tokenizer, text)
    template = prompt_template(tokenizer)
    head = context_ids_for(tokenizer, template, [])
    body = (ids * (n_tokens // len(ids) + 1))[: n_tokens - len(head)]
    return head + body


def timed(function, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--ttft-length", type=int, default=8192)
    parser.add_argument("--quick", action="store_true", help="one repetition, shorter decode")
    parser.add_argument("--store", default=None, help="STARQA_HOME for the converted model")
    parser.add_argument("--phase1-only", action="store_true", help="only table (1)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="float32", store_root=args.store)
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
    print(f"model {engine.model_name}, float32, torch threads {torch.get_num_threads()}, torch {torch.__version__}")

    def hf_prefill(ids):
        with torch.inference_mode():
            reference(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    def hf_star_phase1(ids, block, anchor):
        """Phase 1 the plain way, through HF's default attention: every [anchor, block] encoded in full."""
        with torch.inference_mode():
            for start in range(0, len(ids), block):
                end = min(start + block, len(ids))
                if start == 0:
                    piece, positions = ids[:end], list(range(end))
                else:
                    piece = ids[:anchor] + ids[start:end]
                    positions = list(range(anchor)) + list(range(start, end))
                reference.model(input_ids=torch.tensor([piece]), position_ids=torch.tensor([positions]),
                                use_cache=True)

    print("\n(1) Phase 1 seconds (lower is better); x = HF full prefill / Star Phase 1; new path x = Phase 1 through"
          " HF's attention (each [anchor, block] in full) / starqa's Phase 1, at 1024/512 and at the default 1024/1024")
    print(f"{'tokens':>7} {'HF full prefill':>16} {'star 1024/512':>14} {'x':>6} {'star n/4':>10} {'x':>6}"
          f" {'HF-attention star 1024/512':>27} {'new path x':>11}"
          f" {'star 1024/1024':>15} {'HF-attention 1024/1024':>23} {'new path x':>11}")
    for n in lengths:
        ids = context_of(engine, n)
        full = timed(lambda: hf_prefill(ids))
        star = timed(lambda: engine.encode_context(ids, 1024, 512))
        quarter = timed(lambda: engine.encode_context(ids, n // 4, n // 4))
        plain = timed(lambda: hf_star_phase1(ids, 1024, 512))
        default = timed(lambda: engine.encode_context(ids, 1024, 1024))
        plain_default = timed(lambda: hf_star_phase1(ids, 1024, 1024))
        print(f"{n:>7} {full:>15.2f}s {star:>13.2f}s {full / star:>5.2f}x {quarter:>9.2f}s {full / quarter:>5.2f}x"
              f" {plain:>26.2f}s {plain / star:>10.2f}x"
              f" {default:>14.2f}s {plain_default:>22.2f}s {plain_default / default:>10.2f}x", flush=True)
    if args.phase1_only:
        return

    n = args.ttft_length
    ids = context_of(engine, n)
    template = prompt_template(engine.tokenizer)
    query = query_ids_for(engine.tokenizer, template, QUESTION)
    ctx = engine.encode_context(ids, 1024, 1024)
    engine.generate(ctx, query, max_new_tokens=1)  # warm-up
    star_ttft = timed(lambda: engine.generate(ctx, query, max_new_tokens=1), repeat=1 if args.quick else 3)
    cold = timed(lambda: engine.generate_full(ids + query, max_new_tokens=1))
    print(f"\n(2) time to first token, {n}-token stored document")
    print(f"  warm Star (Phase 2 only): {star_ttft * 1000:.0f} ms; cold full-attention prefill: {cold:.2f} s; "
          f"ratio {cold / star_ttft:.0f}x")

    print("\n(3) decode tokens/s (Phase 2, 64 new tokens, greedy)")
    engine.stop_ids = set()  # decode the full count
    rates = {}
    for length in (512, n):
        ctx = engine.encode_context(context_of(engine, length), 1024, 1024)
        engine.generate(ctx, query, max_new_tokens=16 if args.quick else 64)
        rates[length] = engine.last_stats.decode_tokens_per_s
        print(f"  {length:>6} context tokens: {rates[length]:.1f} tokens/s")
    print(f"  ratio {n} vs 512: {rates[n] / rates[512]:.2f}")


if __name__ == "__main__":
    main()
