"""Turn a PDF or text file (or stdin) into normalised reading text with a page map over it.

PDF text is rebuilt as a word processor's paragraphs: running headers, footers and page numbers are dropped, lines
wrapped inside a paragraph are joined and words hyphenated at line ends are rejoined, because a small model answers
far worse from hard-wrapped text. Text that is not valid UTF-8 is decoded with replacement characters (U+FFFD) and
a warning, rather than refused: one bad byte in a long file should not stop an ingest.
"""

from __future__ import annotations

import bisect
import io
import logging
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from starqa.errors import StarqaError, UsageError

__all__ = ["Page", "ExtractedDocument", "extract_document", "page_of_offset", "pages_of_span"]

_SNIFF_BYTES = 8192


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
    "pdf"); a ".pdf" file that does not is reported as damaged; anything else is read as UTF-8 text, one page per
    form-feed-separated part. `on_page(done, total)` is called after each PDF page is extracted.
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
    text, text_warnings = _decode_text(data, label)
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


def _decode_text(data: bytes, label: str) -> tuple[str, list[str]]:
    binary = StarqaError(f"{label} looks like a binary file, not text or PDF: convert it to PDF or plain text first")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte order mark
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            raise binary from None
        if "\x00" in text[:_SNIFF_BYTES]:
            raise binary
        return text, []
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise binary
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        return text, [f"{label}: decoded with replacement characters: the file is not valid UTF-8 "
                      f"({text.count(chr(0xFFFD))} bad bytes); re-save it as UTF-8 for an exact text"]


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
    """The text and its page map from pieces tagged with 0-based page indices (non-decreasing).

    A page starts at its first piece; a page with no pieces is empty and sits where the next page starts (or at the
    end of the text); each page ends where the next one starts, so the map covers the text.
    """
    starts: list[int] = []
    offset = 0
    for piece, page in zip(pieces, piece_pages):
        while len(starts) <= page:
            starts.append(offset)
        offset += len(piece)
    while len(starts) < total:
        starts.append(offset)
    if starts:
        starts[0] = 0
    ends = starts[1:] + [offset]
    return "".join(pieces), tuple(Page(number=i + 1, start=s, end=e) for i, (s, e) in enumerate(zip(starts, ends)))


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
            raise StarqaError(f"{label} is not a readable PDF ({_reason(error)}): check the file, or export it "
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
                raise StarqaError(f"{label} is encrypted and cannot be decrypted ({_reason(error)}): remove the "
                                  "encryption with the program that made it") from None
        elif password is not None:
            warnings.append(f"--password is ignored: {label} is not encrypted")
        try:
            total = len(reader.pages)
        except FileNotDecryptedError:
            raise StarqaError(f"{label} is encrypted: pass --password") from None
        except damaged as error:
            raise StarqaError(f"{label} is not a readable PDF ({_reason(error)}): check the file, or export it "
                              "again from the program that made it") from None
        if total == 0:
            raise StarqaError(f"{label} has no pages: check the file")

        pages_lines: list[list[_Line]] = []
        failed: list[int] = []
        for index in range(total):
            try:
                pages_lines.append(_page_lines(reader.pages[index], index))
            except damaged:
                failed.append(index + 1)
                pages_lines.append([])
            if on_page is not None:
                on_page(index + 1, total)
    finally:
        logger.removeHandler(collector)
        logger.propagate = saved_propagate

    if len(failed) == total:
        raise StarqaError(f"{label} is not a readable PDF (no page could be read): check the file, or export it "
                          "again from the program that made it")
    if not any(line.text.strip() for lines in pages_lines for line in lines):
        raise StarqaError(f"{label} has no text layer (scanned?): run OCR first (e.g. ocrmypdf) and ingest the "
                          "result")
    if failed:
        warnings.append(f"{label}: could not read {_page_list(failed)}: their text is missing")
    blank = [i + 1 for i, lines in enumerate(pages_lines)
             if i + 1 not in failed and not any(line.text.strip() for line in lines)]
    if blank and len(blank) < total:
        warnings.append(f"{label}: {_page_list(blank)} {'has' if len(blank) == 1 else 'have'} no text "
                        "(scanned images?): run OCR on the file if they matter")
    if collector.messages:
        more = f" (and {len(collector.messages) - 1} more)" if len(collector.messages) > 1 else ""
        warnings.append(f"{label}: the PDF reader reported problems: {collector.messages[0]}{more}; the text may "
                        "be incomplete")

    body = _drop_running_lines(pages_lines)
    text, pages = _paragraphs(body, total)
    if not text.strip():
        raise StarqaError(f"{label} has no text layer (scanned?): run OCR first (e.g. ocrmypdf) and ingest the "
                          "result")
    return ExtractedDocument(text=text, pages=pages, kind="pdf", warnings=tuple(warnings))


def _reason(error: BaseException) -> str:
    message = " ".join(str(error).split())
    if len(message) > 120:
        message = message[:117] + "..."
    return message or type(error).__name__


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


def _drop_running_lines(pages_lines: list[list[_Line]]) -> list[list[_Line]]:
    """Drop running headers and footers, and bare page numbers, from the top and bottom of each page.

    A running line sits among the first (or last) few lines of more than half of the pages that have text, with
    digits matching any digits; it must read the same on those pages ("CONFIDENTIAL") or carry a number that
    counts with the pages ("Page 3 of 7"), so that "Article 5", "Article 9" at the tops of pages stay.
    """
    with_text = [lines for lines in pages_lines if lines]
    need = max(2, len(with_text) // 2 + 1)
    running: dict[str, set[str]] = {}
    for zone in ("top", "bottom"):
        seen: dict[str, dict[int, str]] = {}
        for lines in with_text:
            edge = lines[:_EDGE] if zone == "top" else lines[-_EDGE:]
            for line in edge:
                if line.text:
                    seen.setdefault(_edge_key(line.text), {}).setdefault(line.page, " ".join(line.text.split()))
        running[zone] = {key for key, occurrences in seen.items()
                         if len(occurrences) >= need and _is_running(occurrences, need)}

    offset = _page_number_offset(with_text, need)
    result = []
    for lines in pages_lines:
        lines = list(lines)
        for zone, index in (("top", 0), ("bottom", -1)):
            removed = 0
            while lines and removed < _EDGE and (
                    not lines[index].text or _PAGE_NUMBER.match(lines[index].text)
                    or _edge_key(lines[index].text) in running[zone]
                    or (removed == 0 and offset is not None
                        and offset + lines[index].page in _edge_numbers(lines[index]))):
                lines.pop(index)
                removed += 1
        result.append(lines)
    return result


def _edge_numbers(line: _Line) -> set[int]:
    """Numbers at the start or end of a short line: where headers put the page number ("Chapter 2: Scope 7")."""
    if len(line.text) > 100:
        return set()
    return {int(number) for pair in re.findall(r"^(\d{1,4})\b|\b(\d{1,4})$", line.text) for number in pair if number}


def _page_number_offset(pages_lines: list[list[_Line]], need: int) -> int | None:
    """The page label minus the page index, when the first or last lines of most pages carry it; else None.

    This finds headers whose text changes from chapter to chapter but that carry the page number.
    """
    offsets: Counter = Counter()
    for lines in pages_lines:
        offsets.update({number - line.page for line in lines[:1] + lines[-1:] for number in _edge_numbers(line)})
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


def _paragraphs(pages_lines: list[list[_Line]], total: int) -> tuple[str, tuple[Page, ...]]:
    lines = [line for page in pages_lines for line in page]
    layout = _layout(lines)
    words, compounds = _vocabulary([line for line in lines if line.text])

    pieces: list[str] = []
    piece_pages: list[int] = []
    previous: _Line | None = None
    blank_before = False
    for line in lines:
        if not line.text:
            blank_before = True
            continue
        if previous is None:
            pieces.append(line.text)
            piece_pages.append(line.page)
        elif blank_before or _breaks(previous, line, layout):
            pieces.append("\n\n")
            piece_pages.append(previous.page)
            pieces.append(line.text)
            piece_pages.append(line.page)
        else:
            cut, joint = _join(pieces[-1], line.text, words, compounds)
            if cut:
                pieces[-1] = pieces[-1][:-cut]
            if joint:
                pieces.append(joint)
                piece_pages.append(previous.page)
            pieces.append(line.text)
            piece_pages.append(line.page)
        previous = line
        blank_before = False

    return _assemble(pieces, piece_pages, total)


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


def _layout(lines: list[_Line]) -> _Layout:
    body = [line.text for line in lines if line.text]
    lengths = sorted(len(text) for text in body)
    full = float(lengths[min(len(lengths) - 1, int(len(lengths) * 0.8))]) if lengths else 0.0
    gaps = []
    for previous, line in zip(lines, lines[1:]):
        if previous.page == line.page and previous.y is not None and line.y is not None and line.text:
            gap = previous.y - line.y
            if gap > 0:
                gaps.append(round(gap * 2) / 2)
    if len(gaps) < 5:
        return _Layout(full=full, pitch=None, paragraph_gap=float("inf"), spaced=False)
    counts = Counter(gaps)
    best = max(counts.values())
    pitch = statistics.median(gap for gap, count in counts.items() if count == best)
    paragraph_gap = pitch * 1.2 + 0.5
    wide = sum(1 for gap in gaps if gap > paragraph_gap)
    return _Layout(full=full, pitch=pitch, paragraph_gap=paragraph_gap, spaced=wide >= max(3, 0.05 * len(gaps)))


def _vocabulary(lines: list[_Line]) -> tuple[set[str], set[str]]:
    """Words and hyphenated compounds that occur inside lines (not split across them), lowercased."""
    words: set[str] = set()
    compounds: set[str] = set()
    for line in lines:
        text = line.text.lower()
        words.update(re.findall(r"\w+", text))
        for compound in re.findall(r"\w+(?:-\w+)+", text.rstrip("-")):
            parts = compound.split("-")
            compounds.update(f"{a}-{b}" for a, b in zip(parts, parts[1:]))
    return words, compounds
