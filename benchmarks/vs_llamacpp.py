"""Benchmark (not a test): starqa beside llama.cpp on the same GGUF, same thread count, in one run.

llama.cpp is what a user would pick instead: it runs a GGUF as it is (its own 4/8-bit weights, float16 KV). It runs
in its own process (`--llama-worker`: two OpenMP runtimes in one process slowed both), and the output states its
version and build (llama_print_system_info). starqa decodes with each of --weights (default bfloat16 and auto, the
GGUF's own integers). This prints one table:

  - prefill of a whole document (llama.cpp) vs starqa's Phase 1 (block = anchor = 1024), at 2K/4K/8K/16K tokens;
  - a repeated question over that document: llama.cpp restores its saved state and evaluates the question;
    starqa reads the stored KV (from the page cache) and runs Phase 2's prefill; both to the first answer token;
  - decode tokens/s at 512 and 8K tokens of context;
  - bytes per token on disk: llama.cpp's saved state vs starqa's stored KV (bfloat16, int8).

It needs llama-cpp-python, an optional extra built from source (a few minutes):

    make bench-install                           # pip install -e ".[bench]" into the venv
    .venv/bin/python benchmarks/vs_llamacpp.py   # writes benchmarks/results/vs-llamacpp.txt too
    .venv/bin/python benchmarks/vs_llamacpp.py --model qwen2.5-coder-1.5b --lengths 8192 --decode-lengths 8192
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import decode_precisions  # noqa: E402  (benchmarks/, the script's own folder)


def _timed(function, repeat: int = 1) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def llama_worker(job_path: str) -> None:
    """The llama.cpp side, in its own process (two OpenMP runtimes in one process slowed both): reads the job (GGUF,
    threads, token ids), prints one JSON object with its timings and the build it ran."""
    import llama_cpp
    from llama_cpp import Llama

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    threads, new_tokens, question = job["threads"], job["new_tokens"], job["question"]
    longest = max(len(ids) for ids in job["prefill"] + job["decode"]) + 64 + new_tokens
    llama = Llama(model_path=job["gguf"], n_ctx=longest, n_threads=threads, n_threads_batch=threads, n_batch=512,
                  verbose=False)
    info = llama_cpp.llama_print_system_info()
    result = {"version": llama_cpp.__version__,
              "system_info": info.decode(errors="replace") if isinstance(info, bytes) else str(info),
              "prefill": [], "decode": []}
    for ids in job["prefill"]:
        def prefill():
            llama.reset()
            llama.eval(ids)

        seconds = _timed(prefill)
        state = llama.save_state()

        def repeat():
            llama.load_state(state)
            llama.eval(question)

        result["prefill"].append({"tokens": len(ids), "prefill_s": seconds, "repeat_s": _timed(repeat, repeat=3),
                                  "state_bytes": state.llama_state_size})
    for ids in job["decode"]:
        llama.reset()
        llama.eval(ids)
        started = time.perf_counter()
        for token in job["decode_tokens"][:new_tokens]:
            llama.eval([token])  # one token per step, as decoding does
        result["decode"].append({"tokens": len(ids), "tokens_per_s": new_tokens / (time.perf_counter() - started)})
    print(json.dumps(result))


def run_llama(gguf: str, threads: int, new_tokens: int, question, prefill_ids, decode_ids, decode_tokens) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        job = Path(scratch) / "job.json"
        job.write_text(json.dumps({"gguf": gguf, "threads": threads, "new_tokens": new_tokens, "question": question,
                                   "prefill": prefill_ids, "decode": decode_ids, "decode_tokens": decode_tokens}))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        done = subprocess.run([sys.executable, __file__, "--llama-worker", str(job)], capture_output=True, text=True,
                              env=env)
        if done.returncode != 0:
            sys.exit(f"the llama.cpp worker failed: {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a GGUF file or a bundled/catalogue model name")
    parser.add_argument("--weights", default="bfloat16,auto,auto+int8",
                        help="starqa --weights to decode with, comma-separated; MODE+int8: with --activations int8")
    parser.add_argument("--store", default=None, help="STARQA_HOME holding the converted model")
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--decode-lengths", default="512,8192")
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vs-llamacpp.txt"))
    parser.add_argument("--llama-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.llama_worker:
        llama_worker(args.llama_worker)
        return
    if importlib.util.find_spec("llama_cpp") is None:  # found, not imported: llama.cpp runs in its own process
        sys.exit("benchmarks/vs_llamacpp.py needs llama-cpp-python: run `make bench-install` (it builds llama.cpp "
                 "from source, a few minutes), then run this again")

    import torch

    from starqa.answer.passes import load_context
    from starqa.engine.star_engine import StarEngine
    from starqa.model.catalogue import CATALOGUE
    from starqa.model.resolve import bundled_gguf_path
    from starqa.model.quantized_weights import gguf_source
    from starqa.store.document_store import DocumentStore

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    decode_lengths = [int(x) for x in args.decode_lengths.split(",")]
    engine = StarEngine.load(args.model, device="cpu", dtype="auto", store_root=args.store, weights="bfloat16")
    source = gguf_source(engine.model_dir)
    # the GGUF the model was converted from (recorded by the conversion), else the one a catalogue model's
    # package holds whole (smollm2-135m), else --model itself (a .gguf file)
    gguf = (str(source[0]) if source else str(bundled_gguf_path(args.model)) if args.model in CATALOGUE
            else args.model)
    rng = random.Random(0)
    vocabulary = range(100, 30000)
    question = [rng.choice(vocabulary) for _ in range(20)]
    prefill_ids = [[rng.choice(vocabulary) for _ in range(n)] for n in lengths]
    decode_ids = [[rng.choice(vocabulary) for _ in range(n)] for n in decode_lengths]
    decode_tokens = [rng.choice(vocabulary) for _ in range(args.new_tokens)]
    peer = run_llama(gguf, args.threads, args.new_tokens, question, prefill_ids, decode_ids, decode_tokens)
    root = DocumentStore(args.store).root
    summaries, packed = decode_precisions.attach_all(engine, args.weights.split(","), root, print)
    lines = [f"starqa ({engine.dtype} compute, decode kernels on CPU) vs llama.cpp {peer['version']} "
             f"(llama-cpp-python in its own process, same GGUF {Path(gguf).name}, its own weights, f16 KV), "
             f"{args.threads} threads, one run; other processes may share this CPU",
             f"llama.cpp build: {peer['system_info'].strip()}",
             "starqa decoding weights: " + "; ".join(f"{m}: {summaries[m]}" for m in summaries)]
    lines.append("")
    lines.append(f"{'tokens':>7} {'llama.cpp prefill':>18} {'starqa Phase 1':>15} {'ratio':>6} "
                 f"{'repeat question: llama.cpp':>27} {'starqa':>8} {'ratio':>6}")
    bytes_line = ""
    with tempfile.TemporaryDirectory() as scratch:
        store = DocumentStore(Path(scratch) / "store")
        for ids, theirs in zip(prefill_ids, peer["prefill"]):
            n = len(ids)
            phase1 = _timed(lambda: engine.encode_context(ids, 1024, 1024))
            document = _store_document(engine, store, ids)

            def starqa_repeat():
                ctx = load_context(engine, store, document)
                engine.generate(ctx, question, max_new_tokens=1)

            repeat_starqa = _timed(starqa_repeat, repeat=3)
            lines.append(f"{n:>7,} {theirs['prefill_s']:>17.2f}s {phase1:>14.2f}s {theirs['prefill_s'] / phase1:>5.2f}x "
                         f"{theirs['repeat_s']:>26.3f}s {repeat_starqa:>7.3f}s "
                         f"{theirs['repeat_s'] / repeat_starqa:>5.2f}x")
            if n == max(lengths):
                bytes_line = (f"bytes per token on disk at {n:,} tokens: llama.cpp state "
                              f"{theirs['state_bytes'] / n:,.0f}; starqa KV bfloat16 {document.kv_bytes_per_token:,.0f}")
                document_int8 = _store_document(engine, store, ids, kv_dtype="int8", name="doc-int8")
                bytes_line += f", int8 {document_int8.kv_bytes_per_token:,.0f}"
    lines.append("")
    lines.append("decode tokens/s (one question, greedy):")
    engine.stop_ids = set()
    for ids, theirs in zip(decode_ids, peer["decode"]):
        ctx = engine.encode_context(ids, 1024, 1024)
        parts = []
        for mode in packed:
            decode_precisions.use(engine, packed[mode])
            best = 0.0
            for _ in range(2):
                engine.generate(ctx, question[:3], max_new_tokens=args.new_tokens)
                best = max(best, engine.last_stats.decode_tokens_per_s)
            parts.append(f"starqa --weights {mode} {best:.1f} ({best / theirs['tokens_per_s']:.2f}x)")
        lines.append(f"  {len(ids):>6,} tokens: llama.cpp {theirs['tokens_per_s']:.1f}; " + ", ".join(parts))
    lines.append("")
    lines.append(bytes_line)
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text + "\n", encoding="utf-8")


def _store_document(engine, store, ids, kv_dtype: str = "auto", name: str = "doc"):
    """Store `ids` as a document the way ingest does (blocks in their stored precision), for the repeated question."""
    from starqa.engine.star_engine import quantize_block
    from starqa.store.kv_quant import KEY_GROUP, resolve_kv_dtype
    from starqa.store.document_store import write_block_file
    from starqa.documents.tokens import plan_blocks

    kv = resolve_kv_dtype(kv_dtype, engine.dtype)
    manifest = {"model": engine.model_name, "dtype": str(engine.dtype).removeprefix("torch."), "kv_dtype": kv,
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
