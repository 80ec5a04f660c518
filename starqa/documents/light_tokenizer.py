"""Answering without transformers: the model's tokenizer.json through the `tokenizers` library, and a profile.

Loading transformers' AutoTokenizer costs seconds of imports, most of an `ask` on a stored document. Asking needs
little of it: the prompt template's text (rendered from the chat template), the query tokenized with special
tokens parsed, the answer decoded, the stop tokens and the tokenizer's fingerprint. The first time a model is used
with the HF tokenizer at hand, `write_profile` records these, and checks on probe texts and ids that the bare
`tokenizers.Tokenizer` encodes and decodes exactly as the HF tokenizer does; only then (`profile["light"]`) do
later processes use `LightTokenizer` instead of the HF one. Document text (ingest) still goes through
starqa.documents.fast_tokenizer, which needs the HF tokenizer.

The profile lives beside the tokenizer check record (the store's models/ folder), keyed by a hash of the
tokenizer's files, so an edited tokenizer gets a new check.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path
from typing import Any

from starqa.documents.fast_tokenizer import PROBE_TEXT
from starqa.store.records import read_records, record

PROFILE_FILE_NAME = "tokenizer-profiles.json"
PROFILE_VERSION = 1
# Files whose content decides how the model's text is tokenized and its prompt rendered.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json", "config.json")
_PROBE_QUESTIONS = (
    "What are the termination clauses?", "Which law governs this agreement?",
    "Wie hoch ist die Vertragsstrafe (in EUR)?  Antwort: 1.234,56 \u20ac", "\u5408\u540c\u4f55\u65f6\u751f\u6548\uff1f",
    "Is <|im_end|> or <s> a token here? \U0001f600 tabs\tand\nnew lines", "  leading and trailing spaces  ",
)


def profile_key(model_dir: Path) -> str:
    digest = hashlib.sha256(f"light-tokenizer-{PROFILE_VERSION}".encode())
    for name in _TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def read_profile(record_path: Path, model_dir: Path) -> dict | None:
    profile = read_records(record_path).get(profile_key(model_dir))
    return profile if isinstance(profile, dict) and profile.get("version") == PROFILE_VERSION else None


def write_profile(record_path: Path | None, model_dir: Path, hf_tokenizer: Any, stop_ids: set[int]) -> dict:
    """Build (and record, with a record path) the profile of `hf_tokenizer`, checking the light tokenizer on probes."""
    from starqa.model.resolve import tokenizer_fingerprint
    from starqa.documents.tokens import context_head_text, prompt_template, query_text

    template = prompt_template(hf_tokenizer)
    profile = {
        "version": PROFILE_VERSION,
        "template": {"prefix": template.prefix, "suffix": template.suffix, "bos_id": template.bos_id},
        "fingerprint": tokenizer_fingerprint(hf_tokenizer),
        "stop_ids": sorted(stop_ids),
        "eos_token_id": hf_tokenizer.eos_token_id,
        "clean_up_tokenization_spaces": bool(getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)),
        "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    reason = _differences(Path(model_dir), hf_tokenizer, profile,
                          [context_head_text(template)] + [query_text(template, q) for q in _PROBE_QUESTIONS])
    profile["light"] = reason == ""
    profile["reason"] = reason
    if record_path is not None:
        record(record_path, profile_key(model_dir), profile)
    return profile


def _differences(model_dir: Path, hf_tokenizer: Any, profile: dict, texts: list[str]) -> str:
    """"" when the light tokenizer encodes `texts` and decodes probe ids exactly as `hf_tokenizer`; else why not."""
    try:
        light = LightTokenizer(model_dir, profile)
    except Exception as exc:  # noqa: BLE001 - no tokenizer.json, or one the tokenizers library cannot read
        return f"tokenizer.json cannot be loaded by the tokenizers library ({exc.__class__.__name__})"
    for text in [*texts, PROBE_TEXT]:
        expected = list(hf_tokenizer.encode(text, add_special_tokens=False))
        if light.encode(text) != expected:
            return f"encodes {text[:40]!r} differently"
    probe_ids = list(hf_tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
    special = sorted(getattr(hf_tokenizer, "all_special_ids", []) or [])
    generator = random.Random(0)
    vocabulary = len(hf_tokenizer)
    sequences = [probe_ids, probe_ids[:37], probe_ids[5:61] + special, special + probe_ids[:20],
                 *[[generator.randrange(vocabulary) for _ in range(40)] for _ in range(4)]]
    for ids in sequences:
        for skip in (True, False):
            if light.decode(ids, skip_special_tokens=skip) != hf_tokenizer.decode(ids, skip_special_tokens=skip):
                return f"decodes ids differently (skip_special_tokens={skip})"
    return ""


class LightTokenizer:
    """The part of an HF tokenizer that asking needs, over `tokenizers.Tokenizer` (see the module docstring)."""

    def __init__(self, model_dir: Path, profile: dict) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        self.profile = profile
        self.eos_token_id = profile.get("eos_token_id")
        self._clean_up = profile.get("clean_up_tokenization_spaces", False)

    @property
    def recorded_template(self):
        from starqa.documents.tokens import PromptTemplate

        t = self.profile["template"]
        return PromptTemplate(prefix=t["prefix"], suffix=t["suffix"], bos_id=t["bos_id"])

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Template text with special tokens parsed (as the HF tokenizer's `encode(text, add_special_tokens=False)`)."""
        if add_special_tokens:
            raise ValueError("LightTokenizer encodes prompt pieces only (add_special_tokens=False)")
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def convert_ids_to_tokens(self, ids) -> list[str | None]:
        """The vocabulary's token strings (starqa.evidence places byte-level tokens in the text by them)."""
        return [self._tokenizer.id_to_token(int(i)) for i in ids]

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (spaces before punctuation and contractions)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
