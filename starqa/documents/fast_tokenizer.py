"""Fast document tokenization: a tiktoken encoding built offline from the model's own byte-level BPE tokenizer.

tiktoken encodes long documents many times faster than the HF tokenizer, but it only knows how to run a
byte-level BPE whose token ids are the merge priorities and whose pre-tokenizer is one regex. This module
rebuilds such an encoding from what the HF tokenizer itself holds (vocabulary, merges, pre-tokenizer, added
tokens, normalizer); nothing is downloaded. `TextEncoder` uses it only after checking that it gives the very
ids the HF tokenizer gives (on `PROBE_TEXT`, slices of it, the model's own added tokens, and with forced chunk
cuts); otherwise, and for any tokenizer we cannot express (WordPiece, Unigram, Metaspace, add_prefix_space, ...),
it encodes with the HF tokenizer and says why in `reason`. `text_encoder_for` records the outcome of that check
in a small JSON file, so it runs once per tokenizer.

What is reproduced is how starqa tokenizes document text, `starqa.documents.tokens.encode_document`:
`hf_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)`. How the tiktoken path gets the
same ids:

* special added tokens (`<|im_end|>`, ...) are plain text: a document cannot forge chat turns. HF leaves them
  out of its added-token matcher in that mode, so the text around them is pre-tokenized as one piece;
* non-special added tokens found in the text still become their own id, as HF does: the text is split on them
  first (leftmost-longest, like HF's matcher); a normalizer, if any, is applied to the pieces between them with
  HF's own normalizer object;
* the ordinary text is encoded in chunks cut at "ASCII letter, space, ASCII letter" positions: every
  supported pre-tokenizer splits there and its pieces before and after do not depend on the other side
  (the verification re-checks this with a cut at every such position of the probe);
* chunks tiktoken cannot encode exactly go through the HF pre-tokenizer and BPE model instead: characters
  whose UTF-8 bytes are missing from the vocabulary (HF drops them, tiktoken would panic), unencodable
  text (lone surrogates) and whitespace runs longer than `LONG_WHITESPACE_RUN_CHARS` (tiktoken's regex
  engine overflows its backtracking stack at about a million whitespace characters).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from starqa.store.records import read_records, record
from starqa.documents.tokens import encode_document

# Bump when the construction or the checks change: a verification recorded under an older key is stale.
FAST_TOKENIZER_VERSION = 2

# The JSON file a tokenizer check is recorded in (keyed by `verification_key`), see `text_encoder_for`.
RECORD_FILE_NAME = "tokenizer-checks.json"
# Document text is cut into chunks of about this many characters (at the next safe cut after it).
CHUNK_CHARS = 1 << 16
# Whitespace runs at least this long go to the HF tokenizer: tiktoken (fancy-regex) fails on runs of ~1e6.
LONG_WHITESPACE_RUN_CHARS = 100_000

PROBE_TEXT = (
    'MASTER SERVICES AGREEMENT (the "Agreement") dated 2024-03-15T09:30:00Z.\n\n'
    "1. Term. This Agreement runs for 36 months; either party may terminate it for convenience on ninety (90) "
    "days' notice. Fees: $1,234,567.89 (USD) + 7.5% VAT = $1,327,160.48 -- or 1e-9, 0x1F, v2.0.1, #42, @user.\n"
    "Account 00012345678901234567890 and pi 3141592653589793238462643383279502884197169399375105820974944.\n"
    "Don't, don't, won't, can't; I'LL, WE'RE, It'S, they've, he'd, she's, you're, I'm, O'Neil's 'quoted' "
    "\u201ccurly\u201d \u2018single\u2019 rock'n'roll 90's '''triple''' isn't it?\n"
    "\tTabbed\tcolumns\t\t42\t3.0e-5\t\n"
    "    four spaces, then eight:        x;  two  spaces  between  words.\n"
    "def parse(path: str) -> dict[str, int]:\n"
    "    with open(path, encoding='utf-8') as fh:\n"
    "        return {k.strip(): int(v) for k, v in (line.split('=', 1) for line in fh if line)}\n"
    "\n"
    "if (a <= b && c != d) { x += y >> 2; arr[i++] = *p--; } // comment /* block */ #include <stdio.h>\n"
    "SELECT name, SUM(amount) FROM orders WHERE id IN (1, 22, 333) GROUP BY name;\r\n"
    "https://example.com/path?q=a+b&x=%20y#frag  user.name+tag@example.org  C:\\Users\\a\\file.txt\n"
    "CJK: \u672c\u5408\u540c\u81ea\u53cc\u65b9\u7b7e\u5b57\u4e4b\u65e5\u8d77\u751f\u6548\u3002"
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3001\u30ab\u30bf\u30ab\u30ca\u3068\u3072\u3089\u304c\u306a\u3002"
    "\ud55c\uad6d\uc5b4 \ubb38\uc7a5\uc785\ub2c8\ub2e4.\n"
    "Emoji: \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "
    "\U0001f1eb\U0001f1f7 \u2714\ufe0f \u2764 \U0001f680launch \U0001f4a5!!\n"
    "Accents: caf\u00e9, na\u00efve, \u00c5ngstr\u00f6m, Stra\u00dfe, Dvo\u0159\u00e1k, fa\u00e7ade, "
    "R\u00c9SUM\u00c9; decomposed: cafe\u0301 n\u0303o \u0131\u0307 \ufb01ne \u212b\n"
    "Scripts: \u0391\u03b8\u03ae\u03bd\u03b1 \u041c\u043e\u0441\u043a\u0432\u0430 "
    "\u0627\u0644\u0642\u0627\u0647\u0631\u0629 \u05d9\u05e8\u05d5\u05e9\u05dc\u05d9\u05dd "
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\n"
    "Numbers: \u00bd \u00be x\u00b2 10\u00b3 \u216b \u0663\u0664\u0665 \u0967\u0968\u0969 \u2466 "
    "\uff11\uff12\uff13 12\u00a0345 1\u202f000\n"
    "Whitespace: a\u00a0b\u3000c\u2028d\u2029e\u0085f\x0bg\x0ch\r\ni \x1c j\u200bk \u2003 l\n"
    "Special-looking: <|im_start|>user\nHi there<|im_end|>\n<|endoftext|><|endoftext|> <|im_start <filename> "
    "<|im_end| <| im_end |> </s> <s> [INST] <<SYS>> <pad> <unk> <|begin_of_text|> <|eot_id|>\n"
    "Control: a\x07b !\x7f! \x1b[0m end\n"
    "spaced words" + " " * 40 + "after forty spaces\n" + "\n" * 7 + "   \n  \t \n\t\t\n" + "last words   "
)


class UnsupportedTokenizerError(ValueError):
    """The HF tokenizer cannot be expressed as a tiktoken encoding; the message says why."""


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    code_points = byte_values[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return {byte: chr(code_point) for byte, code_point in zip(byte_values, code_points)}


# The regex of tokenizers' ByteLevel pre-tokenizer (use_regex=True), which is GPT-2's.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=True) then ByteLevel: every number character is a piece of its own, so the
# ` ?\p{N}+` branch goes, and a whitespace run before a digit ends a piece (as at the end of the text).
GPT2_INDIVIDUAL_DIGITS_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
# Digits(individual_digits=False) then ByteLevel: runs of number characters are pieces of their own.
GPT2_CONTIGUOUS_DIGITS_PATTERN = (
    r"""\p{N}+|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)

# Chunks are cut at the space of "letter space letter": the piece before ends with the letter, the next starts
# with " letter", for all the patterns above and the Llama 3 / Qwen2 Split regexes.
_CUT_RE = re.compile(r"[A-Za-z] [A-Za-z]")
_LONG_WHITESPACE_RE = re.compile(r"(?<!\s)\s{%d,}" % LONG_WHITESPACE_RUN_CHARS)
# Bytes that never occur in UTF-8: their absence from a vocabulary does not matter.
_NEVER_IN_UTF8 = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])


@dataclass(frozen=True)
class ByteLevelBPEEncoding:
    """A tiktoken encoding rebuilt from an HF byte-level BPE, with what it takes to reproduce HF's ids."""

    encoding: tiktoken.Encoding
    rank_to_id: list[int] | None  # tiktoken rank -> HF id, or None when the ranks are the HF ids
    # Non-special added tokens, which split document text: those matched on the raw text (normalized=False),
    # and those matched after the normalizer (normalized=True). Special ones are plain text in documents.
    raw_added_tokens: dict[str, int]
    normalized_added_tokens: dict[str, int]
    normalizer: Any  # the tokenizers normalizer (has normalize_str) or None
    missing_bytes: bytes  # byte values valid UTF-8 can contain that have no token: HF drops them


def _backend(hf_tokenizer: Any) -> Any:
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(hf_tokenizer, "to_str") and hasattr(hf_tokenizer, "pre_tokenizer"):
        backend = hf_tokenizer  # a bare tokenizers.Tokenizer
    if backend is None:
        raise UnsupportedTokenizerError(
            f"{type(hf_tokenizer).__name__} has no `tokenizers` backend (a slow Python tokenizer)"
        )
    return backend


def _pattern_for_pre_tokenizer(spec: dict | None) -> str:
    """One regex, in tiktoken's syntax, that splits text as the HF pre-tokenizer `spec` does."""
    if spec is None:
        raise UnsupportedTokenizerError("no pre-tokenizer, so no byte-level mapping")
    steps = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    last = steps[-1]
    if last.get("type") != "ByteLevel":
        raise UnsupportedTokenizerError(f"pre-tokenizer {kinds} does not end with ByteLevel (not byte-level BPE)")
    if last.get("add_prefix_space", False):
        raise UnsupportedTokenizerError("ByteLevel pre-tokenizer with add_prefix_space=True")
    uses_regex = last.get("use_regex", True)
    head = steps[:-1]
    if not head and uses_regex:
        return GPT2_PATTERN
    if len(head) == 1 and head[0].get("type") == "Digits" and uses_regex:
        if head[0].get("individual_digits", False):
            return GPT2_INDIVIDUAL_DIGITS_PATTERN
        return GPT2_CONTIGUOUS_DIGITS_PATTERN
    if len(head) == 1 and head[0].get("type") == "Split" and not uses_regex:
        split = head[0]
        pattern = split.get("pattern", {})
        if "Regex" not in pattern:
            raise UnsupportedTokenizerError(f"Split pre-tokenizer on a plain string {pattern!r}")
        if split.get("behavior") != "Isolated" or split.get("invert", False):
            raise UnsupportedTokenizerError(
                f"Split pre-tokenizer with behavior={split.get('behavior')!r}, invert={split.get('invert')!r}"
            )
        return pattern["Regex"]
    raise UnsupportedTokenizerError(f"pre-tokenizer sequence {kinds} cannot be written as one regex")


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        if isinstance(merge, str):  # the older "a b" form
            left, sep, right = merge.partition(" ")
            if not sep:
                raise UnsupportedTokenizerError(f"unreadable merge {merge!r}")
        else:
            left, right = merge
        pairs.append((left, right))
    return pairs


def build_byte_level_bpe_encoding(hf_tokenizer: Any, *, check_reachability: bool = True) -> ByteLevelBPEEncoding:
    """Rebuild the HF tokenizer's byte-level BPE as tiktoken; raises UnsupportedTokenizerError saying why not.

    `check_reachability` (about 0.1 s per 50k tokens) looks for merge results that HF's BPE does not produce
    from their own text: tiktoken returns any piece found whole in the vocabulary, so they would differ.
    """
    backend = _backend(hf_tokenizer)
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedTokenizerError(f"the model is {model.get('type')}, not BPE")
    if model.get("dropout") not in (None, 0, 0.0):
        raise UnsupportedTokenizerError("BPE dropout is random")
    if model.get("byte_fallback"):
        raise UnsupportedTokenizerError("BPE with byte_fallback (a SentencePiece-style vocabulary)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UnsupportedTokenizerError("BPE with a subword prefix or end-of-word suffix")
    pat_str = _pattern_for_pre_tokenizer(spec.get("pre_tokenizer"))

    added_specs = spec.get("added_tokens") or []
    for added in added_specs:
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            raise UnsupportedTokenizerError(f"added token {added['content']!r} uses lstrip/rstrip/single_word")
    has_normalizer = spec.get("normalizer") is not None
    splitting = [a for a in added_specs if not a.get("special")]  # special ones are document text
    raw_added = {a["content"]: a["id"] for a in splitting if not (has_normalizer and a.get("normalized"))}
    normalized_added = {a["content"]: a["id"] for a in splitting if has_normalizer and a.get("normalized")}
    added_contents = {a["content"] for a in added_specs}

    vocab: dict[str, int] = model["vocab"]
    byte_of_char = {char: byte for byte, char in gpt2_bytes_to_unicode().items()}
    for token in vocab:
        if token not in added_contents and any(char not in byte_of_char for char in token):
            raise UnsupportedTokenizerError(f"vocabulary token {token!r} is not written in byte-level characters")

    def token_bytes(token: str) -> bytes:
        return bytes(byte_of_char[char] for char in token)

    pairs = _merge_pairs(model.get("merges") or [])
    byte_ids: dict[bytes, int] = {}
    for char, byte in byte_of_char.items():
        if char in vocab and char not in added_contents:
            byte_ids[bytes([byte])] = vocab[char]
    merged_ids: dict[bytes, int] = {}
    merge_results: list[str] = []
    for left, right in pairs:
        merged = left + right
        if left not in vocab or right not in vocab or merged not in vocab:
            raise UnsupportedTokenizerError(f"merge {left!r} + {right!r} uses or makes a token not in the vocabulary")
        key = token_bytes(merged)
        if key in merged_ids or key in byte_ids:
            raise UnsupportedTokenizerError(f"token {merged!r} is made by two merges: one rank cannot express that")
        merged_ids[key] = vocab[merged]
        merge_results.append(merged)
    made = set(merge_results) | {char for char in byte_of_char if char in vocab}
    orphans = [t for t in vocab if t not in made and t not in added_contents]
    if orphans and model.get("ignore_merges"):
        raise UnsupportedTokenizerError(
            f"{len(orphans)} vocabulary tokens (e.g. {orphans[0]!r}) are made by no merge, and ignore_merges=True "
            "lets HF return them whole"
        )

    merge_ids = list(merged_ids.values())
    if all(a < b for a, b in zip(merge_ids, merge_ids[1:])):
        # GPT-2 style: merge results are numbered in merge order, so the HF ids are valid tiktoken ranks.
        ranks = {**byte_ids, **merged_ids}
        rank_to_id = None
    else:
        # Ranks must follow the merge order: rank = 256 + merge index (bytes below), then map ranks to HF ids.
        ranks = {}
        rank_to_id = [0] * (256 + len(merge_ids))
        for byte_key, hf_id in byte_ids.items():
            ranks[byte_key] = byte_key[0]
            rank_to_id[byte_key[0]] = hf_id
        for index, (key, hf_id) in enumerate(merged_ids.items()):
            ranks[key] = 256 + index
            rank_to_id[256 + index] = hf_id

    if check_reachability and not model.get("ignore_merges"):
        bpe_model = backend.model
        unreachable = tuple(
            token for token in merge_results if [t.id for t in bpe_model.tokenize(token)] != [vocab[token]]
        )
        if unreachable:
            raise UnsupportedTokenizerError(
                f"{len(unreachable)} merge results (e.g. {unreachable[0]!r}) are not what HF's BPE makes of their "
                "own text, but tiktoken would return them whole"
            )

    missing = bytes(
        sorted(b for b in range(256) if bytes([b]) not in byte_ids and b not in _NEVER_IN_UTF8)
    )
    try:
        encoding = tiktoken.Encoding(
            f"hf-byte-level-bpe-{len(vocab)}",
            pat_str=pat_str,
            mergeable_ranks=ranks,
            special_tokens={a["content"]: a["id"] for a in added_specs} if rank_to_id is None else {},
        )
    except ValueError as exc:  # the regex is not valid for fancy-regex
        raise UnsupportedTokenizerError(f"tiktoken rejects the pre-tokenizer regex {pat_str!r}: {exc}") from exc
    return ByteLevelBPEEncoding(
        encoding=encoding,
        rank_to_id=rank_to_id,
        raw_added_tokens=raw_added,
        normalized_added_tokens=normalized_added,
        normalizer=backend.normalizer if has_normalizer else None,
        missing_bytes=missing,
    )


def build_tiktoken_encoding(hf_tokenizer: Any, *, strict: bool = False) -> tiktoken.Encoding | None:
    """The tiktoken encoding equivalent to the HF tokenizer's byte-level BPE, whose ids are the HF ids; or None.

    None (or, with strict=True, UnsupportedTokenizerError with the reason) when the tokenizer is not a byte-level
    BPE we can express, or when its ids are not in merge order (only `TextEncoder` remaps those). The encoding
    alone does not reproduce HF everywhere: `encode_ordinary` ignores added tokens in the text and panics on
    characters whose bytes have no token; `TextEncoder` handles both. This does not run the identity check.
    """
    try:
        built = build_byte_level_bpe_encoding(hf_tokenizer)
        if built.rank_to_id is not None:
            raise UnsupportedTokenizerError(
                "merge results are not numbered in merge order: tiktoken ranks cannot be the HF ids"
            )
    except UnsupportedTokenizerError:
        if strict:
            raise
        return None
    return built.encoding


def verification_key(hf_tokenizer: Any) -> str:
    """A key to record a verification under: it changes with the tokenizer, the libraries whose ids are compared
    (tiktoken, tokenizers, transformers), and this module's checks."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else type(hf_tokenizer).__name__.encode())
    digest.update(f"|tiktoken={tiktoken.__version__}|tokenizers={tokenizers.__version__}"
                  f"|transformers={transformers.__version__}|v={FAST_TOKENIZER_VERSION}|".encode())
    digest.update(PROBE_TEXT.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def _added_tokens_probe(hf_tokenizer: Any, limit: int = 300) -> str:
    """A probe text with the model's own added tokens, special or not, inside words, between spaces, doubled."""
    try:
        added = [token.content for _, token in sorted(_backend(hf_tokenizer).get_added_tokens_decoder().items())]
    except (UnsupportedTokenizerError, AttributeError):
        return ""
    return "".join(f"a{content}b {content} {content}{content}\n" for content in added[:limit] if content)


def _literal_alternation(tokens: dict[str, int]) -> re.Pattern | None:
    if not tokens:
        return None
    # Longest first: at the leftmost position the longest token wins, as in HF's leftmost-longest matcher.
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _split_on(pattern: re.Pattern | None, tokens: dict[str, int], text: str) -> Iterator[tuple[str, int | None]]:
    """Yields (ordinary text, None) and (token, id) in order."""
    if pattern is None:
        yield text, None
        return
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            yield text[start : match.start()], None
        yield match.group(), tokens[match.group()]
        start = match.end()
    if start < len(text):
        yield text[start:], None


def _first_difference(expected: list[int], got: list[int]) -> str:
    index = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return f"at token {index}: HF {expected[index:index + 4]} vs tiktoken {got[index:index + 4]}"


def text_encoder_for(hf_tokenizer: Any, record_path: Path | None) -> TextEncoder:
    """The TextEncoder for `hf_tokenizer`, re-using the check recorded in the JSON file `record_path` (an object
    keyed by `verification_key`) or running it and recording its outcome there; None: check, record nothing.

    A record that cannot be read or written only means the check runs again next time."""
    if record_path is None:
        return TextEncoder.for_tokenizer(hf_tokenizer)
    key = verification_key(hf_tokenizer)
    recorded = read_records(record_path).get(key)
    if isinstance(recorded, dict) and recorded.get("engine") == "tiktoken":
        return TextEncoder.for_tokenizer(hf_tokenizer, verified=True)
    if isinstance(recorded, dict) and recorded.get("engine") == "hf":
        return TextEncoder(hf_tokenizer, reason=str(recorded.get("reason") or "")
                           or "tiktoken was recorded as not identical to the HF tokenizer")
    encoder = TextEncoder.for_tokenizer(hf_tokenizer)
    record(record_path, key, {"engine": encoder.engine, "reason": encoder.reason,
                               "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return encoder


class TextEncoder:
    """Encodes document text to ids with tiktoken when verified identical, else with the HF tokenizer."""

    engine: str  # "tiktoken" or "hf"
    reason: str  # why the HF fallback was taken ("" for tiktoken)

    def __init__(
        self,
        hf_tokenizer: Any,
        built: ByteLevelBPEEncoding | None = None,
        reason: str = "",
        *,
        chunk_chars: int = CHUNK_CHARS,
    ) -> None:
        self.hf_tokenizer = hf_tokenizer
        self._built = built
        self.engine = "tiktoken" if built is not None else "hf"
        self.reason = "" if built is not None else (reason or "no tiktoken encoding")
        self.chunk_chars = max(1, chunk_chars)
        self.hf_fallback_chunks = 0  # chunks of document text the tiktoken engine handed to HF's own pipeline
        if built is not None:
            self._encode_ordinary = built.encoding.encode_ordinary
            self._raw_added_re = _literal_alternation(built.raw_added_tokens)
            self._normalized_added_re = _literal_alternation(built.normalized_added_tokens)
            self._missing_ascii = [chr(b) for b in built.missing_bytes if b < 0x80]
            self._missing_bytes = list(built.missing_bytes)

    @property
    def encoding(self) -> tiktoken.Encoding | None:
        return self._built.encoding if self._built is not None else None

    @classmethod
    def for_tokenizer(cls, hf_tokenizer: Any, *, verified: bool | None = None) -> TextEncoder:
        """The encoder for `hf_tokenizer`. verified=None builds the tiktoken encoding and checks it against HF
        on the probe; record `engine == "tiktoken"` (under `verification_key`) and pass it as `verified` later
        to skip the check (`text_encoder_for` does that)."""
        if verified is False:
            return cls(hf_tokenizer, reason="tiktoken was recorded as not identical to the HF tokenizer")
        try:
            built = build_byte_level_bpe_encoding(hf_tokenizer, check_reachability=verified is None)
        except UnsupportedTokenizerError as exc:
            return cls(hf_tokenizer, reason=f"not expressible as tiktoken: {exc}")
        encoder = cls(hf_tokenizer, built)
        if verified is None:
            mismatch = encoder._probe_mismatch()
            if mismatch:
                return cls(hf_tokenizer, reason=f"tiktoken ids differ from HF on the probe: {mismatch}")
        return encoder

    def _probe_mismatch(self) -> str:
        third = len(PROBE_TEXT) // 3
        texts = [
            PROBE_TEXT,
            PROBE_TEXT[1:],
            PROBE_TEXT[7:-5],
            PROBE_TEXT[:third],
            PROBE_TEXT[third:],
            PROBE_TEXT[third + 13 : 2 * third + 3],
            PROBE_TEXT.upper(),
            _added_tokens_probe(self.hf_tokenizer),
        ]
        cutting_everywhere = TextEncoder(self.hf_tokenizer, self._built, chunk_chars=1)
        for number, text in enumerate(texts):
            expected = encode_document(self.hf_tokenizer, text)
            for label, encoder in (("", self), (" with a cut at every safe position", cutting_everywhere)):
                got = encoder.encode(text)
                if got != expected:
                    return f"probe text {number}{label}, {_first_difference(expected, got)}"
        return ""

    def encode(self, text: str) -> list[int]:
        """Ids of document `text`, exactly `starqa.documents.tokens.encode_document(hf_tokenizer, text)`: no BOS;
        special token strings inside the text ("<|im_end|>") are plain text; non-special added tokens become their
        ids."""
        if self._built is None:
            return encode_document(self.hf_tokenizer, text)
        ids: list[int] = []
        built = self._built
        for raw_piece, token_id in _split_on(self._raw_added_re, built.raw_added_tokens, text):
            if token_id is not None:
                ids.append(token_id)
                continue
            if built.normalizer is None:
                self._encode_document_text(raw_piece, ids)
                continue
            normalized = built.normalizer.normalize_str(raw_piece)
            for piece, inner_id in _split_on(self._normalized_added_re, built.normalized_added_tokens, normalized):
                if inner_id is not None:
                    ids.append(inner_id)
                else:
                    self._encode_document_text(piece, ids)
        return ids

    def _encode_document_text(self, text: str, ids: list[int]) -> None:
        """Appends the ids of normalized text holding no added token, chunk by chunk."""
        start, length = 0, len(text)
        while start < length:
            end = length
            if length - start > self.chunk_chars:
                cut = _CUT_RE.search(text, start + self.chunk_chars - 1)
                if cut is not None:
                    end = cut.start() + 1
            self._encode_chunk(text[start:end] if (start, end) != (0, length) else text, ids)
            start = end

    def _encode_chunk(self, chunk: str, ids: list[int]) -> None:
        if self._tiktoken_can_encode(chunk):
            try:
                ranks = self._encode_ordinary(chunk)
            except BaseException as exc:  # a Rust panic (pyo3 PanicException derives from BaseException)
                if type(exc).__name__ != "PanicException":
                    raise
            else:
                rank_to_id = self._built.rank_to_id
                ids.extend(ranks if rank_to_id is None else [rank_to_id[rank] for rank in ranks])
                return
        self.hf_fallback_chunks += 1
        ids.extend(self._hf_pipeline_ids(chunk))

    def _tiktoken_can_encode(self, chunk: str) -> bool:
        if chunk.isascii():
            if any(char in chunk for char in self._missing_ascii):
                return False
        else:
            try:
                data = chunk.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates: HF's own pipeline decides what happens
                return False
            if any(byte in data for byte in self._missing_bytes):
                return False
        return len(chunk) < LONG_WHITESPACE_RUN_CHARS or _LONG_WHITESPACE_RE.search(chunk) is None

    def _hf_pipeline_ids(self, chunk: str) -> list[int]:
        """HF's own pre-tokenizer and BPE model on already split and normalized text: exactly HF's ids."""
        backend = _backend(self.hf_tokenizer)
        model = backend.model
        return [
            token.id for piece, _ in backend.pre_tokenizer.pre_tokenize_str(chunk) for token in model.tokenize(piece)
        ]
