"""Turn a PDF or text file (or stdin) into normalised reading text with a page map over it.

PDF text is rebuilt as a word processor's paragraphs: running headers, footers and page numbers are dropped, lines
wrapped inside a paragraph are joined and words hyphenated at line ends are rejoined, because a small model answers
far worse from hard-wrapped text. PDF pages stream through: each is extracted, its lines spilled to a temporary
file and only its first and last lines (where running headers are) kept, so the memory a long PDF takes is about
its text, not its pages (~30 MiB at the peak for 1,000 pages). How a text file's bytes are decoded, and when they
are refused as binary, is `starqa.documents.decoding`'s rule.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import re
import statistics
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from starqa.documents.decoding import decode_text
from starqa.errors import StarqaError, UsageError, one_line

__all__ = ["Page", "ExtractedDocument", "extract_document", "page_of_offset", "pages_of_span"]


@dataclass(frozen=True)
class Page:
    number: int  # 1-based, as a PDF reader shows it
    start: int  # char offset of the page's first char in ExtractedDocument.text
    end: int  # exclusive


@dataclass(frozen=True)
class ExtractedDocument:
    text: str  # normalised reading text
    pages: tuple[Page, ...]  # page map over `text`, in order, covering it
    kind: str  # "pdf", "text" or "stdin"
    warnings: tuple[str, ...]  # e.g. "decoded with replacement characters: the file is not valid UTF-8"


# --------------------------------------------------------------------------------------------------- entry point


def extract_document(source: str | Path, *, password: str | None = None,
                     on_page: Callable[[int, int], None] | None = None) -> ExtractedDocument:
    """Read `source` ("-" = stdin) and return its normalised text and page map.

    A file whose bytes start with "%PDF-" is read as a PDF whatever its name (so is a PDF piped to stdin: kind
    "pdf"); a ".pdf" file that does not is reported as damaged; anything else is read as text (its encoding found by
    `starqa.documents.decoding`, which refuses binary files), one page per form-feed-separated part. `on_page(done,
    total)` is called after each PDF page is extracted.
    """
    if str(source) == "-":
        label = "standard input"
        stream = getattr(sys.stdin, "buffer", None)
        data = stream.read() if stream is not None else (sys.stdin.read() if sys.stdin else "").encode("utf-8")
        suffix = ""
    else:
        path = Path(source)
        label = f"'{path}'"
        if not path.exists():
            raise UsageError(f"{label} does not exist: check the path (use - to read standard input)")
        if path.is_dir():
            raise UsageError(f"{label} is a directory, not a file: give the path of a PDF or text file")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise StarqaError(f"cannot read {label}: {error.strerror or error}: check its permissions") from None
        suffix = path.suffix.lower()

    if not data:
        raise StarqaError(f"{label} is empty: there is no text to read; give a file with some text in it")
    if data.lstrip(b"\x00\t\n\r ")[:5] == b"%PDF-":
        return _extract_pdf(data, label, password=password, on_page=on_page)
    if suffix == ".pdf":
        raise StarqaError(f"{label} is not a readable PDF (no %PDF header): check the file, or export it again "
                          "from the program that made it")
    warnings = []
    if password is not None:
        warnings.append(f"--password is ignored: {label} is not a PDF")
    text, text_warnings = decode_text(data, label)
    pages_text = _text_pages(text)
    if not any(part.strip() for part in pages_text):
        raise StarqaError(f"{label} contains only whitespace: there is no text to read; check that it is the "
                          "right file")
    joined, pages = _join_pages([[part] if part else [] for part in pages_text], separator="\n\n")
    kind = "stdin" if label == "standard input" else "text"
    return ExtractedDocument(text=joined, pages=pages, kind=kind, warnings=tuple(warnings + text_warnings))


# ------------------------------------------------------------------------------------------------- page lookup


def page_of_offset(pages: Sequence[Page], offset: int) -> int:
    """The number of the page that holds char `offset`; offsets before the text give the first page, offsets at
    or past its end the last page that has any text."""
    if not pages:
        raise ValueError("empty page map")
    if offset >= pages[-1].end:
        return next((page.number for page in reversed(pages) if page.end > page.start), pages[-1].number)
    index = bisect.bisect_right([page.start for page in pages], offset) - 1
    return pages[max(index, 0)].number


def pages_of_span(pages: Sequence[Page], start: int, end: int) -> list[int]:
    """Numbers of the pages that overlap chars [start, end); an empty span gives the page holding `start`."""
    hits = [page.number for page in pages
            if page.start < end and page.end > start and page.end > page.start] if end > start else []
    return hits or [page_of_offset(pages, start)]


# -------------------------------------------------------------------------------------------------------- text


def _text_pages(text: str) -> list[str]:
    """Line endings -> \\n, trailing whitespace stripped; pages split on form feeds (a trailing empty page dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    parts = text.split("\f")
    pages = []
    for part in parts:
        lines = [line.rstrip() for line in part.split("\n")]
        pages.append("\n".join(lines).strip("\n"))
    while len(pages) > 1 and not pages[-1]:
        pages.pop()
    return pages


def _join_pages(page_paragraphs: list[list[str]], separator: str) -> tuple[str, tuple[Page, ...]]:
    """Join per-page paragraphs with `separator` (which belongs to the page before it)."""
    pieces: list[str] = []
    piece_pages: list[int] = []
    for page, paragraphs in enumerate(page_paragraphs):
        for paragraph in paragraphs:
            if pieces:
                pieces.append(separator)
                piece_pages.append(piece_pages[-1])
            pieces.append(paragraph)
            piece_pages.append(page)
    return _assemble(pieces, piece_pages, len(page_paragraphs))


def _assemble(pieces: list[str], piece_pages: list[int], total: int) -> tuple[str, tuple[Page, ...]]:
    """The text and its page map from pieces tagged with 0-based page indices (non-decreasing)."""
    builder = _TextBuilder()
    for piece, page in zip(pieces, piece_pages):
        builder.add(piece, page)
    return builder.finish(total)


class _TextBuilder:
    """Builds the text and its page map from pieces added in order, each tagged with its 0-based page index.

    A page starts at its first piece; a page with no pieces is empty and sits where the next page starts (or at the
    end of the text); each page ends where the next one starts, so the map covers the text.
    """

    _JOIN_EVERY = 4096  # pieces; joining them keeps the overhead of many small strings off a long document

    def __init__(self) -> None:
        self._joined: list[str] = []
        self._pieces: list[str] = []  # the latest pieces: the last one may still be cut
        self._starts: list[int] = []
        self._offset = 0

    def add(self, piece: str, page: int) -> None:
        while len(self._starts) <= page:
            self._starts.append(self._offset)
        self._pieces.append(piece)
        self._offset += len(piece)
        if len(self._pieces) >= self._JOIN_EVERY:
            self._joined.append("".join(self._pieces[:-1]))
            del self._pieces[:-1]

    def cut(self, chars: int) -> None:
        """Remove the last `chars` characters of the last piece added."""
        self._pieces[-1] = self._pieces[-1][:-chars]
        self._offset -= chars

    def finish(self, total: int) -> tuple[str, tuple[Page, ...]]:
        starts = self._starts
        while len(starts) < total:
            starts.append(self._offset)
        if starts:
            starts[0] = 0
        ends = starts[1:] + [self._offset]
        text = "".join(self._joined + self._pieces)
        return text, tuple(Page(number=i + 1, start=s, end=e) for i, (s, e) in enumerate(zip(starts, ends)))


# --------------------------------------------------------------------------------------------------------- PDF


@dataclass
class _Line:
    text: str
    page: int  # 0-based index
    y: float | None  # baseline in user space (None when unknown)


class _LogCollector(logging.Handler):
    """Collects pypdf's log messages during a read, to report them as one warning instead of stray log lines."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _extract_pdf(data: bytes, label: str, *, password: str | None,
                 on_page: Callable[[int, int], None] | None) -> ExtractedDocument:
    import pypdf
    from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

    warnings: list[str] = []
    spill = _PageSpill()
    logger = logging.getLogger("pypdf")
    collector = _LogCollector()
    logger.addHandler(collector)
    saved_propagate, logger.propagate = logger.propagate, False
    damaged = (PyPdfError, ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError,
               RecursionError, ZeroDivisionError, OverflowError, UnicodeError, EOFError)
    try:
        try:
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            encrypted = reader.is_encrypted
        except damaged as error:
            raise StarqaError(f"{label} is not a readable PDF ({one_line(error, 120)}): check the file, or export it "
                              "again from the program that made it") from None
        if encrypted:
            try:
                if password is None:
                    if not reader.decrypt(""):  # only an owner password: opens without one
                        raise StarqaError(f"{label} is encrypted: pass --password")
                elif not reader.decrypt(password):
                    raise StarqaError(f"{label}: the password is wrong: check the value given to --password")
            except DependencyError:
                raise StarqaError(f"{label} is encrypted with AES, which needs the 'cryptography' package: "
                                  "pip install cryptography") from None
            except StarqaError:
                raise
            except damaged as error:
                raise StarqaError(f"{label} is encrypted and cannot be decrypted ({one_line(error, 120)}): remove the "
                                  "encryption with the program that made it") from None
        elif password is not None:
            warnings.append(f"--password is ignored: {label} is not encrypted")
        try:
            total = len(reader.pages)
        except FileNotDecryptedError:
            raise StarqaError(f"{label} is encrypted: pass --password") from None
        except damaged as error:
            raise StarqaError(f"{label} is not a readable PDF ({one_line(error, 120)}): check the file, or export it "
                              "again from the program that made it") from None
        if total == 0:
            raise StarqaError(f"{label} has no pages: check the file")

        # Pages stream through: each one's lines are spilled to a temporary file as it is extracted, and only its
        # first and last lines (where running headers and footers are) stay in memory.
        failed: list[int] = []
        blank: list[int] = []
        edges: list[tuple[list[_Line], list[_Line]]] = []
        for index in range(total):
            try:
                lines = _page_lines(reader.pages[index], index)
            except damaged:
                failed.append(index + 1)
                lines = []
            else:
                if not any(line.text.strip() for line in lines):
                    blank.append(index + 1)
            spill.write(lines)
            edges.append((lines[:_EDGE], lines[-_EDGE:]))
            if (index + 1) % _PARSED_OBJECTS_PAGES == 0:
                _forget_parsed_objects(reader)
            if on_page is not None:
                on_page(index + 1, total)
        del reader
        if len(failed) == total:
            raise StarqaError(f"{label} is not a readable PDF (no page could be read): check the file, or export "
                              "it again from the program that made it")
        if len(failed) + len(blank) == total:
            raise StarqaError(f"{label} has no text layer (scanned?): run OCR first (e.g. ocrmypdf) and ingest "
                              "the result")
        if failed:
            warnings.append(f"{label}: could not read {_page_list(failed)}: their text is missing")
        if blank and len(blank) < total:
            warnings.append(f"{label}: {_page_list(blank)} {'has' if len(blank) == 1 else 'have'} no text "
                            "(scanned images?): run OCR on the file if they matter")
        if collector.messages:
            more = f" (and {len(collector.messages) - 1} more)" if len(collector.messages) > 1 else ""
            warnings.append(f"{label}: the PDF reader reported problems: {collector.messages[0]}{more}; the text "
                            "may be incomplete")

        running = _running_lines(edges)
        del edges
        text, pages = _paragraphs(lambda: (running.strip(lines) for lines in spill.read()), total)
    finally:
        logger.removeHandler(collector)
        logger.propagate = saved_propagate
        spill.close()

    if not text.strip():
        raise StarqaError(f"{label} has no text layer (scanned?): run OCR first (e.g. ocrmypdf) and ingest the "
                          "result")
    return ExtractedDocument(text=text, pages=pages, kind="pdf", warnings=tuple(warnings))


# pypdf keeps every object it has parsed (content streams, fonts) for the life of the reader; forgetting them every
# so many pages keeps its memory flat on long documents, at no measurable cost in speed.
_PARSED_OBJECTS_PAGES = 32


def _forget_parsed_objects(reader) -> None:
    cache = getattr(reader, "resolved_objects", None)
    if isinstance(cache, dict):
        cache.clear()


class _PageSpill:
    """Each page's lines, written to a temporary file (one JSON line per page) and read back in order."""

    def __init__(self) -> None:
        try:
            self._file = tempfile.TemporaryFile("w+", encoding="utf-8", prefix="starqa-pages-")
        except OSError:  # no writable temporary folder: keep them in memory
            self._file = io.StringIO()

    def write(self, lines: list[_Line]) -> None:
        self._file.write(json.dumps([[line.text, line.y] for line in lines], ensure_ascii=False) + "\n")

    def read(self) -> Iterator[list[_Line]]:
        self._file.flush()
        self._file.seek(0)
        for index, row in enumerate(self._file):
            yield [_Line(text, index, y) for text, y in json.loads(row)]

    def close(self) -> None:
        self._file.close()


def _page_list(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10]) + (", ..." if len(numbers) > 10 else "")
    return f"page{'s' if len(numbers) > 1 else ''} {shown}"


_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "st", "\ufb06": "st", "\u00a0": " ", "\t": " ", "\u2002": " ", "\u2003": " ",
                            "\u2009": " ", "\u200b": None, "\ufeff": None, "\x00": None})


def _clean(line: str) -> str:
    line = line.translate(_LIGATURES)
    line = re.sub(r"\u00ad(?=.)", "", line)  # soft hyphens inside a line are invisible
    return re.sub(r" {2,}", " ", line).strip()


def _page_lines(page, index: int) -> list[_Line]:
    """The page's text lines in reading order, each with its baseline y where pypdf tells us."""
    chunks: list[tuple[str, float | None]] = []

    def visitor(text, cm, tm, font_dict, font_size):
        try:
            y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]
        except (TypeError, IndexError):
            y = None
        chunks.append((text, y))

    raw = page.extract_text(visitor_text=visitor)
    if "".join(text for text, _ in chunks) != raw:
        chunks = [(raw, None)]  # positions do not line up with the text: do without them
    lines: list[_Line] = []
    current: list[str] = []
    current_y: float | None = None
    for text, y in chunks:
        parts = text.split("\n")
        for number, part in enumerate(parts):
            if number:
                lines.append(_Line(_clean("".join(current)), index, current_y))
                current, current_y = [], None
            if part.strip() and current_y is None and not "".join(current).strip():
                current_y = y if number == 0 else None
            current.append(part)
    if current:
        lines.append(_Line(_clean("".join(current)), index, current_y))
    while lines and not lines[-1].text:
        lines.pop()
    while lines and not lines[0].text:
        lines.pop(0)
    return lines


# Running headers and footers.
_EDGE = 4  # how many lines at the top and at the bottom of a page may be header or footer
_PAGE_NUMBER = re.compile(r"^(?:page\s*)?[-\u2013\u2014 ]*\d{1,4}[-\u2013\u2014 ]*(?:(?:of|/)\s*\d{1,4})?$",
                          re.IGNORECASE)


def _edge_key(text: str) -> str:
    return re.sub(r"\d+", "#", " ".join(text.lower().split()))


@dataclass(frozen=True)
class _RunningLines:
    """The running headers and footers of a document, found by `_running_lines`; `strip` drops them from a page."""

    keys: dict[str, set[str]]  # zone ("top", "bottom") -> edge keys of its running lines
    page_number_offset: int | None  # page label minus page index, when the edges of most pages carry it
    bare_number_offset: int | None  # the same for bare page-number lines ("7", "- 7 -", "Page 7 of 20")

    def strip(self, lines: list[_Line]) -> list[_Line]:
        """The page's lines without running headers and footers, page numbers and blank edge lines.

        A bare number is dropped only when it is this page's number: a table's last cell ("1250") stays.
        """
        lines = list(lines)
        for zone, index in (("top", 0), ("bottom", -1)):
            removed = 0
            while lines and removed < _EDGE and self._is_edge_line(lines[index], zone, first=removed == 0):
                lines.pop(index)
                removed += 1
        return lines

    def _is_edge_line(self, line: _Line, zone: str, *, first: bool) -> bool:
        if not line.text:
            return True
        bare = _bare_page_number(line.text)
        if bare is not None:
            return self.bare_number_offset is not None and bare - line.page == self.bare_number_offset
        if _edge_key(line.text) in self.keys[zone]:
            return True
        offset = self.page_number_offset
        return first and offset is not None and offset + line.page in _edge_numbers(line)


def _running_lines(edges: Sequence[tuple[list[_Line], list[_Line]]]) -> _RunningLines:
    """Find running headers and footers from each page's first and last `_EDGE` lines (all that `strip` looks at).

    A running line sits among the first (or last) few lines of more than half of the pages that have text, with
    digits matching any digits; it must read the same on those pages ("CONFIDENTIAL") or carry a number that
    counts with the pages ("Page 3 of 7"), so that "Article 5", "Article 9" at the tops of pages stay.
    """
    with_text = [(head, tail) for head, tail in edges if head]
    need = max(2, len(with_text) // 2 + 1)
    running: dict[str, set[str]] = {}
    for zone in ("top", "bottom"):
        seen: dict[str, dict[int, str]] = {}
        for head, tail in with_text:
            for line in head if zone == "top" else tail:
                if line.text:
                    seen.setdefault(_edge_key(line.text), {}).setdefault(line.page, " ".join(line.text.split()))
        running[zone] = {key for key, occurrences in seen.items()
                         if len(occurrences) >= need and _is_running(occurrences, need)}
    return _RunningLines(running, _page_number_offset(with_text, need), _bare_number_offset(with_text, need))


def _bare_page_number(text: str) -> int | None:
    """The number of a line that is only a page number ("7", "- 7 -", "Page 7", "7 of 20"), else None."""
    return int(re.search(r"\d+", text).group()) if _PAGE_NUMBER.match(text) else None


def _bare_number_offset(edges: Sequence[tuple[list[_Line], list[_Line]]], need: int) -> int | None:
    """The page label minus the page index of bare page-number lines, when `need` pages agree on it; else None."""
    offsets: Counter = Counter()
    for head, tail in edges:
        bare = ((_bare_page_number(line.text), line.page) for line in head + tail if line.text)
        offsets.update({number - page for number, page in bare if number is not None})
    if not offsets:
        return None
    offset, count = offsets.most_common(1)[0]
    return offset if count >= need else None


def _edge_numbers(line: _Line) -> set[int]:
    """Numbers at the start or end of a short line: where headers put the page number ("Chapter 2: Scope 7")."""
    if len(line.text) > 100:
        return set()
    return {int(number) for pair in re.findall(r"^(\d{1,4})\b|\b(\d{1,4})$", line.text) for number in pair if number}


def _page_number_offset(edges: Sequence[tuple[list[_Line], list[_Line]]], need: int) -> int | None:
    """The page label minus the page index, when the first or last lines of most pages carry it; else None.

    This finds headers whose text changes from chapter to chapter but that carry the page number.
    """
    offsets: Counter = Counter()
    for head, tail in edges:
        offsets.update({number - line.page for line in head[:1] + tail[-1:] for number in _edge_numbers(line)})
    if not offsets:
        return None
    offset, count = offsets.most_common(1)[0]
    return offset if count >= need else None


def _is_running(occurrences: dict[int, str], need: int) -> bool:
    """Same text on `need` pages, or a number in it that is the page index plus a constant on `need` pages."""
    if Counter(occurrences.values()).most_common(1)[0][1] >= need:
        return True
    numbers = {page: [int(n) for n in re.findall(r"\d+", text)] for page, text in occurrences.items()}
    width = min(len(values) for values in numbers.values())
    for position in range(width):
        offsets = Counter(values[position] - page for page, values in numbers.items())
        if offsets.most_common(1)[0][1] >= need:
            return True
    return False


# Paragraphs.
_CLAUSE_START = re.compile(
    r"^(?:\d{1,3}(?:\.\d{1,3})*\.?\s|\(\s?(?:[a-zA-Z]|[ivxlcIVXLC]{1,6}|\d{1,3})\s?\)\s|[a-zA-Z][.)]\s"
    r"|[\u2022\u25cf\u25aa\u2023\u2043\u00b7*\u2013\u2014-]\s|[\u201c\"'\u2018][A-Z])"
)
_SENTENCE_END = re.compile(r"[.:;!?][\u201d\"'\u2019)\]]*$")
_HYPHEN_END = re.compile(r"(\w+)[-\u00ad]$")
_WORD_START = re.compile(r"^(\w+)")


def _paragraphs(read_pages: Callable[[], Iterable[list[_Line]]], total: int) -> tuple[str, tuple[Page, ...]]:
    """The text and page map of the pages' body lines; `read_pages()` gives the pages, in order, once per pass.

    The first pass measures the layout and collects the vocabulary; the second joins lines into paragraphs.
    """
    counts = _LayoutCounts()
    words: set[str] = set()
    compounds: set[str] = set()
    for lines in read_pages():
        counts.add(lines)
        _add_vocabulary([line for line in lines if line.text], words, compounds)
    layout = counts.layout()

    text = _TextBuilder()
    previous: _Line | None = None
    blank_before = False
    for lines in read_pages():
        for line in lines:
            if not line.text:
                blank_before = True
                continue
            if previous is None:
                text.add(line.text, line.page)
            elif blank_before or _breaks(previous, line, layout):
                text.add("\n\n", previous.page)
                text.add(line.text, line.page)
            else:
                cut, joint = _join(previous.text, line.text, words, compounds)
                if cut:
                    text.cut(cut)
                if joint:
                    text.add(joint, previous.page)
                text.add(line.text, line.page)
            previous = line
            blank_before = False
    return text.finish(total)


def _join(before: str, after: str, words: set[str], compounds: set[str]) -> tuple[int, str]:
    """How to join two lines of one paragraph: (chars to cut from the end of `before`, text to put between)."""
    match = _HYPHEN_END.search(before)
    if match:
        if before.endswith("\u00ad"):
            return 1, ""  # a soft hyphen: the word was broken there
        start = _WORD_START.match(after)
        if start and after[0].islower():
            head, tail = match.group(1), start.group(1)
            joined, compound = (head + tail).lower(), f"{head}-{tail}".lower()
            if compound in compounds and joined not in words:
                return 0, ""  # a real hyphen that happens to fall at the line end ("well-\nknown")
            return 1, ""  # a word hyphenated by the layout ("termi-\nnation")
        if start:
            return 0, ""  # "SOW-\n001", "non-\nEU": keep the hyphen, no space
    if before.endswith(("\u2014", "\u2013")) and not before.endswith((" \u2014", " \u2013")):
        return 0, ""  # an unspaced dash
    return 0, " "


def _breaks(previous: _Line, line: _Line, layout: _Layout) -> bool:
    """Whether `line` starts a new paragraph after `previous`."""
    if layout.pitch and previous.page == line.page and previous.y is not None and line.y is not None:
        gap = previous.y - line.y
        if gap > layout.paragraph_gap:
            return True
        if layout.spaced and gap > 0:
            return False  # paragraphs are spaced and this is an ordinary line's gap: the same paragraph
    if _SENTENCE_END.search(previous.text) and _CLAUSE_START.match(line.text):
        return True
    # A short line whose successor's first word would have fitted on it ended a paragraph.
    first_word = line.text.split(" ", 1)[0]
    return (len(previous.text) < 0.7 * layout.full and not _HYPHEN_END.search(previous.text)
            and len(previous.text) + 1 + len(first_word) < 0.95 * layout.full)


@dataclass(frozen=True)
class _Layout:
    full: float  # chars in a full line of body text
    pitch: float | None  # usual distance between baselines
    paragraph_gap: float  # a larger distance than this separates paragraphs
    spaced: bool  # whether the document separates paragraphs by space (then gaps decide, on one page)


class _LayoutCounts:
    """Line lengths and baseline gaps of the body text, counted page by page, and the `_Layout` they give."""

    def __init__(self) -> None:
        self.lengths: Counter = Counter()  # chars in a line -> lines
        self.gaps: Counter = Counter()  # distance between consecutive baselines on a page (to 0.5) -> times

    def add(self, lines: list[_Line]) -> None:
        """One page's lines, in order."""
        self.lengths.update(len(line.text) for line in lines if line.text)
        for previous, line in zip(lines, lines[1:]):
            if previous.page == line.page and previous.y is not None and line.y is not None and line.text:
                gap = previous.y - line.y
                if gap > 0:
                    self.gaps[round(gap * 2) / 2] += 1

    def layout(self) -> _Layout:
        full = 0.0
        n_lines = sum(self.lengths.values())
        if n_lines:
            rank = min(n_lines - 1, int(n_lines * 0.8))  # the 80th percentile of the lengths
            for length in sorted(self.lengths):
                rank -= self.lengths[length]
                if rank < 0:
                    full = float(length)
                    break
        n_gaps = sum(self.gaps.values())
        if n_gaps < 5:
            return _Layout(full=full, pitch=None, paragraph_gap=float("inf"), spaced=False)
        best = max(self.gaps.values())
        pitch = statistics.median(gap for gap, count in self.gaps.items() if count == best)
        paragraph_gap = pitch * 1.2 + 0.5
        wide = sum(count for gap, count in self.gaps.items() if gap > paragraph_gap)
        return _Layout(full=full, pitch=pitch, paragraph_gap=paragraph_gap, spaced=wide >= max(3, 0.05 * n_gaps))


def _add_vocabulary(lines: list[_Line], words: set[str], compounds: set[str]) -> None:
    """Add the words and hyphenated compounds that occur inside lines (not split across them), lowercased."""
    for line in lines:
        text = line.text.lower()
        words.update(re.findall(r"\w+", text))
        for compound in re.findall(r"\w+(?:-\w+)+", text.rstrip("-")):
            parts = compound.split("-")
            compounds.update(f"{a}-{b}" for a, b in zip(parts, parts[1:]))
