"""Evidence for one answer, end to end: the observer handed to the engine while the answer is decoded (it follows
the model's retrieval heads, starqa.evidence.heads), then, from what every rank observed, the sources, quotes and
`grounded` (starqa.evidence.quotes) about the stored document version.
"""

from __future__ import annotations

from collections.abc import Sequence

from starqa.evidence.heads import remember, retrieval_heads
from starqa.evidence.observer import AttentionShares, attended_tokens
from starqa.evidence.quotes import DocumentView, Evidence, evidence_from_weights


def evidence_for_answer(document: DocumentView, parts, answer: str, question: str = "") -> Evidence:
    """Sources, evidence quotes and `grounded` for an answer, from every rank's observed attention
    (starqa.evidence.observer.AttentionShares.stacked(), gathered in any order) and the answer's text."""
    return evidence_from_weights(document, attended_tokens(parts, document.context_tokens), answer, question)


def observer_for(engine, spans: Sequence[tuple[int, int]], document_offset: int, heads=None, *, ranks=None):
    """The observer to hand the engine (`observe_prefix`, or one per row in `generate_batch(observers=...)`) for one
    answer over the context blocks `spans` held by this process. It follows the model's retrieval heads: `heads`
    (a starqa.evidence.heads.RetrievalHeads), or else the model's (`model_heads`: calibrated on the model's first
    use, then read from the store's record; call this before decoding, as a first calibration runs the engine
    itself). A model without retrieval heads is followed on every head."""
    heads = model_heads(engine, ranks) if heads is None else heads
    return AttentionShares(spans, document_offset, engine.head_dim ** -0.5, heads=heads if heads.heads else None)


def model_heads(engine, ranks=None):
    """The engine's retrieval heads (starqa.evidence.heads), found by rank 0 alone under several processes and
    given to the others (each rank keeps them for the engine's lifetime, so later calls are no collective)."""
    from starqa import report
    from starqa.engine.distributed import share_outcome

    if ranks is None or not ranks.distributed:
        return retrieval_heads(engine, on_status=report.info)
    return remember(engine, share_outcome(ranks, lambda: retrieval_heads(engine, on_status=report.info)))


def answer_evidence(engine, document, observer, answer: str, question: str, ranks=None) -> Evidence:
    """Sources, evidence quotes and `grounded` for one answer about a stored document (a
    starqa.store.document_store.StoredDocument), from `observer` (this process's `observer_for`). Under several
    processes every rank must call it (the ranks' observations are gathered); the ranks other than the speaker get an
    empty Evidence."""
    from starqa.engine.distributed import gather_objects

    parts = gather_objects(observer.stacked(), ranks) if ranks is not None else [observer.stacked()]
    if ranks is not None and not ranks.is_speaker:
        return Evidence()
    return evidence_for_answer(document_view(document, engine.tokenizer), parts, answer, question)


_VIEWS: dict = {}  # (stored version's folder, tokenizer) -> DocumentView: token positions are worked out once
_VIEWS_KEPT = 4


def document_view(document, tokenizer) -> DocumentView:
    """The DocumentView of a starqa.store.document_store.StoredDocument version, kept for the next questions about
    it."""
    key = (str(document.path), id(tokenizer))
    view = _VIEWS.get(key)
    if view is None:
        view = DocumentView.from_stored(document, tokenizer)
        while len(_VIEWS) >= _VIEWS_KEPT:
            _VIEWS.pop(next(iter(_VIEWS)))
        _VIEWS[key] = view
    return view
