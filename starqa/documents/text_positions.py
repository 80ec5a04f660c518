"""Where tokens sit in the stored text and on its pages: each document token's character offset, each block's
character span and pages. Ingest records every block's pages with them; attribution places attention and quotes
by them.
"""

from __future__ import annotations

from collections.abc import Sequence

from starqa.documents.extraction import Page, pages_of_span


# At most this many characters at the end of a decoded piece may differ from the text: the replacement character(s)
# a decoder writes for a character whose bytes continue in the next token.
_PARTIAL_CHAR = 4


def block_char_spans(tokenizer, context_ids: Sequence[int], document_offset: int,
                     spans: Sequence[tuple[int, int]], text: str) -> list[tuple[int, int]]:
    """Each block's [start, end) in the document `text` (which its document tokens encode).

    A block may end inside a character (byte-level tokens split a multi-byte one): that character counts to the
    next block, and the next piece is decoded from the last clean token boundary, so the split never shifts the
    blocks after it. A tokenizer that does not give the text back exactly (it normalises) is followed by
    decoded lengths instead: approximate, but the best it allows.
    """
    char_spans, position = [], 0
    clean_token, clean_char = document_offset, 0  # ids[document_offset:clean_token] decode to text[:clean_char]
    exact = True
    for start, end in spans:
        first = max(start, document_offset)
        if end <= first:
            char_spans.append((0, 0))
            continue
        if exact:
            piece = tokenizer.decode(list(context_ids[clean_token:end]), skip_special_tokens=False)
            expected = text[clean_char:clean_char + len(piece)]
            common = _common_prefix(piece, expected)
            if common == len(piece):
                boundary = clean_char + common
                clean_token, clean_char = end, boundary
            elif common >= len(piece) - _PARTIAL_CHAR:
                boundary = clean_char + common  # a split character: it starts the next block
            else:
                exact = False
        if not exact:
            length = len(tokenizer.decode(list(context_ids[first:end]), skip_special_tokens=False))
            boundary = min(position + length, len(text))
        char_spans.append((position, boundary))
        position = boundary
    return char_spans


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def block_pages(tokenizer, context_ids, document_offset, spans, pages: Sequence[dict],
                text: str) -> list[list[int]]:
    """The page numbers each block's document text lies on."""
    page_map = [Page(number=p["number"], start=p["start"], end=p["end"]) for p in pages]
    result = []
    for char_start, char_end in block_char_spans(tokenizer, context_ids, document_offset, spans, text):
        result.append(pages_of_span(page_map, char_start, char_end) if char_end > char_start else [])
    return result


def token_char_starts(tokenizer, document_ids: Sequence[int], text: str) -> list[int]:
    """Where each document token starts in `text` (which the ids encode), plus len(text) at the end.

    Byte-level BPE vocabularies (GPT-2 style) give every token's bytes exactly; a token that starts inside a
    multi-byte character is placed at that character. Other tokenizers go through block_char_spans
    one token at a time (approximate where the tokenizer normalises the text).
    """
    starts = _byte_level_starts(tokenizer, document_ids, text)
    if starts is not None:
        return starts
    spans = [(i, i + 1) for i in range(len(document_ids))]
    char_spans = block_char_spans(tokenizer, list(document_ids), 0, spans, text)
    return [start for start, _ in char_spans] + [len(text)]


def _byte_level_starts(tokenizer, document_ids: Sequence[int], text: str) -> list[int] | None:
    from starqa.documents.fast_tokenizer import gpt2_bytes_to_unicode

    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return None
    table = {character: byte for byte, character in gpt2_bytes_to_unicode().items()}
    lengths = []
    pieces = []
    for token in convert(list(document_ids)):
        if token is None:
            return None
        try:
            piece = bytes(table[character] for character in token)
        except KeyError:  # not a byte-level vocabulary
            return None
        pieces.append(piece)
        lengths.append(len(piece))
    encoded = text.encode("utf-8")
    if b"".join(pieces) != encoded:
        return None
    # byte offset -> index of the character holding that byte
    char_of_byte = []
    for index, character in enumerate(text):
        char_of_byte.extend([index] * len(character.encode("utf-8")))
    starts, byte = [], 0
    for length in lengths:
        starts.append(char_of_byte[byte] if byte < len(char_of_byte) else len(text))
        byte += length
    return starts + [len(text)]
