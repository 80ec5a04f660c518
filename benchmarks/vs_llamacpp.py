"""Benchmark (not a test): starqa beside llama.cpp on the same GGUF, same thread count, in one run.

llama.cpp is what a user would pick instead: it runs the bundled GGUF as it is (4-bit Q4_1 weights, float16 KV).
This prints one table:

  - prefill of a whole document (llama.cpp) vs starqa's Phase 1 (block = anchor = 1024), at 2K/4K/8K/16K tokens;
  - a repeated question over that document: llama.cpp restores its saved state and evaluates the question;
    starqa reads the stored KV (from the page cache) and runs Phase 2's prefill; both to the first answer token;
  - decode tokens/s at 512 and 8K tokens of context;
  - bytes per token on disk: llama.cpp's saved state vs starqa's stored KV (bfloat16, int8).

It needs llama-cpp-python, an optional extra built from source (a few minutes):

    make bench-install                           # pip install -e ".[bench]" into the venv
    .venv/bin/python benchmarks/vs_llamacpp.py   # writes benchmarks/results/vs-llamacpp.txt too
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _timed(function, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--decode-lengths", default="512,8192")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vs-llamacpp.txt"))
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        sys.exit("benchmarks/vs_llamacpp.py needs llama-cpp-python: run `make bench-install` (it builds llama.cpp "
                 "from source, a few minutes), then run this again")

    import torch

    from starqa.ask import load_context
    from starqa.engine import StarEngine
    from starqa.models import bundled_gguf_path
    from starqa.store import DocumentStore

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    decode_lengths = [int(x) for x in args.decode_lengths.split(",")]
    longest = max(lengths + decode_lengths) + 64 + args.new_tokens
    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="auto")
    llama = Llama(model_path=str(bundled_gguf_path("smollm2-135m")), n_ctx=longest, n_threads=args.threads,
                  n_threads_batch=args.threads, n_batch=512, verbose=False)
    rng = random.Random(0)
    vocabulary = range(100, 40000)
    question = [rng.choice(vocabulary) for _ in range(20)]
    lines = [f"starqa ({engine.dtype}, decode kernels on CPU) vs llama.cpp (llama-cpp-python, same GGUF: Q4_1 weights, "
             f"f16 KV), {args.threads} threads, one run"]

    def llama_prefill(ids):
        llama.reset()
        llama.eval(ids)

    def llama_decode_rate(ids) -> float:
        llama.reset()
        llama.eval(ids)
        started = time.perf_counter()
        for _ in range(args.new_tokens):
            llama.eval([rng.choice(vocabulary)])  # one token per step, as decoding does
        return args.new_tokens / (time.perf_counter() - started)

    lines.append("")
    lines.append(f"{'tokens':>7} {'llama.cpp prefill':>18} {'starqa Phase 1':>15} {'ratio':>6} "
                 f"{'repeat question: llama.cpp':>27} {'starqa':>8} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as scratch:
        store = DocumentStore(Path(scratch) / "store")
        for n in lengths:
            ids = [rng.choice(vocabulary) for _ in range(n)]
            prefill = _timed(lambda: llama_prefill(ids))
            state = llama.save_state()
            phase1 = _timed(lambda: engine.encode_context(ids, 1024, 1024))

            def llama_repeat():
                llama.load_state(state)
                llama.eval(question)

            repeat_llama = _timed(llama_repeat, repeat=3)
            document = _store_document(engine, store, ids)

            def starqa_repeat():
                ctx = load_context(engine, store, document)
                engine.generate(ctx, question, max_new_tokens=1)

            repeat_starqa = _timed(starqa_repeat, repeat=3)
            lines.append(f"{n:>7,} {prefill:>17.2f}s {phase1:>14.2f}s {prefill / phase1:>5.2f}x "
                         f"{repeat_llama:>26.3f}s {repeat_starqa:>7.3f}s {repeat_llama / repeat_starqa:>5.2f}x")
            state_bytes_per_token = state.llama_state_size / n
            if n == max(lengths):
                bytes_line = (f"bytes per token on disk at {n:,} tokens: llama.cpp state {state_bytes_per_token:,.0f}; "
                              f"starqa KV bfloat16 {document.kv_bytes_per_token:,.0f}")
                document_int8 = _store_document(engine, store, ids, kv_dtype="int8", name="doc-int8")
                bytes_line += f", int8 {document_int8.kv_bytes_per_token:,.0f}"
    lines.append("")
    lines.append("decode tokens/s (one question, greedy):")
    engine.stop_ids = set()
    for n in decode_lengths:
        ids = [rng.choice(vocabulary) for _ in range(n)]
        llama_rate = llama_decode_rate(ids)
        ctx = engine.encode_context(ids, 1024, 1024)
        engine.generate(ctx, question[:3], max_new_tokens=args.new_tokens)
        ours = engine.last_stats.decode_tokens_per_s
        ctx8 = engine.encode_context(ids, 1024, 1024, kv_dtype="int8")
        engine.generate(ctx8, question[:3], max_new_tokens=args.new_tokens)
        ours8 = engine.last_stats.decode_tokens_per_s
        lines.append(f"  {n:>6,} tokens: llama.cpp {llama_rate:.1f}; starqa {ours:.1f} ({ours / llama_rate:.2f}x), "
                     f"with int8 KV {ours8:.1f} ({ours8 / llama_rate:.2f}x)")
    lines.append("")
    lines.append(bytes_line)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n", encoding="utf-8")


def _store_document(engine, store, ids, kv_dtype: str = "auto", name: str = "doc"):
    """Store `ids` as a document the way ingest does (blocks in their stored precision), for the repeated question."""
    from starqa.engine import quantize_block
    from starqa.kv_quant import KEY_GROUP, resolve_kv_dtype
    from starqa.store import write_block_file
    from starqa.tokens import plan_blocks

    kv = resolve_kv_dtype(kv_dtype, engine.dtype)
    manifest = {"model": "smollm2-135m", "dtype": str(engine.dtype).removeprefix("torch."), "kv_dtype": kv,
                "kv_key_group": KEY_GROUP, "context_tokens": len(ids), "document_token_offset": 0, "block_size": 1024,
                "anchor_size": 1024, "source": {"path": "-", "sha256": "", "kind": "text"}}
    with store.lock(name), store.writing(name, manifest) as writer:
        writer.write_text("", [])
        writer.write_context_ids(ids)
        for block in engine.encode_blocks(ids, 1024, 1024):
            write_block_file(writer.staging, quantize_block(block, kv))
        for index, (start, end) in enumerate(plan_blocks(len(ids), 1024)):
            writer.record_existing_block(index, start, end)
    return store.get(name)


if __name__ == "__main__":
    main()
