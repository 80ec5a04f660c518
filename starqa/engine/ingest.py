"""Ingest: extract a document, tokenize the context part of the prompt, run Phase 1, and store the KV.

Data flows one way: documents -> tokens -> engine (Phase 1) -> store. Blocks are written as Phase 1 yields them, so
the KV of a long document never has to fit in memory at once. Under torch.distributed, rank 0 prepares the document
and owns the store; every rank encodes its contiguous run of blocks and writes their files into rank 0's staging
folder; the manifest is written and the document published only after all ranks have finished.

A new version of a stored document (--force, --update) takes over every block the version it replaces holds with
the same key (starqa.store.reuse) when both were made with the same settings; only the other blocks run Phase 1, spread
over the ranks as before.
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
from starqa.config import AUTO_BLOCK_SIZE, Settings
from starqa.engine.star_engine import head_blocks, quantize_block
from starqa.store.kv_quant import KEY_GROUP, resolve_kv_dtype
from starqa.engine.distributed import (RankFailure, Ranks, agree, block_plan, broadcast_object, gather_objects,
                                      share_outcome)
from starqa.errors import StarqaError, UsageError
from starqa.store.reuse import anchor_from_block_files, block_keys, reusable_blocks
from starqa.documents.text_positions import block_pages
from starqa.store.document_store import (DamagedDocument, DocumentStore, StoredDocument, block_file_name,
                                         name_from_path, reingest_hint, validate_name, write_block_file)
from starqa.documents.tokens import PROMPT_LAYOUT_VERSION, context_ids_for, plan_blocks, prompt_template

# Test hook: STARQA_FAIL_PHASE1_RANK=N makes rank N raise during Phase 1 (how the fault tests stage a failure).
_FAIL_RANK_ENV = "STARQA_FAIL_PHASE1_RANK"


@dataclass
class IngestResult:
    name: str
    document: StoredDocument | None  # None on ranks other than 0
    phase1_ran: bool  # False when the document was already stored with the same source and settings
    phase1_s: float = 0.0
    blocks_reused: int = 0  # taken over from the version this one replaced
    blocks_encoded: int = 0


@dataclass
class _Prepared:
    name: str
    context_ids: list[int]
    manifest: dict
    text: str
    pages: list[dict]
    stored: bool  # already stored with the same source and settings: nothing to do
    settings: Settings | None = None  # the settings it is stored with: an `auto` block size made a number


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
    """The signature without what the user left to `auto` (dtype, KV dtype, block size): a document stored from the
    same source in another precision (e.g. float32 by an earlier starqa), or with other block sizes, is still the
    document asked for."""
    auto = {key for key, left in (("dtype", settings.dtype == "auto"), ("kv_dtype", settings.kv_dtype == "auto"),
                                  ("block_size", settings.block_size == AUTO_BLOCK_SIZE),
                                  ("anchor_size", settings.block_size == AUTO_BLOCK_SIZE
                                   and settings.anchor_size is None)) if left}
    return {key: value for key, value in signature.items() if key not in auto}


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


def _file_digest(source: str) -> str | None:
    """SHA-256 of a regular file's bytes (None if it cannot be read: extraction then says why)."""
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _stored_version(store: DocumentStore, name: str, replacing: bool) -> StoredDocument | None:
    """The version stored under `name`, if any; a damaged one is refused unless it is to be replaced."""
    if not store.exists(name):
        return None
    try:
        return store.get(name)
    except DamagedDocument:
        if not replacing:
            raise
        report.warn(f"replacing '{name}', whose stored manifest cannot be read")
        return None


def _nothing_to_do(stored: StoredDocument | None, source: str, source_sha256: str, signature: dict, *,
                   force: bool, update: bool) -> bool:
    """Whether the stored version already is this source with these settings (then say so); a name clash without
    --force or --update is a usage error."""
    if stored is None:
        return False
    same_source = stored.manifest.get("source", {}).get("sha256") == source_sha256
    diffs = differences(stored.manifest, signature)
    if same_source and not diffs and not force:
        if update:
            report.info(f"'{stored.name}' is unchanged ({source}): skipped")
        else:
            report.info(f"'{stored.name}' is already stored from the same source with the same settings; nothing to do")
        return True
    if not (force or update):
        what = "a different source file" if not same_source else "different settings: " + ", ".join(diffs)
        raise UsageError(f"document '{stored.name}' is already stored with {what}; pass --force to replace it, "
                         "or --name to store it under another name")
    return False


def _prepare(source, settings, engine, store, *, name, force, update, allow_long, password) -> _Prepared:
    from starqa.documents.extraction import extract_document

    name = validate_name(name if name is not None else name_from_path(source))
    signature = chosen_signature(settings_signature(engine, settings), settings)
    stored = _stored_version(store, name, replacing=force or update)
    # A regular file is hashed before it is extracted: an unchanged one (an `--update` cron job over many files)
    # costs one read, not an extraction. A stream can be read only once: its text identifies it.
    version = _file_version(source)
    source_sha256 = _file_digest(source) if version is not None else None
    nothing = _Prepared(name, [], {}, "", [], stored=True)
    if source_sha256 is not None and _file_version(source) == version and _nothing_to_do(
            stored, source, source_sha256, signature, force=force, update=update):
        return nothing
    with report.progress() as bar:
        pages_task = bar.add_task("extracting pages", total=None)
        extracted = extract_document(source, password=password,
                                     on_page=lambda done, total: bar.update(pages_task, completed=done, total=total))
    for warning in extracted.warnings:
        report.warn(warning)
    if version is None:
        source_sha256 = hashlib.sha256(extracted.text.encode("utf-8")).hexdigest()
    elif source_sha256 is None or _file_version(source) != version:  # saved again while it was hashed or extracted
        raise StarqaError(f"'{source}' changed while it was being read; nothing was stored: try again")
    if _nothing_to_do(stored, source, source_sha256, signature, force=force, update=update):
        return nothing
    record = {"path": str(Path(source).resolve()) if source != "-" else "-", "sha256": source_sha256,
              "kind": extracted.kind}
    pages = [{"number": p.number, "start": p.start, "end": p.end} for p in extracted.pages]
    # An update keeps the stored version's sizes where they were left to `auto`, so its unchanged blocks are taken over
    keep = stored.manifest if update and stored is not None else None
    return _prepared_text(name, record, extracted.text, pages, settings, engine, allow_long=allow_long,
                          label=f"'{source}'", keep_sizes_of=keep)


def _prepared_text(name: str, source: dict, text: str, pages: list[dict], settings, engine, *, allow_long: bool,
                   label: str, keep_sizes_of: dict | None = None) -> _Prepared:
    """The document to store from its extracted text and page map: its prompt's ids (checked against the model's
    window), the settings it is stored with (Settings.sized_for) and its manifest; `source` ({"path", "sha256",
    "kind"}) is what it was extracted from."""
    template = prompt_template(engine.tokenizer)
    document_ids = engine.encode_document_text(text)
    context_ids = context_ids_for(engine.tokenizer, template, document_ids)
    window = engine.context_window
    if window and len(context_ids) > window and not allow_long:
        raise UsageError(
            f"{label} is {len(context_ids):,} tokens with the prompt, but the model reads at most {window:,}; "
            "use a model with a longer context, or pass --allow-long to encode it anyway"
        )
    sliding = engine.sliding_window
    if sliding and len(context_ids) > sliding:
        # Within the window a sliding-window layer attends exactly like a full one; beyond it, Star Attention (which
        # attends to every stored token) would no longer compute what the model computes.
        raise UsageError(
            f"{label} is {len(context_ids):,} tokens with the prompt, but {engine.model_name} attends to only the "
            f"last {sliding:,} tokens in some layers (sliding-window attention), which starqa does not implement; "
            "use a model without a sliding window (e.g. Mistral v0.2 or later) or a shorter document"
        )
    settings = settings.sized_for(len(context_ids), stored=keep_sizes_of)
    manifest = {
        "source": dict(source),
        "model": engine.model_name,
        **settings_signature(engine, settings),
        "tokenizer_engine": engine.tokenizer_engine,
        "tokenizer_engine_reason": engine.tokenizer_engine_reason,
        **({"kv_key_group": KEY_GROUP} if resolve_kv_dtype(settings.kv_dtype, engine.dtype) == "int8" else {}),
        "context_tokens": len(context_ids),
        "document_tokens": len(document_ids),
        "document_token_offset": len(context_ids) - len(document_ids),
        "pages": len(pages),
        "starqa_version": __version__,
    }
    return _Prepared(name, context_ids, manifest, text, pages, stored=False, settings=settings)


def ingest(source: str, settings: Settings, engine, store: DocumentStore, *, name: str | None = None,
           force: bool = False, update: bool = False, allow_long: bool = False, password: str | None = None,
           ranks: Ranks | None = None) -> IngestResult:
    """Ingest one file (or "-" for stdin) as document `name` (default: the file's stem).

    A name already stored from another source or with other settings is refused unless `force` or `update` (which
    replace it, taking over the blocks that did not change); `update` skips a name stored from this very source with
    these settings, `force` stores it again (every block taken over)."""
    ranks = ranks or Ranks()
    prepared = share_outcome(ranks, lambda: _prepare(source, settings, engine, store, name=name, force=force,
                                                     update=update, allow_long=allow_long, password=password))
    if prepared.stored:
        document = store.get(prepared.name) if ranks.is_speaker else None
        return IngestResult(name=prepared.name, document=document, phase1_ran=False)

    settings = prepared.settings
    spans = plan_blocks(len(prepared.context_ids), settings.block_size)
    if ranks.is_speaker:
        stored = _store_as_speaker(prepared, settings, engine, store, spans, ranks, force=force, update=update)
        if stored is None:  # another process stored the same source with the same settings while we waited
            return IngestResult(name=prepared.name, document=store.get(prepared.name), phase1_ran=False)
        phase1_s, document = stored
        encoded = document.manifest["blocks_encoded"]
    else:
        plan = broadcast_object(None, ranks)
        if plan == _STORED_MEANWHILE:
            return IngestResult(name=prepared.name, document=None, phase1_ran=False)
        if plan is None:  # rank 0 failed before Phase 1 and reports why
            raise RankFailure("rank 0 could not start storing the document")
        phase1_s = _phase1(engine, prepared.context_ids, settings, spans, ranks, plan)
        agree(ranks, "storing the document", None)
        document, encoded = None, len(plan.to_encode)
    peaks = gather_objects(report.peak_rss_mb(), ranks)
    if ranks.is_speaker:
        _summary(prepared, settings, phase1_s, document, peaks, engine.device)
    return IngestResult(name=prepared.name, document=document, phase1_ran=True, phase1_s=phase1_s,
                        blocks_reused=len(spans) - encoded, blocks_encoded=encoded)


def ingest_text(name: str, text: str, pages: list[dict], source: dict, settings: Settings, engine,
                store: DocumentStore) -> IngestResult:
    """Store already extracted text with its page map as document `name` in this one process, replacing what the
    name holds (blocks it already has are taken over): a stored document's copy for another model
    (starqa.answer.escalation stores it from the stored text, so its pages and evidence offsets are the original's)."""
    validate_name(name)
    prepared = _prepared_text(name, source, text, pages, settings, engine, allow_long=False, label=f"'{name}'")
    settings = prepared.settings
    spans = plan_blocks(len(prepared.context_ids), settings.block_size)
    stored = _store_as_speaker(prepared, settings, engine, store, spans, Ranks(), force=True, update=False)
    phase1_s, document = stored
    return IngestResult(name=name, document=document, phase1_ran=True, phase1_s=phase1_s,
                        blocks_reused=len(spans) - document.manifest["blocks_encoded"],
                        blocks_encoded=document.manifest["blocks_encoded"])


# What rank 0 broadcasts instead of its Phase 1 plan when the document turned out to be stored already.
_STORED_MEANWHILE = "stored-meanwhile"


@dataclass
class _Phase1Plan:
    """What rank 0 tells every rank before Phase 1 (small and picklable: it is broadcast)."""

    staging: str  # rank 0's staging folder, where every rank writes its block files
    to_encode: list[int]  # the blocks not taken over from the previous version, in order
    anchor_files: list[str] | None  # the head blocks' files (taken over, in the compute dtype): the anchor's KV


def _store_as_speaker(prepared, settings, engine, store, spans, ranks, *, force, update):
    """Rank 0 (or the only process): lock, stage, take over unchanged blocks, run its share of Phase 1, record every
    block, publish.

    Returns (Phase 1 seconds, the stored document), or None when a concurrent ingest stored the same source with the
    same settings while this one waited for the lock (nothing to do, as if it had been stored before).
    """
    stage = "before Phase 1"
    signature = settings_signature(engine, settings)
    try:
        with store.lock(prepared.name, on_wait=report.info):
            if not force and _stored_the_same(store, prepared, chosen_signature(signature, settings)):
                report.info(f"'{prepared.name}' was just stored from the same source with the same settings by "
                            "another starqa process; nothing to do")
                broadcast_object(_STORED_MEANWHILE, ranks)
                return None
            if not (force or update):
                _refuse_if_stored_meanwhile(store, prepared)
            previous = _readable_version(store, prepared.name)  # read under the lock: it cannot change now
            keys = block_keys(prepared.context_ids, spans, settings.effective_anchor_size, signature)
            with store.writing(prepared.name, prepared.manifest, previous=previous) as writer:
                writer.write_text(prepared.text, prepared.pages)
                writer.write_context_ids(prepared.context_ids)
                reused = _take_over_blocks(store, previous, writer, keys, signature)
                plan = _Phase1Plan(str(writer.staging), [i for i in range(len(spans)) if i not in reused],
                                   _anchor_files(writer.staging, reused, signature,
                                                 head_blocks(spans, settings.effective_anchor_size)))
                broadcast_object(plan, ranks)
                stage = "Phase 1"
                phase1_s = _phase1(engine, prepared.context_ids, settings, spans, ranks, plan)
                stage = "publishing"
                pages_per_block = block_pages(engine.tokenizer, prepared.context_ids,
                                              prepared.manifest["document_token_offset"], spans, prepared.pages,
                                              prepared.text)
                for index, (start, end) in enumerate(spans):
                    writer.record_existing_block(index, start, end, pages_per_block[index], key=keys[index],
                                                 reused=index in reused)
                prepared.manifest.update(phase1_s=round(phase1_s, 3), nproc=ranks.world, blocks_reused=len(reused),
                                         blocks_encoded=len(plan.to_encode))
        document = store.get(prepared.name)
    except BaseException as exc:
        if stage == "before Phase 1":
            broadcast_object(None, ranks)
        elif stage == "publishing" and isinstance(exc, Exception):
            agree(ranks, "storing the document", exc)
        raise
    agree(ranks, "storing the document", None)
    return phase1_s, document


def _readable_version(store: DocumentStore, name: str) -> StoredDocument | None:
    try:
        return store.get(name) if store.exists(name) else None
    except StarqaError:  # a damaged manifest (replaced with --force or --update): nothing to take over
        return None


def _take_over_blocks(store: DocumentStore, previous: StoredDocument | None, writer, keys: list[str],
                      signature: dict) -> dict[int, dict]:
    """Link (else copy) into the staging folder every block of `previous` with a key this version has, when both
    were made with the same settings (model, tokenizer, layout, block and anchor size, dtype, KV dtype); a block
    file that no longer matches its checksum is encoded again instead. Returns {index: previous block}."""
    if previous is None or differences(previous.manifest, signature):
        return {}
    candidates = reusable_blocks(previous.blocks, keys)
    intact = store.intact_files(previous, [block["file"] for block in candidates.values()])
    damaged = sorted(index for index, block in candidates.items() if block["file"] not in intact)
    if damaged:
        report.warn(f"'{previous.name}': the stored files of block(s) {', '.join(map(str, damaged))} do not match "
                    "their checksums; encoding them again")
    reused = {index: block for index, block in candidates.items() if block["file"] in intact}
    for block in reused.values():
        writer.take_over_block(previous, block)
    return reused


def _anchor_files(staging: Path, reused: dict[int, dict], signature: dict, head: int) -> list[str] | None:
    """The head blocks' files (block 0, and with an anchor larger than the block every block that starts inside it)
    when all were taken over in the compute dtype: the anchor is then the head of their KV, bit for bit what their
    own pass gives (otherwise it is encoded: a narrower stored KV is not the anchor's)."""
    if any(index not in reused for index in range(head)) or signature["kv_dtype"] != signature["dtype"]:
        return None
    return [str(staging / block_file_name(index)) for index in range(head)]


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


def _refuse_if_stored_meanwhile(store: DocumentStore, prepared: _Prepared) -> None:
    if store.exists(prepared.name):  # a concurrent ingest stored it while we waited for the lock
        raise UsageError(f"document '{prepared.name}' was just stored by another starqa process; "
                         "pass --force to replace it")


def _phase1(engine, context_ids, settings: Settings, spans, ranks: Ranks, plan: _Phase1Plan) -> float:
    """This rank's share of the blocks to encode, each written as soon as it is encoded; all ranks then agree."""
    mine = [plan.to_encode[i] for i in block_plan(len(plan.to_encode), ranks.world, ranks.rank)]
    staging = Path(plan.staging)
    started = time.perf_counter()
    error = None
    with report.progress() as bar:
        task = bar.add_task("Phase 1: encoding blocks", total=len(plan.to_encode))
        watcher = (_BlockFileWatcher(staging, bar, task, taken_over=len(spans) - len(plan.to_encode))
                   if ranks.is_speaker and ranks.distributed else None)
        try:
            if str(ranks.rank) == _fail_rank():
                # Shaped like a library's error (CUDA out of memory): not ours, and on several lines.
                raise RuntimeError("injected failure\n(STARQA_FAIL_PHASE1_RANK)")
            kv_dtype = resolve_kv_dtype(settings.kv_dtype, engine.dtype)
            anchor = None
            anchor_len = min(settings.effective_anchor_size, len(context_ids))
            if plan.anchor_files is not None and mine and min(mine) >= head_blocks(spans, anchor_len):
                anchor = anchor_from_block_files([Path(path) for path in plan.anchor_files], anchor_len,
                                                 engine.device)
            for block in engine.encode_blocks(context_ids, settings.block_size, settings.effective_anchor_size,
                                              block_indices=mine, batch=settings.phase1_batch, anchor=anchor):
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
        bar.update(task, completed=len(plan.to_encode))
    return time.perf_counter() - started


def _fail_rank() -> str:
    import os

    return os.environ.get(_FAIL_RANK_ENV, "")


class _BlockFileWatcher:
    """Rank 0's progress across ranks: counts block files appearing in the shared staging folder."""

    def __init__(self, staging: Path, bar, task, taken_over: int = 0) -> None:
        self.staging, self.bar, self.task, self.taken_over = staging, bar, task, taken_over
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.5):
            written = sum(1 for _ in (self.staging / "blocks").glob("*.safetensors")) - self.taken_over
            self.bar.update(self.task, completed=written)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def _summary(prepared: _Prepared, settings, phase1_s, document, peaks: list[float], device) -> None:
    n_tokens = len(prepared.context_ids)
    manifest = document.manifest
    encoded_tokens = sum(block["end"] - block["start"] for block in document.blocks if not block.get("reused"))
    rate = f"{encoded_tokens / max(phase1_s, 1e-9):,.0f} tokens/s" if encoded_tokens else "nothing to encode"
    rows = [
        ("pages", f"{prepared.manifest['pages']}"),
        ("tokens", f"{n_tokens:,}"),
        ("blocks", f"{len(document.blocks)}"),
        ("blocks reused / encoded", f"{manifest['blocks_reused']} / {manifest['blocks_encoded']}"),
        ("block / anchor size", f"{settings.block_size} / {settings.effective_anchor_size}"),
        ("dtype / KV dtype", f"{prepared.manifest['dtype']} / {prepared.manifest['kv_dtype']}"),
        ("Phase 1", f"{phase1_s:.2f} s ({rate})"),
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
    if not explicit_sizes or settings.block_size == AUTO_BLOCK_SIZE:  # the document's own unless asked for others
        signature.pop("block_size")
        signature.pop("anchor_size")
    diffs = differences(document.manifest, signature)
    if diffs:
        raise StarqaError(f"document '{document.name}' was stored with a different {', '.join(diffs)}; "
                          f"{reingest_hint(document)} (with your --model/--dtype)")
