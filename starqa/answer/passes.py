"""One pass of answers over one stored document: Star Attention over its stored KV or, for comparison, full attention
over its text (the document's causal pass made once, then every question over it), a batch of questions decoded
together; each answer with its evidence, the events that print it, and the timing table of the pass. `starqa ask`
(starqa.answer.ask), hybrid answering (starqa.answer.hybrid), the escalation to a larger model
(starqa.answer.escalation) and the server's worker run these.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starqa import report
from starqa.answer import events
from starqa.answer.record import Answer
from starqa.engine.distributed import Ranks, agree, block_plan, phase2_spread
from starqa.store.context_kv import ContextKV
from starqa.errors import StarqaError
from starqa.evidence.collect import answer_evidence, observer_for
from starqa.evidence.quotes import answer_trailer_lines
from starqa.store.document_store import DocumentStore, StoredDocument, reingest_hint
from starqa.documents.tokens import context_ids_for, plan_blocks, prompt_template, query_ids_for

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
    from starqa.store.kv_quant import KEY_GROUP

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
    return _over_context(engine, ctx, document, questions, settings, attention="star", cache_hit=cache_hit,
                         phase1_s=phase1_s, stream=stream, ranks=ranks, each_token=each_token)


def ask_full(engine, document: StoredDocument, full: ContextKV, questions: Sequence[str], settings, *,
             context_s: float = 0.0, stream: Stream | None = None, each_token: EachToken | None = None) -> list[Reply]:
    """Full attention: the questions over the document's full-attention KV (`full_context`), decoded together.
    `context_s`: the seconds of the document's causal pass when these answers paid for it (the first full-attention
    answers of a document), counted in their prefill and time to first token."""
    replies = _over_context(engine, full, document, questions, settings, attention="full", cache_hit=False,
                            phase1_s=0.0, stream=stream, ranks=None, each_token=each_token)
    for reply in replies:
        reply.answer.prefill_s += context_s
        reply.answer.ttft_s += context_s
    return replies


def _over_context(engine, ctx: ContextKV, document: StoredDocument, questions: Sequence[str], settings, *,
                  attention: str, cache_hit: bool, phase1_s: float, stream: Stream | None, ranks: Ranks | None,
                  each_token: EachToken | None) -> list[Reply]:
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
            question=question, answer=text.strip(), doc=document.name, attention=attention, cache_hit=cache_hit,
            context_tokens=ctx.n_tokens, query_tokens=len(query_ids[row]), answer_tokens=len(ids),
            phase1_s=phase1_s if row == 0 else 0.0, prefill_s=stats.prefill_s, ttft_s=stats.ttft_s,
            decode_tokens_per_s=stats.decode_tokens_per_s, sources=found.sources, evidence=found.evidence,
            grounded=found.grounded), text))
    return replies


def full_context(opened) -> tuple[ContextKV, float]:
    """The opened document's full-attention KV (`full_attention_kv`), made on its first full-attention question and
    kept on `opened` for the next ones: (the KV, the seconds spent making it now, else 0.0)."""
    held = getattr(opened, "full_kv", None)
    if held is not None:
        return held, 0.0
    ids = opened.context if isinstance(opened.context, list) else full_context_ids(opened.engine, opened.document)
    started = time.perf_counter()
    opened.full_kv = full_attention_kv(opened.engine, opened.document, ids)
    return opened.full_kv, time.perf_counter() - started


def full_context_ids(engine, document: StoredDocument) -> list[int]:
    """The prompt's context ids for full attention over the document's stored text."""
    return context_ids_for(engine.tokenizer, prompt_template(engine.tokenizer),
                           engine.encode_document_text(document.text()))


def full_attention_kv(engine, document: StoredDocument, context_ids: Sequence[int]) -> ContextKV:
    """The document's KV under full attention: one causal pass over the whole context, i.e. what Star Attention keeps
    with one block spanning it (no anchor: the first block has none). Phase 2 over it answers a question exactly as
    one causal pass over document and question does (one softmax over every earlier token), so the document is
    encoded once for all of a document's full-attention questions, not once per question. The blocks the document
    was stored in name the answers' sources, as they do for Star."""
    n = len(context_ids)
    kv = engine.encode_context(context_ids, n, batch=1)
    spans = [(block["start"], block["end"]) for block in document.blocks]
    if not spans or spans[0][0] != 0 or spans[-1][1] != n or any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        spans = plan_blocks(n, document.manifest["block_size"])  # the stored blocks do not tile this context
    return ContextKV(n_tokens=n, spans=spans, keys=kv.keys, values=kv.values)


def timing_table(answers: Sequence[Answer], engine, load_s: float | None = None, kv_dtype: str | None = None,
                 together: int | None = None, document_pass: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """The title and rows of one batch's timing table (stderr). `together`: the questions decoded at once, when a
    server decoded other requests' questions with these; `document_pass` (full attention): whether these answers'
    prefill includes the document's causal pass (the first full-attention answers of an ask) or only the
    questions' tokens over the document's KV made before."""
    answer = answers[0]
    together = len(answers) if together is None else together
    rows = []
    if load_s is not None:
        rows.append(("load (model + KV)", f"{load_s:.2f} s"))
    rows.append(("dtype / KV dtype", f"{str(engine.dtype).removeprefix('torch.')} / {kv_dtype or '-'}"))
    if answer.phase1_s:
        rows.append(("Phase 1", f"{answer.phase1_s:.2f} s"))
    label = "Phase 2 prefill" if answer.attention == "star" else "full-attention prefill"
    prompt_tokens = sum(a.query_tokens for a in answers) + (
        answer.context_tokens if answer.attention == "full" and document_pass else 0)
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
    the stored version that answered (starqa.governance.audit.document_version)."""
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
