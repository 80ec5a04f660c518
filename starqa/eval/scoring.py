"""Scoring as RULER does it: case-insensitive substring matching of the reference answers in the prediction.

string_match_all (synthetic tasks): the fraction of references that appear in the prediction.
string_match_part (question answering): 1 if any reference appears in the prediction, else 0.
A leading copy of the answer prefix the model was asked to begin with is not scored (see without_answer_prefix).
Per case a score is in [0, 1]; reports multiply the mean by 100.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

METRICS = ("all", "part")
_CONTROL = re.compile(r"[\x00-\x1f]")
_ANSWER_LABEL = re.compile(r"answer\s*:\s*", re.IGNORECASE)  # a label some models put before the prefix


def clean_prediction(text: str) -> str:
    """RULER's post-processing: control characters become newlines, surrounding whitespace goes."""
    return _CONTROL.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("a case needs at least one reference answer")
    lowered = prediction.lower()
    return sum(1.0 for reference in references if reference.lower() in lowered) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("a case needs at least one reference answer")
    lowered = prediction.lower()
    return max(1.0 if reference.lower() in lowered else 0.0 for reference in references)


def without_answer_prefix(prediction: str, prefix: str) -> str:
    """The prediction less a leading copy of the answer prefix (case-insensitive, opening quotes allowed).

    RULER puts the answer prefix at the end of the prompt, so a prediction never holds it; our prompt asks the model
    to begin with it, and its echo is not part of the answer (cwe's prefix contains words such as "appear" and
    "that" that are substrings of words in its vocabulary, and an echo would score them). An "Answer:" label
    before the echo goes with it.
    """
    text = prediction.lstrip().lstrip("\"'\u201c").lstrip()
    label = _ANSWER_LABEL.match(text)
    if label and not _ANSWER_LABEL.match(prefix):
        text = text[label.end():]  # "Answer: According to the chain(s) ..." (the 0.5B on vt and cwe)
    if prefix and text.lower().startswith(prefix.lower()):
        return text[len(prefix):]
    return prediction


def score(metric: str, prediction: str, references: Sequence[str], answer_prefix: str = "") -> float:
    prediction = without_answer_prefix(clean_prediction(prediction), answer_prefix)
    if metric == "all":
        return string_match_all(prediction, references)
    if metric == "part":
        return string_match_part(prediction, references)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
