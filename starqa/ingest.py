"""Ingest: extract a document, tokenize the context part of the prompt, run Phase 1, and store the KV.

Data flows one way: documents -> tokens -> engine (Phase 1) -> store. Blocks are written as Phase 1 yields them, so
the KV of a long document never has to fit in memory at once.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from starqa import __version__, report
from starqa.config import Settings
from starqa.documents import extract_document
from starqa.errors import StarqaError, UsageError
from starqa.store import DocumentStore, StoredDocument, name_from_path, validate_name
from starqa.tokens import PROMPT_LAYOUT_VERSION, context_ids_for, encode_document, prompt_template


@dataclass
class IngestResult:
    name: str
    document: StoredDocument
    phase1_ran: bool  # False when the document was already stored with the same source and settings
    phase1_s: float = 0.0


def dtype_name(engine) -> str:
    return str(engine.dtype).removeprefix("torch.")


def settings_signature(engine, settings: Settings) -> dict:
    """What a stored document's KV depends on, besides its source text."""
    return {
        "model_fingerprint": engine.model_fingerprint,
        "tokenizer_fingerprint": engine.tokenizer_fingerprint,
        "prompt_layout_version": PROMPT_LAYOUT_VERSION,
        "block_size": settings.block_size,
        "anchor_size": settings.effective_anchor_size,
        "dtype": dtype_name(engine),
    }


def differences(manifest: dict, signature: dict) -> list[str]:
    labels = {"model_fingerprint": "model", "tokenizer_fingerprint": "tokenizer",
              "prompt_layout_version": "prompt layout", "block_size": "block size",
              "anchor_size": "anchor size", "dtype": "dtype"}
    found = []
    for key, wanted in signature.items():
        stored = manifest.get(key)
        if stored != wanted:
            if key == "model_fingerprint":
                found.append(f"model ({manifest.get('model', '?')} as stored)")
            else:
                found.append(f"{labels[key]} (stored {stored}, now {wanted})")
    return found


def _source_digest(source: str, text: str) -> str:
    if source == "-":
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ingest(source: str, settings: Settings, engine, store: DocumentStore, *, name: str | None = None,
           force: bool = False, allow_long: bool = False, password: str | None = None,
           encode_blocks=None) -> IngestResult:
    """Ingest one file (or "-" for stdin) as document `name` (default: the file's stem)."""
    name = validate_name(name if name is not None else name_from_path(source))
    with report.progress() as bar:
        pages_task = bar.add_task("extracting pages", total=None)

        def on_page(done: int, total: int) -> None:
            bar.update(pages_task, completed=done, total=total)

        extracted = extract_document(source, password=password, on_page=on_page)
    for warning in extracted.warnings:
        report.warn(warning)
    source_sha256 = _source_digest(source, extracted.text)
    signature = settings_signature(engine, settings)

    if store.exists(name):
        stored = store.get(name)
        same_source = stored.manifest.get("source", {}).get("sha256") == source_sha256
        diffs = differences(stored.manifest, signature)
        if same_source and not diffs and not force:
            report.info(f"'{name}' is already stored from the same source with the same settings; nothing to do")
            return IngestResult(name=name, document=stored, phase1_ran=False)
        if not force:
            what = "a different source file" if not same_source else "different settings: " + ", ".join(diffs)
            raise UsageError(f"document '{name}' is already stored with {what}; pass --force to replace it, "
                             "or --name to store it under another name")

    tokenizer = engine.tokenizer
    template = prompt_template(tokenizer)
    document_ids = engine.encode_document_text(extracted.text)
    context_ids = context_ids_for(tokenizer, template, document_ids)
    window = engine.context_window
    if window and len(context_ids) > window and not allow_long:
        raise UsageError(
            f"'{source}' is {len(context_ids):,} tokens with the prompt, but the model reads at most {window:,}; "
            "use a model with a longer context, or pass --allow-long to encode it anyway"
        )
    anchor_size = settings.effective_anchor_size
    manifest = {
        "source": {"path": str(Path(source).resolve()) if source != "-" else "-", "sha256": source_sha256,
                   "kind": extracted.kind},
        "model": engine.model_name,
        **signature,
        "tokenizer_engine": getattr(engine, "tokenizer_engine", "hf"),
        "context_tokens": len(context_ids),
        "document_tokens": len(document_ids),
        "document_token_offset": len(context_ids) - len(document_ids),
        "pages": len(extracted.pages),
        "starqa_version": __version__,
    }
    started = time.perf_counter()
    with store.lock(name, on_wait=report.info):
        if store.exists(name) and not force:  # stored by a concurrent ingest while we waited for the lock
            stored = store.get(name)
            if stored.manifest.get("source", {}).get("sha256") == source_sha256 and not differences(stored.manifest, signature):
                report.info(f"'{name}' was just stored by another starqa process; nothing to do")
                return IngestResult(name=name, document=stored, phase1_ran=False)
            raise UsageError(f"document '{name}' was just stored by another process; pass --force to replace it")
        with store.writing(name, manifest) as writer:
            writer.write_text(extracted.text, [{"number": p.number, "start": p.start, "end": p.end}
                                               for p in extracted.pages])
            writer.write_context_ids(context_ids)
            run_phase1 = encode_blocks or _encode_blocks_here
            phase1_s = run_phase1(engine, context_ids, settings, writer)
            writer_manifest_extra = {"phase1_s": round(phase1_s, 3)}
            manifest.update(writer_manifest_extra)
    document = store.get(name)
    _summary(name, extracted, context_ids, settings, phase1_s, document, time.perf_counter() - started)
    return IngestResult(name=name, document=document, phase1_ran=True, phase1_s=phase1_s)


def _encode_blocks_here(engine, context_ids, settings: Settings, writer) -> float:
    """Phase 1 in this process, writing each block as soon as it is encoded."""
    from starqa.tokens import plan_blocks

    n_blocks = len(plan_blocks(len(context_ids), settings.block_size))
    started = time.perf_counter()
    with report.progress() as bar:
        task = bar.add_task("Phase 1: encoding blocks", total=n_blocks)
        for block in engine.encode_blocks(context_ids, settings.block_size, settings.effective_anchor_size,
                                          batch=settings.phase1_batch):
            writer.write_block(block.index, block.start, block.end, block.keys, block.values)
            bar.advance(task)
    return time.perf_counter() - started


def _summary(name, extracted, context_ids, settings, phase1_s, document, total_s) -> None:
    rows = [
        ("pages", f"{len(extracted.pages)}"),
        ("tokens", f"{len(context_ids):,}"),
        ("blocks", f"{len(document.blocks)}"),
        ("block / anchor size", f"{settings.block_size} / {settings.effective_anchor_size}"),
        ("Phase 1", f"{phase1_s:.2f} s ({len(context_ids) / max(phase1_s, 1e-9):,.0f} tokens/s)"),
        ("peak memory (RSS)", f"{report.peak_rss_mb():,.0f} MiB"),
    ]
    cuda = report.cuda_peak_mb()
    if cuda is not None:
        rows.append(("peak CUDA memory", f"{cuda:,.0f} MiB"))
    rows.append(("KV on disk", report.human_bytes(document.manifest["kv_bytes"])))
    report.table(f"ingested '{name}'", rows)
    if not report.is_quiet():
        print(f"stored '{name}' ({len(context_ids):,} tokens, {len(document.blocks)} blocks)", file=sys.stderr)


def check_usable(document: StoredDocument, engine, settings: Settings, *, explicit_sizes: bool) -> None:
    """Refuse a stored document whose KV was made with another model, tokenizer, layout or dtype."""
    signature = settings_signature(engine, settings)
    if not explicit_sizes:  # block sizes are the document's own unless the user asked for others
        signature.pop("block_size")
        signature.pop("anchor_size")
    diffs = differences(document.manifest, signature)
    if diffs:
        source = document.manifest.get("source", {}).get("path", "SOURCE")
        raise StarqaError(
            f"document '{document.name}' was stored with a different " + ", ".join(diffs)
            + f"; re-ingest it: starqa ingest {source} --name {document.name} --force (with your --model/--dtype)"
        )
