"""Question/answer files (JSONL, one {"question": ..., "answers": [...]} per line) and the bundled sample document.

The bundled sample is samples/contract.txt with samples/contract-qa.jsonl in a source checkout; the RULER-style `qa`
task is built from it. An installed package without the samples simply has no bundled sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from starqa.errors import UsageError

SAMPLES_DIR = Path(__file__).resolve().parent.parent.parent / "samples"


@dataclass(frozen=True)
class QAPair:
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class QASource:
    """A document and questions about it."""

    name: str
    text: str
    pairs: tuple[QAPair, ...]


def parse_qa_lines(lines, origin: str) -> list[QAPair]:
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{origin} line {number} is not JSON; expected {{\"question\": ..., \"answers\": [...]}}") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise UsageError(f"{origin} line {number} needs a non-empty \"question\" string")
        answers = item.get("answers", item.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if (not isinstance(answers, list) or not answers
                or not all(isinstance(answer, str) and answer.strip() for answer in answers)):
            raise UsageError(f"{origin} line {number} needs \"answers\": a non-empty list of non-empty strings")
        pairs.append(QAPair(question=item["question"].strip(), answers=tuple(answer.strip() for answer in answers)))
    if not pairs:
        raise UsageError(f"{origin} holds no questions")
    return pairs


def load_qa_file(path: Path | str) -> list[QAPair]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not part of line 1
    except FileNotFoundError:
        raise UsageError(f"QA file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read QA file {path}: {exc.__class__.__name__}") from None
    return parse_qa_lines(text.splitlines(), str(path))


def bundled_sample(samples_dir: Path = SAMPLES_DIR) -> QASource | None:
    """samples/contract.txt + samples/contract-qa.jsonl, or None when they are not there."""
    document, questions = samples_dir / "contract.txt", samples_dir / "contract-qa.jsonl"
    if not document.is_file() or not questions.is_file():
        return None
    return QASource(name="contract", text=document.read_text(encoding="utf-8"), pairs=tuple(load_qa_file(questions)))
