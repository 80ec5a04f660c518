"""Answer attribution on generated documents: does the first source hold the planted fact the question asks for?

    python benchmarks/attribution.py --split heldout --lengths 1024,4096 --per-cell 5         # docs/evidence.md's figures
    python benchmarks/attribution.py --model qwen2.5-coder-0.5b --per-cell 2 --store STORE    # docs/models.md's figures
    python benchmarks/attribution.py --split tune --lengths 1024,2048,4096,8192 --per-cell 2 --no-echoes --raw /tmp/raw
    python benchmarks/attribution.py --split tune --lengths 1024,2048,4096,8192 --per-cell 1 --first-round 2 \
        --echo-share 1 --grid                                                                 # tuning, round 2

Cases come from benchmarks/attribution_set.py (one fact per document, distractors of the same shape, text and PDF,
block sizes 256-2048, the fact at depths 0, 1/4, 1/2, 3/4, 1). Each case goes the way `starqa ingest` + `ask` take
it: the file is written (text with form-feed pages, or a PDF), extracted with starqa.documents.extraction, tokenized with the
prompt template, encoded by Phase 1 in blocks and answered by Phase 2 with the sources observer attached. A case
record (one JSON line, written as soon as it is measured; rerunning continues a stopped run) holds the answer,
whether it is correct (the planted value in it), and for the current method (starqa.evidence) and the old
peak-attention ranking ("baseline"): whether the first source's block holds the fact, whether its pages hold it,
whether the first evidence quote overlaps it, and `grounded`. The summary prints hit rates over the correctly
answered cases, per format, length and depth.

--raw DIR also saves, per case, what the offline analysis of methods needs (benchmarks/attribution_study.py): per
layer and head the attention each document token got, summed over the answer's decoding steps, and every step's
top tokens per head; and the same for a neutral question.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import attribution_set  # noqa: E402

NEUTRAL_QUESTION = "What is this document about?"
DEFAULT_MODEL = "smollm2-135m"  # the model docs/evidence.md's figures were measured on (records without "model")


class Recorder:
    """Raw attention over the document for offline study: per (layer, head) the probability each document token
    got, summed over decoding steps, and each step's top tokens per head (probabilities over the whole context)."""

    TOP = 8

    def __init__(self, layers: int, heads: int, document_offset: int, held_tokens: int) -> None:
        self.offset = document_offset
        self.dense = torch.zeros(layers, heads, held_tokens - document_offset)
        self.top_index: list[torch.Tensor] = []  # per observation [heads, TOP] (document token index)
        self.top_p: list[torch.Tensor] = []
        self.sink: list[torch.Tensor] = []  # per observation [heads]: probability on the template tokens

    def observe(self, layer: int, query: torch.Tensor, prefix_keys: torch.Tensor) -> None:
        self.observe_scores(layer, _scores(query, prefix_keys))

    def observe_scores(self, layer: int, scores: torch.Tensor) -> None:
        probability = torch.softmax(scores.float(), dim=-1)
        document = probability[:, self.offset:]
        self.dense[layer] += document
        top = document.topk(min(self.TOP, document.shape[-1]), dim=-1)
        self.top_index.append(top.indices.to(torch.int32))
        self.top_p.append(top.values.half())
        self.sink.append(probability[:, : self.offset].sum(-1).half())

    def arrays(self, prefix: str) -> dict:
        return {f"{prefix}dense": self.dense.half().numpy(), f"{prefix}top_index": torch.stack(self.top_index).numpy(),
                f"{prefix}top_p": torch.stack(self.top_p).numpy(), f"{prefix}sink": torch.stack(self.sink).numpy()}


def _scores(query: torch.Tensor, prefix_keys: torch.Tensor) -> torch.Tensor:
    last = query[0, :, -1].float()
    keys = prefix_keys[0].float()
    group = last.shape[0] // keys.shape[0]
    scores = torch.einsum("hgd,hnd->hgn", last.view(keys.shape[0], group, -1), keys) * last.shape[-1] ** -0.5
    return scores.reshape(last.shape[0], -1)


class PeakShares:
    """The method this replaces (the baseline, as it was in starqa.evidence.observer): per decoding step and layer, each block's
    highest score and the document's log-sum-exp per head; a block's strength is its highest probability over
    heads, averaged over steps and layers (one process only)."""

    def __init__(self, spans, document_offset: int) -> None:
        held_start = spans[0][0]
        self.ranges = [(max(s, document_offset) - held_start, e - held_start) for s, e in spans]
        self.lse: list[torch.Tensor] = []
        self.peak: list[torch.Tensor] = []

    def observe_scores(self, layer: int, scores: torch.Tensor) -> None:
        scores = scores.float()
        heads = scores.shape[0]
        peaks, pieces = [], []
        for lo, hi in self.ranges:
            if hi > lo:
                peaks.append(scores[:, lo:hi].max(dim=-1).values)
                pieces.append(scores[:, lo:hi])
            else:
                peaks.append(torch.full((heads,), -float("inf")))
        self.peak.append(torch.stack(peaks, dim=-1))
        self.lse.append(torch.logsumexp(torch.cat(pieces, dim=-1), dim=-1))

    def shares(self) -> torch.Tensor:
        probability = torch.exp(torch.stack(self.peak) - torch.stack(self.lse)[..., None])
        strength = probability.max(dim=1).values.mean(dim=0)
        return strength / strength.sum()


class Tee:
    """Several observers on one engine pass (each gets the same scores)."""

    def __init__(self, *observers) -> None:
        self.observers = [observer for observer in observers if observer is not None]

    def observe(self, layer: int, query: torch.Tensor, prefix_keys: torch.Tensor) -> None:
        self.observe_scores(layer, _scores(query, prefix_keys))

    def observe_scores(self, layer: int, scores: torch.Tensor) -> None:
        from starqa.evidence.observer import deliver

        for observer in self.observers:  # every head's scores: each observer gets the rows of its own heads
            deliver(observer, layer, scores)


def correct(answer: str, reference: str) -> bool:
    """The planted value appears in the answer (case and thousands separators aside)."""
    def norm(text: str) -> str:
        return " ".join(text.lower().replace(",", "").split())
    return norm(reference) in norm(answer)


def overlaps(span: tuple[int, int], start: int, end: int) -> bool:
    return start < span[1] and span[0] < end


GRID = [(a, q) for a in (0.0, 0.5, 1.0, 2.0) for q in (0.0, 0.5, 1.0)]


def run_case(engine, case, folder: Path, raw: Path | None, max_new_tokens: int, grid: bool = False) -> dict:
    from starqa.evidence import collect, quotes
    from starqa.answer.passes import answer_text
    from starqa.documents.extraction import extract_document
    from starqa.evidence.heads import retrieval_heads
    from starqa.evidence.quotes import rank_sources
    from starqa.documents.text_positions import block_char_spans, block_pages
    from starqa.documents.tokens import context_ids_for, prompt_template, query_ids_for

    tokenizer = engine.tokenizer
    template = prompt_template(tokenizer)
    path = attribution_set.write_document(case, folder)
    extracted = extract_document(path)
    text = extracted.text
    pages = [{"number": p.number, "start": p.start, "end": p.end} for p in extracted.pages]
    fact_span = attribution_set.locate(text, case.fact)
    if fact_span is None:
        raise RuntimeError(f"{case.case_id}: the planted fact is not in the extracted text")
    fact_pages = sorted({p["number"] for p in pages if overlaps(fact_span, p["start"], p["end"])})
    document_ids = engine.encode_document_text(text)
    context = context_ids_for(tokenizer, template, document_ids)
    offset = len(context) - len(document_ids)
    started = time.perf_counter()
    ctx = engine.encode_context(context, case.block_size, case.block_size)
    phase1_s = time.perf_counter() - started

    query = query_ids_for(tokenizer, template, case.question)
    baseline = PeakShares(ctx.spans, offset)
    observer = collect.observer_for(engine, ctx.spans, offset, heads=retrieval_heads(engine))
    recorder = Recorder(engine.num_layers, engine.args.num_heads, offset, ctx.n_tokens) if raw else None
    new_ids = engine.generate(ctx, query, max_new_tokens=max_new_tokens,
                              observe_prefix=Tee(baseline, observer, recorder))
    answer = answer_text(engine, new_ids)
    is_correct = correct(answer, case.answer)

    char_spans = block_char_spans(tokenizer, context, offset, ctx.spans, text)
    pages_per_block = block_pages(tokenizer, context, offset, ctx.spans, pages, text)
    old = rank_sources(baseline.shares(), pages_per_block)
    document = quotes.DocumentView(text, pages, context, offset, list(ctx.spans), pages_per_block, tokenizer)
    found = collect.evidence_for_answer(document, [observer.stacked()], answer, case.question)

    def block_hit(sources) -> bool | None:
        if not sources:
            return False
        start, end = char_spans[sources[0]["block"]]
        return overlaps(fact_span, start, end)

    record = {
        **case.to_record(), "pages": len(pages), "fact_span": list(fact_span), "fact_pages": fact_pages,
        "document_tokens": len(document_ids), "blocks": len(ctx.spans), "answer": answer, "correct": is_correct,
        "phase1_s": round(phase1_s, 2), "decode_tokens_per_s": round(engine.last_stats.decode_tokens_per_s, 2),
        "baseline": {"block_hit": block_hit(old), "page_hit": bool(old) and fact_pages[0] in old[0]["pages"],
                     "sources": old},
        "evidence": {"block_hit": block_hit(found.sources),
                     "page_hit": bool(found.sources) and fact_pages[0] in found.sources[0]["pages"],
                     "quote_hit": bool(found.evidence) and overlaps(fact_span, found.evidence[0]["start"],
                                                                    found.evidence[0]["end"]),
                     "grounded": found.grounded, "sources": found.sources, "quotes": found.evidence},
    }
    if grid:
        from starqa.evidence.observer import attended_tokens

        weights = attended_tokens([observer.stacked()], len(context))
        record["grid"] = {}
        for match_weight, question_weight in GRID:
            option = quotes.evidence_from_weights(document, weights, answer, case.question, match_weight=match_weight,
                                              question_weight=question_weight)
            record["grid"][f"a{match_weight} q{question_weight}"] = {
                "block_hit": block_hit(option.sources), "grounded": option.grounded,
                "quote_hit": bool(option.evidence) and overlaps(fact_span, option.evidence[0]["start"],
                                                                option.evidence[0]["end"])}
    distractor_spans = [attribution_set.locate(text, sentence) for sentence, _ in case.distractors]
    copied = [span for span, (_, value) in zip(distractor_spans, case.distractors)
              if span is not None and correct(answer, value)]
    record["copied_distractor"] = bool(copied)
    if copied:  # the answer came from a distractor: does the first source hold that one?
        for method, sources in (("baseline", old), ("evidence", found.sources)):
            start, end = char_spans[sources[0]["block"]] if sources else (0, 0)
            record[method]["distractor_block_hit"] = overlaps(copied[0], start, end)
    if raw is not None:
        import numpy as np

        neutral = Recorder(engine.num_layers, engine.args.num_heads, offset, ctx.n_tokens)
        neutral_ids = engine.generate(ctx, query_ids_for(tokenizer, template, NEUTRAL_QUESTION),
                                      max_new_tokens=8, observe_prefix=neutral)
        raw.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(raw / f"{case.case_id}.npz", **recorder.arrays(""), **neutral.arrays("neutral_"),
                            document_ids=np.array(document_ids, dtype=np.int32),
                            answer_ids=np.array(new_ids, dtype=np.int32),
                            neutral_ids=np.array(neutral_ids, dtype=np.int32),
                            spans=np.array(ctx.spans, dtype=np.int32))
        (raw / f"{case.case_id}.txt").write_text(text, encoding="utf-8")
        (raw / f"{case.case_id}.pages.json").write_text(json.dumps(pages), encoding="utf-8")
    return record


# ---------------------------------------------------------------- summary


def _rate(records, method: str, key: str) -> str:
    values = [r[method].get(key) for r in records if r[method].get(key) is not None]
    return f"{100 * sum(values) / len(values):5.1f} % ({sum(values)}/{len(values)})" if values else "–"


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion hits/n (stays inside [0, 1] at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarize(records: list[dict], method: str = "evidence") -> str:
    """Hit rates over the correctly answered cases: overall, per format x length, per depth (and the baseline)."""
    lines = []
    right = [r for r in records if r["correct"]]
    lines.append(f"{len(records)} cases, {len(right)} answered correctly "
                 f"({100 * len(right) / max(1, len(records)):.0f} %); hit rates over the correct ones:")
    hits = sum(bool(r[method]["block_hit"]) for r in right)
    low, high = wilson_interval(hits, len(right))
    lines.append(f"first source's block holds the fact: {hits}/{len(right)} "
                 f"(95 % Wilson interval {100 * low:.1f}-{100 * high:.1f} %)")
    lines.append(f"{'group':<28} {'n':>4}  {'first source (block)':>22}  {'first source (page)':>22}  "
                 f"{'first quote':>22}  {'grounded':>22}  {'baseline block':>22}")
    groups: dict[str, list[dict]] = defaultdict(list)
    groups["all"] = right
    for r in right:
        groups[f"{r['fmt']} {r['target_tokens']}"].append(r)
    for r in right:
        groups[f"depth {r['depth']:.2f}"].append(r)
    for r in right:
        groups[f"block {r['block_size']}"].append(r)
    for r in right:
        groups[f"family {r['family']}"].append(r)
    for r in right:
        groups["with an echo" if r.get("echo") else "without an echo"].append(r)
    for name, group in groups.items():
        lines.append(f"{name:<28} {len(group):>4}  {_rate(group, method, 'block_hit'):>22}  "
                     f"{_rate(group, method, 'page_hit'):>22}  {_rate(group, method, 'quote_hit'):>22}  "
                     f"{_rate(group, method, 'grounded'):>22}  {_rate(group, 'baseline', 'block_hit'):>22}")
    wrong = [r for r in records if not r["correct"]]
    lines.append(f"wrong answers: {len(wrong)}; grounded among them: {_rate(wrong, method, 'grounded')}; "
                 f"copied a distractor: {sum(r.get('copied_distractor', False) for r in wrong)}, first source holds "
                 f"it: {_rate([r for r in wrong if r.get('copied_distractor')], method, 'distractor_block_hit')}")
    return "\n".join(lines)


def markdown_table(records: list[dict]) -> str:
    """docs/evidence.md's table: per format and length, the first source's hits over the correct answers at each depth,
    for this method and the baseline."""
    right = [r for r in records if r["correct"]]
    depths = sorted({r["depth"] for r in records})
    lines = ["| document | correct answers | " + " | ".join(f"depth {d:g}" for d in depths) + " | all | baseline |",
             "|---|---:|" + "---:|" * (len(depths) + 2)]

    def cell(rows, method="evidence"):
        hits = sum(bool(r[method]["block_hit"]) for r in rows)
        return f"{hits}/{len(rows)}" if rows else "–"

    groups = sorted({(r["fmt"], r["target_tokens"]) for r in records}, key=lambda g: (g[1], g[0]))
    for fmt, length in groups + [("all", None)]:
        rows = [r for r in right if fmt == "all" or (r["fmt"], r["target_tokens"]) == (fmt, length)]
        total = [r for r in records if fmt == "all" or (r["fmt"], r["target_tokens"]) == (fmt, length)]
        name = "all" if fmt == "all" else f"{fmt}, {length:,} tokens"
        lines.append(f"| {name} | {len(rows)} of {len(total)} | "
                     + " | ".join(cell([r for r in rows if r["depth"] == d]) for d in depths)
                     + f" | {cell(rows)} | {cell(rows, 'baseline')} |")
    lines.append(f"| all, baseline | {len(right)} of {len(records)} | "
                 + " | ".join(cell([r for r in right if r["depth"] == d], "baseline") for d in depths)
                 + f" | {cell(right, 'baseline')} | |")
    return "\n".join(lines)


def summarize_grid(records: list[dict]) -> str:
    """Per weighting of the answer (a) and question (q) matches: hits over the correct answers (also those with an
    echo of the answer elsewhere) and how often a correct / a wrong answer is called grounded."""
    right = [r for r in records if r["correct"] and "grid" in r]
    wrong = [r for r in records if not r["correct"] and "grid" in r]
    echoed = [r for r in right if r.get("echo")]
    lines = [f"{len(right)} correct answers ({len(echoed)} with an echo), {len(wrong)} wrong",
             f"{'weights':<12} {'block':>7} {'quote':>7} {'block, echo':>12} {'quote, echo':>12} "
             f"{'grounded (correct)':>19} {'grounded (wrong)':>17}"]
    for setting in (right or wrong)[0]["grid"]:
        def pct(rows, key):
            values = [r["grid"][setting][key] for r in rows]
            return f"{100 * sum(values) / len(values):.0f}" if values else "-"
        lines.append(f"{setting:<12} {pct(right, 'block_hit'):>7} {pct(right, 'quote_hit'):>7} "
                     f"{pct(echoed, 'block_hit'):>12} {pct(echoed, 'quote_hit'):>12} {pct(right, 'grounded'):>19} "
                     f"{pct(wrong, 'grounded'):>17}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("tune", "heldout"), default="heldout")
    parser.add_argument("--lengths", default="1024,4096", help="Document lengths in tokens (default: %(default)s).")
    parser.add_argument("--per-cell", type=int, default=5, help="Cases per length, format and depth.")
    parser.add_argument("--formats", default="text,pdf")
    parser.add_argument("--first-round", type=int, default=0, help="Start at this round (one case per cell each).")
    parser.add_argument("--no-echoes", action="store_true", help="Cases without echo sentences (the first tuning "
                                                                  "round was made so).")
    parser.add_argument("--echo-share", type=float, default=attribution_set.ECHO_SHARE,
                        help="Share of cases with an echo (default: %(default)s).")
    parser.add_argument("--grid", action="store_true", help="Also record the hits of every weighting of answer "
                                                            "and question matches (for tuning).")
    parser.add_argument("--out", type=Path, help="JSONL of case records (default: benchmarks/results/"
                                                 "attribution-SPLIT.jsonl); a rerun continues it.")
    parser.add_argument("--raw", type=Path, help="Also save raw attention per case here (for the study).")
    parser.add_argument("--model", default="smollm2-135m", help="Catalogue name or model folder (default: "
                                                                     "%(default)s); its retrieval heads are the "
                                                                     "store's record, calibrated on first use.")
    parser.add_argument("--weights", default="auto", help="Decode weights, as `ask --weights` (default: %(default)s).")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--store", type=Path, default=None, help="starqa store (models/ is used).")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core "
                                                                "machine, 2 threads ran 7x slower than 1).")
    parser.add_argument("--summary-only", action="store_true", help="Print the summary of --out and exit.")
    args = parser.parse_args()
    suffix = "" if args.model == DEFAULT_MODEL else f"-{Path(args.model).name}"
    out = args.out or HERE / "results" / f"attribution-{args.split}{suffix}.jsonl"
    done = {}
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("model", DEFAULT_MODEL) == args.model:  # a file holds one model's records
                    done[record["case_id"]] = record
    if args.summary_only:
        print(summarize(list(done.values())))
        print(markdown_table(list(done.values())))
        if args.grid:
            print(summarize_grid(list(done.values())))
        return 0

    from starqa.engine.star_engine import StarEngine

    torch.set_num_threads(args.threads)
    engine = StarEngine.load(args.model, device="cpu", dtype=args.dtype, store_root=args.store, weights=args.weights)
    count = lambda text: len(engine.encode_document_text(text))  # noqa: E731
    lengths = [int(value) for value in args.lengths.split(",")]
    cases = attribution_set.generate_cases(args.split, lengths, args.per_cell, count, args.formats.split(","),
                                           first_round=args.first_round, echoes=not args.no_echoes,
                                           echo_share=args.echo_share)
    print(f"{len(cases)} cases ({len(done)} already measured) -> {out}", file=sys.stderr, flush=True)
    folder = Path("/tmp") / f"starqa-attribution-docs-{args.split}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for number, case in enumerate(cases, start=1):
        if case.case_id in done:
            continue
        record = run_case(engine, case, folder, args.raw, args.max_new_tokens, args.grid)
        record.update(dtype=args.dtype, model=args.model, weights=args.weights)
        with out.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        done[case.case_id] = record
        e = record["evidence"]
        print(f"[{number}/{len(cases)}] {case.case_id} {case.fmt} {case.target_tokens} d={case.depth} "
              f"b={case.block_size} correct={record['correct']} block_hit={e['block_hit']} "
              f"baseline={record['baseline']['block_hit']} answer={record['answer'][:60]!r}", file=sys.stderr,
              flush=True)
    measured = [done[case.case_id] for case in cases if case.case_id in done]
    print(summarize(measured))
    print(markdown_table(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
