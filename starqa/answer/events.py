"""What answering produces, as events; and `EventPrinter`, which prints them the way `starqa ask` does.

Answering a request (starqa.answer.ask) emits plain JSON-able dicts, in this order per batch of questions: the answer
text as it is decoded, then each question's Answer with its text and the lines printed under it (evidence quotes,
grounded, sources), then the batch's timing table. `starqa ask` prints them in its own process; `starqa serve` sends
the same dicts to a client (`POST /v1/ask`, one per line), which prints them with the same printer, so both print the
same bytes. torch-free.

    {"type": "document", "doc": "memo"}                       a document begins (when several are asked)
    {"type": "delta", "doc": "memo", "question": 0, "text": " The"}     answer text as it is decoded
    {"type": "answer", "doc": "memo", "question": 0, "answer": {...}, "text": " The fee ...", "lines": [...],
     "version": {"object": "memo.3f2a...", "version": 2, "source_sha256": "...", "model": "...", ...}}
    {"type": "timings", "title": "...", "rows": [["time to first token", "0.210 s"], ...]}
    {"type": "error", "message": "memo: ..."}                 one document failed; the others are still answered
    {"type": "note", "doc": "memo", "question": 0, "message": "answered again with full attention: not grounded"}

`answer` is the `ask --json` object (starqa.answer.record.Answer.to_row); `text` is the decoded answer as streamed (not
stripped); `question` counts the questions asked of that document from 0. A server adds `failed` (the request
failed as a whole: one error line and an exit code), `done` (the exit code) and `unserved` (nothing was done: the
client answers in its own process), see starqa.serve.protocol.
"""

from __future__ import annotations

import sys

from starqa import report
from starqa.answer.record import row_json


def document(doc: str) -> dict:
    return {"type": "document", "doc": doc}


def delta(doc: str, question: int, text: str) -> dict:
    return {"type": "delta", "doc": doc, "question": question, "text": text}


def answer(doc: str, question: int, row: dict, text: str, lines: list[str], version: dict | None = None) -> dict:
    """`version`: the stored version that answered (object, version, source SHA-256, model), for the audit log."""
    event = {"type": "answer", "doc": doc, "question": question, "answer": row, "text": text, "lines": lines}
    if version is not None:
        event["version"] = version
    return event


def timings(title: str, rows: list[tuple[str, str]]) -> dict:
    return {"type": "timings", "title": title, "rows": [list(row) for row in rows]}


def error(message: str) -> dict:
    return {"type": "error", "message": message}


def note(doc: str, question: int, message: str) -> dict:
    """A line about one answer, on stderr in text mode (`answered again with full attention: not grounded`)."""
    return {"type": "note", "doc": doc, "question": question, "message": message}


class EventPrinter:
    """Prints answering events as `starqa ask` always has: answers on stdout, streamed as they are decoded (the
    first unfinished question of a document streams; the others of its batch follow when the batch is done), each
    followed by its lines, or with --json one object per question; tables and errors on stderr (report)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.out = sys.stdout  # looked up now, not at import: a caller may have redirected stdout since
        self._printed: dict[tuple[str, int], int] = {}  # characters of an answer's text already written
        self._streaming: dict[str, int] = {}  # per document: the question whose text is written as it comes

    def __call__(self, event: dict) -> None:
        handler = getattr(self, "_on_" + str(event.get("type")), None)
        if handler is not None:  # an event this starqa does not know (a newer server's) has nothing to print
            handler(event)

    def _on_document(self, event: dict) -> None:
        if not self.as_json:
            self.out.write(f"== {event['doc']} ==\n")
            self.out.flush()

    def _on_delta(self, event: dict) -> None:
        doc, question = event["doc"], event["question"]
        if self.as_json or question != self._streaming.get(doc, 0):
            return
        self.out.write(event["text"])
        self.out.flush()
        key = (doc, question)
        self._printed[key] = self._printed.get(key, 0) + len(event["text"])

    def _on_answer(self, event: dict) -> None:
        doc, question = event["doc"], event["question"]
        if self.as_json:
            self.out.write(row_json(event["answer"]) + "\n")
        else:
            self.out.write(event["text"][self._printed.pop((doc, question), 0):] + "\n")
            self.out.write("".join(line + "\n" for line in event["lines"]))
            self._streaming[doc] = question + 1
        self.out.flush()

    def _on_timings(self, event: dict) -> None:
        report.table(event["title"], [tuple(row) for row in event["rows"]])

    def _on_note(self, event: dict) -> None:
        if not self.as_json:  # --json: the answer's own "hybrid" field says it
            report.info(event["message"])

    def _on_error(self, event: dict) -> None:
        report.error(event["message"])


def ignore(event: dict) -> None:
    """The sink of a process that prints nothing (a torchrun rank other than 0)."""
