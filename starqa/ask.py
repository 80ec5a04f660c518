"""Ask: Phase 2 over a stored document's KV (or, for comparison, full attention over document + question).

Data flows one way: store -> engine (Phase 2) -> answer. Answering emits events (starqa.events): the answer text as
it is decoded, each question's Answer with its text and the lines printed under it, one timing table per batch, a
line per document that failed. `starqa ask` prints them in its own process (starqa.events.EventPrinter);
`starqa serve` runs this same code and sends the same events to the client, which prints them the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starqa import events, report
from starqa.answer import Answer
from starqa.audit import document_version
from starqa.distributed import Ranks, agree, block_plan, phase2_spread, share_outcome
from starqa.context_kv import ContextKV
from starqa.errors import StarqaError, UsageError
from starqa.evidence.collect import answer_evidence, observer_for
from starqa.evidence.quotes import answer_trailer_lines
from starqa.store import DocumentReplaced, DocumentStore, StoredDocument, reingest_hint
from starqa.tokens import context_ids_for, prompt_template, query_ids_for

__all__ = ["Answer", "Reply", "answer_document", "answer_lines", "answer_text", "ask_full", "ask_star", "load_context",
           "run"]

Emit = Callable[[dict], None]  # where events go: a printer, or a server's queue for one request
Stream = Callable[[int, str], None]  # (row of the batch, text decoded since the last call)
EachToken = Callable[[], None]  # called once per decoded token (a server's check that its client is still there)


@dataclass
class Reply:
    """One question's outcome: its Answer (the JSON object) and its text as printed (decoded, not stripped)."""

    answer: Answer
    text: str


def answer_lines(answer: Answer) -> list[str]:
    """The lines printed under an answer's text: its evidence quotes, whether it is grounded in them, then its
    sources (`Sources: pp. 6–7`) (starqa.evidence.answer_trailer_lines)."""
    return answer_trailer_lines(answer)


def load_context(engine, store: DocumentStore, document: StoredDocument,
                 block_indices: Sequence[int] | None = None) -> ContextKV:
    """Read (and check) the stored blocks into one contiguous KV per layer, in their stored precision."""
    from starqa.kv_quant import KEY_GROUP

    if document.kv_dtype == "int8" and document.manifest.get("kv_key_group") != KEY_GROUP:
        raise StarqaError(f"document '{document.name}' holds int8 KV quantized in groups of "
                          f"{document.manifest.get('kv_key_group')} tokens, which this starqa does not read; "
                          f"{reingest_hint(document)}")
    indices = [block["index"] for block in document.blocks] if block_indices is None else list(block_indices)
    by_index = {block["index"]: block for block in document.blocks}
    spans = [(by_index[i]["start"], by_index[i]["end"]) for i in indices]
    held = sum(end - start for start, end in spans)
    # load_blocks is a generator: each block is read, copied into place and dropped before the next is read
    blocks = store.load_blocks(document, indices, device=engine.device)
    return engine.context_from_blocks(blocks, document.manifest["context_tokens"], held,
                                      kv_dtype=document.kv_dtype, spans=spans)


class _TextStream:
    """Each row's answer text as it is decoded: `stream(row, text since the last call)`. A row's text is held back
    while it ends in an incomplete UTF-8 sequence; stop tokens are not text. Without `stream` the text is decoded
    once, at the end (`text`); `each_token()` runs for every token and may raise to stop decoding."""

    def __init__(self, tokenizer, stop_ids, rows: int, stream: Stream | None,
                 each_token: EachToken | None = None) -> None:
        self.tokenizer, self.stop_ids, self.stream, self.each_token = tokenizer, stop_ids, stream, each_token
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.sent = [0] * rows  # characters of each row's text already streamed

    def __call__(self, row: int, token: int) -> None:
        if self.each_token is not None:
            self.each_token()
        if token in self.stop_ids:
            return
        self.ids[row].append(token)
        if self.stream is None:
            return
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if len(text) > self.sent[row]:
            self.stream(row, text[self.sent[row]:])
            self.sent[row] = len(text)

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.ids[row], skip_special_tokens=True)


def answer_text(engine, new_ids: Sequence[int]) -> str:
    """A decoded answer's text (stop tokens dropped, stripped): `Answer.answer` for these generated ids."""
    kept = [token for token in new_ids if token not in engine.stop_ids]
    return engine.tokenizer.decode(kept, skip_special_tokens=True).strip()


def ask_star(engine, ctx: ContextKV, document: StoredDocument, questions: Sequence[str], settings, *,
             cache_hit: bool, phase1_s: float, stream: Stream | None = None,
             ranks: Ranks | None = None, each_token: EachToken | None = None) -> list[Reply]:
    """Phase 2 for a batch of questions over the document's context KV (decoded together), replies in order;
    `stream(row, text)` receives each row's text as it is decoded."""
    ranks = ranks or Ranks()
    template = prompt_template(engine.tokenizer)
    query_ids = [query_ids_for(engine.tokenizer, template, question) for question in questions]
    shares = [observer_for(engine, ctx.spans, document.manifest["document_token_offset"], ranks=ranks)
              for _ in questions]
    texts = _TextStream(engine.tokenizer, engine.stop_ids, len(questions), stream if ranks.is_speaker else None,
                        each_token)
    new_ids = engine.generate_batch(ctx, query_ids, max_new_tokens=settings.max_new_tokens,
                                    temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                                    on_token=texts, observers=shares, **phase2_spread(ranks))
    stats = engine.last_stats
    replies = []
    for row, (question, ids, observer) in enumerate(zip(questions, new_ids, shares)):
        text = texts.text(row)
        found = answer_evidence(engine, document, observer, text.strip(), question, ranks)  # every rank calls it
        replies.append(Reply(Answer(
            question=question, answer=text.strip(), doc=document.name, attention="star", cache_hit=cache_hit,
            context_tokens=ctx.n_tokens, query_tokens=len(query_ids[row]), answer_tokens=len(ids),
            phase1_s=phase1_s if row == 0 else 0.0, prefill_s=stats.prefill_s, ttft_s=stats.ttft_s,
            decode_tokens_per_s=stats.decode_tokens_per_s, sources=found.sources, evidence=found.evidence,
            grounded=found.grounded), text))
    return replies


def ask_full(engine, document: StoredDocument, context_ids: list[int], question: str, settings, *,
             stream: Stream | None = None, each_token: EachToken | None = None) -> Reply:
    """Full attention for comparison: document and question in one causal pass, no stored KV used."""
    query_ids = query_ids_for(engine.tokenizer, prompt_template(engine.tokenizer), question)
    texts = _TextStream(engine.tokenizer, engine.stop_ids, 1, stream, each_token)
    spans = [(block["start"], block["end"]) for block in document.blocks]  # the stored blocks name the sources
    observer = observer_for(engine, spans, document.manifest["document_token_offset"])
    new_ids = engine.generate_full(context_ids + query_ids, max_new_tokens=settings.max_new_tokens,
                                   temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                                   on_token=lambda token: texts(0, token), observe_prefix=observer)
    stats = engine.last_stats
    text = texts.text(0)
    found = answer_evidence(engine, document, observer, text.strip(), question)
    return Reply(Answer(question=question, answer=text.strip(), doc=document.name, attention="full",
                        cache_hit=False, context_tokens=len(context_ids), query_tokens=len(query_ids),
                        answer_tokens=len(new_ids), phase1_s=0.0, prefill_s=stats.prefill_s, ttft_s=stats.ttft_s,
                        decode_tokens_per_s=stats.decode_tokens_per_s, sources=found.sources,
                        evidence=found.evidence, grounded=found.grounded), text)


def timing_table(answers: Sequence[Answer], engine, load_s: float | None = None, kv_dtype: str | None = None,
                 together: int | None = None) -> tuple[str, list[tuple[str, str]]]:
    """The title and rows of one batch's timing table (stderr). `together`: the questions decoded at once, when a
    server decoded other requests' questions with these."""
    answer = answers[0]
    together = len(answers) if together is None else together
    rows = []
    if load_s is not None:
        rows.append(("load (model + KV)", f"{load_s:.2f} s"))
    rows.append(("dtype / KV dtype", f"{str(engine.dtype).removeprefix('torch.')} / {kv_dtype or '-'}"))
    if answer.phase1_s:
        rows.append(("Phase 1", f"{answer.phase1_s:.2f} s"))
    label = "Phase 2 prefill" if answer.attention == "star" else "full-attention prefill"
    prompt_tokens = sum(a.query_tokens for a in answers) + (answer.context_tokens if answer.attention == "full" else 0)
    rows += [
        (label, f"{answer.prefill_s:.3f} s ({prompt_tokens} tokens)"),
        ("time to first token", f"{answer.ttft_s:.3f} s"),
        ("decode", f"{answer.decode_tokens_per_s:.1f} tokens/s" + (f" per question ({together} at once)"
                                                                   if together > 1 else "")
         + f" ({sum(a.answer_tokens for a in answers)} tokens)"),
        ("peak memory (RSS)", f"{report.peak_rss_mb():,.0f} MiB"),
    ]
    cuda = report.cuda_peak_mb(engine.device)
    if cuda is not None:
        rows.append(("peak CUDA memory", f"{cuda:,.0f} MiB"))
    what = "1 question" if len(answers) == 1 else f"{len(answers)} questions"
    return (f"{answer.attention} attention over '{answer.doc}' ({answer.context_tokens:,} context tokens, {what})",
            rows)


def emit_replies(emit: Emit, doc: str, first: int, replies: Sequence[Reply], version: dict | None = None) -> None:
    """The answer events of a batch whose first question is the document's question number `first`; `version`:
    the stored version that answered (starqa.audit.document_version)."""
    for row, reply in enumerate(replies):
        emit(events.answer(doc, first + row, reply.answer.to_row(), reply.text, answer_lines(reply.answer), version))


def timer() -> Callable[[], float]:
    started = time.perf_counter()
    return lambda: time.perf_counter() - started


def load_context_share(engine, store: DocumentStore, document: StoredDocument, ranks: Ranks,
                       n_blocks: int) -> ContextKV:
    """This rank's contiguous run of the stored blocks (all of them in one process); every rank must succeed."""
    error, ctx = None, None
    try:
        ctx = load_context(engine, store, document, block_plan(n_blocks, ranks.world, ranks.rank))
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it; re-raised by agree()
        if not ranks.distributed:
            raise
        error = exc
    agree(ranks, "loading the KV", error)
    return ctx


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
        if _is_valid_name(doc) and store.exists(doc) or files and Path(doc).exists() or not _is_glob(doc):
            matches = [doc]
        else:
            matches = fnmatch.filter(store.names(), doc)
            if not matches:
                raise UsageError(f"--doc '{doc}' matches no stored document; `starqa list` shows what is stored")
        resolved += [match for match in matches if match not in resolved]
    return resolved


def _is_glob(text: str) -> bool:
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
    """Hybrid's second pass when it goes to another model (settings.escalate_to, starqa.escalation), else None."""
    if attention != "hybrid" or settings.escalate_to == "full":
        return None
    from starqa.escalation import FULL, Escalation, check_target

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
    escalation: object = None  # hybrid's second pass to another model (starqa.escalation.Escalation), or None


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
    from starqa.ingest import check_usable, ingest
    from starqa.store import validate_name

    ingest_options = {key: value for key, value in (ingest_options or {}).items() if value}
    elapsed = timer()
    stored_name = doc if _is_valid_name(doc) and store.exists(doc) else None
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
            if attention in ("star", "hybrid") and load_kv is not None:  # hybrid: Star first (starqa.hybrid)
                context = load_kv(engine, store, document)
            elif attention in ("star", "hybrid"):
                context = load_context_share(engine, store, document, ranks, len(document.blocks))
            else:  # full attention encodes the stored text again, once for all the questions
                context = context_ids_for(engine.tokenizer, prompt_template(engine.tokenizer),
                                          engine.encode_document_text(document.text())) if ranks.is_speaker else None
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
        if attention == "hybrid":  # Star, then full attention for the answers not grounded (starqa.hybrid)
            from starqa import hybrid

            hybrid.answer_batch(opened, asked, first, settings, ranks=ranks, emit=emit)
            continue
        if attention == "star":
            replies = ask_star(engine, opened.context, document, asked, settings, cache_hit=opened.cache_hit,
                               phase1_s=opened.phase1_s if first == 0 else 0.0, stream=send, ranks=ranks,
                               each_token=each_token)
        elif ranks.is_speaker:
            replies = [ask_full(engine, document, opened.context, asked[0], settings, stream=send,
                                each_token=each_token)]
        else:
            continue  # one full-attention pass needs one process; the other ranks of a torchrun job only wait
        emit_replies(emit, document.name, first, replies, document_version(document, engine))
        emit(events.timings(*timing_table([reply.answer for reply in replies], engine,
                                          opened.load_s if first == 0 else None,
                                          document.kv_dtype if attention == "star" else None)))


def _is_valid_name(doc: str) -> bool:
    from starqa.store import validate_name

    try:
        validate_name(doc)
    except UsageError:
        return False
    return True
