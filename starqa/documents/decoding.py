"""How the bytes of a text file become text: the encoding is read from the bytes, and bytes that do not decode to
text (a binary file named .txt) are refused rather than stored as a document of replacement characters.

The rule, in order (docs/ states it for users):

1. A byte order mark names the encoding: UTF-8, UTF-16 or UTF-32, little- or big-endian.
2. Without one, NUL bytes at every other position of the first 8 KiB (at least a quarter of them), and hardly any
   at the positions between, are the zero high bytes of ASCII characters in UTF-16: little-endian when they follow
   the characters, big-endian when they precede them.
3. Otherwise UTF-8, when the bytes are valid UTF-8.
4. Bytes that are not UTF-8 and hold no UTF-8 multi-byte sequence at all come from a legacy 8-bit encoding: they
   are read as Windows-1252 (Latin-1's superset for text), with a warning, when that gives Western European text.
5. Otherwise UTF-8 with a replacement character (U+FFFD) for each bad sequence, with a warning: one bad byte in a
   long file should not stop an ingest.

Whatever the encoding, the text is refused as binary when it has a NUL character in its first 8 KiB (as git and
grep decide) or when more than 30 % of its characters are replacement or control characters.
"""

from __future__ import annotations

import codecs
import re
import string

from starqa.errors import StarqaError

__all__ = ["decode_text"]

_SNIFF_BYTES = 8192

# A UTF-32 LE mark starts with the UTF-16 LE one, so it is tried first.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)

# Characters no text is made of: C0 controls but backspace, tab, line feed, vertical tab, form feed, carriage return
# and escape (a log's colour codes), DEL, C1 controls, and the replacement character bad bytes decode to.
_NOT_TEXT = re.compile("[\x00-\x07\x0e-\x1a\x1c-\x1f\x7f-\x9f\ufffd]")
# Random bytes decode to about 55 % such characters; a text file with a few bad bytes to well under 1 %.
_BINARY_SHARE = 0.30

_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
_HIGH_BYTES = bytes(range(0x80, 0x100))
_ASCII_LETTERS = string.ascii_letters.encode("ascii")
# Western European text has a few accented letters among many plain ones (French about 3 %); Cyrillic or Greek in
# their own 8-bit encodings are almost all high bytes, which Windows-1252 would turn into wrong Latin letters.
_MAX_HIGH_BYTES_PER_LETTER = 0.25


def decode_text(data: bytes, label: str) -> tuple[str, list[str]]:
    """The text of a text file's bytes, and warnings about how it was read; raises StarqaError for a binary file."""
    text, encoding, bad = _decode(data)
    _refuse_binary(text, label)
    if encoding == "Windows-1252":
        return text, [f"{label} is not UTF-8: read as Windows-1252 (Western European, a superset of Latin-1); if "
                      "accented letters look wrong, save it as UTF-8 and ingest it again"]
    if bad:
        return text, [f"{label}: decoded with replacement characters: the file is not valid {encoding} ({bad} bad "
                      "bytes); re-save it as UTF-8 for an exact text"]
    return text, []


def _decode(data: bytes) -> tuple[str, str, int]:
    """(text, encoding name, count of bad sequences replaced by U+FFFD), by the rule in the module docstring."""
    for mark, codec, name in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            return _decode_leniently(data[len(mark):], codec, name)
    utf16 = _utf16_without_mark(data[:_SNIFF_BYTES])
    if utf16 is not None:
        return _decode_leniently(data, utf16, "UTF-16")
    try:
        return data.decode("utf-8"), "UTF-8", 0
    except UnicodeDecodeError:
        pass
    legacy = _windows_1252(data)
    if legacy is not None:
        return legacy, "Windows-1252", 0
    return _decode_leniently(data, "utf-8", "UTF-8")


def _decode_leniently(data: bytes, codec: str, name: str) -> tuple[str, str, int]:
    try:
        return data.decode(codec), name, 0
    except UnicodeDecodeError:
        text = data.decode(codec, errors="replace")
        return text, name, text.count("\ufffd")


def _utf16_without_mark(head: bytes) -> str | None:
    """'utf-16-le' or 'utf-16-be' when `head` has the NUL pattern of UTF-16 text without a byte order mark, else None.

    The zero high bytes of ASCII characters put NULs at every other position: in at least a quarter of the
    positions for text in a Latin script, with hardly any NULs between them. A UTF-8 file with a stray NUL has too
    few; a binary file has them at both. (UTF-16 text in other scripts, mostly without ASCII, is not recognised:
    its NULs then make it a binary file, refused with a message, rather than text decoded wrongly.)
    """
    pairs = len(head) // 2
    at_even, at_odd = head[0:pairs * 2:2].count(0), head[1:pairs * 2:2].count(0)
    for zeros, others, codec in ((at_odd, at_even, "utf-16-le"), (at_even, at_odd, "utf-16-be")):
        if zeros and zeros * 4 >= pairs and others * 10 <= zeros:
            return codec
    return None


def _windows_1252(data: bytes) -> str | None:
    """The text of a legacy 8-bit Western European file, or None when `data` is not one.

    It is not one when it holds a UTF-8 multi-byte sequence (then it is UTF-8 with a few bad bytes), uses a byte
    Windows-1252 leaves undefined, or has more high bytes than Western European text has letters with accents.
    """
    if _UTF8_MULTIBYTE.search(data):
        return None
    high_bytes = len(data) - len(data.translate(None, _HIGH_BYTES))
    letters = len(data) - len(data.translate(None, _ASCII_LETTERS))
    if high_bytes > _MAX_HIGH_BYTES_PER_LETTER * letters:
        return None
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return None


def _refuse_binary(text: str, label: str) -> None:
    if not text:
        return  # a byte order mark alone: the caller reports a file with no text
    if "\x00" in text[:_SNIFF_BYTES]:
        reason = "it has NUL bytes"
    else:
        # subn counts without a list of every match (a large binary file would have millions).
        share = _NOT_TEXT.subn("", text)[1] / len(text)
        if share <= _BINARY_SHARE:
            return
        reason = f"{share * 100:.0f} % of its characters are control characters or bytes that are not valid text"
    raise StarqaError(f"{label} looks like a binary file, not text or PDF ({reason}): convert it to PDF or to UTF-8 "
                      "plain text first")
