"""Decode speed with and without evidence (the sources observer), in one run, and the ratio.

    python benchmarks/sources_decode.py            # bundled model, 8K-token context, 24 decoded tokens, 7 rounds

`ask` follows the model's retrieval heads while an answer is decoded (starqa.evidence.observer.AttentionShares, set up by
starqa.evidence.collect.observer_for). On a CPU with the decode kernels (starqa.kernels) the scores come out of the kernel
pass that reads the stored keys for the attention, and only in the layers holding a retrieval head; elsewhere (a GPU,
STARQA_KERNELS=off) the torch path scores the retrieval heads' rows only. The observer keeps a top-k and a
log-sum-exp of those heads' rows. Each round decodes the same tokens without an observer, with the retrieval-head observer, and with the
every-head observer (what a model whose calibration found no retrieval heads gets); the rounds alternate so that a
shared machine's load falls on all three alike. Prints tokens/s per round and the median ratios, and the time
`evidence_for_answer` then takes (once per answer, not per token).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from starqa.evidence import collect, quotes
from starqa.engine.star_engine import StarEngine
from starqa.evidence.heads import retrieval_heads
from starqa.evidence.observer import AttentionShares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="Context length (default: %(default)s).")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-dtype", default="auto", help="KV precision of the context (auto: the compute dtype).")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice).")
    parser.add_argument("--store", type=Path, default=None, help="starqa store (its models/ folder is used).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = StarEngine.load("smollm2-135m", device=args.device, dtype=args.dtype, store_root=args.store)
    heads = retrieval_heads(engine)
    engine.stop_ids = set()  # decode the full count
    rng = random.Random(0)
    context = [rng.randrange(100, 40000) for _ in range(args.tokens)]
    ctx = engine.encode_context(context, 1024, 1024, kv_dtype=args.kv_dtype)
    offset = 40  # as if the chat template took the first 40 tokens

    def rate(kind: str):
        """(tokens/s by the wall clock, tokens per CPU second of this process, the observer)."""
        observer = None
        if kind == "retrieval heads":
            observer = collect.observer_for(engine, ctx.spans, offset, heads=heads)
        elif kind == "every head":
            observer = AttentionShares(ctx.spans, offset, engine.head_dim ** -0.5)
        cpu = time.process_time()
        engine.generate(ctx, [5, 6, 7], max_new_tokens=args.new_tokens + 1, observe_prefix=observer)
        cpu = time.process_time() - cpu  # the prompt's pass included: the same work in every kind
        return engine.last_stats.decode_tokens_per_s, (args.new_tokens + 1) / cpu, observer

    from starqa import kernels

    print(f"decode over a {args.tokens}-token context (bundled model, {engine.device}, "
          f"{str(engine.dtype).removeprefix('torch.')}, KV {str(ctx.keys[0].dtype).removeprefix('torch.')}, "
          f"kernels {'on' if kernels.available() else 'off: ' + kernels.unavailable_reason()}, "
          f"{torch.get_num_threads()} threads); {len(heads.heads)} retrieval heads in "
          f"{len(heads.by_layer())} of {engine.num_layers} layers. tokens/s by the wall clock, and per CPU second "
          "of this process (steadier on a shared machine: time spent waiting for a core is not counted)")
    rate("none")  # warm-up
    kinds = ("retrieval heads", "every head")
    ratios = {kind: {"wall": [], "cpu": []} for kind in kinds}
    observer = None
    for number in range(args.rounds):
        none_wall, none_cpu, _ = rate("none")
        line = f"  round {number + 1}: no evidence {none_wall:.2f} ({none_cpu:.2f} per CPU s)"
        for kind in kinds:
            wall, cpu, kept = rate(kind)
            observer = kept if kind == "retrieval heads" else observer
            ratios[kind]["wall"].append(wall / none_wall)
            ratios[kind]["cpu"].append(cpu / none_cpu)
            line += f"   {kind} {wall:.2f} ({cpu:.2f}): {wall / none_wall:.3f}x / {cpu / none_cpu:.3f}x"
        print(line, flush=True)
    for kind in kinds:
        print(f"median ratio, {kind}: {statistics.median(ratios[kind]['wall']):.3f}x by the wall clock, "
              f"{statistics.median(ratios[kind]['cpu']):.3f}x per CPU second")

    # What happens once per answer: attended tokens -> passages, quotes, sources (a view of a text of this size).
    words = " ".join(f"word{rng.randrange(1000)}" + ("." if i % 12 == 11 else "") for i in range(args.tokens))
    document_ids = engine.encode_document_text(words)[: args.tokens - offset]
    text = engine.tokenizer.decode(document_ids)
    view = quotes.DocumentView(text, [{"number": 1, "start": 0, "end": len(text)}],
                                 context[:offset] + document_ids, offset, list(ctx.spans), [[1]] * len(ctx.spans),
                                 engine.tokenizer)
    started = time.perf_counter()
    view.token_starts, view.passages  # noqa: B018 - worked out once per document version, kept for later questions
    prepared = time.perf_counter() - started
    started = time.perf_counter()
    collect.evidence_for_answer(view, [observer.stacked()], "The answer is word17.", "What is the answer?")
    print(f"per document version: token positions and passages {prepared * 1000:.0f} ms; per answer: evidence "
          f"{(time.perf_counter() - started) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
