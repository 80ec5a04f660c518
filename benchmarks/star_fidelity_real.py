"""Benchmark (not a test): Star Attention's Phase 1 and Phase 2 on a real model against a float64 computation.

    STARQA_HOME=/tmp/store .venv/bin/python benchmarks/star_fidelity_real.py --model /work/gguf/qwen2.5-coder-0.5b.gguf

The same check as tests/test_star_fidelity.py, on real weights and real text (an 8K-token niah_single_2 prompt of
`starqa eval --suite ruler`): for a few blocks of 128 tokens (anchor 128) at global offsets up to ~8K, the KV the
engine keeps (float32 and bfloat16 compute) against tests/star_reference.py's float64 `[anchor, block]` at global
positions, from the model's float32 weights (so the bfloat16 figure includes the weights' rounding to bfloat16).
For scale, the same tokens' KV under full attention differs from Star's by the "Star vs full" figure: what the
approximation itself changes. Phase 2: the next-token logits after a question over blocks 0-2 (the engine's stored
KV) against the float64 forward with one plain softmax over that KV, and the KL divergence between full attention's
and Star's next-token distributions (both float64). Prints one table; bounded (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--blocks", default="0,1,2,32,62")
    args = parser.parse_args()

    import torch
    from safetensors import safe_open

    from star_reference import Float64Decoder, relative_error
    from starqa.engine.star_engine import StarEngine
    from starqa.eval.prompts import PromptBuilder
    from starqa.eval.tasks import generate_cases

    started = time.perf_counter()
    store = os.environ.get("STARQA_HOME")
    engines = {dtype: StarEngine.load(args.model, device="cpu", dtype=dtype, store_root=store)
               for dtype in ("float32", "bfloat16")}
    directory = engines["float32"].model_dir
    handles = [safe_open(str(path), framework="pt") for path in sorted(Path(directory).glob("*.safetensors"))]
    where = {name: handle for handle in handles for name in handle.keys()}
    config = json.loads((Path(directory) / "config.json").read_text())
    reference = Float64Decoder(config, lambda name: where[name].get_tensor(name) if name in where else None)

    prompts = PromptBuilder(engines["float32"].hf_tokenizer)
    case = generate_cases("niah_single_2", 8192, 1, 0, prompts.count)[0]
    context, query = prompts.context_ids(case.context_text), prompts.query_ids(case.question)
    block = anchor = args.block_size
    wanted = [int(index) for index in args.blocks.split(",")]
    n_blocks = -(-len(context) // block)
    wanted = [index for index in wanted if index < n_blocks]
    print(f"{Path(args.model).name}: {len(context)} context tokens, block = anchor = {block}, blocks {wanted}")

    kept = {dtype: {b.index: b for b in engine.encode_blocks(context, block, anchor, block_indices=wanted)}
            for dtype, engine in engines.items()}
    head = 3 * block  # blocks 0-2: also encoded under full attention, for scale
    full_keys, full_values, _ = reference.encode(context[:head], range(head))
    print("| block | global tokens | float32 engine: K / V error | bfloat16 engine: K / V error "
          "| Star vs full (float64): K / V |")
    print("|---:|---|---:|---:|---:|")
    star_reference = {}
    for index in wanted:
        start, end = index * block, min((index + 1) * block, len(context))
        keys, values = reference.star_block(context, (start, end), anchor)
        star_reference[index] = (keys, values)
        cells = []
        for dtype in ("float32", "bfloat16"):
            got = kept[dtype][index]
            key_error = max(relative_error(got.keys[layer], keys[layer]) for layer in range(len(keys)))
            value_error = max(relative_error(got.values[layer], values[layer]) for layer in range(len(keys)))
            cells.append(f"{key_error:.1e} / {value_error:.1e}")
        if end <= head:
            key_gap = max(relative_error(keys[layer], full_keys[layer][:, start:end]) for layer in range(len(keys)))
            value_gap = max(relative_error(values[layer], full_values[layer][:, start:end])
                            for layer in range(len(keys)))
            cells.append(f"{key_gap:.1e} / {value_gap:.1e}")
        else:
            cells.append("–")
        print(f"| {index} | {start}..{end - 1} | " + " | ".join(cells) + " |")
    print("(errors: max over layers of max |engine - float64| / max |float64| per layer's keys or values)")

    # Phase 2 over blocks 0-2 as stored: the question's next-token logits
    n = head
    positions = range(n, n + len(query))
    full_past = [(full_keys[layer], full_values[layer]) for layer in range(len(full_keys))]
    _, _, full_logits = reference.encode(query, positions, past=full_past, logits=True)
    print("\n| compute | Phase 2 logits error vs float64 over the stored KV | same next token | KL(full || Star), "
          "float64 |")
    print("|---|---:|---:|---:|")
    for dtype, engine in engines.items():
        ctx = engine.encode_context(context[:head], block, anchor)
        cache = engine._new_cache(batch=1, capacity=len(query), prefix=ctx)
        logits = engine._step(cache, torch.tensor([query]), torch.tensor([list(positions)]))[0]
        stored = [(ctx.keys[layer][0], ctx.values[layer][0]) for layer in range(len(ctx.keys))]
        _, _, expected = reference.encode(query, positions, past=stored, logits=True)
        error = relative_error(logits, expected[-1])
        same = int(torch.argmax(logits)) == int(torch.argmax(expected[-1]))
        if dtype == "float32":  # Star's own effect, from the float64 Star KV of blocks 0-2
            star_past = [(torch.cat([star_reference[i][0][layer] for i in (0, 1, 2)], dim=1),
                          torch.cat([star_reference[i][1][layer] for i in (0, 1, 2)], dim=1))
                         for layer in range(len(full_keys))] if all(i in star_reference for i in (0, 1, 2)) else None
            if star_past is not None:
                _, _, star_logits = reference.encode(query, positions, past=star_past, logits=True)
                p, q = torch.log_softmax(full_logits[-1], -1), torch.log_softmax(star_logits[-1], -1)
                kl = float((p.exp() * (p - q)).sum())
            else:
                kl = None
        print(f"| {dtype} | {error:.1e} | {'yes' if same else 'no'} | "
              f"{'–' if dtype != 'float32' or kl is None else f'{kl:.2e}'} |")
    print(f"\nelapsed {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
