"""Benchmark (not a test): where Star Attention loses accuracy against full attention, paired on the same cases.

    .venv/bin/python benchmarks/star_sweep.py run --model /work/gguf/qwen2.5-coder-0.5b.gguf --lengths 8192 \\
        --tasks niah_multivalue,niah_multiquery --samples 4 --configs L/4:L/4,L/8:L/8,1024:1024,L/8:L/2,L/4:L/4:f32 \\
        --log benchmarks/results/star-sweep-0.5b.jsonl --budget-s 1200
    .venv/bin/python benchmarks/star_sweep.py report benchmarks/results/star-sweep-0.5b.jsonl

run: the cases are those of `starqa eval --suite ruler` (starqa.eval.tasks, same seed, same prompts, same scoring),
plus generated ones of its own: `distract_K`, one needle (word key, 7-digit number, essay prose) among K distractor
needles with other keys (distract_0 is niah_single_2's kind of case). Each case is answered once with full attention
and once per configuration BLOCK:ANCHOR[:f32] (sizes in tokens or L/N of the requested length; `:f32` runs Phase 1
in float32 and stores its KV in bfloat16, so that only Phase 1's precision differs). Greedy decoding, each task's
RULER answer budget, the compute dtype of --dtype (bfloat16 by default). An anchor larger than the block is run too
(starqa.engine.star_engine: blocks that start inside the anchor see every token before them, the later ones the whole anchor;
the anchor's KV is computed once). One JSON line per (case, mode) in --log;
a rerun skips what the log holds; --budget-s stops starting new cases after that many seconds.

report: per length, task and configuration: cases, full and Star accuracy, the paired difference in points with its
95 % interval (normal approximation over the per-case differences), won/lost, how often Star's answer is the very
text full attention gave, Phase 1 seconds; then the same by where the first needle sits (block 0, a block the
anchor covers, or a later block) and by distractor count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
Z95 = 1.959964


# ---------------------------------------------------------------- configurations


def parse_config(text: str):
    from starqa.eval.runner import SizeSpec

    parts = text.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "f32"):
        raise SystemExit(f"a configuration is BLOCK:ANCHOR or BLOCK:ANCHOR:f32, not {text!r}")
    return SizeSpec.parse(parts[0]), SizeSpec.parse(parts[1]), "float32" if len(parts) == 3 else None


# ---------------------------------------------------------------- cases


def own_cases(task: str, length: int, samples: int, seed: int, count):
    """distract_K: niah_single_2's case with K distractor needles (other keys, evenly spaced after the needle)."""
    from starqa.eval import tasks

    k = int(task.removeprefix("distract_"))
    spec = tasks.TaskSpec(task, "niah", "all", 128, num_keys=k + 1)
    return [tasks._niah_case(spec, length, index, samples, seed, count, None) for index in range(samples)]


def make_cases(engine, task_names, lengths, samples, seed):
    from starqa.eval.prompts import PromptBuilder
    from starqa.eval.qa_file import bundled_sample
    from starqa.eval.tasks import generate_cases, spread_order

    prompts = PromptBuilder(engine.hf_tokenizer)
    cases = []
    for length in lengths:
        for task in task_names:
            if task.startswith("distract_"):
                cases += own_cases(task, length, samples, seed, prompts.count)
            else:
                cases += generate_cases(task, length, samples, seed, prompts.count,
                                        qa_source=bundled_sample() if task == "qa" else None)
    rank = {index: position for position, index in enumerate(spread_order(samples))}
    return prompts, sorted(cases, key=lambda case: (rank[case.index], case.length))


def needle_tokens(case, prompts, context_ids) -> list[int]:
    """Approximate context token offsets of each reference answer (needle value) found in the context text."""
    document_tokens = len(context_ids) - prompts.document_offset
    offsets = []
    for answer in case.answers:
        position = case.context_text.find(answer)
        if position >= 0:
            offsets.append(prompts.document_offset + round(position / len(case.context_text) * document_tokens))
    return offsets


# ---------------------------------------------------------------- Phase 1 (any anchor)


def phase1(engine, context_ids, block_size: int, anchor_size: int, batch: int = 4):
    """The context KV in bfloat16 storage (an anchor larger than the block included: starqa.engine.star_engine runs it)."""
    return engine.encode_context(context_ids, block_size, anchor_size, batch=batch, kv_dtype="bfloat16")


# ---------------------------------------------------------------- run


def load_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def record_key(record: dict) -> tuple:
    return (record["model"], record["case_id"], record["mode"], record["block_size"], record["anchor_size"],
            record["phase1_dtype"])


def run(args) -> int:
    import torch

    from starqa.engine.star_engine import StarEngine
    from starqa.eval.runner import prediction_text
    from starqa.eval.scoring import clean_prediction, score

    started = time.perf_counter()
    store = os.environ.get("STARQA_HOME")
    engine = StarEngine.load(args.model, device=args.device, dtype=args.dtype, store_root=store)
    engine32 = None
    configs = [parse_config(text) for text in args.configs.split(",")]
    if any(dtype == "float32" for _, _, dtype in configs):
        engine32 = StarEngine.load(args.model, device=args.device, dtype="float32", store_root=store)
    model = Path(args.model).stem if args.model.endswith(".gguf") else args.model
    compute = str(engine.dtype).removeprefix("torch.")
    prompts, cases = make_cases(engine, args.tasks.split(","), [int(x) for x in args.lengths.split(",")],
                                args.samples, args.seed)
    log = Path(args.log)
    done = {record_key(record) for record in load_records(log)}
    print(f"{len(cases)} cases, {len(configs)} Star configurations; {len(done)} records already in {log}", flush=True)
    with torch.inference_mode():
        engine.generate_full(list(range(100, 140)), max_new_tokens=2)  # warm-up
    for case in cases:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s} s spent: stopping before {case.task} {case.length} #{case.index}")
            break
        context_ids, query_ids = prompts.context_ids(case.context_text), prompts.query_ids(case.question)
        budget = case.max_new_tokens
        base = {"model": model, "compute_dtype": compute, "task": case.task, "length": case.length,
                "index": case.index, "case_id": case.case_id, "depth": case.depth,
                "context_tokens": len(context_ids), "needle_tokens": needle_tokens(case, prompts, context_ids),
                "answers": list(case.answers)}
        modes = [("full", None, None, None)]
        for block, anchor, phase1_dtype in configs:
            modes.append(("star", block.resolve(case.length), anchor.resolve(case.length), phase1_dtype or compute))
        for mode, block_size, anchor_size, phase1_dtype in modes:
            key = (model, case.case_id, mode, block_size, anchor_size, phase1_dtype)
            if key in done:
                continue
            phase1_s = None
            mode_started = time.perf_counter()
            if mode == "full":
                new_ids = engine.generate_full(list(context_ids) + list(query_ids), max_new_tokens=budget)
            else:
                encoder = engine32 if phase1_dtype == "float32" else engine
                ctx = phase1(encoder, context_ids, block_size, anchor_size)
                phase1_s = time.perf_counter() - mode_started
                new_ids = engine.generate(ctx, query_ids, max_new_tokens=budget)
                del ctx
            prediction = prediction_text(engine, new_ids)
            record = dict(base, mode=mode, block_size=block_size, anchor_size=anchor_size, phase1_dtype=phase1_dtype,
                          prediction=clean_prediction(prediction),
                          score=score(case.metric, prediction, case.answers, case.answer_prefix),
                          phase1_s=phase1_s, total_s=time.perf_counter() - mode_started, new_tokens=len(new_ids))
            with log.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            done.add(key)
            print(f"{case.task} {case.length} #{case.index} {mode} {block_size}/{anchor_size} {phase1_dtype or ''}: "
                  f"{record['score']:.2f} in {record['total_s']:.1f}s", flush=True)
    print(f"elapsed {time.perf_counter() - started:.0f} s", flush=True)
    return 0


# ---------------------------------------------------------------- teacher-forced (no decoding)


def gold_answer(case) -> str:
    """The answer as the model phrases it under full attention: RULER's answer prefix, the values, a full stop."""
    return f"{case.answer_prefix} {', '.join(case.answers)}."


def all_logits(engine, ids, positions, cache):
    """starqa.model.transformer.Transformer.forward's torch path, returning the logits of every position (it returns the
    last one's only): [batch, tokens, vocab] float32."""
    import torch.nn.functional as F

    model = engine.model
    heads, kv_heads, dim = model.args.num_heads, model.args.num_kv_heads, model.args.head_dim
    batch, tokens = ids.shape
    x = F.embedding(ids, model.embed)
    cos, sin = model.rotary(positions)
    for index, layer in enumerate(model.layers):
        h = model._rms_norm(x, layer.input_norm)
        qkv = layer.qkv(h)
        rotated = model._rotate(qkv[..., : (heads + kv_heads) * dim].view(batch, tokens, heads + kv_heads, dim)
                                .transpose(1, 2), cos, sin)
        q, k = rotated[:, :heads], rotated[:, heads:]
        v = qkv[..., (heads + kv_heads) * dim:].view(batch, tokens, kv_heads, dim).transpose(1, 2)
        attended = cache.attend(index, q, k, v, dim ** -0.5)
        x = layer.o(attended.reshape(batch, tokens, heads * dim), residual=x)
        h = model._rms_norm(x, layer.post_norm)
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        x = layer.down(F.silu(gate) * up, residual=x)
    return model.lm_head(model._rms_norm(x, model.norm)).float()


def value_token_spans(tokenizer, prefix_ids: list[int], answer: str, values) -> tuple[list[int], list[list[int]]]:
    """The gold answer's ids and, for each value, the indices of the answer tokens that spell it."""
    ids = list(tokenizer.encode(answer, add_special_tokens=False))
    spans = []
    for value in values:
        start = answer.find(value)
        covering = []
        for i in range(len(ids)):
            # characters decoded before / through token i
            before = len(tokenizer.decode(ids[:i]))
            through = len(tokenizer.decode(ids[: i + 1]))
            if through > start and before < start + len(value):
                covering.append(i)
        spans.append(covering)
    return ids, spans


def teacher_forced(engine, ctx, query_ids, answer_ids):
    """Log-probabilities [answer tokens, vocab] of each gold answer token's position, given the context KV."""
    import torch

    n = ctx.n_tokens
    ids = list(query_ids) + list(answer_ids)
    cache = engine._new_cache(batch=1, capacity=len(ids), prefix=ctx)
    with torch.inference_mode():
        logits = all_logits(engine, torch.tensor([ids], device=engine.device),
                            torch.arange(n, n + len(ids), device=engine.device)[None], cache)[0].cpu()
    return torch.log_softmax(logits[len(query_ids) - 1 : len(ids) - 1], dim=-1)


def tf_run(args) -> int:
    import torch

    from starqa.engine.star_engine import StarEngine

    started = time.perf_counter()
    store = os.environ.get("STARQA_HOME")
    engine = StarEngine.load(args.model, device=args.device, dtype=args.dtype, store_root=store)
    configs = [parse_config(text) for text in args.configs.split(",")]
    engine32 = (StarEngine.load(args.model, device=args.device, dtype="float32", store_root=store)
                if any(dtype == "float32" for _, _, dtype in configs) else None)
    model = Path(args.model).stem if args.model.endswith(".gguf") else args.model
    compute = str(engine.dtype).removeprefix("torch.")
    prompts, cases = make_cases(engine, args.tasks.split(","), [int(x) for x in args.lengths.split(",")],
                                args.samples, args.seed)
    if args.indices:
        cases = [case for case in cases if case.index in {int(i) for i in args.indices.split(",")}]
    log = Path(args.log)
    done = {(r["case_id"], r["block_size"], r["anchor_size"], r["phase1_dtype"]) for r in load_records(log)
            if r["model"] == model}
    print(f"{len(cases)} cases x (full + {len(configs)} Star configurations); {len(done)} records in {log}", flush=True)
    for case in cases:
        if time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s} s spent: stopping before {case.task} {case.length} #{case.index}")
            break
        context_ids, query_ids = prompts.context_ids(case.context_text), prompts.query_ids(case.question)
        answer_ids, value_spans = value_token_spans(engine.hf_tokenizer, query_ids, gold_answer(case), case.answers)
        base = {"model": model, "compute_dtype": compute, "task": case.task, "length": case.length,
                "index": case.index, "case_id": case.case_id, "depth": case.depth, "method": "teacher-forced",
                "context_tokens": len(context_ids), "needle_tokens": needle_tokens(case, prompts, context_ids),
                "answers": list(case.answers)}
        full_logp = None
        modes = [("full", len(context_ids), len(context_ids), compute)]
        modes += [("star", b.resolve(case.length), a.resolve(case.length), d or compute) for b, a, d in configs]
        for mode, block_size, anchor_size, phase1_dtype in modes:
            key = (case.case_id, None if mode == "full" else block_size, None if mode == "full" else anchor_size,
                   phase1_dtype)
            if key in done and mode != "full":
                continue
            mode_started = time.perf_counter()
            encoder = engine32 if phase1_dtype == "float32" and compute != "float32" else engine
            ctx = phase1(encoder, context_ids, block_size, anchor_size)  # block >= context: full attention
            phase1_s = time.perf_counter() - mode_started
            logp = teacher_forced(engine, ctx, query_ids, answer_ids)
            del ctx
            target = torch.tensor(answer_ids)
            token_logp = logp[torch.arange(len(answer_ids)), target]
            argmax_ok = (logp.argmax(-1) == target).tolist()
            values_ok = [all(argmax_ok[i] for i in span) for span in value_spans]
            value_logp = [float(sum(token_logp[i] for i in span)) for span in value_spans]
            record = dict(base, mode=mode, block_size=None if mode == "full" else block_size,
                          anchor_size=None if mode == "full" else anchor_size, phase1_dtype=phase1_dtype,
                          score=sum(values_ok) / len(values_ok), exact=all(argmax_ok), value_logp=value_logp,
                          answer_logp=float(token_logp.sum()), phase1_s=phase1_s,
                          total_s=time.perf_counter() - mode_started)
            if mode == "full":
                full_logp = logp
            elif full_logp is not None:  # KL(full || star) per answer position, mean
                record["kl_from_full"] = float((full_logp.exp() * (full_logp - logp)).sum(-1).mean())
            if key not in done:
                with log.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                done.add(key)
            print(f"{case.task} {case.length} #{case.index} {mode} {block_size}/{anchor_size} {phase1_dtype}: "
                  f"values {record['score']:.2f} logp {record['answer_logp']:.2f} in {record['total_s']:.0f}s",
                  flush=True)
    print(f"elapsed {time.perf_counter() - started:.0f} s", flush=True)
    return 0


# ---------------------------------------------------------------- report


def paired(star: list[float], full: list[float]) -> tuple[float, float | None, int, int]:
    differences = [s - f for s, f in zip(star, full)]
    half = (Z95 * statistics.stdev(differences) / math.sqrt(len(differences)) * 100 if len(differences) > 1
            else None)
    return 100 * statistics.fmean(differences), half, sum(d > 0 for d in differences), sum(d < 0 for d in differences)


def config_label(record: dict) -> str:
    if record["mode"] == "full":
        return "full"
    suffix = " f32-P1" if record["phase1_dtype"] == "float32" and record["compute_dtype"] != "float32" else ""
    return f"{record['block_size']}/{record['anchor_size']}{suffix}"


def needle_place(record: dict) -> str:
    """Where the first needle sits for this configuration: block 0, covered by the anchor, or a later block."""
    if not record["needle_tokens"]:
        return "?"
    token = record["needle_tokens"][0]
    if token < record["block_size"]:
        return "block 0"
    if token < record["anchor_size"]:
        return "in anchor"
    return "later block"


def paired_groups(records: list[dict], group_of) -> tuple[dict, dict[tuple, list[dict]]]:
    """(full-attention record per (model, case), Star records with a full twin grouped by model, length, group and
    Star configuration): what both tables pair."""
    full = {(r["model"], r["case_id"]): r for r in records if r["mode"] == "full"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if record["mode"] == "star" and (record["model"], record["case_id"]) in full:
            groups[(record["model"], record["length"], group_of(record), config_label(record))].append(record)
    return full, groups


def table(records: list[dict], group_of, title: str) -> None:
    full, groups = paired_groups(records, group_of)
    print(f"\n{title}")
    print(f"| model | length | group | Star b/a | cases | full | Star | retention | Star − full (95 %) | won/lost "
          f"| same answer | Phase 1 s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(groups, key=lambda k: (k[0], k[1], str(k[2]), _order(k[3]))):
        rows = groups[key]
        fulls = [full[(r["model"], r["case_id"])] for r in rows]
        star_scores, full_scores = [r["score"] for r in rows], [f["score"] for f in fulls]
        delta, half, won, lost = paired(star_scores, full_scores)
        full_accuracy, star_accuracy = 100 * statistics.fmean(full_scores), 100 * statistics.fmean(star_scores)
        retention = f"{100 * star_accuracy / full_accuracy:.1f} %" if full_accuracy else "–"
        same = sum(r["prediction"] == f["prediction"] for r, f in zip(rows, fulls))
        interval = f"{delta:+.1f} ± {half:.1f}" if half is not None else f"{delta:+.1f}"
        phase1 = statistics.fmean(r["phase1_s"] for r in rows)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(rows)} | {full_accuracy:.1f} | {star_accuracy:.1f} "
              f"| {retention} | {interval} | {won}/{lost} | {same}/{len(rows)} | {phase1:.1f} |")


def _order(label: str) -> tuple:
    head = label.split()[0]
    block, anchor = head.split("/")
    return (int(block), int(anchor), label)


def tf_table(records: list[dict], group_of, title: str) -> None:
    """Teacher-forced records: value accuracy (every token of a value is the argmax given the gold answer so far),
    the answer's log-probability, KL(full || Star) per answer token."""
    full, groups = paired_groups(records, group_of)
    print(f"\n{title}")
    print("| model | length | group | Star b/a | cases | full value acc. | Star value acc. | Star − full (95 %) "
          "| won/lost | Star − full answer log-prob (95 %) | KL(full‖Star) per token | Phase 1 s |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key in sorted(groups, key=lambda k: (k[0], k[1], str(k[2]), _order(k[3]))):
        rows = groups[key]
        fulls = [full[(r["model"], r["case_id"])] for r in rows]
        delta, half, won, lost = paired([r["score"] for r in rows], [f["score"] for f in fulls])
        logp_deltas = [r["answer_logp"] - f["answer_logp"] for r, f in zip(rows, fulls)]
        logp_half = (Z95 * statistics.stdev(logp_deltas) / math.sqrt(len(rows)) if len(rows) > 1 else None)
        interval = f"{delta:+.1f} ± {half:.1f}" if half is not None else f"{delta:+.1f}"
        logp = (f"{statistics.fmean(logp_deltas):+.2f} ± {logp_half:.2f}" if logp_half is not None
                else f"{statistics.fmean(logp_deltas):+.2f}")
        kl = statistics.fmean(r.get("kl_from_full", float("nan")) for r in rows)
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(rows)} "
              f"| {100 * statistics.fmean(f['score'] for f in fulls):.1f} "
              f"| {100 * statistics.fmean(r['score'] for r in rows):.1f} | {interval} | {won}/{lost} | {logp} "
              f"| {kl:.3f} | {statistics.fmean(r['phase1_s'] for r in rows):.0f} |")


def report(args) -> int:
    records = [record for path in args.logs for record in load_records(Path(path))]
    if args.model:
        records = [record for record in records if record["model"] == args.model]
    forced = [record for record in records if record.get("method") == "teacher-forced"]
    if forced:
        tf_table(forced, lambda r: "all", "Teacher-forced, all tasks (pooled cases)")
        tf_table(forced, lambda r: r["task"], "Teacher-forced, per task")
        tf_table(forced, needle_place, "Teacher-forced, by where the first needle sits")
        full = [r for r in forced if r["mode"] == "full"]
        print(f"\nfull attention forward (block = context), mean seconds: "
              f"{statistics.fmean(r['phase1_s'] for r in full):.0f} over {len(full)} cases")
    records = [record for record in records if record.get("method") != "teacher-forced"]
    if not records:
        return 0
    table(records, lambda r: "all", "All tasks (pooled cases)")
    table(records, lambda r: r["task"], "Per task")
    table(records, needle_place, "By where the first needle sits")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    tf_parser = commands.add_parser("tf")
    for run_parser in (run_parser, tf_parser):
        _run_options(run_parser)
    report_parser = commands.add_parser("report")
    report_parser.add_argument("logs", nargs="+")
    report_parser.add_argument("--model")
    args = parser.parse_args()
    return {"run": run, "tf": tf_run, "report": report}[args.command](args)


def _run_options(run_parser) -> None:
    run_parser.add_argument("--model", required=True)
    run_parser.add_argument("--dtype", default="bfloat16")
    run_parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run_parser.add_argument("--lengths", default="8192")
    run_parser.add_argument("--tasks", default="niah_multivalue,niah_multiquery,niah_multikey_1,niah_single_3")
    run_parser.add_argument("--samples", type=int, default=4)
    run_parser.add_argument("--indices", help="Only these sample indices (comma-separated; sample i of n has its "
                                              "needle at depth i / (n - 1)); default: all, spread out first")
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--configs", default="L/4:L/4")
    run_parser.add_argument("--log", required=True)
    run_parser.add_argument("--budget-s", type=float, default=float("inf"))


if __name__ == "__main__":
    sys.exit(main())
