"""Ask: Phase 2 over a stored document's KV (or, for comparison, full attention over document + question): which
documents, opened (or first ingested) one after another, their questions in batches, each batch a pass of
starqa.answer.passes, or hybrid answering's two passes (starqa.answer.hybrid).

Data flows one way: store -> engine (Phase 2) -> answer. Answering emits events (starqa.answer.events): the answer text
as it is decoded, each question's Answer with its text and the lines printed under it, one timing table per batch, a
line per document that failed. `starqa ask` prints them in its own process (starqa.answer.events.EventPrinter);
`starqa serve` runs this same code and sends the same events to the client, which prints them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from starqa.answer import events, passes
from starqa.governance.audit import document_version
from starqa.engine.distributed import Ranks, share_outcome
from starqa.errors import StarqaError, UsageError
from starqa.answer.passes import EachToken, Emit, emit_replies, load_context_share, timer, timing_table
from starqa.store.document_store import DocumentReplaced, DocumentStore, StoredDocument

__all__ = ["answer_document", "open_document", "run"]

# Reading a stored document while another process replaces it (`ingest --force`, `rm`) fails part-way; the name
# then links to the new version, so reading again answers from that one.
_READ_ATTEMPTS = 3


def resolve_documents(store: DocumentStore, docs: Sequence[str], all_documents: bool, *,
                      files: bool = True) -> list[str]:
    """The --doc values (stored names, globs over stored names, or files to ingest first), or every stored name
    with --all, in the order given (each once). A glob that matches nothing is a usage error naming it.
    `files=False` (a server): a value is never a path on this machine, only a name or a glob."""
    import fnmatch
    from pathlib import Path

    if all_documents:
        if docs:
            raise UsageError("--all asks every stored document; drop --doc, or drop --all")
        names = store.names()
        if not names:
            raise UsageError(f"--all: no documents stored in {store.root}; ingest some first")
        return names
    if not docs:
        raise UsageError("give --doc NAME (a stored document, a glob over stored names, or a file), or --all")
    resolved: list[str] = []
    for doc in docs:
        if is_valid_name(doc) and store.exists(doc) or files and Path(doc).exists() or not is_glob(doc):
            matches = [doc]
        else:
            matches = fnmatch.filter(store.names(), doc)
            if not matches:
                raise UsageError(f"--doc '{doc}' matches no stored document; `starqa list` shows what is stored")
        resolved += [match for match in matches if match not in resolved]
    return resolved


def is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def engine_for(manifest: dict, settings, explicit_model: str | None) -> tuple[str | None, str | None]:
    """(model, dtype) to load for a stored document: the model and compute dtype it was stored with, unless asked
    otherwise (dtype None: the settings' own)."""
    return explicit_model or manifest.get("model"), manifest.get("dtype") if settings.dtype == "auto" else None


def run(engine_loader, settings, store: DocumentStore, *, docs: Sequence[str], all_documents: bool = False,
        questions: list[str], attention: str, name: str | None, explicit_model: str | None, explicit_sizes: bool,
        ranks: Ranks, emit: Emit, stream: bool = True, ingest_options: dict | None = None, files: bool = True,
        load_kv=None, each_token: EachToken | None = None) -> int:
    """The `ask` command over one or several documents: one model load (per model and dtype the documents were
    stored with); each document's KV is loaded, used for every question and released before the next one, so
    memory is bounded by the largest document. Returns the exit code: with several documents, one that fails
    (unknown, damaged) is reported on its own line and the others are still answered; 1 if any failed.

    Events go to `emit` (answer text as decoded only with `stream`). A server passes `files=False` (a --doc value
    is never a file to ingest), `load_kv(engine, store, document)`, its memory of documents' KV, and `each_token`,
    its check (per decoded token) that the client is still there."""
    targets = share_outcome(ranks, lambda: resolve_documents(store, docs, all_documents, files=files))
    if name is not None and len(targets) > 1:
        raise UsageError("--name names one document; drop it to ask several")
    engines: dict[tuple, object] = {}

    def load_engine(model: str | None, dtype: str | None):
        key = (model, dtype)
        if key not in engines:
            engines.clear()  # one model in memory at a time
            engines[key] = engine_loader(model, dtype)
        return engines[key]

    options = dict(questions=questions, attention=attention, explicit_model=explicit_model,
                   explicit_sizes=explicit_sizes, ranks=ranks, emit=emit, stream=stream,
                   ingest_options=ingest_options, files=files, load_kv=load_kv, each_token=each_token,
                   escalation=_escalation(settings, attention, engine_loader, store))
    if len(targets) == 1:
        answer_document(load_engine, settings, store, doc=targets[0], name=name, **options)
        return 0
    failed = 0
    for doc in targets:
        emit(events.document(doc))
        try:
            answer_document(load_engine, settings, store, doc=doc, name=None, **options)
        except StarqaError as exc:  # every rank raises the same error (agree/share_outcome): all go on together
            failed += 1
            emit(events.error(f"{doc}: {exc}"))
    if failed:
        emit(events.error(f"{failed} of {len(targets)} documents failed"))
        return 1
    return 0


def _escalation(settings, attention: str, engine_loader, store: DocumentStore):
    """Hybrid's second pass when it goes to another model (settings.escalate_to, starqa.answer.escalation), else
    None."""
    if attention != "hybrid" or settings.escalate_to == "full":
        return None
    from starqa.answer.escalation import FULL, Escalation, check_target

    model = check_target(settings.escalate_to, settings, attention=attention, explicit=False)
    return Escalation(None if model == FULL else model, engine_loader, store)


@dataclass
class OpenDocument:
    """A document ready to be asked: the engine for it, its stored version and its context (KV for star
    attention; the prompt's context ids for full attention, on the speaking rank)."""

    engine: object
    document: StoredDocument
    context: object
    cache_hit: bool  # Phase 1 did not run for this ask
    phase1_s: float
    load_s: float  # finding (or ingesting) the document, loading the model and the KV
    escalation: object = None  # hybrid's second pass to another model (starqa.answer.escalation.Escalation), or None


def answer_document(load_engine, settings, store: DocumentStore, *, doc: str, questions: list[str], attention: str,
                    name: str | None, explicit_model: str | None, explicit_sizes: bool, ranks: Ranks, emit: Emit,
                    stream: bool = True, ingest_options: dict | None = None, files: bool = True,
                    load_kv=None, each_token: EachToken | None = None, escalation=None) -> None:
    """Find (or first ingest) one document, load its KV, answer every question, release the KV.

    `ingest_options` (force, allow_long, password) apply when `doc` is a file to ingest first.
    """
    opened = open_document(load_engine, settings, store, doc=doc, attention=attention, name=name,
                           explicit_model=explicit_model, explicit_sizes=explicit_sizes, ranks=ranks,
                           ingest_options=ingest_options, files=files, load_kv=load_kv)
    opened.escalation = escalation
    answer_questions(opened, questions, settings, attention=attention, ranks=ranks, emit=emit, stream=stream,
                     each_token=each_token)
    if escalation is not None:
        escalation.release()
    # `opened` and its KV are released here, before the next document's KV is read


def open_document(load_engine, settings, store: DocumentStore, *, doc: str, attention: str, name: str | None,
                  explicit_model: str | None, explicit_sizes: bool, ranks: Ranks, ingest_options: dict | None = None,
                  files: bool = True, load_kv=None) -> OpenDocument:
    """The engine for `doc` (a stored name, or with `files` a file ingested first), its current version checked
    against that engine, and its context, read again if another process replaced the document meanwhile."""
    from starqa.engine.ingest import check_usable, ingest
    from starqa.store.document_store import validate_name

    ingest_options = {key: value for key, value in (ingest_options or {}).items() if value}
    elapsed = timer()
    stored_name = doc if is_valid_name(doc) and store.exists(doc) else None
    if stored_name is not None and ingest_options:
        flags = ", ".join("--" + key.replace("_", "-") for key in ingest_options)
        raise UsageError(f"{flags} apply when --doc is a file to ingest, and '{doc}' is a stored document name")
    if stored_name is not None:
        manifest = share_outcome(ranks, lambda: store.get(stored_name)).manifest
        engine = load_engine(*engine_for(manifest, settings, explicit_model))
        cache_hit, phase1_s = True, 0.0
    else:
        from pathlib import Path

        if not (files and Path(doc).exists()):
            validate_name(doc)
            store.get(doc)  # raises: no such document (with close names)
        engine = load_engine(explicit_model, None)
        result = ingest(doc, settings, engine, store, name=name, ranks=ranks, **ingest_options)
        stored_name, cache_hit, phase1_s = result.name, not result.phase1_ran, result.phase1_s

    for attempt in range(_READ_ATTEMPTS):
        # Rank 0 picks the version every rank reads: a link swapped between two ranks' reads cannot mix versions.
        document = share_outcome(ranks, lambda: store.get(stored_name))
        check_usable(document, engine, settings, explicit_sizes=explicit_sizes)
        try:
            if attention in ("star", "hybrid") and load_kv is not None:  # hybrid: Star first (starqa.answer.hybrid)
                context = load_kv(engine, store, document)
            elif attention in ("star", "hybrid"):
                context = load_context_share(engine, store, document, ranks, len(document.blocks))
            else:  # full attention encodes the stored text again, once for all the questions
                context = passes.full_context_ids(engine, document) if ranks.is_speaker else None
            break
        except DocumentReplaced:  # (several processes agree on failures as a RankFailure, not retried)
            if attempt == _READ_ATTEMPTS - 1:
                raise
    return OpenDocument(engine, document, context, cache_hit, phase1_s, elapsed())


def answer_questions(opened: OpenDocument, questions: list[str], settings, *, attention: str, ranks: Ranks,
                     emit: Emit, stream: bool = True, each_token: EachToken | None = None) -> None:
    """Every question, in batches of the settings' batch size (star and hybrid attention; full attention: one at a
    time)."""
    engine, document = opened.engine, opened.document
    batch = settings.batch_size if attention in ("star", "hybrid") else 1
    for first in range(0, len(questions), batch):
        asked = questions[first:first + batch]
        send = (lambda row, text, first=first: emit(events.delta(document.name, first + row, text))) if stream else None
        if attention == "hybrid":  # Star, then full attention for the answers not grounded (starqa.answer.hybrid)
            from starqa.answer import hybrid

            hybrid.answer_batch(opened, asked, first, settings, ranks=ranks, emit=emit, each_token=each_token)
            continue
        document_pass = True
        if attention == "star":
            replies = passes.ask_star(engine, opened.context, document, asked, settings, cache_hit=opened.cache_hit,
                               phase1_s=opened.phase1_s if first == 0 else 0.0, stream=send, ranks=ranks,
                               each_token=each_token)
        elif ranks.is_speaker:
            full, context_s = passes.full_context(opened)  # the document's causal pass: once, for every question
            replies = passes.ask_full(engine, document, full, asked, settings, context_s=context_s, stream=send,
                                      each_token=each_token)
            document_pass = context_s > 0
        else:
            continue  # one full-attention pass needs one process; the other ranks of a torchrun job only wait
        emit_replies(emit, document.name, first, replies, document_version(document, engine))
        emit(events.timings(*timing_table([reply.answer for reply in replies], engine,
                                          opened.load_s if first == 0 else None,
                                          document.kv_dtype if attention == "star" else None,
                                          document_pass=document_pass)))


def is_valid_name(doc: str) -> bool:
    from starqa.store.document_store import validate_name

    try:
        validate_name(doc)
    except UsageError:
        return False
    return True
