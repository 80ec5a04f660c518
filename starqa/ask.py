"""Ask: Phase 2 over a stored document's KV (or, for comparison, full attention over document + question).

Data flows one way: store -> engine (Phase 2) -> answer. The answer streams to stdout as it is decoded; timings go
to stderr; with --json each question's result is one JSON object on one line of stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from starqa import report
from starqa.distributed import Ranks, agree, block_plan, phase2_spread, share_outcome
from starqa.context_kv import ContextKV
from starqa.errors import StarqaError, UsageError
from starqa.evidence import answer_evidence, answer_trailer_lines, observer_for
from starqa.store import DocumentReplaced, DocumentStore, StoredDocument, reingest_hint
from starqa.tokens import context_ids_for, prompt_template, query_ids_for


@dataclass
class Answer:
    question: str
    answer: str
    doc: str
    attention: str  # "star" or "full"
    cache_hit: bool
    context_tokens: int
    query_tokens: int
    answer_tokens: int
    phase1_s: float
    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    sources: list = field(default_factory=list)  # [{"pages": [4, 5], "block": 3, "share": 0.41}, ...]
    evidence: list = field(default_factory=list)  # [{"page", "text", "start", "end", "score"}, ...] (text.txt)
    grounded: bool = False  # the answer's content is in one evidence quote (starqa.evidence)

    def to_json(self) -> str:
        row = asdict(self)
        for key in ("phase1_s", "prefill_s", "ttft_s", "decode_tokens_per_s"):
            row[key] = round(row[key], 4)
        return json.dumps(row, ensure_ascii=False)


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


class _StreamPrinter:
    """Prints a batch's answers in question order: the first streams as its tokens arrive, the others (decoded
    alongside it) follow when the batch is done, each under its own answer with its sources."""

    def __init__(self, tokenizer, stop_ids, rows: int = 1) -> None:
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.out = sys.stdout  # looked up now, not at import: a caller may have redirected stdout since
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.printed = ""  # of the first answer

    def __call__(self, row: int, token: int) -> None:
        if token in self.stop_ids:
            return
        self.ids[row].append(token)
        if row == 0:
            text = self.tokenizer.decode(self.ids[0], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def close(self, trailers: Sequence[str]) -> None:
        """End every answer, each followed by its trailer lines (sources), in question order."""
        for row, trailer in enumerate(trailers):
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            self.out.write(text[len(self.printed):] if row == 0 else text)
            self.out.write("\n" + (trailer + "\n" if trailer else ""))
            self.out.flush()


def answer_text(engine, new_ids: list[int]) -> str:
    kept = [token for token in new_ids if token not in engine.stop_ids]
    return engine.tokenizer.decode(kept, skip_special_tokens=True).strip()


def ask_star(engine, ctx: ContextKV, document: StoredDocument, questions: Sequence[str], settings, *,
             cache_hit: bool, phase1_s: float, stream: bool, ranks: Ranks | None = None) -> list[Answer]:
    """Phase 2 for a batch of questions over the document's context KV (decoded together), answers in order."""
    ranks = ranks or Ranks()
    template = prompt_template(engine.tokenizer)
    query_ids = [query_ids_for(engine.tokenizer, template, question) for question in questions]
    shares = [observer_for(engine, ctx.spans, document.manifest["document_token_offset"], ranks=ranks)
              for _ in questions]
    printer = _StreamPrinter(engine.tokenizer, engine.stop_ids, len(questions)) if stream and ranks.is_speaker else None
    new_ids = engine.generate_batch(ctx, query_ids, max_new_tokens=settings.max_new_tokens,
                                    temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                                    on_token=printer, observers=shares, **phase2_spread(ranks))
    stats = engine.last_stats
    texts = [answer_text(engine, ids) for ids in new_ids]
    found = [answer_evidence(engine, document, row_shares, text, question, ranks)
             for row_shares, text, question in zip(shares, texts, questions)]
    answers = [Answer(question=question, answer=texts[row], doc=document.name, attention="star",
                      cache_hit=cache_hit, context_tokens=ctx.n_tokens, query_tokens=len(query_ids[row]),
                      answer_tokens=len(ids), phase1_s=phase1_s if row == 0 else 0.0, prefill_s=stats.prefill_s,
                      ttft_s=stats.ttft_s, decode_tokens_per_s=stats.decode_tokens_per_s, sources=found[row].sources,
                      evidence=found[row].evidence, grounded=found[row].grounded)
               for row, (question, ids) in enumerate(zip(questions, new_ids))]
    if printer is not None:
        printer.close(["\n".join(answer_trailer_lines(answer)) for answer in answers])
    return answers


def ask_full(engine, document: StoredDocument, context_ids: list[int], question: str, settings, *,
             stream: bool) -> Answer:
    """Full attention for comparison: document and question in one causal pass, no stored KV used."""
    query_ids = query_ids_for(engine.tokenizer, prompt_template(engine.tokenizer), question)
    printer = _StreamPrinter(engine.tokenizer, engine.stop_ids) if stream else None
    spans = [(block["start"], block["end"]) for block in document.blocks]  # the stored blocks name the sources
    observer = observer_for(engine, spans, document.manifest["document_token_offset"])
    new_ids = engine.generate_full(context_ids + query_ids, max_new_tokens=settings.max_new_tokens,
                                   temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                                   on_token=None if printer is None else (lambda token: printer(0, token)),
                                   observe_prefix=observer)
    stats = engine.last_stats
    text = answer_text(engine, new_ids)
    found = answer_evidence(engine, document, observer, text, question)
    answer = Answer(question=question, answer=text, doc=document.name, attention="full",
                    cache_hit=False, context_tokens=len(context_ids), query_tokens=len(query_ids),
                    answer_tokens=len(new_ids), phase1_s=0.0, prefill_s=stats.prefill_s, ttft_s=stats.ttft_s,
                    decode_tokens_per_s=stats.decode_tokens_per_s, sources=found.sources, evidence=found.evidence,
                    grounded=found.grounded)
    if printer is not None:
        printer.close(["\n".join(answer_trailer_lines(answer))])
    return answer


def print_timings(answers: Sequence[Answer], engine, load_s: float | None = None, kv_dtype: str | None = None) -> None:
    """One table per batch of questions (stderr)."""
    answer = answers[0]
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
        ("decode", f"{answer.decode_tokens_per_s:.1f} tokens/s" + (f" per question ({len(answers)} at once)"
                                                                   if len(answers) > 1 else "")
         + f" ({sum(a.answer_tokens for a in answers)} tokens)"),
        ("peak memory (RSS)", f"{report.peak_rss_mb():,.0f} MiB"),
    ]
    cuda = report.cuda_peak_mb(engine.device)
    if cuda is not None:
        rows.append(("peak CUDA memory", f"{cuda:,.0f} MiB"))
    what = "1 question" if len(answers) == 1 else f"{len(answers)} questions"
    report.table(f"{answer.attention} attention over '{answer.doc}' ({answer.context_tokens:,} context tokens, "
                 f"{what})", rows)


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


def resolve_documents(store: DocumentStore, docs: Sequence[str], all_documents: bool) -> list[str]:
    """The --doc values (stored names, globs over stored names, or files to ingest first), or every stored name
    with --all, in the order given (each once). A glob that matches nothing is a usage error naming it."""
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
        if _is_valid_name(doc) and store.exists(doc) or Path(doc).exists() or not _is_glob(doc):
            matches = [doc]
        else:
            matches = fnmatch.filter(store.names(), doc)
            if not matches:
                raise UsageError(f"--doc '{doc}' matches no stored document; `starqa list` shows what is stored")
        resolved += [match for match in matches if match not in resolved]
    return resolved


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def run(engine_loader, settings, store: DocumentStore, *, docs: Sequence[str], all_documents: bool = False,
        questions: list[str], as_json: bool, attention: str, name: str | None, explicit_model: str | None,
        explicit_sizes: bool, ranks: Ranks, ingest_options: dict | None = None) -> int:
    """The `ask` command over one or several documents: one model load (per model and dtype the documents were
    stored with); each document's KV is loaded, used for every question and released before the next one, so
    memory is bounded by the largest document. Returns the exit code: with several documents, one that fails
    (unknown, damaged) is reported on its own line and the others are still answered; 1 if any failed."""
    targets = share_outcome(ranks, lambda: resolve_documents(store, docs, all_documents))
    if name is not None and len(targets) > 1:
        raise UsageError("--name names one document; drop it to ask several")
    engines: dict[tuple, object] = {}

    def load_engine(model: str | None, dtype: str | None):
        key = (model, dtype)
        if key not in engines:
            engines.clear()  # one model in memory at a time
            engines[key] = engine_loader(model, dtype)
        return engines[key]

    if len(targets) == 1:
        answer_document(load_engine, settings, store, doc=targets[0], questions=questions, as_json=as_json,
                        attention=attention, name=name, explicit_model=explicit_model,
                        explicit_sizes=explicit_sizes, ranks=ranks, ingest_options=ingest_options)
        return 0
    failed = 0
    for doc in targets:
        if ranks.is_speaker and not as_json:
            print(f"== {doc} ==", flush=True)
        try:
            answer_document(load_engine, settings, store, doc=doc, questions=questions, as_json=as_json,
                            attention=attention, name=None, explicit_model=explicit_model,
                            explicit_sizes=explicit_sizes, ranks=ranks, ingest_options=ingest_options)
        except StarqaError as exc:  # every rank raises the same error (agree/share_outcome): all go on together
            failed += 1
            if ranks.is_speaker:
                report.error(f"{doc}: {exc}")
    if failed:
        if ranks.is_speaker:
            report.error(f"{failed} of {len(targets)} documents failed")
        return 1
    return 0


def answer_document(load_engine, settings, store: DocumentStore, *, doc: str, questions: list[str], as_json: bool,
                    attention: str, name: str | None, explicit_model: str | None, explicit_sizes: bool,
                    ranks: Ranks, ingest_options: dict | None = None) -> None:
    """Find (or first ingest) one document, load its KV, answer every question, release the KV.

    `ingest_options` (force, allow_long, password) apply when `doc` is a file to ingest first.
    """
    from starqa.ingest import check_usable, ingest
    from starqa.store import validate_name

    ingest_options = {key: value for key, value in (ingest_options or {}).items() if value}
    elapsed = timer()
    stored_name = doc if _is_valid_name(doc) and store.exists(doc) else None
    if stored_name is not None and ingest_options:
        flags = ", ".join("--" + key.replace("_", "-") for key in ingest_options)
        raise UsageError(f"{flags} apply when --doc is a file to ingest, and '{doc}' is a stored document name")
    if stored_name is not None:
        # A stored document is answered with the model and compute dtype it was stored with, unless asked otherwise.
        manifest = share_outcome(ranks, lambda: store.get(stored_name)).manifest
        engine = load_engine(explicit_model or manifest.get("model"),
                             manifest.get("dtype") if settings.dtype == "auto" else None)
        cache_hit, phase1_s = True, 0.0
    else:
        from pathlib import Path

        if not Path(doc).exists():
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
            if attention == "star":
                context = load_context_share(engine, store, document, ranks, len(document.blocks))
            else:  # full attention encodes the stored text again, once for all the questions
                context = context_ids_for(engine.tokenizer, prompt_template(engine.tokenizer),
                                          engine.encode_document_text(document.text())) if ranks.is_speaker else None
            break
        except DocumentReplaced:  # (several processes agree on failures as a RankFailure, not retried)
            if attempt == _READ_ATTEMPTS - 1:
                raise
    load_s = elapsed()
    batch = settings.batch_size if attention == "star" else 1
    for first in range(0, len(questions), batch):
        asked = questions[first:first + batch]
        stream = not as_json
        if attention == "star":
            answers = ask_star(engine, context, document, asked, settings, cache_hit=cache_hit,
                               phase1_s=phase1_s if first == 0 else 0.0, stream=stream, ranks=ranks)
        elif ranks.is_speaker:
            answers = [ask_full(engine, document, context, asked[0], settings, stream=stream)]
        else:
            continue  # one full-attention pass needs one process; the other ranks of a torchrun job only wait
        if ranks.is_speaker:
            if as_json:
                for answer in answers:
                    print(answer.to_json(), flush=True)
            print_timings(answers, engine, load_s if first == 0 else None,
                          document.kv_dtype if attention == "star" else None)
    del context  # released before the next document's KV is read


def _is_valid_name(doc: str) -> bool:
    from starqa.store import validate_name

    try:
        validate_name(doc)
    except UsageError:
        return False
    return True
