"""Benchmark (not a test): what bfloat16 compute and narrower stored KV cost in accuracy, paired on the same cases.

    .venv/bin/python benchmarks/precision.py compute   # bf16 vs float32: the RULER-style suite at 2K and 4K
    .venv/bin/python benchmarks/precision.py kv        # stored KV: bfloat16 vs float16 vs int8, one Phase 1 per case
    .venv/bin/python benchmarks/precision.py report    # the tables, from the records (no measuring)

compute: runs `starqa eval --suite ruler --dtype bfloat16` (full attention and Star L/4) with its own results log,
then pairs every record with the float32 record of the same case and mode in benchmarks/results/ruler-cases.jsonl
(the 20-sample float32 run: same seed, so the same generated cases).
kv: for each case of the same suite, Phase 1 runs once in bfloat16 (Star L/4) and its blocks are stored in each KV
precision in turn (starqa.engine.star_engine.quantize_block, as `ingest --kv-dtype` stores them), so every precision answers
from the same encoding; scored as the eval scores. Both write JSONL logs under benchmarks/results/ and continue a
stopped run. Paired differences are in points with their 95 % interval (normal approximation, over all tasks'
samples of a length).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
FLOAT32_LOG = RESULTS / "ruler-cases.jsonl"
BF16_LOG = RESULTS / "precision-bf16-cases.jsonl"
KV_LOG = RESULTS / "precision-kv-cases.jsonl"
KV_DTYPES = ("bfloat16", "float16", "int8")
Z95 = 1.959964


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _paired(pairs: list[tuple[float, float]]) -> str:
    differences = [new - old for new, old in pairs]
    mean = 100 * statistics.fmean(differences)
    half = 100 * Z95 * statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    won, lost = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
    return f"{mean:+.1f} ± {half:.1f} ({won} won / {lost} lost)"


def run_compute(lengths: str, samples: int) -> None:
    command = [sys.executable, "-m", "starqa", "eval", "--suite", "ruler", "--lengths", lengths, "--samples",
               str(samples), "--pairs", "L/4:L/4", "--dtype", "bfloat16", "--device", "cpu", "--resume",
               str(BF16_LOG), "--json", "--quiet"]
    print("running:", " ".join(command), file=sys.stderr)
    with (RESULTS / "precision-bf16.json").open("w") as out:
        subprocess.run(command, check=False, stdout=out, cwd=REPO)


def run_kv(lengths: list[int], samples: int, seed: int) -> None:
    import torch

    from starqa.engine.star_engine import StarEngine, quantize_block
    from starqa.eval.command import _suite_cases, _suite_qa_source
    from starqa.eval.runner import prediction_text
    from starqa.eval.scoring import clean_prediction, score
    from starqa.eval.tasks import TASK_NAMES
    from starqa.eval.prompts import PromptBuilder

    done = {(r["task"], r["length"], r["index"], r["kv_dtype"]) for r in _records(KV_LOG)}
    engine = StarEngine.load("smollm2-135m", device="cpu", dtype="bfloat16")
    tasks = list(TASK_NAMES)
    qa_source = _suite_qa_source(tasks, explicit=False)
    if qa_source is None:
        tasks.remove("qa")
    cases = _suite_cases(engine, tasks, lengths, samples, seed, qa_source)
    prompts = PromptBuilder(engine.hf_tokenizer)
    with KV_LOG.open("a", encoding="utf-8") as log:
        for number, case in enumerate(cases, start=1):
            todo = [kv for kv in KV_DTYPES if (case.task, case.length, case.index, kv) not in done]
            if not todo:
                continue
            context_ids = prompts.context_ids(case.context_text)
            query_ids = prompts.query_ids(case.question)
            size = case.length // 4
            blocks = list(engine.encode_blocks(context_ids, size, size))
            spans = [(block.start, block.end) for block in blocks]
            for kv in todo:
                ctx = engine.context_from_blocks((quantize_block(block, kv) for block in blocks), len(context_ids),
                                                 len(context_ids), kv_dtype=kv, spans=spans)
                new_ids = engine.generate(ctx, query_ids, max_new_tokens=case.max_new_tokens)
                prediction = prediction_text(engine, new_ids)
                log.write(json.dumps({
                    "task": case.task, "length": case.length, "index": case.index, "kv_dtype": kv,
                    "case_id": case.case_id, "block_size": size, "kv_bytes": ctx.nbytes(),
                    "context_tokens": len(context_ids), "prediction": clean_prediction(prediction),
                    "score": score(case.metric, prediction, case.answers, case.answer_prefix)}) + "\n")
                log.flush()
                del ctx
            print(f"{number}/{len(cases)} {case.task} {case.length} #{case.index}", file=sys.stderr)
            del blocks
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


def report() -> None:
    key = lambda r: (r["task"], r["length"], r["index"], r["mode"], r["block_size"], r["anchor_size"])  # noqa: E731
    float32 = {key(r): r for r in _records(FLOAT32_LOG)}
    bf16 = _records(BF16_LOG)
    if bf16:
        print("compute dtype: bfloat16 minus float32, same cases (accuracy in %, paired difference in points)")
        print(f"{'length':>7} {'mode':>12} {'n':>4} {'float32':>8} {'bfloat16':>9}  bf16 - fp32 (95 %)")
        groups: dict[tuple, list[tuple[float, float]]] = {}
        for record in bf16:
            old = float32.get(key(record))
            if old is not None and old.get("case_id") == record["case_id"]:
                label = "full" if record["mode"] == "full" else f"star {record['block_size']}/{record['anchor_size']}"
                groups.setdefault((record["length"], label), []).append((record["score"], old["score"]))
        for (length, label), pairs in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] != "full")):
            new = 100 * statistics.fmean(p[0] for p in pairs)
            old = 100 * statistics.fmean(p[1] for p in pairs)
            print(f"{length:>7,} {label:>12} {len(pairs):>4} {old:>7.1f}% {new:>8.1f}%  {_paired(pairs)}")
    kv = _records(KV_LOG)
    if kv:
        print("\nstored KV precision (bfloat16 compute, Star L/4): accuracy and paired difference from bfloat16 KV")
        by_case: dict[tuple, dict[str, dict]] = {}
        for record in kv:
            by_case.setdefault((record["task"], record["length"], record["index"]), {})[record["kv_dtype"]] = record
        lengths = sorted({k[1] for k in by_case})
        print(f"{'length':>7} {'KV':>9} {'n':>4} {'bytes/token':>12} {'accuracy':>9}  minus bfloat16 KV (95 %)")
        for length in lengths:
            complete = [v for k, v in by_case.items() if k[1] == length and all(d in v for d in KV_DTYPES)]
            for dtype in KV_DTYPES:
                pairs = [(c[dtype]["score"], c["bfloat16"]["score"]) for c in complete]
                per_token = statistics.fmean(c[dtype]["kv_bytes"] / c[dtype]["context_tokens"] for c in complete)
                accuracy = 100 * statistics.fmean(p[0] for p in pairs)
                paired = _paired(pairs) if dtype != "bfloat16" else "-"
                print(f"{length:>7,} {dtype:>9} {len(pairs):>4} {per_token:>12,.0f} {accuracy:>8.1f}%  {paired}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("compute", "kv", "report"))
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.part == "compute":
        run_compute(args.lengths, args.samples)
    elif args.part == "kv":
        run_kv([int(x) for x in args.lengths.split(",")], args.samples, args.seed)
    report()


if __name__ == "__main__":
    main()
