"""Benchmark (not a test): accuracy of decoding with 8- and 4-bit weights against bfloat16 decoding, paired.

Every case is encoded once (Phase 1 and the query's prefill compute in bfloat16 whatever --weights says, so the
context KV is the same bytes for every precision); then the same engine answers it greedily once per precision,
swapping only the weights its decoding GEMVs read (starqa.model.quantized_weights.attach). The cases and their scoring
are `starqa eval`'s: the RULER-style suite (--suite) and the sample contract's QA (--contract), Star Attention with
block = anchor = L/4 for the suite and the config's 1024 for the contract, as eval and ingest use them.

Prints, per precision: accuracy, the paired difference against bfloat16 with a 95 % interval (normal approximation
of the mean of paired differences), and how often the answer text differs from bfloat16's. Writes every answer as
JSON lines (--out) so that a stopped run can be read.

    .venv/bin/python benchmarks/quantized_accuracy.py --model qwen2.5-coder-0.5b --suite --lengths 4096 --samples 2
    .venv/bin/python benchmarks/quantized_accuracy.py --model qwen2.5-coder-1.5b --contract --suite \
        --precisions bfloat16,auto,auto+int8
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import decode_precisions  # noqa: E402  (benchmarks/, the script's own folder)

PRECISIONS = ("bfloat16", "int8", "int4", "auto", "auto+int8")  # MODE+int8: with --activations int8


def paired_summary(scores: dict[str, list[float]], answers: dict[str, list[str]]) -> list[str]:
    base, base_answers = scores["bfloat16"], answers["bfloat16"]
    lines = [f"{'weights':>10} {'cases':>6} {'accuracy':>9} {'vs bfloat16 (95% CI)':>24} {'answer text changed':>20}"]
    for name, values in scores.items():
        n = len(values)
        accuracy = sum(values) / n if n else float("nan")
        diffs = [a - b for a, b in zip(values, base)]
        mean = sum(diffs) / n if n else float("nan")
        sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
        half = 1.96 * sd / math.sqrt(n) if n else float("nan")
        changed = sum(a != b for a, b in zip(answers[name], base_answers))
        lines.append(f"{name:>10} {n:>6} {accuracy:>9.1%} {mean:>+10.1%} [{mean - half:+.1%}, {mean + half:+.1%}] "
                     f"{changed:>9} of {n} ({changed / n:.0%})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--store", default=None, help="STARQA_HOME (default: the usual store)")
    parser.add_argument("--suite", action="store_true", help="the RULER-style suite")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--samples", type=int, default=2, help="per task and length")
    parser.add_argument("--tasks", default=None)
    parser.add_argument("--contract", action="store_true", help="samples/contract.txt with samples/contract-qa.jsonl")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--out", default="benchmarks/results/quantized-accuracy.jsonl")
    args = parser.parse_args()

    from starqa import report
    from starqa.model import quantized_weights
    from starqa.engine.star_engine import StarEngine
    from starqa.eval.command import _document_cases, _suite_cases, _suite_qa_source, parse_lengths, parse_tasks
    from starqa.eval.prompts import PromptBuilder
    from starqa.eval.qa_file import load_qa_file
    from starqa.eval.runner import prediction_text
    from starqa.eval.scoring import score
    from starqa.store.document_store import DocumentStore

    report.set_quiet(True)
    engine = StarEngine.load(args.model, device="cpu", store_root=args.store, weights="bfloat16")
    root = DocumentStore(args.store).root
    precisions = args.precisions.split(",")
    summaries, packed = decode_precisions.attach_all(engine, precisions, root)
    print(f"{engine.model_name}, compute {engine.dtype}; decoding weights: "
          + "; ".join(f"{name}: {summaries[name]}" for name in precisions), flush=True)

    cases = []
    if args.suite:
        tasks = parse_tasks(args.tasks)
        qa_source = _suite_qa_source(tasks, explicit=args.tasks is not None)
        tasks = [t for t in tasks if t != "qa" or qa_source is not None]
        cases += [(case, case.length // 4) for case in
                  _suite_cases(engine, tasks, parse_lengths(args.lengths), args.samples, 0, qa_source)]
    if args.contract:
        repo = Path(__file__).resolve().parent.parent
        text = (repo / "samples" / "contract.txt").read_text(encoding="utf-8")
        pairs = load_qa_file(repo / "samples" / "contract-qa.jsonl")
        cases += [(case, 1024) for case in _document_cases(engine, "contract", text, pairs, 128)]
    prompts = PromptBuilder(engine.hf_tokenizer)
    scores = {name: [] for name in precisions}
    answers = {name: [] for name in precisions}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    encoded = (None, None)  # the contract's questions share one document: encoded once
    with out.open("a", encoding="utf-8") as log:
        for number, (case, block) in enumerate(cases, 1):
            context_ids = prompts.context_ids(case.context_text)
            query_ids = prompts.query_ids(case.question)
            if encoded[0] != (case.context_text, block):
                encoded = ((case.context_text, block), engine.encode_context(context_ids, block, block))
            ctx = encoded[1]
            for name in precisions:
                decode_precisions.use(engine, packed[name])
                new_ids = engine.generate(ctx, query_ids, max_new_tokens=case.max_new_tokens, temperature=0.0)
                prediction = prediction_text(engine, new_ids)
                value = score(case.metric, prediction, case.answers, case.answer_prefix)
                scores[name].append(value)
                answers[name].append(prediction)
                log.write(json.dumps({"model": engine.model_name, "weights": name, "weights_summary": summaries[name],
                                      "task": case.task, "length": case.length, "index": case.index,
                                      "case_id": case.case_id, "block_size": block, "prediction": prediction,
                                      "answers": list(case.answers), "score": value,
                                      "decode_tokens_per_s": engine.last_stats.decode_tokens_per_s}) + "\n")
                log.flush()
            print(f"[{number}/{len(cases)}] {case.task} {case.length} #{case.index}: "
                  + ", ".join(f"{name} {scores[name][-1]:.2f}" for name in precisions)
                  + f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    print()
    print("\n".join(paired_summary(scores, answers)))
    print(f"\n{len(cases)} cases, {time.perf_counter() - started:.0f} s; answers in {out}")


if __name__ == "__main__":
    main()
