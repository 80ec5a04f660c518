"""Evidence for an answer, the text side: the stored text cut into quotable passages (sentences or clauses of at most
~300 characters, never crossing a paragraph or page), the answer's content terms (numbers, names, words the question
did not already hold), the scoring that picks the passages from the answer's attention (starqa.evidence.observer)
and its content, the sources (blocks and their pages), and whether the answer's content is found in the quotes
(`grounded`).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from starqa.documents.text_positions import block_pages, token_char_starts

# A quote is at most about this many characters: a sentence or a clause of one.
MAX_QUOTE_CHARS = 300


# ---------------------------------------------------------------- passages


@dataclass(frozen=True)
class Passage:
    start: int  # [start, end) in the stored text
    end: int


_BREAK = re.compile(r"\n\s*\n|\f|\n(?=\s*(?:\(?[0-9ivxa-zA-Z]{1,4}[.)]\s|[\u2022\u25cf*\u2013-]\s))")
# A colon ends a passage only before a capital ("as follows: The Supplier ..."); before a number it introduces a
# value ("Notice period: 30 days", "One of the special magic numbers for X is: 9828391."), and a label cut from its
# value grounds neither the label's question nor the value's answer.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?;])[\u201d\"'\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
                           r"|(?<=:)[\u201d\"'\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z]))")
_CLAUSE_CUT = re.compile(r"[;,:]\s+|\s+(?:and|or|but|which|where|unless|provided)\s+")
_MIN_SENTENCE = 25  # a shorter "sentence" ("15.", "Ltd.") joins the next one


def passages(text: str, pages: Sequence[dict] = ()) -> list[Passage]:
    """`text` cut into quotable passages, in order: sentences (or clauses of long ones) of at most
    MAX_QUOTE_CHARS characters, never across a paragraph break or a page boundary; whitespace trimmed."""
    bounds = sorted({0, len(text), *(page["start"] for page in pages if 0 < page["start"] < len(text))})
    result: list[Passage] = []
    for page_start, page_end in zip(bounds, bounds[1:]):
        for block_start, block_end in _split(text, page_start, page_end, _BREAK):
            sentences = _split(text, block_start, block_end, _SENTENCE_END)
            for start, end in _join_short(text, sentences):
                result.extend(_cut_long(text, start, end))
    return result


def _split(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    pieces, position = [], start
    for match in pattern.finditer(text, start, end):
        pieces.append((position, match.start()))
        position = match.end()
    pieces.append((position, end))
    return [trimmed for piece in pieces if (trimmed := _trim(text, *piece))]


def _trim(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _join_short(text: str, sentences: list[tuple[int, int]]) -> list[tuple[int, int]]:
    joined: list[tuple[int, int]] = []
    carry = None
    for start, end in sentences:
        if carry is not None:
            start = carry
            carry = None
        if end - start < _MIN_SENTENCE and (start, end) != sentences[-1]:
            carry = start
            continue
        joined.append((start, end))
    if carry is not None:
        joined.append((carry, sentences[-1][1]))
    return joined


def _cut_long(text: str, start: int, end: int) -> list[Passage]:
    """A sentence longer than MAX_QUOTE_CHARS cut at clause boundaries (else at a space) into pieces that fit."""
    pieces = []
    while end - start > MAX_QUOTE_CHARS:
        limit = start + MAX_QUOTE_CHARS
        cut = None
        for match in _CLAUSE_CUT.finditer(text, start + MAX_QUOTE_CHARS // 3, limit):
            cut = match
        if cut is not None:
            piece_end, next_start = cut.start() + (1 if text[cut.start()] in ";,:" else 0), cut.end()
        else:
            space = text.rfind(" ", start + 1, limit)
            piece_end, next_start = (space, space + 1) if space > start else (limit, limit)
        trimmed = _trim(text, start, piece_end)
        if trimmed:
            pieces.append(Passage(*trimmed))
        start = next_start
    trimmed = _trim(text, start, end)
    if trimmed:
        pieces.append(Passage(*trimmed))
    return pieces


def passage_index(passage_list: Sequence[Passage], char: int) -> int | None:
    """The passage holding character `char` (None when it falls between passages, e.g. on whitespace)."""
    index = bisect.bisect_right([p.start for p in passage_list], char) - 1
    if index >= 0 and char < passage_list[index].end:
        return index
    return None


# ---------------------------------------------------------------- answer content


_STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers him
his how i if in into is it its itself just me more most my no nor not now of off on once only or other our ours out
over own same she should so some such than that the their theirs them then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your yours
according answer answers briefly document documents text says stated state states mentioned provided given yes
many much long often whose
""".split())
_TERM = re.compile(r"\d[\d,.]*\d|\d|[^\W\d_][\w'\u2019-]*", re.UNICODE)


@dataclass(frozen=True)
class Term:
    text: str  # as compared: lowercase; numbers without thousands separators
    number: bool


def _normal(word: str) -> tuple[str, bool]:
    if word[0].isdigit():
        return word.replace(",", "").rstrip("."), True
    word = word.lower().replace("\u2019", "'").rstrip("'-").removesuffix("'s")  # "days'", "party's" -> "days", "party"
    for suffix in ("ing", "ed", "es", "s"):  # "governs", "governed", "governing" -> "govern"; "ends" -> "end"
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)], False
    return word, False


def content_terms(answer: str, question: str = "") -> list[Term]:
    """The answer's checkable content: its numbers and its words that are neither stopwords nor in the question
    (an answer that repeats the question's words has not said anything by them), in order, without repeats."""
    asked = {_normal(word)[0] for word in _TERM.findall(question)}
    terms: list[Term] = []
    seen = set()
    for word in _TERM.findall(answer):
        text, number = _normal(word)
        if not text or text in seen or text in asked:
            continue
        if not number and (word.lower() in _STOPWORDS or len(word) < 3):
            continue
        seen.add(text)
        terms.append(Term(text, number))
    return terms


def terms_in(text: str) -> set[str]:
    """The normalised words and numbers of a piece of text, for matching content terms against it."""
    return {_normal(word)[0] for word in _TERM.findall(text)}


# The passage an answer is grounded in must hold at least this share of the question's content words, weighted
# by their rarity: a passage about another key ("Project Garnet" when "Project Meridian" was asked) is no support.
QUESTION_COVERAGE = 0.5


def grounded(terms: Sequence[Term], quoted: Sequence[str], asked: Sequence[Term] = (),
             asked_weights: dict[str, float] | None = None) -> bool:
    """Whether one quoted passage holds the answer's content: every number of it, at least two thirds of its
    other terms, and (when the question has content words) QUESTION_COVERAGE of the question's words, weighted by
    `asked_weights` (equal weights without). An answer stitched from several unrelated passages, one copied from a
    passage about something else, or whose number merely occurs somewhere, is not grounded; neither is an answer
    with nothing to check (only the question's words, "Yes")."""
    if not terms:
        return False
    numbers = [term.text for term in terms if term.number]
    words = [term.text for term in terms if not term.number]
    weights = {term.text: (asked_weights or {}).get(term.text, 1.0) for term in asked}
    for text in quoted:
        found = terms_in(text)
        if any(number not in found for number in numbers):
            continue
        if words and sum(word in found for word in words) * 3 < 2 * len(words):
            continue
        if weights and sum(w for word, w in weights.items() if word in found) < QUESTION_COVERAGE * sum(
                weights.values()):
            continue
        return True
    return False


@dataclass
class Evidence:
    """What `evidence_for_answer` finds: sources (blocks, as before), quotes, and whether the answer is grounded."""

    sources: list = field(default_factory=list)  # [{"pages": [6, 7], "block": 4, "share": 0.54}, ...]
    evidence: list = field(default_factory=list)  # [{"page", "text", "start", "end", "score"}, ...]
    grounded: bool = False


# ---------------------------------------------------------------- choosing the passages

# A passage's score is its share of the answer's attention (relative to the most attended passage), plus
# MATCH_WEIGHT times the share of the answer's content it holds and QUESTION_WEIGHT times the share of the question's
# content words it holds (terms weighted by their rarity in the document).
MATCH_WEIGHT = 1.0
QUESTION_WEIGHT = 1.0
MAX_QUOTES = 3
RELATIVE = 0.5  # a further quote (or source) must score at least this fraction of the best


@dataclass
class DocumentView:
    """One stored document version as attribution needs it: its text and page map, its context ids and where the
    document starts in them, its block spans and their pages. Token positions and passages are worked out once."""

    text: str
    pages: list  # [{"number", "start", "end"}, ...]
    context_ids: list
    document_offset: int
    spans: list  # global [start, end) of every block, in order
    pages_per_block: list
    tokenizer: object
    _starts: list | None = field(default=None, repr=False)
    _passages: list | None = field(default=None, repr=False)
    _passage_terms: list | None = field(default=None, repr=False)

    @classmethod
    def from_stored(cls, document, tokenizer) -> "DocumentView":
        """From a starqa.store.document_store.StoredDocument (its text, ids and page map are read and checked once
        here)."""
        text, pages, context_ids = document.text(), document.pages(), document.context_ids()
        offset = document.manifest["document_token_offset"]
        spans = [(block["start"], block["end"]) for block in document.blocks]
        pages_per_block = [block.get("pages") for block in document.blocks]
        if any(block_pages_ is None for block_pages_ in pages_per_block):  # stored before page sources existed
            pages_per_block = block_pages(tokenizer, context_ids, offset, spans, pages, text)
        return cls(text, pages, context_ids, offset, spans, pages_per_block, tokenizer)

    @property
    def context_tokens(self) -> int:
        return len(self.context_ids)

    @property
    def token_starts(self) -> list[int]:
        """Where each document token starts in the text (index i = context position document_offset + i)."""
        if self._starts is None:
            self._starts = token_char_starts(self.tokenizer, self.context_ids[self.document_offset:], self.text)
        return self._starts

    @property
    def passages(self) -> list[Passage]:
        if self._passages is None:
            self._passages = passages(self.text, self.pages)
        return self._passages

    @property
    def passage_terms(self) -> list[set[str]]:
        """The normalised words and numbers of each passage."""
        if self._passage_terms is None:
            self._passage_terms = [terms_in(self.text[p.start:p.end]) for p in self.passages]
        return self._passage_terms

    def page_of(self, char: int) -> int:
        from starqa.documents.extraction import Page, page_of_offset

        return page_of_offset([Page(p["number"], p["start"], p["end"]) for p in self.pages], char)


def passage_attention(document: DocumentView, weights) -> list[float]:
    """Each passage's sum of the attention weights [context_tokens] of the document tokens starting in it."""
    starts = document.token_starts
    bounds = [p.start for p in document.passages]
    sums = [0.0] * len(bounds)
    weights = weights.tolist() if hasattr(weights, "tolist") else list(weights)
    for index in range(len(starts) - 1):
        weight = weights[document.document_offset + index] if document.document_offset + index < len(weights) else 0
        if weight:
            at = passage_index(document.passages, starts[index])
            if at is None:  # whitespace between passages: the passage it precedes
                at = bisect.bisect_right(bounds, starts[index])
                at = at if at < len(bounds) else None
            if at is not None:
                sums[at] += weight
    return sums


def rarity(document: DocumentView, terms: Sequence[Term]) -> dict[str, float]:
    """Each term's inverse document frequency over the passages, log((passages + 1) / (passages holding it + 0.5)):
    a word every passage has tells little."""
    import math

    found = document.passage_terms
    return {term.text: math.log((len(found) + 1) / (sum(term.text in words for words in found) + 0.5))
            for term in terms}


def passage_matches(document: DocumentView, terms: Sequence[Term], weights: dict[str, float]) -> list[float]:
    """The share of `terms` each passage holds, each term counted by its weight (its rarity)."""
    total = sum(weights.get(term.text, 0.0) for term in terms)
    if not terms or total <= 0:
        return [0.0] * len(document.passages)
    return [sum(weights[t.text] for t in terms if t.text in words) / total for words in document.passage_terms]


def evidence_from_weights(document: DocumentView, weights, answer: str, question: str = "", *,
                          match_weight: float = MATCH_WEIGHT, question_weight: float = QUESTION_WEIGHT,
                          max_quotes: int = MAX_QUOTES, relative: float = RELATIVE) -> Evidence:
    """Sources, quotes and grounded for `answer` from the attention per context token
    (starqa.evidence.observer.attended_tokens)."""
    attention = passage_attention(document, weights)
    best_attention = max(attention, default=0.0)
    terms = content_terms(answer, question)
    asked = content_terms(question)
    asked_weights = rarity(document, asked)
    matches = passage_matches(document, terms, rarity(document, terms))
    question_matches = passage_matches(document, asked, asked_weights)
    scores = [((a / best_attention) if best_attention > 0 else 0.0) + match_weight * m + question_weight * q
              for a, m, q in zip(attention, matches, question_matches)]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    chosen = [i for i in order[:max_quotes] if scores[i] > 0 and scores[i] >= relative * scores[order[0]]]
    quotes = []
    for i in chosen:
        passage = document.passages[i]
        quotes.append({"page": document.page_of(passage.start), "text": document.text[passage.start:passage.end],
                       "start": passage.start, "end": passage.end,
                       "score": round(scores[i] / (1 + match_weight + question_weight), 3)})
    block_scores = _block_scores(document, scores)
    total = sum(block_scores)
    shares = torch.tensor([score / total if total > 0 else 0.0 for score in block_scores])
    sources = rank_sources(shares, document.pages_per_block, relative=relative)
    return Evidence(sources=sources, evidence=quotes, grounded=grounded(terms, [q["text"] for q in quotes], asked,
                                                                      asked_weights))


def _block_scores(document: DocumentView, scores: Sequence[float]) -> list[float]:
    """Each block's best passage score (a passage counts for every block it overlaps)."""
    starts = document.token_starts
    offset = document.document_offset
    result = []
    for start, end in document.spans:
        first, last = max(start, offset) - offset, end - offset
        if last <= first:
            result.append(0.0)
            continue
        char_start, char_end = starts[first], starts[last]
        lo = bisect.bisect_right([p.end for p in document.passages], char_start)
        best = 0.0
        for i in range(lo, len(document.passages)):
            if document.passages[i].start >= char_end:
                break
            best = max(best, scores[i])
        result.append(best)
    return result


def rank_sources(shares: torch.Tensor, pages_per_block: Sequence[Sequence[int]], *, top: int = 3,
                 relative: float = 0.5) -> list[dict]:
    """The strongest blocks, strongest first: at most `top`, each at least `relative` times the strongest."""
    sources: list[dict] = []
    for block in torch.argsort(shares, descending=True).tolist():
        share = float(shares[block])
        if sources and (len(sources) >= top or share < relative * sources[0]["share"]):
            break
        if not pages_per_block[block] or share <= 0:
            continue
        sources.append({"pages": list(pages_per_block[block]), "block": block, "share": round(share, 3)})
    return sources


def format_sources(sources: Sequence[dict]) -> str:
    """'Sources: pp. 4–5, 12' (strongest first; a block's pages joined with an en dash)."""
    parts, seen = [], set()
    for source in sources:
        pages = [p for p in source["pages"] if p not in seen]
        seen.update(pages)
        if not pages:
            continue
        parts.append(str(pages[0]) if len(pages) == 1 else f"{pages[0]}\u2013{pages[-1]}")
    if not parts:
        return ""
    single = len(parts) == 1 and "\u2013" not in parts[0]
    return ("Sources: p. " if single else "Sources: pp. ") + ", ".join(parts)


# ---------------------------------------------------------------- output


def format_evidence(found: Evidence) -> str:
    """The lines printed under an answer: one per quote (page and passage, whitespace collapsed) and whether the
    answer is grounded in them ("Grounded: no" is what to search a batch job's output for)."""
    lines = []
    for number, quote in enumerate(found.evidence):
        label = "Evidence: " if number == 0 else " " * len("Evidence: ")
        lines.append(f"{label}p. {quote['page']} \u201c{' '.join(quote['text'].split())}\u201d")
    if found.grounded:
        lines.append("Grounded: yes (the answer's content is in the quoted passages)")
    else:
        lines.append("Grounded: no (the answer's content is not in the quoted passages: check it in the document)")
    return "\n".join(lines)


def answer_trailer_lines(answer) -> list[str]:
    """The lines printed under an answer's text (an object with `evidence`, `grounded` and `sources`, as
    starqa.answer.ask.Answer): its quotes, whether it is grounded in them, then its pages ("Sources: ...")."""
    lines = format_evidence(Evidence(sources=answer.sources, evidence=answer.evidence,
                                     grounded=answer.grounded)).splitlines()
    if answer.sources:
        lines.append(format_sources(answer.sources))
    return lines
