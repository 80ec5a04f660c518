"""Runs cases through full attention and Star Attention with one StarEngine, and records what each run measured.

For each case the prompt is built once (prompts.py); then
    full:  engine.generate_full(context_ids + query_ids)            one causal pass over the whole prompt, no cache
    star:  ctx = engine.encode_context(context_ids, block, anchor)  Phase 1
           engine.generate(ctx, query_ids)                          Phase 2
with the same greedy decoding. Each (case, mode) gives one record (a dict, one JSON line in the results log):
prediction, score, Phase 1 seconds, time to first token, decode tokens/s and peak memory.

Peak RSS is per mode where Linux lets a process reset its high-water mark (/proc/self/clear_refs); elsewhere it is
the process's peak so far, and `peak_rss_scope` says so. A results log (--resume) gets each record as soon as it is
measured; records already in it are not measured again (their score is recomputed from the stored prediction), and
records made from other cases (another seed, tokenizer or model) are refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from starqa import report
from starqa.errors import UsageError
from starqa.eval.prompts import PromptBuilder
from starqa.eval.scoring import clean_prediction, score, without_answer_prefix
from starqa.eval.tasks import Case
from starqa.evidence.collect import evidence_for_answer, observer_for
from starqa.evidence.quotes import DocumentView
from starqa.documents.text_positions import block_char_spans
from starqa.documents.tokens import plan_blocks
from starqa.config import block_size_for

RecordKey = tuple  # (task, length, index, mode, block_size, anchor_size)


# ---------------------------------------------------------------- which attention modes to compare


@dataclass(frozen=True)
class SizeSpec:
    """A block or anchor size: a number of tokens, or a fraction of the requested length ("L/4")."""

    tokens: int | None = None
    divisor: int | None = None

    @classmethod
    def parse(cls, text: str) -> "SizeSpec":
        text = text.strip()
        if text.isdigit() and int(text) > 0:
            return cls(tokens=int(text))
        match = re.fullmatch(r"[Ll]/([1-9][0-9]*)", text)
        if match:
            return cls(divisor=int(match.group(1)))
        raise UsageError(f"a block or anchor size must be a positive number of tokens or L/N (a fraction of the "
                         f"length), not {text!r}")

    def resolve(self, length: int) -> int:
        return self.tokens if self.tokens is not None else max(1, length // self.divisor)

    def __str__(self) -> str:
        return str(self.tokens) if self.tokens is not None else f"L/{self.divisor}"


@dataclass(frozen=True)
class StarSpec:
    """One requested Star Attention configuration (block size, anchor size), possibly relative to the length."""

    block: SizeSpec
    anchor: SizeSpec

    @property
    def label(self) -> str:
        return f"star b={self.block}, a={self.anchor}"


QUARTER = StarSpec(SizeSpec(divisor=4), SizeSpec(divisor=4))  # the paper's default: block = anchor = length / 4


@dataclass(frozen=True)
class Mode:
    """One concrete way to run a case: full attention, or Star Attention with a block and an anchor size."""

    name: str  # "full" or "star"
    block_size: int | None = None
    anchor_size: int | None = None

    @property
    def label(self) -> str:
        return "full" if self.name == "full" else f"star {self.block_size}/{self.anchor_size}"


FULL = Mode("full")


def modes_for(length: int, specs: Sequence[StarSpec]) -> tuple[list[Mode], list[str]]:
    """Full attention plus each Star configuration at this length (the second list: notes on skipped
    configurations; none today, since an anchor larger than the block runs too)."""
    modes, skipped = [FULL], []
    for spec in specs:
        block, anchor = spec.block.resolve(length), spec.anchor.resolve(length)
        mode = Mode("star", block, anchor)
        if mode not in modes:
            modes.append(mode)
    return modes, skipped


def record_key(record: dict) -> RecordKey:
    return (record["task"], record["length"], record["index"], record["mode"], record["block_size"],
            record["anchor_size"])


def case_key(case: Case, mode: Mode) -> RecordKey:
    return (case.task, case.length, case.index, mode.name, mode.block_size, mode.anchor_size)


# ---------------------------------------------------------------- the results log (--resume)


class ResultLog:
    """A JSONL file of per-case records: read once, then appended to, one flushed line per finished record."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"--resume needs a file, and {self.path} is a directory")
        if not self.path.parent.is_dir():
            raise UsageError(f"cannot write the results log {self.path}: folder {self.path.parent} does not exist")

    def load(self) -> dict[RecordKey, dict]:
        records: dict[RecordKey, dict] = {}
        if not self.path.exists():
            return records
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read the results log {self.path}: {exc.__class__.__name__}") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[record_key(record)] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                # A line cut short by an interruption: that case is simply measured again.
                report.warn(f"{self.path} line {number} is not a complete result; it will be measured again")
        return records

    def append(self, record: dict) -> None:
        with self.path.open("a+", encoding="utf-8") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:  # make sure a line cut short earlier does not swallow this one
                handle.seek(handle.tell() - 1)
                last = handle.read(1)
                handle.seek(0, os.SEEK_END)
                if last != "\n":
                    handle.write("\n")
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


# ---------------------------------------------------------------- measuring


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: "5" > /proc/self/clear_refs). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cuda_reset(engine) -> None:
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)


def _synchronize(engine) -> None:
    import torch

    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def prediction_text(engine, new_ids: Sequence[int]) -> str:
    kept = [token for token in new_ids if token not in engine.stop_ids]
    return engine.tokenizer.decode(kept, skip_special_tokens=True).strip()


class EvalRunner:
    """Measures (case, mode) pairs with one engine; `records` holds everything measured or resumed, in order."""

    def __init__(self, engine, *, phase1_batch: int = 4, max_new_tokens: int | None = None,
                 log: ResultLog | None = None, on_record: Callable[[dict], None] | None = None,
                 full_attention_block_size: int | str = 1024) -> None:
        self.engine = engine
        self.prompts = PromptBuilder(engine.hf_tokenizer)
        self.phase1_batch = phase1_batch
        self.max_new_tokens = max_new_tokens  # overrides each task's own budget when given
        self.log = log
        self.on_record = on_record
        self.previous = log.load() if log is not None else {}
        self.records: list[dict] = []
        self.resumed = 0
        self.peak_rss_scope = "mode"
        self.full_attention_block_size = full_attention_block_size  # blocks naming a full-attention answer's sources
        self._dtype = str(engine.dtype).removeprefix("torch.")
        self._warm = False

    def check_log(self, plan: Sequence[tuple[Case, Sequence[Mode]]]) -> None:
        """Refuse, before anything is measured, a results log whose records for these cases were made otherwise."""
        for case, modes in plan:
            for mode in modes:
                previous = self.previous.get(case_key(case, mode))
                if previous is not None:
                    self._check_previous(case, previous)

    def _check_previous(self, case: Case, previous: dict) -> None:
        # Mixing another prompt, model or device into a row would average things that cannot be compared.
        if (previous.get("case_id") != case.case_id or previous.get("model") != self.engine.model_name
                or previous.get("dtype") != self._dtype
                or str(previous.get("device", "")).split(":")[0] != self.engine.device.type
                or previous.get("max_new_tokens") != (self.max_new_tokens or case.max_new_tokens)):
            raise UsageError(
                f"{self.log.path} holds a result for {case.task} at {case.length} tokens, sample {case.index}, "
                "made from another prompt, model or device (a different --samples, --seed, --model, --dtype, "
                "--device or --max-new-tokens?); use the options of the run it continues, or another --resume file")

    def pending(self, case: Case, modes: Sequence[Mode]) -> list[Mode]:
        """The modes of this case not yet in the results log (a log record of other content is refused)."""
        todo = []
        for mode in modes:
            previous = self.previous.get(case_key(case, mode))
            if previous is None:
                todo.append(mode)
                continue
            self._check_previous(case, previous)
            # Scored again from the stored prediction, so records made before a scoring fix are scored like new ones.
            previous = dict(previous, score=score(case.metric, previous["prediction"], case.answers,
                                                  case.answer_prefix))
            self.records.append(previous)
            self.resumed += 1
            if self.on_record is not None:
                self.on_record(previous)
        return todo

    def run_case(self, case: Case, modes: Sequence[Mode]) -> list[dict]:
        todo = self.pending(case, modes)
        if not todo:
            return []
        context_ids = self.prompts.context_ids(case.context_text)
        query_ids = self.prompts.query_ids(case.question)
        if not self._warm:
            self._warm_up(context_ids, query_ids)
        measured = []
        for mode in todo:
            record = self.measure(case, mode, context_ids, query_ids)
            if self.log is not None:
                self.log.append(record)
            self.records.append(record)
            measured.append(record)
            if self.on_record is not None:
                self.on_record(record)
        return measured

    def _warm_up(self, context_ids: Sequence[int], query_ids: Sequence[int]) -> None:
        """One tiny run of each path first, so one-time start-up costs do not land on the first measured case
        (nor the model's first-use calibration of its retrieval heads, which the sources follow)."""
        from starqa.evidence.heads import retrieval_heads

        retrieval_heads(self.engine, on_status=report.info)
        head = list(context_ids[:32])
        self.engine.generate_full(head + list(query_ids), max_new_tokens=2)
        ctx = self.engine.encode_context(head, block_size=16, anchor_size=16, batch=self.phase1_batch)
        self.engine.generate(ctx, query_ids, max_new_tokens=2)
        self._warm = True

    def measure(self, case: Case, mode: Mode, context_ids: Sequence[int], query_ids: Sequence[int]) -> dict:
        engine = self.engine
        budget = self.max_new_tokens or case.max_new_tokens
        if not reset_peak_rss():
            self.peak_rss_scope = "process"
        _cuda_reset(engine)
        phase1_s = None
        document_offset = self.prompts.document_offset
        if mode.name == "full":
            # The sources of a full-attention answer are named by the blocks of the default size (as `ask` names
            # them by the stored document's blocks).
            spans = plan_blocks(len(context_ids), block_size_for(self.full_attention_block_size, len(context_ids)))
            observer = observer_for(engine, spans, document_offset)
            new_ids = engine.generate_full(list(context_ids) + list(query_ids), max_new_tokens=budget,
                                           temperature=0.0, observe_prefix=observer)
        else:
            started = time.perf_counter()
            ctx = engine.encode_context(context_ids, mode.block_size, mode.anchor_size, batch=self.phase1_batch)
            _synchronize(engine)
            phase1_s = time.perf_counter() - started
            spans = list(ctx.spans)
            observer = observer_for(engine, spans, document_offset)
            new_ids = engine.generate(ctx, query_ids, max_new_tokens=budget, temperature=0.0,
                                      observe_prefix=observer)
            del ctx
        stats = engine.last_stats
        prediction = prediction_text(engine, new_ids)
        found, source_hit, evidence_hit = _attribution(engine, case, context_ids, document_offset, spans, observer,
                                                       prediction)
        cuda_peak = report.cuda_peak_mb(engine.device) if engine.device.type == "cuda" else None
        return {
            "task": case.task, "length": case.length, "index": case.index, "mode": mode.name,
            "block_size": mode.block_size, "anchor_size": mode.anchor_size,
            "case_id": case.case_id, "model": engine.model_name, "dtype": self._dtype, "device": str(engine.device),
            "depth": case.depth,
            "context_tokens": len(context_ids), "query_tokens": len(query_ids),
            "prediction": clean_prediction(prediction), "answers": list(case.answers), "metric": case.metric,
            "score": score(case.metric, prediction, case.answers, case.answer_prefix),
            "phase1_s": phase1_s, "prefill_s": stats.prefill_s, "ttft_s": stats.ttft_s, "decode_s": stats.decode_s,
            "new_tokens": stats.new_tokens, "decode_tokens_per_s": stats.decode_tokens_per_s,
            "peak_rss_mb": report.peak_rss_mb(), "peak_cuda_mb": cuda_peak, "max_new_tokens": budget,
            "source_hit": source_hit, "evidence_hit": evidence_hit,
            # the signals hybrid answering may escalate on (starqa.answer.hybrid): grounded, the best quote's score
            "grounded": found.grounded, "evidence_score": found.evidence[0]["score"] if found.evidence else 0.0,
        }


def _attribution(engine, case: Case, context_ids, document_offset: int, spans, observer,
                 prediction: str) -> tuple:
    """(evidence, source_hit, evidence_hit): the answer's evidence as judged against the user's question
    (starqa.evidence: its quotes and `grounded`),
    whether the first source block holds the first reference answer, and whether the first evidence quote does.

    The hits are None when no reference occurs in the context exactly once (e.g. cwe's counted words are everywhere).
    """
    text = case.context_text
    view = DocumentView(text, [{"number": 1, "start": 0, "end": len(text)}], list(context_ids), document_offset,
                        list(spans), [[1]] * len(spans), engine.tokenizer)
    found = evidence_for_answer(view, [observer.stacked()], prediction, case.question)
    # `grounded` as `ask` would judge it: the answer a user reads against the question a user asks, both without
    # the suite's answer prefix: neither its instruction ("Begin your answer with: ...") nor the model's echo of it
    # ("The special magic numbers for X mentioned in the provided text are") is part of the question or the answer,
    # and the echo's words ("mentioned", "provided") are in no passage, so every echoing answer was judged ungrounded
    asked = user_question(case)
    answer = without_answer_prefix(clean_prediction(prediction), case.answer_prefix)
    judged = found if (asked, answer) == (case.question, prediction) else \
        evidence_for_answer(view, [observer.stacked()], answer, asked)
    position = text.find(case.answers[0]) if case.answers else -1
    if position < 0 or text.count(case.answers[0]) != 1:
        return judged, None, None
    if not found.sources:
        return judged, False, False
    char_spans = block_char_spans(engine.tokenizer, context_ids, document_offset, spans, text)
    start, end = char_spans[found.sources[0]["block"]]
    quote = found.evidence[0] if found.evidence else {"start": 0, "end": 0}
    return judged, start <= position < end, quote["start"] <= position < quote["end"]


def user_question(case: Case) -> str:
    """The case's question less the answer-prefix instruction the suite appends (starqa.eval.tasks)."""
    from starqa.eval.tasks import with_answer_prefix

    if not case.answer_prefix:
        return case.question
    suffix = with_answer_prefix("", case.answer_prefix)
    return case.question.removesuffix(suffix) if case.question.endswith(suffix) else case.question
