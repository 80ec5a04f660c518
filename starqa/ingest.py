"""Ingest: extract a document, tokenize the context part of the prompt, run Phase 1, and store the KV.

Data flows one way: documents -> tokens -> engine (Phase 1) -> store. Blocks are written as Phase 1 yields them, so
the KV of a long document never has to fit in memory at once. Under torch.distributed, rank 0 prepares the document
and owns the store; every rank encodes its contiguous run of blocks and writes their files into rank 0's staging
folder; the manifest is written and the document published only after all ranks have finished.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from starqa import __version__, report
from starqa.config import Settings
from starqa.engine import quantize_block
from starqa.kv_quant import KEY_GROUP, resolve_kv_dtype
from starqa.distributed import RankFailure, Ranks, agree, block_plan, broadcast_object, gather_objects, share_outcome
from starqa.errors import StarqaError, UsageError
from starqa.sources import block_pages
from starqa.store import (DamagedDocument, DocumentStore, StoredDocument, name_from_path, reingest_hint, validate_name,
                          write_block_file)
from starqa.tokens import PROMPT_LAYOUT_VERSION, context_ids_for, plan_blocks, prompt_template

# Test hook: STARQA_FAIL_PHASE1_RANK=N makes rank N raise during Phase 1 (how the fault tests stage a failure).
_FAIL_RANK_ENV = "STARQA_FAIL_PHASE1_RANK"


@dataclass
class IngestResult:
    name: str
    document: StoredDocument | None  # None on ranks other than 0
    phase1_ran: bool  # False when the document was already stored with the same source and settings
    phase1_s: float = 0.0


@dataclass
class _Prepared:
    name: str
    context_ids: list[int]
    manifest: dict
    text: str
    pages: list[dict]
    stored: bool  # already stored with the same source and settings: nothing to do


def expand_sources(arguments: list[str]) -> list[str]:
    """The files to ingest: each argument as given, or the files a glob pattern matches (sorted), in order.

    Patterns are expanded here so that quoted ones work (`starqa ingest "docs/*.pdf"`) and on shells that leave an
    unmatched pattern as it is; `**` matches folders recursively. A pattern that matches no file is an error naming
    it. An argument that exists as a path is never a pattern; a file given twice is ingested once.
    """
    import glob
    import os

    sources: list[str] = []
    seen: set[str] = set()
    for argument in arguments:
        if argument == "-" or os.path.lexists(argument) or not glob.has_magic(argument):
            matches = [argument]
        else:
            matches = sorted(path for path in glob.glob(os.path.expanduser(argument), recursive=True)
                             if os.path.isfile(path))
            if not matches:
                raise UsageError(f"'{argument}' matches no file: check the pattern")
        for source in matches:
            key = source if source == "-" else os.path.realpath(source)
            if key not in seen:
                seen.add(key)
                sources.append(source)
    return sources


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
        "kv_dtype": resolve_kv_dtype(settings.kv_dtype, engine.dtype),
    }


def chosen_signature(signature: dict, settings: Settings) -> dict:
    """The signature without what the user left to `auto` (dtype, KV dtype): a document stored from the same
    source in another precision (e.g. float32 by an earlier starqa) is still the document asked for."""
    return {key: value for key, value in signature.items()
            if not (key == "dtype" and settings.dtype == "auto") and not (key == "kv_dtype" and settings.kv_dtype == "auto")}


def differences(manifest: dict, signature: dict) -> list[str]:
    labels = {"tokenizer_fingerprint": "tokenizer", "prompt_layout_version": "prompt layout",
              "block_size": "block size", "anchor_size": "anchor size", "dtype": "dtype", "kv_dtype": "KV dtype"}
    found = []
    for key, wanted in signature.items():
        stored = manifest.get(key)
        if key == "kv_dtype" and stored is None:  # stored before --kv-dtype: its KV is in its compute dtype
            stored = manifest.get("dtype")
        if stored != wanted:
            if key == "model_fingerprint":
                found.append(f"model (stored with {manifest.get('model', '?')})")
            else:
                found.append(f"{labels[key]} (stored {stored}, now {wanted})")
    return found


def _file_version(source: str) -> tuple | None:
    """What changes when a regular file is rewritten; None for stdin, pipes and other streams (read only once)."""
    if source == "-":
        return None
    try:
        status = os.stat(source)
    except OSError:  # gone: extraction says so, or the check after hashing finds it changed
        return None
    return (status.st_ino, status.st_size, status.st_mtime_ns) if stat.S_ISREG(status.st_mode) else None


def _source_digest(source: str, text: str, version: tuple | None) -> str:
    """SHA-256 of the source file as extracted; of the text for a stream, which cannot be read a second time."""
    if version is None:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        version = None  # removed meanwhile: reported as changed below
    if version is None or _file_version(source) != version:  # saved again while it was extracted or hashed
        raise StarqaError(f"'{source}' changed while it was being read; nothing was stored: try again")
    return digest.hexdigest()


def _prepare(source, settings, engine, store, *, name, force, allow_long, password) -> _Prepared:
    from starqa.documents import extract_document

    name = validate_name(name if name is not None else name_from_path(source))
    version = _file_version(source)
    with report.progress() as bar:
        pages_task = bar.add_task("extracting pages", total=None)
        extracted = extract_document(source, password=password,
                                     on_page=lambda done, total: bar.update(pages_task, completed=done, total=total))
    for warning in extracted.warnings:
        report.warn(warning)
    source_sha256 = _source_digest(source, extracted.text, version)
    signature = chosen_signature(settings_signature(engine, settings), settings)
    stored = None
    if store.exists(name):
        try:
            stored = store.get(name)
        except DamagedDocument:
            if not force:
                raise
            report.warn(f"replacing '{name}', whose stored manifest cannot be read")
    if stored is not None:
        same_source = stored.manifest.get("source", {}).get("sha256") == source_sha256
        diffs = differences(stored.manifest, signature)
        if same_source and not diffs and not force:
            report.info(f"'{name}' is already stored from the same source with the same settings; nothing to do")
            return _Prepared(name, [], {}, "", [], stored=True)
        if not force:
            what = "a different source file" if not same_source else "different settings: " + ", ".join(diffs)
            raise UsageError(f"document '{name}' is already stored with {what}; pass --force to replace it, "
                             "or --name to store it under another name")

    template = prompt_template(engine.tokenizer)
    document_ids = engine.encode_document_text(extracted.text)
    context_ids = context_ids_for(engine.tokenizer, template, document_ids)
    window = engine.context_window
    if window and len(context_ids) > window and not allow_long:
        raise UsageError(
            f"'{source}' is {len(context_ids):,} tokens with the prompt, but the model reads at most {window:,}; "
            "use a model with a longer context, or pass --allow-long to encode it anyway"
        )
    sliding = engine.sliding_window
    if sliding and len(context_ids) > sliding:
        # Within the window a sliding-window layer attends exactly like a full one; beyond it, Star Attention (which
        # attends to every stored token) would no longer compute what the model computes.
        raise UsageError(
            f"'{source}' is {len(context_ids):,} tokens with the prompt, but {engine.model_name} attends to only the "
            f"last {sliding:,} tokens in some layers (sliding-window attention), which starqa does not implement; "
            "use a model without a sliding window (e.g. Mistral v0.2 or later) or a shorter document"
        )
    manifest = {
        "source": {"path": str(Path(source).resolve()) if source != "-" else "-", "sha256": source_sha256,
                   "kind": extracted.kind},
        "model": engine.model_name,
        **settings_signature(engine, settings),
        "tokenizer_engine": engine.tokenizer_engine,
        "tokenizer_engine_reason": engine.tokenizer_engine_reason,
        **({"kv_key_group": KEY_GROUP} if resolve_kv_dtype(settings.kv_dtype, engine.dtype) == "int8" else {}),
        "context_tokens": len(context_ids),
        "document_tokens": len(document_ids),
        "document_token_offset": len(context_ids) - len(document_ids),
        "pages": len(extracted.pages),
        "starqa_version": __version__,
    }
    pages = [{"number": p.number, "start": p.start, "end": p.end} for p in extracted.pages]
    return _Prepared(name, context_ids, manifest, extracted.text, pages, stored=False)


def ingest(source: str, settings: Settings, engine, store: DocumentStore, *, name: str | None = None,
           force: bool = False, allow_long: bool = False, password: str | None = None,
           ranks: Ranks | None = None) -> IngestResult:
    """Ingest one file (or "-" for stdin) as document `name` (default: the file's stem)."""
    ranks = ranks or Ranks()
    prepared = share_outcome(ranks, lambda: _prepare(source, settings, engine, store, name=name, force=force,
                                                     allow_long=allow_long, password=password))
    if prepared.stored:
        document = store.get(prepared.name) if ranks.is_speaker else None
        return IngestResult(name=prepared.name, document=document, phase1_ran=False)

    spans = plan_blocks(len(prepared.context_ids), settings.block_size)
    if ranks.is_speaker:
        stored = _store_as_speaker(prepared, settings, engine, store, spans, ranks, force)
        if stored is None:  # another process stored the same source with the same settings while we waited
            return IngestResult(name=prepared.name, document=store.get(prepared.name), phase1_ran=False)
        phase1_s, document = stored
    else:
        staging = broadcast_object(None, ranks)
        if staging == _STORED_MEANWHILE:
            return IngestResult(name=prepared.name, document=None, phase1_ran=False)
        if staging is None:  # rank 0 failed before Phase 1 and reports why
            raise RankFailure("rank 0 could not start storing the document")
        phase1_s = _phase1(engine, prepared.context_ids, settings, Path(staging), spans, ranks)
        agree(ranks, "storing the document", None)
        document = None
    peaks = gather_objects(report.peak_rss_mb(), ranks)
    if ranks.is_speaker:
        _summary(prepared, settings, phase1_s, document, peaks, engine.device)
    return IngestResult(name=prepared.name, document=document, phase1_ran=True, phase1_s=phase1_s)


# What rank 0 broadcasts instead of its staging folder when the document turned out to be stored already.
_STORED_MEANWHILE = "stored-meanwhile"


def _store_as_speaker(prepared, settings, engine, store, spans, ranks, force):
    """Rank 0 (or the only process): lock, stage, run its share of Phase 1, record every block, publish.

    Returns (Phase 1 seconds, the stored document), or None when a concurrent ingest stored the same source with the
    same settings while this one waited for the lock (nothing to do, as if it had been stored before).
    """
    stage = "before Phase 1"
    try:
        with store.lock(prepared.name, on_wait=report.info):
            if not force and _stored_the_same(store, prepared,
                                              chosen_signature(settings_signature(engine, settings), settings)):
                report.info(f"'{prepared.name}' was just stored from the same source with the same settings by "
                            "another starqa process; nothing to do")
                broadcast_object(_STORED_MEANWHILE, ranks)
                return None
            _refuse_if_stored_meanwhile(store, prepared, force)
            with store.writing(prepared.name, prepared.manifest) as writer:
                writer.write_text(prepared.text, prepared.pages)
                writer.write_context_ids(prepared.context_ids)
                broadcast_object(str(writer.staging), ranks)
                stage = "Phase 1"
                phase1_s = _phase1(engine, prepared.context_ids, settings, writer.staging, spans, ranks)
                stage = "publishing"
                pages_per_block = block_pages(engine.tokenizer, prepared.context_ids,
                                              prepared.manifest["document_token_offset"], spans, prepared.pages,
                                              prepared.text)
                for index, (start, end) in enumerate(spans):
                    writer.record_existing_block(index, start, end, pages_per_block[index])
                prepared.manifest["phase1_s"] = round(phase1_s, 3)
                prepared.manifest["nproc"] = ranks.world
        document = store.get(prepared.name)
    except BaseException as exc:
        if stage == "before Phase 1":
            broadcast_object(None, ranks)
        elif stage == "publishing" and isinstance(exc, Exception):
            agree(ranks, "storing the document", exc)
        raise
    agree(ranks, "storing the document", None)
    return phase1_s, document


def _stored_the_same(store: DocumentStore, prepared: _Prepared, signature: dict) -> bool:
    """Whether the name now holds this very source, stored with the settings this ingest would use."""
    if not store.exists(prepared.name):
        return False
    try:
        manifest = store.get(prepared.name).manifest
    except StarqaError:  # a damaged manifest: not the same, and the refusal below says what to do
        return False
    return (manifest.get("source", {}).get("sha256") == prepared.manifest["source"]["sha256"]
            and not differences(manifest, signature))


def _refuse_if_stored_meanwhile(store: DocumentStore, prepared: _Prepared, force: bool) -> None:
    if store.exists(prepared.name) and not force:  # a concurrent ingest stored it while we waited for the lock
        raise UsageError(f"document '{prepared.name}' was just stored by another starqa process; "
                         "pass --force to replace it")


def _phase1(engine, context_ids, settings: Settings, staging: Path, spans, ranks: Ranks) -> float:
    """This rank's share of Phase 1, each block written as soon as it is encoded; all ranks then agree."""
    mine = block_plan(len(spans), ranks.world, ranks.rank)
    started = time.perf_counter()
    error = None
    with report.progress() as bar:
        task = bar.add_task("Phase 1: encoding blocks", total=len(spans))
        watcher = _BlockFileWatcher(staging, bar, task) if ranks.is_speaker and ranks.distributed else None
        try:
            if str(ranks.rank) == _fail_rank():
                # Shaped like a library's error (CUDA out of memory): not ours, and on several lines.
                raise RuntimeError("injected failure\n(STARQA_FAIL_PHASE1_RANK)")
            kv_dtype = resolve_kv_dtype(settings.kv_dtype, engine.dtype)
            for block in engine.encode_blocks(context_ids, settings.block_size, settings.effective_anchor_size,
                                              block_indices=mine, batch=settings.phase1_batch):
                write_block_file(staging, quantize_block(block, kv_dtype))
                if watcher is None:
                    bar.advance(task)
        except Exception as exc:  # noqa: BLE001 - every rank must hear of it; re-raised by agree()
            if not ranks.distributed:
                raise
            error = exc
        finally:
            if watcher is not None:
                watcher.stop()
        agree(ranks, "Phase 1", error)
        bar.update(task, completed=len(spans))
    return time.perf_counter() - started


def _fail_rank() -> str:
    import os

    return os.environ.get(_FAIL_RANK_ENV, "")


class _BlockFileWatcher:
    """Rank 0's progress across ranks: counts block files appearing in the shared staging folder."""

    def __init__(self, staging: Path, bar, task) -> None:
        self.staging, self.bar, self.task = staging, bar, task
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.5):
            self.bar.update(self.task, completed=sum(1 for _ in (self.staging / "blocks").glob("*.safetensors")))

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _summary(prepared: _Prepared, settings, phase1_s, document, peaks: list[float], device) -> None:
    n_tokens = len(prepared.context_ids)
    rows = [
        ("pages", f"{prepared.manifest['pages']}"),
        ("tokens", f"{n_tokens:,}"),
        ("blocks", f"{len(document.blocks)}"),
        ("block / anchor size", f"{settings.block_size} / {settings.effective_anchor_size}"),
        ("dtype / KV dtype", f"{prepared.manifest['dtype']} / {prepared.manifest['kv_dtype']}"),
        ("Phase 1", f"{phase1_s:.2f} s ({n_tokens / max(phase1_s, 1e-9):,.0f} tokens/s)"),
    ]
    if len(peaks) == 1:
        rows.append(("peak memory (RSS)", f"{peaks[0]:,.0f} MiB"))
    else:
        rows += [(f"peak memory rank {rank} (RSS)", f"{peak:,.0f} MiB") for rank, peak in enumerate(peaks)]
    cuda = report.cuda_peak_mb(device)
    if cuda is not None:
        rows.append(("peak CUDA memory (rank 0)", f"{cuda:,.0f} MiB"))
    rows.append(("KV on disk", f"{report.human_bytes(document.manifest['kv_bytes'])} "
                               f"({report.human_bytes(document.kv_bytes_per_token)} per token)"))
    report.table(f"ingested '{prepared.name}'", rows)


def check_usable(document: StoredDocument, engine, settings: Settings, *, explicit_sizes: bool) -> None:
    """Refuse a stored document whose KV was made with another model, tokenizer, layout or dtype (any stored KV
    precision is read as it is)."""
    signature = settings_signature(engine, settings)
    signature.pop("kv_dtype")
    if not explicit_sizes:  # block sizes are the document's own unless the user asked for others
        signature.pop("block_size")
        signature.pop("anchor_size")
    diffs = differences(document.manifest, signature)
    if diffs:
        raise StarqaError(f"document '{document.name}' was stored with a different {', '.join(diffs)}; "
                          f"{reingest_hint(document)} (with your --model/--dtype)")
