"""RULER-style test cases, generated locally and deterministically from a seed, sized in model tokens.

    cases = generate_cases("niah_single_2", 4096, n_samples=20, seed=0, count_tokens=prompts.count)

Tasks (RULER's names; templates, needles and answer prefixes follow RULER's):
    niah_single_1    one needle (word key, 7-digit number) in repetitive noise
    niah_single_2    one needle (word key, 7-digit number) in essay prose
    niah_single_3    one needle (word key, UUID) in essay prose
    niah_multikey_1  the needle among three distractor needles with other keys, in essay prose
    niah_multivalue  four needles with the same key; all four values must be returned
    niah_multiquery  four needles with different keys, all four asked at once
    vt               variable tracking: "VAR X1 = 12345", "VAR X2 = VAR X1", ... (4 hops) in noise; name them all
    cwe              common words extraction: a numbered word list; name the 10 most frequent words
    qa               a question about the bundled sample contract, with essay documents as padding

A case's prompt is starqa's usual one (starqa.documents.tokens): the context part holds RULER's preamble and the
haystack, the query part holds RULER's question and, as an instruction, its answer prefix. `count_tokens(context_text,
question)` gives the prompt's total tokens (context part + query part); every case is sized to within `tolerance` (2 %)
below the requested length. Needles sit at depth i / (n - 1) for sample i of n (further needles evenly spaced after it).
"""

from __future__ import annotations

import hashlib
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from starqa.eval import haystack
from starqa.eval.haystack import LengthError, largest_fitting, spread_depths
from starqa.eval.qa_file import QAPair, QASource
from starqa.words import ADJECTIVES, NOUNS, cwe_vocabulary

CountTokens = Callable[[str, str], int]
TOLERANCE = 0.02


@dataclass(frozen=True)
class Case:
    """One prompt to answer: the document-side text, the question side, and the references to score against."""

    task: str
    length: int  # requested prompt length in tokens (own-document cases: the document's context tokens)
    index: int  # sample index within (task, length)
    context_text: str
    question: str
    answers: tuple[str, ...]
    metric: str = "all"  # "all" = RULER string_match_all, "part" = string_match_part
    max_new_tokens: int = 128
    depth: float | None = None  # where the (first) needle sits, 0 = start of the context, 1 = end
    answer_prefix: str = ""  # what the model is asked to begin with; a leading copy of it is not scored

    @property
    def case_id(self) -> str:
        """A fingerprint of the case's content: a resumed run refuses records made from other content."""
        digest = hashlib.sha256()
        for part in (self.task, str(self.length), str(self.index), self.context_text, self.question,
                     "\x1f".join(self.answers)):
            digest.update(part.encode("utf-8"))
            digest.update(b"\x00")
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: str  # niah, vt, cwe, qa
    metric: str
    max_new_tokens: int  # RULER's tokens_to_generate for the family
    haystack: str = "essay"  # niah: noise or essay
    value_kind: str = "numbers"  # niah: numbers or uuids
    num_keys: int = 1  # niah: needles with distinct keys (the first num_queries are asked)
    num_values: int = 1  # niah: values per key
    num_queries: int = 1


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("niah_single_1", "niah", "all", 128, haystack="noise"),
    TaskSpec("niah_single_2", "niah", "all", 128),
    TaskSpec("niah_single_3", "niah", "all", 128, value_kind="uuids"),
    TaskSpec("niah_multikey_1", "niah", "all", 128, num_keys=4),
    TaskSpec("niah_multivalue", "niah", "all", 128, num_values=4),
    TaskSpec("niah_multiquery", "niah", "all", 128, num_keys=4, num_queries=4),
    TaskSpec("vt", "vt", "all", 30),
    TaskSpec("cwe", "cwe", "all", 120),
    TaskSpec("qa", "qa", "part", 32),
)}
TASK_NAMES = tuple(TASKS)

# RULER's templates, split at {context}: the preamble opens the document, the question and answer prefix follow it.
NIAH_PREAMBLE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n")
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
VT_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
                    "are assigned the value {value}, they are:")
VT_HOPS = 4
CWE_PREAMBLE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n")
CWE_QUESTION = "What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10
QA_PREAMBLE = ("Answer the question based on the given documents. Only give me the answer and do not output any "
               "other words.\n\nThe following are given documents.\n\n")
QA_INSTRUCTION = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                  "other words.")
ANSWER_PREFIX_INSTRUCTION = 'Begin your answer with: "{prefix}"'


def with_answer_prefix(question: str, prefix: str) -> str:
    """The query carries RULER's answer prefix as an instruction (the prompt layout has no assistant-side prefix)."""
    return f"{question}\n{ANSWER_PREFIX_INSTRUCTION.format(prefix=prefix)}"


def _rng(seed: int, task: str, length: int, index: int, part: str = "case") -> random.Random:
    # Seeding with a string is deterministic across runs and platforms (it does not depend on PYTHONHASHSEED).
    return random.Random(f"starqa-eval/{seed}/{task}/{length}/{index}/{part}")


def spread_order(n: int) -> list[int]:
    """0..n-1 ordered so that every prefix is spread out (sample i's needle sits at depth i / (n - 1)): both ends,
    then the middle, then the quarters, the eighths, ... (depth fractions in bisection order, rounded to indices)."""
    order = list(dict.fromkeys(index for index in (0, n - 1) if n > 0))
    level = 1
    while len(order) < n and 2 ** level <= 2 * n:
        for k in range(1, 2 ** level, 2):
            index = round(k / 2 ** level * (n - 1))
            if index not in order:
                order.append(index)
        level += 1
    return order + [index for index in range(n) if index not in order]


def generate_cases(task: str, length: int, n_samples: int, seed: int, count_tokens: CountTokens, *,
                   qa_source: QASource | None = None, tolerance: float = TOLERANCE) -> list[Case]:
    """n_samples cases of `task` whose prompts are `length` tokens long (within tolerance, never longer)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_NAMES)}")
    if n_samples <= 0 or length <= 0:
        raise ValueError("n_samples and length must be positive")
    spec = TASKS[task]
    if spec.family == "qa" and qa_source is None:
        raise ValueError("the qa task needs a qa_source (a document with questions)")
    make = {"niah": _niah_case, "vt": _vt_case, "cwe": _cwe_case, "qa": _qa_case}[spec.family]
    cases = []
    for index in range(n_samples):
        try:
            case = make(spec, length, index, n_samples, seed, count_tokens, qa_source)
        except LengthError as exc:
            raise LengthError(f"{task} cannot be built at {length} tokens: {exc}") from None
        total = count_tokens(case.context_text, case.question)
        if not length * (1 - tolerance) <= total <= length:
            raise LengthError(f"{task} at {length} tokens: could only build a {total}-token prompt "
                              f"(needs {length * (1 - tolerance):.0f}..{length})")
        cases.append(case)
    return cases


# ---------------------------------------------------------------- needle in a haystack


def _distinct(make: Callable[[], str], count: int) -> list[str]:
    found: list[str] = []
    while len(found) < count:
        value = make()
        if value not in found:
            found.append(value)
    return found


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _query_phrase(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah_case(spec: TaskSpec, length, index, n_samples, seed, count_tokens, qa_source) -> Case:
    rng = _rng(seed, spec.name, length, index)
    kind = spec.value_kind
    keys = _distinct(lambda: _key(rng), max(spec.num_keys, spec.num_queries))
    values = _distinct(lambda: _value(rng, kind), len(keys) * spec.num_values)
    needles = [NIAH_NEEDLE.format(kind=kind, key=key, value=values[k * spec.num_values + v])
               for k, key in enumerate(keys) for v in range(spec.num_values)]
    # The asked needles come first in `needles` (keys[:num_queries]); the distractor keys' needles after them.
    depth = spread_depths(index, n_samples)
    placed = [((depth + j / len(needles)) % 1.0 if j else depth, text) for j, text in enumerate(needles)]
    asked = keys[: spec.num_queries]
    query = _query_phrase(asked)
    prefix = NIAH_ANSWER_PREFIX.format(kind=kind, query=query)
    question = with_answer_prefix(NIAH_QUESTION.format(kind=kind, query=query), prefix)
    answers = tuple(values[: spec.num_queries * spec.num_values])
    preamble = NIAH_PREAMBLE.format(kind=kind)

    def context(n: int) -> str:
        if spec.haystack == "noise":
            pieces = haystack.noise_haystack(n)
        else:
            pieces = haystack.essay_haystack(n, _rng(seed, spec.name, length, index, "haystack"))
        return preamble + haystack.render(haystack.insert_at_depths(pieces, placed))

    n = largest_fitting(lambda n: count_tokens(context(n), question), length, hint=max(1, length // 8))
    return Case(spec.name, length, index, context(n), question, answers, spec.metric, spec.max_new_tokens, depth,
                prefix)


# ---------------------------------------------------------------- variable tracking


def _variable_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _vt_case(spec: TaskSpec, length, index, n_samples, seed, count_tokens, qa_source) -> Case:
    rng = _rng(seed, spec.name, length, index)
    names = _distinct(lambda: _variable_name(rng), VT_HOPS + 1)
    value = str(rng.randint(10000, 99999))
    statements = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(VT_HOPS)]
    # One statement in each of len(statements) equal stretches of the noise, in chain order: noise between hops.
    depths = [(j + rng.random()) / len(statements) for j in range(len(statements))]
    prefix = VT_ANSWER_PREFIX.format(count=len(names), value=value)
    question = with_answer_prefix(VT_QUESTION.format(value=value), prefix)

    def context(n: int) -> str:
        pieces = haystack.insert_at_depths(haystack.noise_haystack(n), list(zip(depths, statements)))
        return VT_PREAMBLE + haystack.render(pieces)

    n = largest_fitting(lambda n: count_tokens(context(n), question), length, hint=max(1, length // 8))
    return Case(spec.name, length, index, context(n), question, tuple(names), spec.metric, spec.max_new_tokens,
                depths[0], prefix)


# ---------------------------------------------------------------- common words extraction


def cwe_frequencies(items: int, vocabulary: int) -> tuple[int, int]:
    """(times each common word appears, times each other word appears) for a list of about `items` entries.

    RULER uses 30 and 3. Shorter lists scale the common words down so they stay about half the list at most;
    longer lists than the vocabulary can fill raise the other words' count. Common words always appear more often.
    """
    common = min(30, max(2, items // (3 * CWE_COMMON)))
    other = 1 if common < 8 else 2 if common < 12 else 3
    spare = max(1, vocabulary - CWE_COMMON)
    other = max(other, -(-(items - CWE_COMMON * common) // spare))
    return max(common, other + 1), other


def _cwe_case(spec: TaskSpec, length, index, n_samples, seed, count_tokens, qa_source) -> Case:
    vocabulary = cwe_vocabulary()
    words = list(vocabulary)
    _rng(seed, spec.name, length, index).shuffle(words)
    common, others = words[:CWE_COMMON], words[CWE_COMMON:]
    question = with_answer_prefix(CWE_QUESTION, CWE_ANSWER_PREFIX)

    def listing(entries: Sequence[str]) -> str:
        return CWE_PREAMBLE + " ".join(f"{number}. {word}" for number, word in enumerate(entries, start=1))

    # Estimate how many entries fit, to choose the frequencies, then fit the number of other words exactly.
    overhead = count_tokens(listing([]), question)
    probe = (others * 2)[:200]
    per_entry = max(1e-6, (count_tokens(listing(probe), question) - overhead) / len(probe))
    freq_common, freq_other = cwe_frequencies(int((length - overhead) / per_entry), len(vocabulary))

    def context(n_other: int) -> str:
        entries = common * freq_common + others[:n_other] * freq_other
        _rng(seed, spec.name, length, index, "order").shuffle(entries)
        return listing(entries)

    n = largest_fitting(lambda n: count_tokens(context(n), question), length, hint=16, maximum=len(others))
    return Case(spec.name, length, index, context(n), question, tuple(common), spec.metric, spec.max_new_tokens,
                answer_prefix=CWE_ANSWER_PREFIX)


# ---------------------------------------------------------------- question answering over the bundled sample


def _paragraphs(text: str) -> list[str]:
    return [paragraph.strip() for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]


def _content_words(text: str) -> set[str]:
    return {word for word in re.findall(r"[a-z]+", text.lower()) if len(word) >= 4}


def answerable_pairs(source: QASource) -> list[tuple[QAPair, int]]:
    """Pairs with an answer written verbatim in the document, each with the paragraph that answers it.

    Of the paragraphs holding an answer, the one sharing most words with the question (the first on a tie): an
    answer such as "London" can also appear in a paragraph about something else.
    """
    paragraphs = [paragraph.lower() for paragraph in _paragraphs(source.text)]
    found = []
    for pair in source.pairs:
        asked = _content_words(pair.question)
        holding = [position for position, paragraph in enumerate(paragraphs)
                   if any(answer.lower() in paragraph for answer in pair.answers)]
        if holding:
            found.append((pair, max(holding, key=lambda p: (len(asked & _content_words(paragraphs[p])), -p))))
    return found


def _documents(padding: list[str], golden: str, depth: float) -> str:
    documents = list(padding)
    documents.insert(round(depth * len(padding)), golden)
    return "\n\n".join(f"Document {number}:\n{text}" for number, text in enumerate(documents, start=1))


def _qa_case(spec: TaskSpec, length, index, n_samples, seed, count_tokens, qa_source: QASource) -> Case:
    usable = answerable_pairs(qa_source)
    if not usable:
        raise ValueError(f"no question of '{qa_source.name}' has an answer written in the document")
    order = list(range(len(usable)))
    random.Random(f"starqa-eval/{seed}/qa-order").shuffle(order)
    pair, golden = usable[order[index % len(order)]]
    paragraphs = _paragraphs(qa_source.text)
    question = f"{pair.question}\n{QA_INSTRUCTION}"
    depth = spread_depths(index, n_samples)

    def context(window: tuple[int, int], n_words: int) -> str:
        golden_text = "\n\n".join(paragraphs[window[0] : window[1]])
        padding = haystack.essay_paragraphs(n_words, _rng(seed, spec.name, length, index, "padding"))
        return QA_PREAMBLE + _documents(padding, golden_text, depth)

    def fits(window: tuple[int, int]) -> bool:
        return count_tokens(context(window, 0), question) <= length

    window = (0, len(paragraphs))
    if not fits(window):  # the document is longer than the prompt: the answer's paragraph and its neighbours
        window = (golden, golden + 1)
        if not fits(window):
            raise LengthError(f"qa at {length} tokens: the paragraph answering {pair.question!r} alone does not fit")
        grown = True
        while grown:
            grown = False
            for candidate in ((window[0], window[1] + 1), (window[0] - 1, window[1])):
                if 0 <= candidate[0] and candidate[1] <= len(paragraphs) and fits(candidate):
                    window, grown = candidate, True
    n = largest_fitting(lambda n: count_tokens(context(window, n), question), length, hint=max(1, length // 4))
    return Case(spec.name, length, index, context(window, n), question, pair.answers, spec.metric,
                spec.max_new_tokens, depth)


# ---------------------------------------------------------------- a user's own document


def document_cases(name: str, text: str, pairs: Sequence[QAPair], context_tokens: int, *,
                   max_new_tokens: int) -> list[Case]:
    """One case per question about a whole document (no padding, no truncation); scored like RULER's qa."""
    return [Case(task=name, length=context_tokens, index=index, context_text=text, question=pair.question,
                 answers=pair.answers, metric="part", max_new_tokens=max_new_tokens)
            for index, pair in enumerate(pairs)]


__all__ = ["Case", "CountTokens", "LengthError", "TASKS", "TASK_NAMES", "TaskSpec", "answerable_pairs",
           "cwe_frequencies", "document_cases", "generate_cases", "spread_order", "with_answer_prefix"]
