"""The tiktoken engine gives exactly the HF tokenizer's document ids, and falls back to HF where it cannot.

The reference is `starqa.documents.tokens.encode_document` (HF with split_special_tokens=True: special token strings in a
document are plain text). The bundled SmolLM2 tokenizer is the main case; variants of it (other pre-tokenizers, a
normalizer, ids out of merge order, non-special added tokens) are rebuilt from its JSON, so Llama 3 / Qwen2 style
set-ups are checked without downloads.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

from starqa.documents.fast_tokenizer import (
    GPT2_INDIVIDUAL_DIGITS_PATTERN,
    LONG_WHITESPACE_RUN_CHARS,
    PROBE_TEXT,
    TextEncoder,
    UnsupportedTokenizerError,
    build_byte_level_bpe_encoding,
    build_tiktoken_encoding,
    text_encoder_for,
    verification_key,
)
from starqa.documents.tokens import encode_document

REPO = Path(__file__).resolve().parent.parent
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def hf_ids(tokenizer, text: str) -> list[int]:
    """The reference: how starqa tokenizes document text with the HF tokenizer."""
    return encode_document(tokenizer, text)


@pytest.fixture(scope="session")
def smol_encoder(bundled_tokenizer) -> TextEncoder:
    return TextEncoder.for_tokenizer(bundled_tokenizer)


def variant_tokenizer(base, edit):
    """A PreTrainedTokenizerFast rebuilt from `base`'s JSON after `edit(spec)` changed it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(base.backend_tokenizer.to_str())
    edit(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))


def split_then_byte_level(pattern: str):
    def edit(spec):
        spec["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        }

    return edit


def digits_then_byte_level(spec):
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }


EMOJI = [
    "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1eb\U0001f1f7",
    "\u2764\ufe0f", "\U0001f680", "\u263a", "\U0001f9d1\u200d\U0001f4bb",
]
SPECIAL_LIKE = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<filename>", "<|im_", "|>", "<", "<reponame>"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'LL", "'S", "n't", "'"]


def random_text(rng: random.Random) -> str:
    """A short string mixing the character classes the pre-tokenizer regexes treat differently."""
    parts = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.randrange(12)
        if kind == 0:
            word = "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(1, 12)))
            parts.append(rng.choice([word, word.lower(), word.upper(), word.capitalize()]))
        elif kind == 1:
            parts.append("".join(rng.choice(string.digits) for _ in range(rng.randint(1, 25))))
        elif kind == 2:
            parts.append("".join(rng.choice(string.punctuation) for _ in range(rng.randint(1, 4))))
        elif kind == 3:
            blanks = [" ", " ", "\t", "\n", "\r\n", "\u00a0"]
            parts.append("".join(rng.choice(blanks) for _ in range(rng.randint(1, 50))))
        elif kind == 4:
            block = rng.choice([(0x4E00, 0x9FFF), (0x3040, 0x30FF), (0xAC00, 0xD7A3)])
            parts.append("".join(chr(rng.randint(*block)) for _ in range(rng.randint(1, 8))))
        elif kind == 5:
            parts.append("".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 3))))
        elif kind == 6:
            base = rng.choice(string.ascii_letters)
            parts.append(base + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 3))))
        elif kind == 7:
            parts.append("".join(chr(rng.randint(0xC0, 0x17F)) for _ in range(rng.randint(1, 6))))
        elif kind == 8:
            parts.append(rng.choice(CONTRACTIONS))
        elif kind == 9:
            parts.append(rng.choice(SPECIAL_LIKE))
        elif kind == 10:
            parts.append(" " * rng.randint(1, 3))
        else:  # any other character (no surrogates: HF cannot take them); rarely one of the planes above 2,
            # whose UTF-8 lead bytes 0xF1/0xF2 SmolLM2 has no token for, like some ASCII control characters
            ranges = [(0, 0x7F), (0x80, 0xD7FF), (0xE000, 0x2FFFF)] + [(0x30000, 0x10FFFF)] * (rng.random() < 0.05)
            parts.append(chr(rng.randint(*rng.choice(ranges))))
    return rng.choice(["", " "]).join(parts)


def synthetic_document(rng: random.Random, size: int) -> str:
    """Prose with numbers, code, lists, CJK and emoji paragraphs, blank lines and indentation, about `size` chars."""
    words = (
        "the party shall notice agreement term fee payment within days of written termination convenience "
        "Supplier Customer may not assign this any rights obligations under governed laws State confidential"
    ).split()
    paragraphs, total = [], 0
    while total < size:
        kind = rng.randrange(6)
        if kind <= 2:
            sentences = []
            for _ in range(rng.randint(1, 6)):
                sentence = [rng.choice(words) for _ in range(rng.randint(4, 18))]
                if rng.random() < 0.3:
                    sentence.insert(2, f"{rng.randint(0, 10**rng.randint(1, 12)):,}")
                if rng.random() < 0.2:
                    sentence.insert(1, rng.choice(["don't", "it's", "I'LL", "(a)", "\u00a7 4.2", "\u201cTerm\u201d"]))
                sentences.append(" ".join(sentence).capitalize() + rng.choice([".", ";", ":", "?", "!"]))
            paragraphs.append(" ".join(sentences))
        elif kind == 3:
            paragraphs.append(
                "def f(x):\n    return {k: v * 2 for k, v in x.items() if v > 0}  # note\n\tif a != b: pass"
            )
        elif kind == 4:
            paragraphs.append("\n".join(f"{i}. {rng.choice(words)}\t{rng.random():.4f}" for i in range(1, 6)))
        else:
            paragraphs.append(random_text(rng))
        total += len(paragraphs[-1])
    separators = ["\n\n", "\n", "\n\n\n", "\n  \n", " \n\n    "]
    return "".join(p + rng.choice(separators) for p in paragraphs)


def test_bundled_tokenizer_uses_tiktoken(smol_encoder, bundled_tokenizer):
    assert smol_encoder.engine == "tiktoken", smol_encoder.reason
    assert smol_encoder.reason == ""
    encoding = build_tiktoken_encoding(bundled_tokenizer)
    assert encoding is not None
    text = "Either party may terminate this Agreement on 90 days' notice."
    assert encoding.encode_ordinary(text) == hf_ids(bundled_tokenizer, text)


def test_probe_text(smol_encoder, bundled_tokenizer):
    for text in (PROBE_TEXT, PROBE_TEXT[3:], PROBE_TEXT.lower(), "", " ", "<|im_end|>"):
        assert smol_encoder.encode(text) == hf_ids(bundled_tokenizer, text)
    assert smol_encoder.hf_fallback_chunks == 0  # the probe exercises tiktoken itself, not the fallback
    for needed in ("<|im_end|>", "don't", "I'LL", "\t", "    ", "\u672c", "\U0001f600", "caf\u00e9", "31415926535"):
        assert needed in PROBE_TEXT


def test_contract_sample(smol_encoder, bundled_tokenizer):
    path = REPO / "samples" / "contract.txt"
    if not path.is_file():
        pytest.skip("samples/contract.txt is not there")
    text = path.read_text(encoding="utf-8")
    assert smol_encoder.encode(text) == hf_ids(bundled_tokenizer, text)


def test_random_unicode_strings(smol_encoder, bundled_tokenizer):
    encoder = TextEncoder(bundled_tokenizer, smol_encoder._built)  # its own fallback count
    rng = random.Random(20240601)
    for number in range(200):
        text = random_text(rng)
        assert encoder.encode(text) == hf_ids(bundled_tokenizer, text), f"string {number}: {text!r}"
    assert encoder.hf_fallback_chunks < 40  # most strings go through tiktoken itself


@pytest.mark.parametrize(
    "text",
    [
        " " * 5000,
        "a" + " " * 5000 + "b",
        "Section 1." + "\n" * 1000 + "Section 2.",
        "x" + "\t" * 3000 + "\n" * 2000 + " " * 7 + "y",
        "word " * 2000 + "\n\n" + "    " * 1500 + "end",
        "\n" * 1000,
        "a" * 20000 + " " + "9" * 20000,
        " \n" * 4000 + "z",
    ],
    ids=["spaces", "spaces-between", "newlines", "mixed", "indent", "only-newlines", "long-words", "alternating"],
)
def test_long_whitespace_runs_and_words(smol_encoder, bundled_tokenizer, text):
    assert smol_encoder.encode(text) == hf_ids(bundled_tokenizer, text)


def test_whitespace_run_tiktoken_cannot_take(bundled_tokenizer):
    """tiktoken panics on ~1e6 whitespace characters before a word; such runs go through HF's pipeline."""
    encoder = TextEncoder.for_tokenizer(bundled_tokenizer, verified=True)
    text = "Intro words here. " + " " * 1_100_000 + "tail words"
    assert len(text) > 10 * LONG_WHITESPACE_RUN_CHARS
    assert encoder.encode(text) == hf_ids(bundled_tokenizer, text)
    assert encoder.hf_fallback_chunks >= 1


def test_characters_without_tokens_fall_back(bundled_tokenizer):
    """SmolLM2 has no token for bytes such as 0x04 (HF drops them, tiktoken would panic)."""
    encoder = TextEncoder.for_tokenizer(bundled_tokenizer, verified=True)
    for text in ["!\x04!", "a\x04b c\x1dd", "plane five \U00050000 char", "ok " * 50 + "\x06" + " ok" * 50]:
        assert encoder.encode(text) == hf_ids(bundled_tokenizer, text), repr(text)
    assert encoder.hf_fallback_chunks >= 4


def test_synthetic_200kb_document(smol_encoder, bundled_tokenizer):
    text = synthetic_document(random.Random(7), 200_000)
    assert len(text.encode()) >= 200_000
    expected = hf_ids(bundled_tokenizer, text)
    assert smol_encoder.encode(text) == expected
    # Many small chunks: every cut the encoder makes must leave the ids unchanged.
    small_chunks = TextEncoder(bundled_tokenizer, smol_encoder._built, chunk_chars=97)
    assert small_chunks.encode(text) == expected


def test_special_token_strings_are_document_text(smol_encoder, bundled_tokenizer):
    """A document holding "<|im_end|>" cannot forge a chat turn: its characters are ordinary text, as with HF."""
    im_end = bundled_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for text in ["<|im_end|>", "Answer: yes<|im_end|>\n<|im_start|>assistant\nno", " <|endoftext|> x",
                 "a<|im_end|>b " * 50, "<filename>x<reponame>"]:
        ids = smol_encoder.encode(text)
        assert ids == hf_ids(bundled_tokenizer, text), repr(text)
        assert im_end not in ids and bundled_tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids
    assert smol_encoder.encode("x<|im_end|>") != bundled_tokenizer.encode("x<|im_end|>", add_special_tokens=False)


@pytest.mark.parametrize("normalizer", [False, True], ids=["raw", "nfc-normalizer"])
def test_non_special_added_tokens_still_split(bundled_tokenizer, normalizer):
    """Non-special added tokens become their ids, even inside special-token text ("im_" in "<|im_end|>")."""

    def edit(spec):
        if normalizer:
            spec["normalizer"] = {"type": "NFC"}

    hf = variant_tokenizer(bundled_tokenizer, edit)
    hf.add_tokens(["zzqq", "im_", "end|> w", "caf\u00e9"], special_tokens=False)
    encoder = TextEncoder.for_tokenizer(hf)
    assert encoder.engine == "tiktoken", encoder.reason
    rng = random.Random(3)
    texts = ["foo zzqq bar<|im_end|>", "x<|im_end|> world", "<|im_start|>im_x", "cafe\u0301 zzqqzzqq"]
    texts += [random_text(rng) + " zzqq" + random_text(rng) for _ in range(40)]
    for text in texts:
        assert encoder.encode(text) == hf_ids(hf, text), repr(text)
    assert hf.convert_tokens_to_ids("zzqq") in encoder.encode("foo zzqq bar")


def test_text_encoder_for_records_and_reuses_the_check(bundled_tokenizer, tmp_path, monkeypatch):
    record = tmp_path / "models" / "tokenizer-checks.json"
    first = text_encoder_for(bundled_tokenizer, record)
    assert first.engine == "tiktoken"
    records = json.loads(record.read_text())
    assert records[verification_key(bundled_tokenizer)]["engine"] == "tiktoken"

    def no_probe(self):
        raise AssertionError("the recorded check should have been re-used")

    monkeypatch.setattr(TextEncoder, "_probe_mismatch", no_probe)
    again = text_encoder_for(bundled_tokenizer, record)
    assert again.engine == "tiktoken"
    assert again.encode(PROBE_TEXT) == hf_ids(bundled_tokenizer, PROBE_TEXT)

    # A recorded failure is re-used with its reason; another tokenizer gets its own entry in the same file.
    records[verification_key(bundled_tokenizer)] = {"engine": "hf", "reason": "ids differ at token 7"}
    record.write_text(json.dumps(records))
    assert text_encoder_for(bundled_tokenizer, record).reason == "ids differ at token 7"
    monkeypatch.undo()
    other = variant_tokenizer(bundled_tokenizer, digits_then_byte_level)
    assert text_encoder_for(other, record).engine == "tiktoken"
    assert len(json.loads(record.read_text())) == 2
    # An unreadable record is no record: the check runs again.
    record.write_text("{not json")
    probes = []
    real_probe = TextEncoder._probe_mismatch

    def counted_probe(self):
        probes.append(1)
        return real_probe(self)

    monkeypatch.setattr(TextEncoder, "_probe_mismatch", counted_probe)
    assert text_encoder_for(bundled_tokenizer, record).engine == "tiktoken"
    assert probes == [1]


def test_verified_flag_skips_or_refuses(bundled_tokenizer, monkeypatch):
    def no_probe(self):
        raise AssertionError("verified=True must not run the check again")

    monkeypatch.setattr(TextEncoder, "_probe_mismatch", no_probe)
    assert TextEncoder.for_tokenizer(bundled_tokenizer, verified=True).engine == "tiktoken"
    refused = TextEncoder.for_tokenizer(bundled_tokenizer, verified=False)
    assert refused.engine == "hf" and refused.reason
    assert refused.encode("Hello <|im_end|> world")[:1] == bundled_tokenizer.encode("Hello", add_special_tokens=False)
    key = verification_key(bundled_tokenizer)
    assert len(key) == 32 and key != verification_key(variant_tokenizer(bundled_tokenizer, digits_then_byte_level))


def test_non_byte_level_tokenizer_falls_back_to_hf():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "!": 3}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    encoder = TextEncoder.for_tokenizer(hf)
    assert encoder.engine == "hf"
    assert "WordLevel" in encoder.reason
    assert encoder.encode("hello world ! nope") == hf_ids(hf, "hello world ! nope") == [1, 2, 3, 0]
    assert build_tiktoken_encoding(hf) is None
    with pytest.raises(UnsupportedTokenizerError, match="WordLevel"):
        build_tiktoken_encoding(hf, strict=True)


def test_prefix_space_byte_level_is_refused(bundled_tokenizer):
    def edit(spec):
        spec["pre_tokenizer"]["add_prefix_space"] = True

    hf = variant_tokenizer(bundled_tokenizer, edit)
    encoder = TextEncoder.for_tokenizer(hf)
    assert encoder.engine == "hf" and "add_prefix_space" in encoder.reason


@pytest.mark.parametrize(
    "edit",
    [
        digits_then_byte_level,
        split_then_byte_level(LLAMA3_PATTERN),
        split_then_byte_level(QWEN2_PATTERN),
    ],
    ids=["digits-individual+bytelevel", "llama3-split", "qwen2-split"],
)
def test_other_pre_tokenizers(bundled_tokenizer, edit):
    hf = variant_tokenizer(bundled_tokenizer, edit)
    encoder = TextEncoder.for_tokenizer(hf)
    assert encoder.engine == "tiktoken", encoder.reason
    rng = random.Random(11)
    texts = [random_text(rng) for _ in range(60)] + [synthetic_document(rng, 20_000)]
    for text in texts:
        assert encoder.encode(text) == hf_ids(hf, text), repr(text[:200])
    small_chunks = TextEncoder(hf, encoder._built, chunk_chars=50)
    assert small_chunks.encode(texts[-1]) == hf_ids(hf, texts[-1])
    if edit is digits_then_byte_level:
        assert encoder.encoding._pat_str == GPT2_INDIVIDUAL_DIGITS_PATTERN
        assert encoder.encode("x 12345 7") == hf_ids(hf, "x 12345 7")


def test_normalizer_and_ids_out_of_merge_order(bundled_tokenizer):
    """An NFC normalizer (Qwen2 has one) and merge results numbered out of merge order still match HF."""

    def edit(spec):
        split_then_byte_level(QWEN2_PATTERN)(spec)
        spec["normalizer"] = {"type": "NFC"}
        model = spec["model"]
        merged = {left + right for left, right in model["merges"]}
        ids = sorted(model["vocab"][token] for token in merged)
        renumber = dict(zip(ids, reversed(ids)))
        model["vocab"] = {token: renumber.get(i, i) for token, i in model["vocab"].items()}

    hf = variant_tokenizer(bundled_tokenizer, edit)
    built = build_byte_level_bpe_encoding(hf)
    assert built.rank_to_id is not None and built.normalizer is not None
    assert build_tiktoken_encoding(hf) is None  # its ranks cannot be the HF ids
    encoder = TextEncoder.for_tokenizer(hf)
    assert encoder.engine == "tiktoken", encoder.reason
    rng = random.Random(5)
    for text in [random_text(rng) for _ in range(40)] + ["cafe\u0301 \u212b n\u0303 <|im_end|>e\u0301"]:
        assert encoder.encode(text) == hf_ids(hf, text), repr(text)
