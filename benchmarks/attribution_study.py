"""Offline comparison of attribution methods on the tuning split's raw attention (benchmarks/attribution.py --raw).

    python benchmarks/attribution_study.py /tmp/raw benchmarks/results/attribution-tune-round1.jsonl \
        $STARQA_HOME/models/retrieval-heads.json      # the calibration's heads (optional)

Every method turns the recorded attention (and, for some, the answer text) into a weight per document token; a
block's score is the sum over its tokens, a passage's (starqa.evidence.passages) likewise. Printed per method: the
share of correctly answered cases whose best block holds the planted fact, and whose best passage overlaps it,
overall and per depth. Retrieval heads are estimated here by two-fold cross-fitting over the cases (heads found on
one half are judged on the other), so the figures do not reward heads fitted to the very cases they are scored on.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def load(raw: Path, records_path: Path, tokenizer) -> list[dict]:
    from starqa.evidence import quotes
    from starqa.documents import text_positions

    cases = []
    for line in records_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        npz = raw / f"{record['case_id']}.npz"
        if not npz.exists():
            continue
        arrays = dict(np.load(npz))
        text = (raw / f"{record['case_id']}.txt").read_text(encoding="utf-8")
        pages = json.loads((raw / f"{record['case_id']}.pages.json").read_text(encoding="utf-8"))
        ids = arrays["document_ids"].tolist()
        starts = np.array(text_positions.token_char_starts(tokenizer, ids, text))
        offset = int(arrays["spans"][-1][1]) - len(ids)
        block_chars = []
        for start, end in arrays["spans"]:
            lo, hi = max(start, offset) - offset, end - offset
            block_chars.append((int(starts[lo]) if hi > lo else 0, int(starts[hi]) if hi > lo else 0))
        cases.append(dict(record=record, arrays=arrays, text=text, pages=pages, ids=ids, starts=starts,
                          offset=offset, block_chars=block_chars, passages=quotes.passages(text, pages)))
    return cases


def fact_tokens(case) -> np.ndarray:
    start, end = case["record"]["fact_span"]
    s = case["starts"][:-1]
    return np.nonzero((s >= start) & (s < end))[0]


def answer_steps(case, tokenizer) -> tuple[list[int], list[int]]:
    """(steps whose generated token carries answer content not in the question, all steps before the stop)."""
    from starqa.evidence import quotes

    ids = case["arrays"]["answer_ids"].tolist()
    record = case["record"]
    terms = {term.text for term in quotes.content_terms(record["answer"], record["question"])}
    content, steps = [], []
    for step, token in enumerate(ids):
        piece = tokenizer.decode([token], skip_special_tokens=True)
        if not piece.strip() and step == len(ids) - 1:
            break
        steps.append(step)
        if quotes.terms_in(piece) & terms or (piece.strip().isdigit() and any(t.isdigit() for t in terms)):
            content.append(step)
    return content, steps


def block_hit(case, weights: np.ndarray) -> bool:
    scores = [weights[max(s, case["offset"]) - case["offset"]: e - case["offset"]].sum()
              for s, e in case["arrays"]["spans"]]
    best = int(np.argmax(scores))
    start, end = case["block_chars"][best]
    fact = case["record"]["fact_span"]
    return start < fact[1] and fact[0] < end


def passage_scores(case, weights: np.ndarray) -> np.ndarray:
    starts = case["starts"][:-1]
    scores = np.zeros(len(case["passages"]))
    bounds = np.array([p.start for p in case["passages"]])
    index = np.searchsorted(bounds, starts, side="right") - 1
    ok = index >= 0
    np.add.at(scores, index[ok], weights[ok])
    return scores


def passage_hit(case, scores: np.ndarray) -> bool:
    best = case["passages"][int(np.argmax(scores))]
    fact = case["record"]["fact_span"]
    return best.start < fact[1] and fact[0] < best.end


# ---------------------------------------------------------------- token weights per method


def top_weights(case, steps, heads: np.ndarray | None, k: int) -> np.ndarray:
    """Sum of the top-k probabilities per (step, layer, head) over the given steps; heads [layers, heads] weights."""
    arrays = case["arrays"]
    index, p = arrays["top_index"], arrays["top_p"].astype(np.float32)  # [obs, heads, TOP]
    layers = arrays["dense"].shape[0]
    weights = np.zeros(len(case["ids"]))
    for step in steps:
        for layer in range(layers):
            obs = step * layers + layer
            if obs >= len(index):
                continue
            w = p[obs, :, :k]
            if heads is not None:
                w = w * heads[layer][:, None]
            np.add.at(weights, index[obs, :, :k].ravel(), w.ravel())
    return weights


def match_weights(case, tokenizer) -> np.ndarray:
    """1 on the tokens of passages holding the answer's content terms, by the fraction of terms they hold."""
    from starqa.evidence import quotes

    record = case["record"]
    terms = quotes.content_terms(record["answer"], record["question"])
    weights = np.zeros(len(case["ids"]))
    if not terms:
        return weights
    starts = case["starts"][:-1]
    for passage in case["passages"]:
        found = quotes.terms_in(case["text"][passage.start:passage.end])
        share = sum(term.text in found for term in terms) / len(terms)
        if share:
            inside = np.nonzero((starts >= passage.start) & (starts < passage.end))[0]
            if len(inside):
                weights[inside] = share / len(inside)
    return weights


def retrieval_heads(cases, tokenizer) -> np.ndarray:
    """[layers, heads]: how often each head's top token is a copy source of the generated token (Wu et al.'s
    retrieval score), over the correct answers' content steps."""
    hits = None
    total = 0
    for case in cases:
        if not case["record"]["correct"]:
            continue
        arrays = case["arrays"]
        layers, heads = arrays["dense"].shape[:2]
        if hits is None:
            hits = np.zeros((layers, heads))
        content, _ = answer_steps(case, tokenizer)
        ids = case["ids"]
        fact = set(fact_tokens(case).tolist())
        answer_ids = arrays["answer_ids"].tolist()
        for step in content:
            sources = {i for i in fact if ids[i] == answer_ids[step]}
            if not sources:
                continue
            total += 1
            for layer in range(layers):
                obs = step * layers + layer
                top1 = arrays["top_index"][obs, :, 0]
                hits[layer] += np.isin(top1, list(sources))
    return hits / max(total, 1)


def view(case, tokenizer):
    from starqa.evidence import quotes
    from starqa.documents.text_positions import block_pages

    context = [0] * case["offset"] + case["ids"]
    spans = [tuple(int(v) for v in span) for span in case["arrays"]["spans"]]
    if "view" not in case:
        pages_per_block = block_pages(tokenizer, context, case["offset"], spans, case["pages"], case["text"])
        case["view"] = quotes.DocumentView(case["text"], case["pages"], context, case["offset"], spans, pages_per_block,
                                       tokenizer)
        case["view"]._starts = case["starts"].tolist()
        case["view"]._passages = case["passages"]
    return case["view"]


def product_hits(case, tokenizer, weights: np.ndarray, match_weight: float, question_weight: float) -> dict:
    """The product's evidence_from_weights on these token weights: first source / first quote / grounded."""
    from starqa.evidence import quotes

    document = view(case, tokenizer)
    context_weights = np.concatenate([np.zeros(case["offset"]), weights])
    record = case["record"]
    found = quotes.evidence_from_weights(document, context_weights, record["answer"], record["question"],
                                     match_weight=match_weight, question_weight=question_weight)
    fact = record["fact_span"]
    result = {"grounded": found.grounded, "quote": bool(found.evidence) and found.evidence[0]["start"] < fact[1]
              and fact[0] < found.evidence[0]["end"]}
    if found.sources:
        start, end = case["block_chars"][found.sources[0]["block"]]
        result["block"] = start < fact[1] and fact[0] < end
        result["page"] = min(record["fact_pages"]) in found.sources[0]["pages"]
    else:
        result["block"] = result["page"] = False
    return result


WEIGHTS = [(a, q) for a in (0.0, 0.5, 1.0, 2.0) for q in (0.0, 0.5, 1.0)]


def main() -> int:
    from transformers import AutoTokenizer

    raw, records_path = Path(sys.argv[1]), Path(sys.argv[2])
    calibration = json.loads(Path(sys.argv[3]).read_text()) if len(sys.argv) > 3 else None
    if calibration is not None and "heads" not in calibration:  # the store's record file: keyed by model
        calibration = next(iter(calibration.values()))
    model_dir = next(p for p in (Path("/tmp/h15-store/models")).iterdir() if p.is_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    cases = load(raw, records_path, tokenizer)
    right = [case for case in cases if case["record"]["correct"]]
    print(f"{len(cases)} cases, {len(right)} correct")
    halves = [right[0::2], right[1::2]]
    fitted = [retrieval_heads(halves[1], tokenizer), retrieval_heads(halves[0], tokenizer)]
    whole = retrieval_heads(right, tokenizer)
    order = np.argsort(whole.ravel())[::-1][:20]
    print("top retrieval heads on the tuning answers (layer, head, score):",
          [(int(i // whole.shape[1]), int(i % whole.shape[1]), round(float(whole.ravel()[i]), 2)) for i in order])
    calibrated = None
    if calibration:
        calibrated = np.zeros_like(whole)
        for (layer, head), score in zip(calibration["heads"], calibration["scores"]):
            calibrated[layer, head] = 1.0
        print("calibration heads:", calibration["heads"])

    methods = defaultdict(lambda: defaultdict(list))
    for fold, half in enumerate(halves):
        score = fitted[fold]
        selections = {f"cross-fitted top{n}": _select(score, n) for n in (5, 10, 16)}
        if calibrated is not None:
            selections["calibration heads"] = calibrated
        for case in half:
            arrays = case["arrays"]
            dense = arrays["dense"].astype(np.float32)
            content, steps = answer_steps(case, tokenizer)
            depth = case["record"]["depth"]
            candidates = {
                "mass all heads": dense.sum((0, 1)),
                "contrast mass - neutral (2 passes)": dense.sum((0, 1)) / max(1, len(arrays["answer_ids"]))
                - arrays["neutral_dense"].astype(np.float32).sum((0, 1)) / max(1, len(arrays["neutral_ids"])),
                "top8 all heads": top_weights(case, steps, None, 8),
                "top1 all heads": top_weights(case, steps, None, 1),
                "no attention": np.zeros(len(case["ids"])),
            }
            for name, selected in selections.items():
                for k in (1, 4, 8):
                    candidates[f"{name} k={k}"] = top_weights(case, steps, selected, k)
            methods["baseline (peak, recorded)"]["block"].append((depth, case["record"]["baseline"]["block_hit"]))
            methods["baseline (peak, recorded)"]["page"].append((depth, case["record"]["baseline"]["page_hit"]))
            for name, weights in candidates.items():
                for match_weight, question_weight in WEIGHTS:
                    if name == "no attention" and match_weight == 0:
                        continue
                    hits = product_hits(case, tokenizer, weights, match_weight, question_weight)
                    for key, value in hits.items():
                        methods[f"{name}, a{match_weight} q{question_weight}"][key].append((depth, value))
    depths = sorted({case["record"]["depth"] for case in right})
    print(f"{'method':<46} {'block':>6} {'page':>6} {'quote':>6} {'ground':>6}   block hit per depth "
          + " ".join(f"{d:>5}" for d in depths))
    for name, results in methods.items():
        block = results["block"]
        per_depth = " ".join(f"{_pct([h for d, h in block if d == depth]):>5}" for depth in depths)
        cells = " ".join(f"{_pct([h for _, h in results[key]]):>6}" for key in ("block", "page", "quote", "grounded"))
        print(f"{name:<46} {cells}   {'':>19}{per_depth}")
    return 0


def _select(score: np.ndarray, n: int) -> np.ndarray:
    flat = score.ravel()
    chosen = np.zeros_like(flat)
    chosen[np.argsort(flat)[::-1][:n]] = 1.0
    return chosen.reshape(score.shape)


def _pct(values) -> str:
    return f"{100 * sum(values) / len(values):.0f}" if values else "-"


if __name__ == "__main__":
    sys.exit(main())
