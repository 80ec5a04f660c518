"""Benchmark (not a test): ingesting a big PDF: extraction pages/s, tokenization tokens/s, Phase 1 tokens/s and the
peak memory (RSS) of each stage, in one process with the bundled model on the CPU.

    python benchmarks/ingest_big.py                                   # 1,000 pages; Phase 1 on the first 4,096 tokens
    python benchmarks/ingest_big.py --pages 100                       # the same on 100 pages (compare the memory)
    python benchmarks/ingest_big.py --max-tokens 0 --block-size 512   # Phase 1 on all of it (hours on a CPU)

Stages, each timed and with its own peak RSS (Linux: the peak is reset before each stage):
1. extraction: `documents.extract_document` on the PDF (pypdf, page by page, then the reading normalisation);
2. tokenization: `engine.encode_document_text` on the whole text (the tiktoken engine when it is verified for the
   model; `--compare-hf` also times the HF tokenizer on the same text and checks the ids are identical);
3. ingest: the real `starqa.engine.ingest.ingest` (extract, tokenize, Phase 1 writing each block to disk, publish) with
   --allow-long, into a temporary store. The bundled model runs Phase 1 at a few hundred tokens/s on a CPU, so by
   default it ingests a text file holding the document's first --max-tokens tokens; --max-tokens 0 ingests the PDF.

The PDF comes from benchmarks/make_big_pdf.py (made under /tmp when missing, never committed). The converted model
is kept in the usual store ($STARQA_HOME, else ~/.cache/starqa) so it is converted once.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc (Linux)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak() -> None:
    """Start a new peak-RSS measurement (Linux >= 4.0: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


class Stage:
    """Times a stage and records RSS before it and its peak."""

    done: list["Stage"] = []

    def __init__(self, name: str) -> None:
        self.name = name
        self.note = ""

    def __enter__(self) -> "Stage":
        reset_peak()
        self.rss_before = rss_mib()[0]
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.peak = rss_mib()[1]
        Stage.done.append(self)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=1000, help="pages of the synthetic PDF (default 1000)")
    ap.add_argument("--pdf", type=Path, help="a PDF of your own instead of the synthetic one")
    ap.add_argument("--max-tokens", type=int, default=4096,
                    help="Phase 1 on the first N document tokens (default 4096); 0 = the whole PDF")
    ap.add_argument("--block-size", type=int, default=256, help="Phase 1 block size (default 256)")
    ap.add_argument("--compare-hf", action="store_true", help="also time the HF tokenizer on the whole text")
    ap.add_argument("--store", type=Path, help="store holding the converted model (default: the usual one)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from starqa import report
    from starqa.config import load_settings
    from starqa.documents.extraction import extract_document
    from starqa.engine.star_engine import StarEngine
    from starqa.engine.ingest import ingest
    from starqa.store.document_store import DocumentStore
    from starqa.documents.tokens import context_ids_for, encode_document, prompt_template

    pdf = args.pdf
    if pdf is None:
        pdf = Path(f"/tmp/starqa-big-{args.pages}.pdf")
        if not pdf.is_file():
            from make_big_pdf import build  # this folder is on the path

            written, seconds = build(pdf, args.pages)
            print(f"made {pdf}: {written} pages in {seconds:.1f} s", file=sys.stderr)
    report.set_quiet(True)
    print(f"python RSS at start: {rss_mib()[0]:,.0f} MiB", file=sys.stderr)

    with Stage("load model") as stage:
        engine = StarEngine.load("smollm2-135m", device="cpu", dtype="float32", store_root=args.store)
    with Stage("tokenizer check") as stage:
        stage.note = f"engine {engine.tokenizer_engine}" + (f" ({engine.tokenizer_engine_reason})"
                                                            if engine.tokenizer_engine_reason else "")

    pages_done = [0]
    with Stage("extraction") as stage:
        extracted = extract_document(pdf, on_page=lambda done, total: pages_done.__setitem__(0, done))
    n_pages = len(extracted.pages)
    stage.note = f"{n_pages:,} pages, {len(extracted.text):,} chars: {n_pages / stage.seconds:,.1f} pages/s"

    with Stage(f"tokenization ({engine.tokenizer_engine})") as stage:
        document_ids = engine.encode_document_text(extracted.text)
    stage.note = f"{len(document_ids):,} tokens: {len(document_ids) / stage.seconds:,.0f} tokens/s"
    if args.compare_hf:
        with Stage("tokenization (hf)") as stage:
            hf_ids = encode_document(engine.hf_tokenizer, extracted.text)
        same = "identical ids" if hf_ids == document_ids else "DIFFERENT ids"
        stage.note = f"{len(hf_ids):,} tokens: {len(hf_ids) / stage.seconds:,.0f} tokens/s, {same}"
        del hf_ids

    settings = load_settings(None, block_size=args.block_size, device="cpu", dtype="float32", nproc="1")
    with tempfile.TemporaryDirectory(prefix="starqa-bench-") as scratch:
        store = DocumentStore(Path(scratch) / "store")
        if args.max_tokens:
            head = len(context_ids_for(engine.tokenizer, prompt_template(engine.tokenizer), []))
            prefix = engine.tokenizer.decode(document_ids[: max(1, args.max_tokens - head)])
            source = Path(scratch) / "prefix.txt"
            source.write_text(prefix, encoding="utf-8")
            what = f"the first {args.max_tokens:,} tokens (as text)"
        else:
            source, what = pdf, "the whole PDF"
        del extracted, document_ids
        with Stage("ingest") as stage:
            result = ingest(str(source), settings, engine, store, name="big", allow_long=True)
        manifest = result.document.manifest
        tokens = manifest["context_tokens"]
        stage.note = (f"{what}: {tokens:,} tokens, {len(manifest['blocks'])} blocks of {args.block_size}; "
                      f"Phase 1 {manifest['phase1_s']:.1f} s = {tokens / manifest['phase1_s']:,.0f} tokens/s; "
                      f"KV {report.human_bytes(manifest['kv_bytes'])}")

    print(f"\n{pdf} ({pdf.stat().st_size / 2**20:.1f} MiB); torch threads {torch.get_num_threads()}")
    print(f"{'stage':<26}{'seconds':>9}{'RSS before':>12}{'peak RSS':>10}{'growth':>9}  notes")
    for s in Stage.done:
        print(f"{s.name:<26}{s.seconds:>9.2f}{s.rss_before:>10,.0f} M{s.peak:>8,.0f} M{s.peak - s.rss_before:>7,.0f} M"
              f"  {s.note}")
    print(f"peak RSS of the process: {report.peak_rss_mb():,.0f} MiB")


if __name__ == "__main__":
    main()
