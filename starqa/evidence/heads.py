"""Retrieval heads: the few attention heads that copy from the context, found once per model and recorded.

When a model copies a fact from its context, a few heads put their strongest attention on the very token being
copied (Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality", 2024). Which heads do so is a
property of the model, so it is measured once, by a calibration on synthetic needles: short documents of filler
sentences with one planted "magic number" (a phrasing used nowhere else: not by the generated sets attribution is
tuned or judged on), asked for and answered with Star Attention over one block. A head's retrieval score is the
share of copied needle tokens at which its top-attended document token is that token's source. The heads scoring
at least MIN_SCORE, at most MAX_HEADS of them, are the retrieval heads; starqa.evidence.observer follows only those
while an answer is decoded, which is both what makes the sources precise and what keeps that cheap.

The outcome is recorded in the store's models/ folder (RECORD_FILE_NAME, keyed by model, tokenizer and this
module's CALIBRATION_VERSION), as the tokenizer check is: the calibration runs on a model's first question.
"""

from __future__ import annotations

import random
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from starqa.evidence.scores import prefix_scores
from starqa.documents.text_positions import token_char_starts
from starqa.store.records import read_records, record

CALIBRATION_VERSION = 1
RECORD_FILE_NAME = "retrieval-heads.json"
MIN_SCORE = 0.3  # share of copied tokens a head must point at
MAX_HEADS = 16
# The calibration: documents of about DOCUMENT_WORDS words, one needle each, at depths spread over the document.
DOCUMENTS = 6
DOCUMENT_WORDS = 450
MIN_COPIES = 8  # fewer copied needle tokens than this: no heads are trusted (the model did not copy)
_SEED = "starqa-retrieval-heads/1"


@dataclass(frozen=True)
class RetrievalHeads:
    """The heads to follow: (layer, head) pairs with their retrieval scores; empty when none qualified."""

    heads: tuple[tuple[int, int], ...]
    scores: tuple[float, ...]
    copies: int  # copied needle tokens the calibration saw
    reason: str = ""  # why there are none

    def by_layer(self) -> dict[int, list[int]]:
        layers: dict[int, list[int]] = {}
        for layer, head in self.heads:
            layers.setdefault(layer, []).append(head)
        return layers

    def to_record(self) -> dict:
        return {"heads": [list(pair) for pair in self.heads], "scores": [round(s, 4) for s in self.scores],
                "copies": self.copies, "reason": self.reason, "version": CALIBRATION_VERSION}

    @classmethod
    def from_record(cls, record: dict) -> "RetrievalHeads":
        return cls(heads=tuple((int(layer), int(head)) for layer, head in record["heads"]),
                   scores=tuple(float(score) for score in record["scores"]), copies=int(record["copies"]),
                   reason=str(record.get("reason", "")))


def select(scores: torch.Tensor, copies: int, *, min_score: float = MIN_SCORE,
           max_heads: int = MAX_HEADS) -> RetrievalHeads:
    """The heads of `scores` [layers, heads] scoring at least min_score, best first, at most max_heads."""
    if copies < MIN_COPIES:
        return RetrievalHeads((), (), copies, reason=f"the model copied only {copies} needle tokens in the "
                                                    f"calibration (at least {MIN_COPIES} needed)")
    flat = scores.flatten()
    order = torch.argsort(flat, descending=True)[:max_heads].tolist()
    chosen = [(index // scores.shape[1], index % scores.shape[1]) for index in order if flat[index] >= min_score]
    if not chosen:
        return RetrievalHeads((), (), copies, reason=f"no head pointed at the copied token in {min_score:.0%} of "
                                                    "the copies")
    return RetrievalHeads(tuple(chosen), tuple(float(scores[layer, head]) for layer, head in chosen), copies)


# ---------------------------------------------------------------- the calibration


class _TopTokens:
    """Records, per decoding step and layer, each head's most attended document token (an observer, as
    starqa.evidence.observer.AttentionShares is)."""

    def __init__(self, document_offset: int, layers: int) -> None:
        self.offset = document_offset
        self.layers = layers
        self.top: list[torch.Tensor] = []  # per observation [heads]

    def observe(self, layer: int, query: torch.Tensor, prefix_keys: torch.Tensor) -> None:
        self.observe_scores(layer, prefix_scores(query, prefix_keys, query.shape[-1] ** -0.5))

    def observe_scores(self, layer: int, scores: torch.Tensor) -> None:
        self.top.append(scores[:, self.offset:].argmax(dim=-1).cpu())

    def per_step(self) -> torch.Tensor:
        """[steps, layers, heads]"""
        return torch.stack(self.top).view(-1, self.layers, self.top[0].shape[0])


def _filler_sentence(rng: random.Random) -> str:
    from starqa.words import ADJECTIVES, NOUNS

    noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
    return rng.choice((f"The {noun} is {rng.choice(ADJECTIVES)}.", f"A {noun} stood next to the {other}.",
                       f"Nobody moved the {rng.choice(ADJECTIVES)} {noun}.", f"The {noun} and the {other} waited."))


def calibration_documents(count: int = DOCUMENTS, words: int = DOCUMENT_WORDS) -> list[tuple[str, str, str]]:
    """(document, question, value) triples: filler sentences with one magic number at depth i / (count - 1)."""
    from starqa.words import ADJECTIVES, NOUNS

    rng = random.Random(_SEED)
    documents = []
    for index in range(count):
        key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        value = str(rng.randint(1_000_000, 9_999_999))
        sentences, total = [], 0
        while total < words:
            sentence = _filler_sentence(rng)
            sentences.append(sentence)
            total += len(sentence.split())
        needle = f"The special magic number for {key} is {value}."
        sentences.insert(round(index / max(1, count - 1) * len(sentences)), needle)
        documents.append((" ".join(sentences), f"What is the special magic number for {key}?", value))
    return documents


def calibrate(engine, *, documents: Sequence[tuple[str, str, str]] | None = None, max_new_tokens: int = 24,
              min_score: float = MIN_SCORE, max_heads: int = MAX_HEADS) -> RetrievalHeads:
    """Run the calibration on `engine` (in this process) and select the retrieval heads."""
    from starqa.documents.tokens import context_ids_for, prompt_template, query_ids_for

    tokenizer = engine.tokenizer
    template = prompt_template(tokenizer)
    layers, heads = engine.num_layers, engine.args.num_heads
    hits = torch.zeros(layers, heads)
    copies = 0
    for text, question, value in documents or calibration_documents():
        document_ids = engine.encode_document_text(text)
        context = context_ids_for(tokenizer, template, document_ids)
        offset = len(context) - len(document_ids)
        ctx = engine.encode_context(context, block_size=len(context))
        observer = _TopTokens(offset, layers)
        new_ids = engine.generate(ctx, query_ids_for(tokenizer, template, question),
                                  max_new_tokens=max_new_tokens, observe_prefix=observer)
        del ctx
        starts = token_char_starts(tokenizer, document_ids, text)
        value_start = text.index(value)
        needle = [i for i in range(len(document_ids)) if value_start <= starts[i] < value_start + len(value)]
        top = observer.per_step()  # [steps, layers, heads]: document token indices
        for step, token in enumerate(new_ids[: top.shape[0]]):
            sources = torch.tensor([i for i in needle if document_ids[i] == token])
            if len(sources) == 0:
                continue
            copies += 1
            hits += torch.isin(top[step], sources).float()
    scores = hits / max(copies, 1)
    return select(scores, copies, min_score=min_score, max_heads=max_heads)


# ---------------------------------------------------------------- the record


def record_key(engine) -> str:
    return f"{engine.model_fingerprint}/{engine.tokenizer_fingerprint}/v{CALIBRATION_VERSION}"


_FOUND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # engine -> RetrievalHeads, for this process


def retrieval_heads(engine, on_status: Callable[[str], None] | None = None) -> RetrievalHeads:
    """The engine's retrieval heads: recorded in the store's models/ folder, else calibrated now (and recorded);
    kept for the engine's lifetime in this process. `on_status` hears of a calibration before it runs."""
    cached = _FOUND.get(engine)
    if cached is not None:
        return cached
    path = record_path(engine)
    key = record_key(engine)
    found = None
    if path is not None:
        recorded = read_records(path).get(key)
        if isinstance(recorded, dict) and recorded.get("version") == CALIBRATION_VERSION:
            try:
                found = RetrievalHeads.from_record(recorded)
            except (KeyError, TypeError, ValueError):
                found = None
    if found is None:
        if on_status is not None:
            on_status(f"finding the retrieval heads of {engine.model_name or 'the model'} (once per model)")
        found = calibrate(engine)
        if path is not None:
            record(path, key, {**found.to_record(), "calibrated": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                 time.gmtime())})
    _FOUND[engine] = found
    return found


def remember(engine, heads: RetrievalHeads) -> RetrievalHeads:
    """Keep `heads` as the engine's for its lifetime in this process (heads another rank found)."""
    _FOUND[engine] = heads
    return heads


def record_path(engine) -> Path | None:
    """models/RECORD_FILE_NAME in the engine's store (None for an engine without a store: nothing recorded)."""
    root = getattr(engine, "store_root", None)
    return None if root is None else Path(root) / "models" / RECORD_FILE_NAME
