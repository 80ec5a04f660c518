"""Benchmark of document tokenization: the HF tokenizer against starqa's tiktoken engine, on one thread each.

    python benchmarks/tokenization.py                      # ~1M tokens, the bundled SmolLM2 tokenizer
    python benchmarks/tokenization.py --tokens 200000      # quicker
    python benchmarks/tokenization.py --text my.txt        # repeat a file of your own to the size
    python benchmarks/tokenization.py --tokenizer DIR      # an HF tokenizer directory instead

The text is samples/contract.txt repeated (when it is there) interleaved with seeded synthetic prose, numbers,
code and non-Latin paragraphs; nothing is downloaded. Rows: `hf` is `tokenizer.encode(text,
add_special_tokens=False, split_special_tokens=True)`, i.e. `starqa.documents.tokens.encode_document`, how starqa tokenizes
documents with the HF tokenizer; `TextEncoder` is starqa.documents.fast_tokenizer with its added-token split, chunking and
checks; `tiktoken (raw)` is the bare `encode_ordinary` call, for the wrapper's overhead. Seconds are the best of
--repeat runs; the ratio is tokens/s over the HF row's. The ids of every engine are checked identical.
"""

from __future__ import annotations

import os

# One thread for everyone: tokenizers' Rayon pool only serves batches, but pin it anyway.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starqa.documents.fast_tokenizer import TextEncoder  # noqa: E402
from starqa.documents.tokens import encode_document  # noqa: E402

WORDS = (
    "the party shall give written notice of termination for convenience within ninety days and pay all fees "
    "accrued under this agreement including any reasonable costs incurred by the supplier before the effective "
    "date customer may not assign its rights or obligations without prior consent which shall not be withheld"
).split()
OTHER_PARAGRAPHS = [
    "def total(rows):\n    return sum(r.amount for r in rows if r.status == 'paid')  # net of VAT\n",
    "\u672c\u5408\u540c\u81ea\u53cc\u65b9\u7b7e\u5b57\u4e4b\u65e5\u8d77\u751f\u6548"
    "\uff0c\u6709\u6548\u671f\u4e09\u5e74\u3002",
    "Die Vertragsparteien vereinbaren eine K\u00fcndigungsfrist von drei Monaten zum Quartalsende.",
    "| Item | Qty | Price |\n|------|-----|-------|\n"
    "| Licence | 12 | $1,200.00 |\n| Support | 1 | $450.50 |",
    "Sch\u00e9ma : caf\u00e9, r\u00e9sum\u00e9, na\u00efve \u2014 \u00ab d\u00e9lai \u00bb de 30 jours."
    " \U0001f4dd\u2705",
]


def synthetic_prose(rng: random.Random, chars: int) -> str:
    paragraphs, total = [], 0
    while total < chars:
        if rng.random() < 0.15:
            paragraph = rng.choice(OTHER_PARAGRAPHS)
        else:
            sentences = []
            for _ in range(rng.randint(2, 7)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(6, 24))]
                if rng.random() < 0.3:
                    words.insert(rng.randint(0, len(words)), f"{rng.randint(1, 10**6):,}")
                if rng.random() < 0.2:
                    words.insert(1, rng.choice(["(a)", "Section 4.2", "don't", "it's", "\u201cTerm\u201d"]))
                sentences.append(" ".join(words).capitalize() + rng.choice(".;:"))
            paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)


def build_text(encode, target_tokens: int, sample: Path | None) -> str:
    """Sample text and synthetic prose, alternating, until `encode` says there are about target_tokens."""
    rng = random.Random(1234)
    sample_text = sample.read_text(encoding="utf-8") if sample is not None and sample.is_file() else ""
    pieces: list[str] = []
    tokens = 0
    while tokens < target_tokens:
        piece = sample_text if sample_text and len(pieces) % 2 == 0 else synthetic_prose(rng, 40_000)
        pieces.append(piece)
        tokens += len(encode(piece)) + 1
    return "\n\n".join(pieces)


def best_time(function, text: str, repeat: int) -> tuple[float, list[int]]:
    best, ids = float("inf"), []
    for _ in range(repeat):
        start = time.perf_counter()
        ids = function(text)
        best = min(best, time.perf_counter() - start)
    return best, ids


def load_tokenizer(directory: str | None):
    from transformers import AutoTokenizer

    if directory:
        return AutoTokenizer.from_pretrained(directory)
    from starqa.model.resolve import bundled_gguf_path

    path = bundled_gguf_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000, help="size of the text in tokens (default 1M)")
    ap.add_argument("--text", type=Path, default=REPO / "samples" / "contract.txt", help="text to repeat")
    ap.add_argument("--tokenizer", help="an HF tokenizer directory (default: the bundled SmolLM2)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per engine; the best counts (default 3)")
    args = ap.parse_args()

    hf = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    encoder = TextEncoder.for_tokenizer(hf)
    setup = time.perf_counter() - start
    print(f"TextEncoder engine: {encoder.engine} {encoder.reason}(build + probe check {setup:.2f} s)".strip())
    if encoder.engine != "tiktoken":
        raise SystemExit("no tiktoken engine for this tokenizer: nothing to compare")

    text = build_text(encoder.encode, args.tokens, args.text)
    source = args.text.name if args.text.is_file() else "synthetic prose only"
    print(f"text: {len(text):,} chars, {len(text.encode()):,} bytes ({source}); threads: 1; best of {args.repeat}")

    rows = [
        ("hf", lambda t: encode_document(hf, t)),
        ("TextEncoder (tiktoken)", encoder.encode),
        ("tiktoken (raw)", encoder.encoding.encode_ordinary),
    ]
    results = []
    for name, function in rows:
        seconds, ids = best_time(function, text, args.repeat)
        results.append((name, seconds, ids))
    reference = results[0][2]
    hf_rate = len(reference) / results[0][1]
    print(f"\n{'engine':<24}{'tokens':>12}{'seconds':>10}{'tokens/s':>14}{'vs hf':>8}  ids")
    for name, seconds, ids in results:
        rate = len(ids) / seconds
        same = "identical" if ids == reference else "DIFFERENT"
        print(f"{name:<24}{len(ids):>12,}{seconds:>10.3f}{rate:>14,.0f}{rate / hf_rate:>7.1f}x  {same}")
    if encoder.hf_fallback_chunks:
        print(f"(TextEncoder handed {encoder.hf_fallback_chunks} chunks to HF's pipeline)")


if __name__ == "__main__":
    main()
