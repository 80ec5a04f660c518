"""Haystacks for the synthetic tasks, needle placement, and fitting generated text to a token length.

A haystack is a list of pieces (sentences), each marked whether a paragraph ends after it, so needles go in at
sentence boundaries and rendering keeps paragraph breaks:

- noise: RULER's repetitive filler, "The grass is green. The sky is blue. ..." sentence after sentence;
- essay: the project's own prose (prose.py), paragraphs shuffled per sample and repeated as needed, cut to a
  number of words (the last sentence may be cut short, as in RULER).

`largest_fitting` finds the largest amount of filler whose prompt still fits the requested token length.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starqa.eval import prose

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class Piece:
    text: str
    paragraph_end: bool = False


def noise_haystack(n_sentences: int) -> list[Piece]:
    return [Piece(NOISE_SENTENCES[i % len(NOISE_SENTENCES)]) for i in range(n_sentences)]


def _essay_sentences() -> list[list[str]]:
    return [_SENTENCE_END.split(paragraph) for paragraph in prose.paragraphs()]


_ESSAY = _essay_sentences()


def essay_paragraph_stream(rng: random.Random):
    """Paragraphs (as sentence lists) in a shuffled order, reshuffled on every pass: endless."""
    while True:
        order = list(range(len(_ESSAY)))
        rng.shuffle(order)
        for index in order:
            yield _ESSAY[index]


def essay_haystack(n_words: int, rng: random.Random) -> list[Piece]:
    """The first n_words words of the shuffled essay stream, as sentences."""
    pieces: list[Piece] = []
    remaining = n_words
    stream = essay_paragraph_stream(rng)
    while remaining > 0:
        paragraph = next(stream)
        for position, sentence in enumerate(paragraph):
            words = sentence.split()
            if len(words) >= remaining:
                pieces.append(Piece(" ".join(words[:remaining]), paragraph_end=True))
                return pieces
            remaining -= len(words)
            pieces.append(Piece(sentence, paragraph_end=position == len(paragraph) - 1))
    return pieces


def essay_paragraphs(n_words: int, rng: random.Random) -> list[str]:
    """The first n_words words of the shuffled essay stream, as paragraphs (for document-style padding)."""
    paragraphs: list[str] = []
    current: list[str] = []
    for piece in essay_haystack(n_words, rng):
        current.append(piece.text)
        if piece.paragraph_end:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def insert_at_depths(pieces: Sequence[Piece], needles: Sequence[tuple[float, str]]) -> list[Piece]:
    """Insert each (depth, sentence) at the sentence boundary nearest depth (0 = start, 1 = end) of the haystack.

    Needles at the same boundary keep their given order.
    """
    slots: dict[int, list[str]] = {}
    for depth, text in needles:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], not {depth}")
        slots.setdefault(round(depth * len(pieces)), []).append(text)
    result: list[Piece] = []
    for position in range(len(pieces) + 1):
        result.extend(Piece(text) for text in slots.get(position, ()))
        if position < len(pieces):
            result.append(pieces[position])
    return result


def render(pieces: Sequence[Piece]) -> str:
    parts = []
    for position, piece in enumerate(pieces):
        parts.append(piece.text)
        if position < len(pieces) - 1:
            parts.append("\n\n" if piece.paragraph_end else " ")
    return "".join(parts)


def spread_depths(index: int, n_samples: int) -> float:
    """Sample i of n gets depth i / (n - 1): the needle walks from the start of the context to its end."""
    return 0.5 if n_samples <= 1 else index / (n_samples - 1)


class LengthError(ValueError):
    """The requested token length cannot be met (too short for the task's fixed text, or beyond its filler)."""


def largest_fitting(tokens_for: Callable[[int], int], limit: int, *, hint: int = 64, maximum: int | None = None) -> int:
    """The largest n >= 0 with tokens_for(n) <= limit, for a tokens_for that grows with n (by bisection)."""
    seen: dict[int, int] = {}

    def measured(n: int) -> int:
        if n not in seen:
            seen[n] = count(n)
        return seen[n]

    count, tokens_for = tokens_for, measured
    if tokens_for(0) > limit:
        raise LengthError(f"the fixed text alone needs {tokens_for(0)} tokens, more than {limit}")
    low, high = 0, max(1, hint)
    if maximum is not None:
        high = min(high, maximum)
    while tokens_for(high) <= limit:  # grow until it does not fit
        low = high
        if maximum is not None and high >= maximum:
            return maximum
        high = high * 2 if maximum is None else min(high * 2, maximum)
    while high - low > 1:  # tokens_for(low) fits, tokens_for(high) does not
        middle = (low + high) // 2
        if tokens_for(middle) <= limit:
            low = middle
        else:
            high = middle
    return low
