"""Tests of starqa.documents.extraction: PDF/text extraction, normalisation, the page map, and the errors users see.

The sample contract (samples/contract.pdf) is laid out like a word processor's output: justified, hard-wrapped
lines, words hyphenated at line ends, a running header and a "Page N of M" footer. Its normalised text must equal
the plain-text twin samples/contract.txt, paragraph by paragraph. No model is involved; the file runs in seconds.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
from pathlib import Path

import pypdf
import pytest

from starqa.documents.extraction import ExtractedDocument, Page, extract_document, page_of_offset, pages_of_span
from starqa.errors import StarqaError, UsageError

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SAMPLE_PDF = SAMPLES / "contract.pdf"
SAMPLE_TXT = SAMPLES / "contract.txt"


@pytest.fixture(scope="module")
def sample() -> ExtractedDocument:
    return extract_document(SAMPLE_PDF)


@pytest.fixture(scope="module")
def raw_pages() -> list[str]:
    """The sample's pages as pypdf extracts them, before any normalisation."""
    return [page.extract_text() for page in pypdf.PdfReader(SAMPLE_PDF).pages]


def _paragraphs(text: str) -> list[str]:
    return [" ".join(paragraph.split()) for paragraph in text.strip().split("\n\n")]


# ----------------------------------------------------------------------------------------------- the sample PDF


def test_sample_pdf_text_equals_its_plain_text_twin(sample):
    twin = SAMPLE_TXT.read_text(encoding="utf-8")
    assert "\f" not in twin
    assert _paragraphs(sample.text) == _paragraphs(twin)  # paragraph by paragraph: a readable diff on failure
    assert sample.text == twin.strip()  # and exactly
    assert sample.kind == "pdf"
    assert sample.warnings == ()


def test_sample_pdf_needs_normalising(raw_pages):
    """The raw text layer has what the normaliser must remove, so the equality above means something."""
    raw = "\n".join(raw_pages)
    assert len(raw_pages) >= 5
    assert all("CONFIDENTIAL" in page and re.search(r"Page \d+ of \d+", page) for page in raw_pages)
    assert len(re.findall(r"[a-z]-\n[a-z]", raw)) >= 3  # words hyphenated at line ends
    assert re.search(r"[a-z,] ?\n[a-z]", raw)  # lines wrapped inside paragraphs


def test_sample_has_no_headers_footers_or_wraps(sample):
    text = sample.text
    assert not re.search(r"\bCONFIDENTIAL\b", text)  # the heading "7. CONFIDENTIALITY" stays
    for running in ("Northwind / Brightwater", "execution version", "Page 1 of", "Page 7 of"):
        assert running not in text
    assert "termination" in text and "termi-" not in text
    paragraphs = text.split("\n\n")
    assert all(paragraph and "\n" not in paragraph for paragraph in paragraphs)
    assert "software-as-a-service" in text  # real hyphens stay


def test_sample_page_map_is_monotonic_and_covers_the_text(sample):
    pages = sample.pages
    assert len(pages) >= 5
    assert [page.number for page in pages] == list(range(1, len(pages) + 1))
    assert pages[0].start == 0 and pages[-1].end == len(sample.text)
    for page, following in zip(pages, pages[1:]):
        assert page.start < page.end == following.start


def test_phrases_map_to_the_page_they_are_printed_on(sample, raw_pages):
    """For each page, lines printed on it (found with pypdf alone) map back to that page number."""
    checked = 0
    for number, raw in enumerate(raw_pages, start=1):
        lines = [line.strip() for line in raw.split("\n")]
        candidates = [line for line in lines[3:-3] if len(line) > 40 and not line.endswith("-")]
        for line in candidates[:3]:
            if sample.text.count(line) == 1:
                offset = sample.text.index(line)
                assert page_of_offset(sample.pages, offset) == number, line
                assert page_of_offset(sample.pages, offset + len(line) - 1) == number, line
                assert pages_of_span(sample.pages, offset, offset + len(line)) == [number]
                checked += 1
    assert checked >= 2 * len(raw_pages)
    # Well-known facts of the sample, on the pages where a reader sees them.
    for phrase in ("ninety (90) days' written notice", "laws of England and Wales", "Daniel Okafor"):
        printed_on = [n for n, raw in enumerate(raw_pages, start=1) if phrase in " ".join(raw.split())]
        assert printed_on, phrase
        assert page_of_offset(sample.pages, sample.text.index(phrase)) == printed_on[0]


def test_a_paragraph_continued_on_the_next_page_is_joined_and_split_by_page(sample, raw_pages):
    spanning = []
    offset = 0
    for paragraph in sample.text.split("\n\n"):
        pages = pages_of_span(sample.pages, offset, offset + len(paragraph))
        if len(pages) > 1:
            spanning.append((paragraph, pages))
        offset += len(paragraph) + 2
    assert spanning, "the sample should have a paragraph that runs over a page break"
    paragraph, pages = spanning[0]
    assert pages == [pages[0], pages[0] + 1]
    start = sample.text.index(paragraph)
    boundary = sample.pages[pages[1] - 1].start  # the first char that came from the later page
    assert start < boundary < start + len(paragraph)
    head, tail = sample.text[start:boundary], sample.text[boundary:start + len(paragraph)]
    squash = "".join
    assert squash(tail.split())[:30] in squash(raw_pages[pages[1] - 1].split())
    assert squash(head.split())[-30:] in squash(raw_pages[pages[0] - 1].replace("-\n", "").split())


def test_on_page_reports_progress():
    calls = []
    document = extract_document(SAMPLE_PDF, on_page=lambda done, total: calls.append((done, total)))
    total = len(document.pages)
    assert calls == [(done, total) for done in range(1, total + 1)]


# ----------------------------------------------------------------------------------------- normalisation of PDFs


def _write_pdf(path: Path, pages: list[list[str]], *, header: str | None = None,
               footer: str | None = None, leading: float = 14.0) -> None:
    """A PDF whose pages hold the given lines (no extra space between them), with optional running lines."""
    from reportlab.pdfgen.canvas import Canvas

    canvas = Canvas(str(path), pagesize=(595, 842))
    for number, lines in enumerate(pages, start=1):
        canvas.setFont("Helvetica", 10)
        if header:
            canvas.drawString(72, 800, header)
        if footer:
            canvas.drawString(260, 40, footer.format(n=number, m=len(pages)))
        y = 760
        for line in lines:
            canvas.drawString(72, y, line)
            y -= leading
        canvas.showPage()
    canvas.save()


def test_hyphenation_real_hyphens_headers_and_page_numbers(tmp_path):
    path = tmp_path / "report.pdf"
    pages = [
        ["Section 4", "The well-known supplier shall give notice of termi-", "nation in writing, and the notice",
         "shall be well-", "known to all parties."],
        ["Section 9", "A second paragraph that is long enough to wrap onto", "another line of the page."],
        ["Section 12", "SOW-", "001 starts on the first day."],
    ]
    _write_pdf(path, pages, header="ACME Holdings - Annual Report 2024", footer="Page {n} of {m}")
    document = extract_document(path)
    text = document.text
    assert "ACME" not in text and "Page" not in text
    assert text.startswith("Section 4\n\n")
    assert "Section 9" in text and "Section 12" in text  # numbered lines at page tops that do not count pages
    assert "notice of termination in writing, and the notice shall be well-known to all parties." in text
    assert "SOW-001 starts" in text
    assert [page.number for page in document.pages] == [1, 2, 3]
    assert page_of_offset(document.pages, text.index("second paragraph")) == 2
    assert page_of_offset(document.pages, text.index("001 starts")) == 3


def test_bare_page_numbers_are_dropped(tmp_path):
    path = tmp_path / "numbers.pdf"
    first = ["A first paragraph that is long enough to fill a line", "and it ends here."]
    second = ["A new paragraph starts on the second page and it runs", "on to the next line."]
    _write_pdf(path, [first, second], footer="- {n} -")
    document = extract_document(path)
    one, two = " ".join(first), " ".join(second)
    assert document.text == f"{one}\n\n{two}"
    assert document.pages == (Page(1, 0, len(one) + 2), Page(2, len(one) + 2, len(one) + 2 + len(two)))


def test_a_number_at_a_page_edge_is_kept_unless_it_is_the_page_number(tmp_path):
    # A table's last cell sits where a page number would: it is content unless it counts with the pages.
    path = tmp_path / "table.pdf"
    pages = [["Fees per quarter in euros:", "Q1", "1250"], ["Fees per year in euros:", "2024", "5000"],
             ["The end of the schedule is here."]]
    _write_pdf(path, pages, footer="{n}")
    text = extract_document(path).text
    assert "1250" in text and "5000" in text and "2024" in text
    assert not re.search(r"(^|\n)[123]($|\n)", text)  # the page numbers 1, 2, 3 are gone
    unnumbered = tmp_path / "unnumbered.pdf"
    _write_pdf(unnumbered, [["Total:", "1250"], ["Total:", "4300"]])
    text = extract_document(unnumbered).text
    assert "1250" in text and "4300" in text


# ------------------------------------------------------------------------------------------------------- text


def test_text_file_pages_split_on_form_feeds(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first page\r\nline two   \r\n\x0csecond page\n\x0c\x0cfourth page\n\n\x0c\n")
    document = extract_document(path)
    assert document.kind == "text" and document.warnings == ()
    assert document.text == "first page\nline two\n\nsecond page\n\nfourth page"
    assert [page.number for page in document.pages] == [1, 2, 3, 4]
    assert document.pages[0] == Page(1, 0, len("first page\nline two\n\n"))
    assert document.pages[2].start == document.pages[2].end  # the empty third page
    assert page_of_offset(document.pages, document.text.index("second")) == 2
    assert page_of_offset(document.pages, document.text.index("fourth")) == 4
    assert pages_of_span(document.pages, 0, len(document.text)) == [1, 2, 4]


def test_text_file_without_form_feeds_is_one_page_kept_as_is(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# Title\n\n  indented line\nnext line \t\n", encoding="utf-8")
    document = extract_document(path)
    assert document.text == "# Title\n\n  indented line\nnext line"
    assert document.pages == (Page(1, 0, len(document.text)),)


def test_stdin_text_and_pdf(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("héllo\nworld\n".encode())))
    document = extract_document("-")
    assert (document.text, document.kind) == ("héllo\nworld", "stdin")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(SAMPLE_PDF.read_bytes())))
    document = extract_document("-")
    assert document.kind == "pdf" and document.text == SAMPLE_TXT.read_text(encoding="utf-8").strip()


def test_utf8_with_a_few_bad_bytes_is_decoded_with_a_warning(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes("Clause 1. The fee is 4,200 € per month; café ".encode("utf-8") + b"na\xefve \xff clause.\n")
    document = extract_document(path)
    assert document.text == "Clause 1. The fee is 4,200 € per month; café na\ufffdve \ufffd clause."
    assert len(document.warnings) == 1 and "not valid UTF-8" in document.warnings[0]
    assert "notes.txt" in document.warnings[0] and "2 bad bytes" in document.warnings[0]


def test_latin1_text_is_read_as_windows_1252_with_a_warning(tmp_path):
    # Not UTF-8 anywhere, and as many accents as Western European text has: a legacy 8-bit file, read exactly.
    path = tmp_path / "latin1.txt"
    text = ("Le prestataire remet les rapports chaque mardi ; la redevance mensuelle est de 4 200 € et elle est "
            "payable à trente jours. Le café crème coûte 3 € à l\u2019hôtel.")
    path.write_bytes(text.encode("cp1252") + b"\r\n")
    document = extract_document(path)
    assert document.text == text
    assert len(document.warnings) == 1 and "latin1.txt' is not UTF-8: read as Windows-1252" in document.warnings[0]


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_utf16_and_utf32_with_or_without_a_byte_order_mark_are_read_exactly(tmp_path, codec):
    # "utf-16" and "utf-32" write a byte order mark; "utf-16-le"/"-be" do not (Windows tools often write these).
    text = "Clause 7. Die Gebühr beträgt 4.200 €.\n\nClause 8. 契約は日本法に準拠する。"
    path = tmp_path / "notes.txt"
    path.write_bytes(text.encode(codec))
    document = extract_document(path)
    assert document.text == text and document.warnings == ()


def test_a_stray_nul_in_a_short_utf8_file_is_not_taken_for_utf16(tmp_path):
    # One NUL at an odd offset of a short file is not UTF-16's pattern: decoded as UTF-16 it would be CJK garbage.
    (tmp_path / "short.txt").write_bytes(b"hello\x00world, and more.")
    assert "(it has NUL bytes)" in _error(tmp_path / "short.txt")


def test_random_bytes_without_nul_are_refused_as_binary(tmp_path):
    noise = random.Random(16).randbytes(4096).replace(b"\x00", b"\x01")  # no NUL anywhere
    (tmp_path / "bin.txt").write_bytes(noise)
    message = _error(tmp_path / "bin.txt")
    assert "bin.txt" in message and "looks like a binary file" in message
    # So is text in an 8-bit encoding that is not Western European: it is not UTF-8, and Windows-1252 would
    # store wrong letters.
    (tmp_path / "cyrillic.txt").write_bytes("Договор регулируется правом Англии.\n".encode("cp1251") * 40)
    assert "looks like a binary file" in _error(tmp_path / "cyrillic.txt")


def test_text_that_is_mostly_control_characters_is_refused_as_binary(tmp_path):
    (tmp_path / "dump.txt").write_bytes(bytes(range(1, 32)) * 100 + b"some text")  # valid UTF-8, but not text
    assert "looks like a binary file" in _error(tmp_path / "dump.txt")
    # A log with terminal colour codes and a man page's backspaces are text.
    (tmp_path / "build.log").write_bytes(b"\x1b[31mERROR\x1b[0m step 3 failed\n" * 50 + b"N\bNA\bAM\bME\bE\n")
    assert extract_document(tmp_path / "build.log").text.startswith("\x1b[31mERROR")


# --------------------------------------------------------------------------------------------------- page lookup


def test_page_lookup_with_an_empty_page():
    pages = (Page(1, 0, 10), Page(2, 10, 10), Page(3, 10, 25), Page(4, 25, 25))
    assert [page_of_offset(pages, offset) for offset in (0, 9, 10, 24)] == [1, 1, 3, 3]
    assert page_of_offset(pages, -5) == 1 and page_of_offset(pages, 25) == 3 and page_of_offset(pages, 99) == 3
    assert pages_of_span(pages, 5, 15) == [1, 3]
    assert pages_of_span(pages, 12, 12) == [3]
    with pytest.raises(ValueError):
        page_of_offset((), 0)


# ------------------------------------------------------------------------------------------------------ errors


def _error(source, exception=StarqaError, **kwargs) -> str:
    with pytest.raises(exception) as caught:
        extract_document(source, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path_and_directory_are_usage_errors(tmp_path):
    message = _error(tmp_path / "nope.pdf", UsageError)
    assert "nope.pdf" in message and "does not exist" in message
    message = _error(tmp_path, UsageError)
    assert str(tmp_path) in message and "directory" in message
    assert UsageError("x").exit_code == 2


def test_empty_whitespace_and_binary_files(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "empty.txt" in _error(tmp_path / "empty.txt") and "empty" in _error(tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_bytes(b"  \n\t\n\x0c \r\n")
    assert "only whitespace" in _error(tmp_path / "blank.txt")
    (tmp_path / "data.txt").write_bytes(b"PK\x03\x04\x00\x00binary" * 20)
    message = _error(tmp_path / "data.txt")
    assert "data.txt" in message and "binary" in message
    assert StarqaError("x").exit_code == 1


def test_corrupt_pdfs(tmp_path):
    noise = tmp_path / "noise.pdf"
    noise.write_bytes(os.urandom(4096).replace(b"%PDF", b"%PDX"))
    message = _error(noise)
    assert "noise.pdf" in message and "not a readable PDF" in message
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes(SAMPLE_PDF.read_bytes()[:1500])
    assert "not a readable PDF" in _error(truncated)


@pytest.fixture(scope="module")
def encrypted_pdf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("encrypted") / "locked.pdf"
    writer = pypdf.PdfWriter(clone_from=SAMPLE_PDF)
    writer.encrypt("s3cret", algorithm="RC4-128")  # RC4 needs no crypto library
    with open(path, "wb") as handle:
        writer.write(handle)
    return path


def test_encrypted_pdf_needs_the_right_password(encrypted_pdf):
    message = _error(encrypted_pdf)
    assert "locked.pdf" in message and "encrypted" in message and "--password" in message
    message = _error(encrypted_pdf, password="wrong")
    assert "locked.pdf" in message and "password" in message
    document = extract_document(encrypted_pdf, password="s3cret")
    assert document.text == SAMPLE_TXT.read_text(encoding="utf-8").strip()
    assert len(document.pages) >= 5


def test_pdf_with_only_an_owner_password_opens_without_one(tmp_path):
    path = tmp_path / "owner.pdf"
    writer = pypdf.PdfWriter(clone_from=SAMPLE_PDF)
    writer.encrypt(user_password="", owner_password="owner", algorithm="RC4-128")
    with open(path, "wb") as handle:
        writer.write(handle)
    assert extract_document(path).text == SAMPLE_TXT.read_text(encoding="utf-8").strip()


def test_damaged_but_readable_pdf_warns(tmp_path):
    path = tmp_path / "xref.pdf"
    path.write_bytes(re.sub(rb"startxref\s+\d+", b"startxref\n123", SAMPLE_PDF.read_bytes()))
    document = extract_document(path)
    assert document.text == SAMPLE_TXT.read_text(encoding="utf-8").strip()
    assert len(document.warnings) == 1 and "xref.pdf" in document.warnings[0]


def test_pdf_without_a_text_layer(tmp_path):
    from reportlab.pdfgen.canvas import Canvas

    path = tmp_path / "scan.pdf"
    canvas = Canvas(str(path))
    canvas.rect(72, 72, 300, 400, fill=1)
    canvas.showPage()
    canvas.save()
    message = _error(path)
    assert "scan.pdf" in message and "no text layer" in message and "OCR" in message
