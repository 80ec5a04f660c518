"""Scoring as RULER does it: case-insensitive substring matching of the reference answers in the prediction.

string_match_all (synthetic tasks): the fraction of references that appear in the prediction.
string_match_part (question answering): 1 if any reference appears in the prediction, else 0.
Per case a score is in [0, 1]; reports multiply the mean by 100.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

METRICS = ("all", "part")
_CONTROL = re.compile(r"[\x00-\x1f]")


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


def score(metric: str, prediction: str, references: Sequence[str]) -> float:
    if metric == "all":
        return string_match_all(clean_prediction(prediction), references)
    if metric == "part":
        return string_match_part(clean_prediction(prediction), references)
    raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
