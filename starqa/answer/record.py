"""One question's answer as programs get it: the object `starqa ask --json` prints, `POST /v1/ask` streams and the
OpenAI endpoint attaches. Its fields are listed once, here; everything that prints or sends an answer goes through
`to_row`. torch-free: the CLI client of a running server prints these objects too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

_ROUNDED = ("phase1_s", "prefill_s", "ttft_s", "decode_tokens_per_s")


@dataclass
class Answer:
    question: str
    answer: str
    doc: str
    attention: str  # "star" or "full": the mode that answered (also under --attention hybrid)
    cache_hit: bool
    context_tokens: int
    query_tokens: int
    answer_tokens: int
    phase1_s: float
    prefill_s: float
    ttft_s: float
    decode_tokens_per_s: float
    sources: list = field(default_factory=list)  # [{"pages": [4, 5], "block": 3, "share": 0.41}, ...]
    evidence: list = field(default_factory=list)  # [{"page", "text", "start", "end", "score"}, ...] (text.txt)
    grounded: bool = False  # the answer's content is in one evidence quote (starqa.evidence)
    hybrid: dict | None = None  # --attention hybrid: {"escalated", "star_answer", "reason", ...} (starqa.answer.hybrid)

    def to_row(self) -> dict:
        """The JSON object (timings rounded), as plain data: a server sends it, a client prints it unchanged."""
        row = asdict(self)
        if row["hybrid"] is None:  # only a hybrid ask's answers carry it
            del row["hybrid"]
        for key in _ROUNDED:
            row[key] = round(row[key], 4)
        return row

    def to_json(self) -> str:
        return row_json(self.to_row())


def row_json(row: dict) -> str:
    """One line of `ask --json`: the same bytes whether `row` was made here or came from a server."""
    return json.dumps(row, ensure_ascii=False)
