"""Hybrid answering: Star Attention answers first; an answer that is not grounded in its evidence is answered again
with full attention over the stored text, and that answer is returned instead (a Self-Route-style fallback,
arXiv:2407.16833, with starqa's own grounding check as the router).

The signal (`escalation_reason`) is the answer's `grounded` flag (starqa.evidence): its content is not in the
passages it drew on. It was chosen on generated RULER-style data and reported on held-out data: docs/hybrid.md.
One place decides it, for `ask`, the server and `eval` alike. `compose_record` builds the hybrid record of an eval
case from the same case's Star and full-attention records: greedy decoding is deterministic, so the second pass of a
hybrid ask is exactly the full-attention run, and its cost is added to the Star pass's.
"""

from __future__ import annotations

from collections.abc import Sequence

NOT_GROUNDED = "not grounded"
ATTENTION_MODES = ("star", "full", "hybrid")


def escalation_reason(grounded: bool, answer: str = "") -> str | None:
    """Why a Star answer is answered again with full attention, or None to keep it."""
    if not grounded:
        return NOT_GROUNDED
    return None


def note_line(reason: str, model: str | None = None) -> str:
    """The stderr line of text mode for an answer given again (by full attention, or by the escalation target
    `model`)."""
    return f"answered again with {model or 'full attention'}: {reason}"


def check_attention(attention: str, flag: str = "--attention") -> str:
    from starqa.errors import UsageError

    if attention not in ATTENTION_MODES:
        raise UsageError(f"{flag} must be star, full or hybrid, not {attention!r}")
    return attention


# ---------------------------------------------------------------- asking (starqa.answer.ask)


def combined_answer(star, full, reason: str, target=None):
    """The Answer a hybrid ask returns for an escalated question: the second pass's (full attention's, or the
    escalation target's: `target`, starqa.answer.escalation.Target), whose timings include both passes (prefill: both
    prefills; time to first token: the whole Star answer, then the second pass's first token) and whose `hybrid`
    field holds the Star answer, why it was not kept and what answered again (`escalated_to`: "full" or the
    model; `full_s`: the second pass's seconds)."""
    import dataclasses

    star_s = star.ttft_s + _decode_s(star)
    hybrid = {"escalated": True, "star_answer": star.answer, "reason": reason, "star_grounded": star.grounded,
              "star_s": round(star_s, 4), "full_s": round(full.ttft_s + _decode_s(full), 4),
              "escalated_to": "full" if target is None else target.model}
    if target is not None:
        hybrid.update(escalated_doc=target.document.name, escalated_attention=full.attention)
        if target.phase1_s:
            hybrid["escalated_phase1_s"] = round(target.phase1_s, 3)  # the copy was stored by this ask
    return dataclasses.replace(
        full, doc=star.doc, cache_hit=star.cache_hit, phase1_s=star.phase1_s, prefill_s=star.prefill_s + full.prefill_s,
        ttft_s=star_s + full.ttft_s, hybrid=hybrid)


def kept_answer(star):
    import dataclasses

    return dataclasses.replace(star, hybrid={"escalated": False, "star_answer": None, "reason": None})


def _decode_s(answer) -> float:
    tokens = max(answer.answer_tokens - 1, 0)
    return tokens / answer.decode_tokens_per_s if answer.decode_tokens_per_s > 0 else 0.0


def answer_batch(opened, questions: list[str], first: int, settings, *, ranks, emit, each_token=None) -> None:
    """One batch of a hybrid ask (starqa.answer.ask.answer_questions): every question answered with Star Attention,
    decoded together; then only those whose answer is not grounded are answered again with full attention over the
    stored text, one after another, in the same second pass; then the batch's answers in order, a note before each one
    given again, and one timing table holding both passes. Answer text is not streamed: it is known once decided."""
    import time

    from starqa.answer import events, passes
    from starqa.governance.audit import document_version

    engine, document = opened.engine, opened.document
    started = time.perf_counter()
    replies = passes.ask_star(engine, opened.context, document, questions, settings, cache_hit=opened.cache_hit,
                              phase1_s=opened.phase1_s if first == 0 else 0.0, stream=None, ranks=ranks,
                              each_token=each_token)
    star_s = time.perf_counter() - started
    if not ranks.is_speaker:
        return  # the full-attention pass runs in one process (the speaker's evidence decides it), as --attention full
    stars = [reply.answer for reply in replies]
    escalated = escalated_rows(stars)
    full_s, target = 0.0, None
    if escalated:
        started = time.perf_counter()
        escalation = getattr(opened, "escalation", None)  # --escalate-to MODEL (starqa.answer.escalation), else None
        target = escalation.target(opened, settings) if escalation is not None else None
        if target is None:  # full attention with the document's own model, the escalated questions together
            full, context_s = passes.full_context(opened)
            again = passes.ask_full(engine, document, full, [questions[row] for row, _ in escalated], settings,
                                    context_s=context_s, each_token=each_token)
            for (row, reason), reply in zip(escalated, again):
                replies[row] = passes.Reply(combined_answer(stars[row], reply.answer, reason), reply.text)
        else:  # the larger model, every escalated question of the batch together
            again = target.answer([questions[row] for row, _ in escalated], settings, each_token=each_token)
            for (row, reason), reply in zip(escalated, again):
                replies[row] = passes.Reply(combined_answer(stars[row], reply.answer, reason, target), reply.text)
        full_s = time.perf_counter() - started
    again = dict(escalated)
    for row, reply in enumerate(replies):
        answered_by = (document, engine)
        if row in again:
            emit(events.note(document.name, first + row, note_line(again[row], target and target.model)))
            if target is not None:
                answered_by = (target.document, target.engine)
        else:
            reply.answer = kept_answer(reply.answer)
        passes.emit_replies(emit, document.name, first + row, [reply],
                         document_version(*answered_by))  # the stored version that answered (audit)
    title, rows = passes.timing_table(stars, engine, opened.load_s if first == 0 else None, document.kv_dtype)
    second = target.model if target is not None else _configured_target(getattr(opened, "escalation", None),
                                                                         document)
    rows += [(f"answered again ({second})", f"{len(escalated)} of {len(questions)} (not grounded)"),
             ("Star pass / second pass", f"{star_s:.2f} s / {full_s:.2f} s")]
    emit(events.timings(title.replace("star attention", "hybrid attention", 1), rows))


def _configured_target(escalation, document) -> str:
    """What would answer again when no question of a batch was escalated: the target model, or full attention."""
    model = getattr(escalation, "model", None)
    return model if model and model != document.manifest.get("model") else "full attention"


def escalated_rows(answers: Sequence) -> list[tuple[int, str]]:
    """(row, reason) of every Star answer of a batch that is answered again."""
    rows = []
    for row, answer in enumerate(answers):
        reason = escalation_reason(answer.grounded, answer.answer)
        if reason is not None:
            rows.append((row, reason))
    return rows


# ---------------------------------------------------------------- eval (starqa.eval)


def compose_record(star: dict, full: dict, escalated_to: str = "full") -> dict:
    """The hybrid record of one eval case from its Star and full-attention records: Star's answer when grounded,
    else full attention's; its seconds are Star's, plus full attention's when escalated. With `escalated_to` a
    model, `full` is that model's record of the same case (starqa.answer.escalation.with_escalation)."""
    reason = escalation_reason(bool(star.get("grounded")), star.get("prediction", ""))
    chosen = full if reason else star
    record = dict(chosen, task=star["task"], length=star["length"], index=star["index"],  # the case asked
                  mode="hybrid", block_size=star["block_size"], anchor_size=star["anchor_size"],
                  phase1_s=star["phase1_s"], escalated=reason is not None, reason=reason, escalated_to=escalated_to,
                  answer_s=answer_seconds(star) + (answer_seconds(full) if reason else 0.0),
                  peak_rss_mb=_max(star.get("peak_rss_mb"), full.get("peak_rss_mb") if reason else None),
                  peak_cuda_mb=_max(star.get("peak_cuda_mb"), full.get("peak_cuda_mb") if reason else None))
    if reason:
        record["ttft_s"] = answer_seconds(star) + full["ttft_s"]
        record["prefill_s"] = star["prefill_s"] + full["prefill_s"]
    return record


def answer_seconds(record: dict) -> float:
    """Seconds to answer one question once the document is stored: the prompt's prefill to the last token (Phase 1,
    paid once per document at ingest, is not included; hybrid records carry their own)."""
    if record.get("answer_s") is not None:
        return record["answer_s"]
    return record["ttft_s"] + (record.get("decode_s") or 0.0)


def _max(*values):
    values = [value for value in values if value is not None]
    return max(values) if values else None


def with_hybrid(records: Sequence[dict]) -> list[dict]:
    """`records` plus one hybrid record per case and Star configuration that has both a Star and a full record
    (each after its Star record); records already hybrid are left as they are."""
    full = {(r["task"], r["length"], r["index"]): r for r in records if r["mode"] == "full"}
    have = {(r["task"], r["length"], r["index"], r["block_size"], r["anchor_size"]) for r in records
            if r["mode"] == "hybrid"}
    result = []
    for record in records:
        result.append(record)
        key = (record["task"], record["length"], record["index"])
        if (record["mode"] == "star" and key in full and "grounded" in record
                and (*key, record["block_size"], record["anchor_size"]) not in have):
            result.append(compose_record(record, full[key]))
    return result
