"""The generated set that answer attribution (sources and evidence) is tuned and judged on: one fact per document.

    from attribution_set import generate_cases, write_document
    cases = generate_cases("heldout", [2048, 6144], per_cell=4, count_tokens=...)

Each case is a document (plain text with form-feed pages, or a PDF made with reportlab) of 1K-8K tokens of filler
(essay prose, the sample contract's clauses, or a generated operations report), with one planted fact the question
asks for and 0-3 distractor facts of the same shape (other keys, other values). Facts come in families whose answers
are numbers, names, places, days and clauses; each family has several phrasings of the fact and of the question.

Splits never share phrasings or seeds:
- "tune": phrasings 0 and 1 of the tuning families; the method is chosen and its thresholds set on it;
- "heldout": phrasings 2 and 3 of the same families, plus two families tuning never sees ("heldout_only");
the retrieval-head calibration (starqa.evidence) plants yet another fact ("the special magic number") in its own
haystack, so it shares nothing with either.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FIRST = ("Amara Bruno Celine Dmitri Elena Farid Greta Hiroshi Ingrid Jonas Keiko Lucia Mateo Nadia Oskar Priya "
         "Quentin Rosa Stefan Tamsin Ulrich Vera Wanjiru Xavier Yusuf Zofia Adele Bastian Cormac Delphine Emeka "
         "Fiona Gideon Hana Idris Juno Kasimir Leila Magnus Nell").split()
LAST = ("Okafor Lindqvist Moreau Petrov Castellano Haddad Novak Tanaka Eriksen Brandt Ishikawa Ferreira Alvarez "
        "Kowalski Strand Raman Delacroix Quispe Vogel Pemberton Richter Marchetti Mwangi Duarte Demir Wisniewska "
        "Halloran Beaumont Achterberg Nwosu Fairbanks Szabo Oyelaran Vance Lombardi Iqbal Kettering Solberg "
        "Abernathy Ruiz").split()
CITIES = ("Lisbon Rotterdam Geneva Vienna Dublin Oslo Helsinki Antwerp Lyon Turin Seville Gdansk Tallinn Porto "
          "Bergen Ghent Utrecht Malmo Bremen Graz Ljubljana Zagreb Krakow Riga Vilnius Aarhus Basel Bilbao Valencia "
          "Marseille Bordeaux Leipzig Dresden Salzburg Innsbruck Trieste Bologna Verona Cork Galway").split()
JURISDICTIONS = ("England and Wales", "Scotland", "Northern Ireland", "the State of New York", "the State of Delaware",
                 "Ontario", "British Columbia", "New South Wales", "Ireland", "the Netherlands", "Switzerland",
                 "Singapore", "Sweden", "Denmark", "Belgium")
CODENAMES = ("Juniper Kestrel Obsidian Marigold Halcyon Tamarind Sirocco Basalt Quillon Larkspur Meridian Cobalt "
             "Saffron Wren Thistle Umber Vesper Zephyr Aster Bramble Cinder Dunlin Ember Fennel Garnet Heron Indigo "
             "Jasper Kelp Lichen").split()
COMPANIES = ("Harrowgate Shipping", "Pellucid Foods", "Orbitron Media", "Cresswell Timber", "Anselm Robotics",
             "Blackmoor Textiles", "Quayside Ferries", "Lumen Pharmacy", "Tidewater Mills", "Grayling Optics",
             "Stonebridge Dairies", "Verity Insurance", "Copperfield Paints", "Northgate Glass", "Kingfisher Rail",
             "Mallory Brewing")
PRODUCTS = ("route planner", "payroll module", "inventory scanner", "fleet dashboard", "booking engine",
            "tariff calculator", "document vault", "sensor gateway", "billing portal", "forecasting toolkit",
            "mapping service", "customs filer")
SITES = ("Harbour Street depot", "Eastgate warehouse", "Millbrook archive", "Riverside data room", "Quarry Lane store",
         "Northfield yard", "Old Mint vault", "Canal Wharf office", "Hillcrest plant", "Marsh Road garage",
         "Westmoor laboratory", "Fairview hangar")
COMMITTEES = ("safety committee", "pricing board", "audit panel", "works council", "ethics committee",
              "procurement board", "tenders panel", "risk committee")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
SERVICES = ("cleaning", "catering", "courier", "security", "laundry", "printing", "waste collection", "translation")


@dataclass(frozen=True)
class Family:
    """Facts of one shape: `facts[i]` and `questions[i]` are phrasing i; a fact's answer is `value`."""

    name: str
    kind: str  # number, name, place, day, clause
    key: Callable[[random.Random], str]
    value: Callable[[random.Random], str]
    facts: tuple[str, ...]  # format fields: {key} {value}
    questions: tuple[str, ...]  # format field: {key}


def _number(low: int, high: int) -> Callable[[random.Random], str]:
    return lambda rng: str(rng.randint(low, high))


def _amount(rng: random.Random) -> str:
    return f"{rng.randint(12, 980)},{rng.randint(0, 999):03d}"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("alarm_code", "number", lambda rng: "the " + rng.choice(SITES), _number(100_000, 9_999_999), (
        "The alarm code for {key} is {value}.",
        "Staff entering {key} must type the alarm code {value}.",
        "For {key}, the alarm code on file is {value}, and it is changed every spring.",
        "Anyone opening {key} outside working hours needs the alarm code, which is {value}.",
    ), (
        "What is the alarm code for {key}?",
        "Which alarm code do staff type to enter {key}?",
        "What alarm code is on file for {key}?",
        "Which code opens {key} outside working hours?",
    )),
    Family("invoice_total", "number", lambda rng: f"INV-{rng.randint(1000, 9999)}", _amount, (
        "Invoice {key} was issued for a total of {value} euros.",
        "The total amount due under invoice {key} is {value} euros.",
        "Accounts confirmed that invoice {key} comes to {value} euros in all.",
        "Once discounts were applied, invoice {key} amounted to {value} euros.",
    ), (
        "What is the total of invoice {key}?",
        "How much is due under invoice {key}?",
        "How many euros does invoice {key} come to?",
        "What did invoice {key} amount to?",
    )),
    Family("project_lead", "name", lambda rng: "Project " + rng.choice(CODENAMES), _person, (
        "The project lead for {key} is {value}.",
        "{value} was appointed to lead {key}.",
        "Day-to-day responsibility for {key} rests with {value}, who reports to the board.",
        "Since the spring reorganisation, {key} has been run by {value}.",
    ), (
        "Who is the project lead for {key}?",
        "Who was appointed to lead {key}?",
        "Who is responsible for {key} day to day?",
        "Who runs {key}?",
    )),
    Family("arbitration_seat", "place", lambda rng: "the " + rng.choice(PRODUCTS) + " licence",
           lambda rng: rng.choice(CITIES), (
        "Any dispute about {key} shall be settled by arbitration in {value}.",
        "Disputes arising under {key} are to be referred to arbitration seated in {value}.",
        "If the parties disagree about {key}, an arbitrator sitting in {value} decides.",
        "Claims under {key} go to arbitration, and the seat of that arbitration is {value}.",
    ), (
        "Where are disputes about {key} settled?",
        "In which city is arbitration under {key} seated?",
        "Where does an arbitrator decide disagreements about {key}?",
        "What is the seat of arbitration for claims under {key}?",
    )),
    Family("governing_law", "clause", lambda rng: "the " + rng.choice(SERVICES) + " contract",
           lambda rng: rng.choice(JURISDICTIONS), (
        "The {key} is governed by the laws of {value}.",
        "The laws of {value} govern the {key}.",
        "The {key} shall be construed in accordance with the laws of {value}.",
        "Questions about the {key} are decided under the laws of {value}.",
    ), (
        "Which law governs the {key}?",
        "Under the laws of which place is the {key} governed?",
        "In accordance with which laws is the {key} construed?",
        "Which laws decide questions about the {key}?",
    )),
    Family("notice_period", "number", lambda rng: "the " + rng.choice(SERVICES) + " agreement",
           _number(14, 180), (
        "Either party may end {key} by giving {value} days' written notice.",
        "To terminate {key}, a party must give written notice of {value} days.",
        "{key} can be brought to an end on {value} days' notice in writing.",
        "The notice period for terminating {key} is {value} days.",
    ), (
        "How many days' notice ends {key}?",
        "What notice must a party give to terminate {key}?",
        "On how many days' notice can {key} be ended?",
        "What is the notice period for terminating {key}?",
    )),
    # Families the tuning split never sees.
    Family("auditor", "name", lambda rng: rng.choice(COMPANIES), _person, (
        "{key} appointed {value} as its external auditor.",
        "The external auditor of {key} is {value}.",
        "{key}'s accounts are audited by {value}.",
        "Shareholders of {key} confirmed {value} as the company's auditor.",
    ), (
        "Who did {key} appoint as its external auditor?",
        "Who is the external auditor of {key}?",
        "Who audits the accounts of {key}?",
        "Who was confirmed as the auditor of {key}?",
    )),
    Family("meeting_day", "day", lambda rng: "the " + rng.choice(COMMITTEES), lambda rng: rng.choice(WEEKDAYS), (
        "The {key} meets every {value} morning.",
        "Meetings of the {key} take place each {value}.",
        "Every {value}, the {key} gathers to review open items.",
        "The {key} holds its weekly session on {value}.",
    ), (
        "On which day does the {key} meet?",
        "When do meetings of the {key} take place?",
        "On what day does the {key} gather?",
        "Which weekday does the {key} hold its session on?",
    )),
)}
HELDOUT_ONLY = ("auditor", "meeting_day")
# An echo repeats the answer's value in an unrelated sentence elsewhere, so that finding the value in the text does
# not settle where the answer came from (as "England and Wales" appears three times in the sample contract).
ECHOES = {
    "number": ("The figure {value} was also printed on last year's delivery notes by mistake.",
               "A caller once quoted the number {value}, which turned out to be a wrong number."),
    "name": ("{value} also writes the monthly staff newsletter.",
             "A visitor named {value} signed the guest book in the spring."),
    "place": ("The staff outing went to {value} last year.", "Several of the drivers grew up near {value}."),
    "clause": ("Some of the suppliers are incorporated in {value}.",
               "The old pension scheme was registered in {value}."),
    "day": ("Deliveries never arrive on {value} afternoons.", "The canteen serves fish every {value}."),
}
ECHO_SHARE = 0.35
TUNE_FAMILIES = tuple(name for name in FAMILIES if name not in HELDOUT_ONLY)
PHRASINGS = {"tune": (0, 1), "heldout": (2, 3)}
SEEDS = {"tune": 1001, "heldout": 2002}  # the calibration in starqa.evidence uses neither


@dataclass
class Case:
    case_id: str
    split: str
    family: str
    kind: str
    phrasing: int
    fmt: str  # "text" or "pdf"
    genre: str  # filler: essay, contract, report
    target_tokens: int
    block_size: int
    depth: float  # where the fact sits among the filler paragraphs: 0 = first, 1 = last
    question: str
    answer: str  # the fact's value
    fact: str  # the planted sentence
    distractors: list[tuple[str, str]] = field(default_factory=list)  # (sentence, value)
    echo: str = ""  # a sentence repeating the answer's value in another context ("" for none)
    paragraphs: list[str] = field(default_factory=list)  # the document, fact and distractors in place

    def to_record(self) -> dict:
        record = dict(self.__dict__)
        record.pop("paragraphs")
        return record


# ---------------------------------------------------------------- filler


def _essay_paragraphs() -> list[str]:
    from starqa.eval import prose

    return prose.paragraphs()


def _contract_paragraphs() -> list[str]:
    text = (REPO / "samples" / "contract.txt").read_text(encoding="utf-8")
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 60]


_REPORT_OPENERS = ("During the review period", "In the last quarter", "Over the summer", "Following the audit",
                   "After the site visit", "Since the new schedule began", "As agreed at the last meeting",
                   "Throughout the winter")
_REPORT_TEAMS = ("the maintenance team", "the regional office", "the planning group", "the finance staff",
                 "the warehouse crew", "the quality unit", "the customer desk", "the legal department")
_REPORT_VERBS = ("reviewed", "updated", "reorganised", "inspected", "documented", "simplified", "tested",
                 "replaced")
_REPORT_OBJECTS = ("the loading procedures", "the spare parts catalogue", "the handover checklists",
                   "the supplier contacts", "the shift rota", "the fire exits", "the label printers",
                   "the training material", "the backup routine", "the delivery windows")
_REPORT_TAILS = ("and reported no serious findings", "with help from two external advisers",
                 "ahead of the busy season", "after several complaints from drivers", "at a modest cost",
                 "so that new staff can follow them", "without interrupting daily work",
                 "and shared the results with every depot")


def _report_paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 6)):
        sentences.append(f"{rng.choice(_REPORT_OPENERS)}, {rng.choice(_REPORT_TEAMS)} {rng.choice(_REPORT_VERBS)} "
                         f"{rng.choice(_REPORT_OBJECTS)} {rng.choice(_REPORT_TAILS)}.")
    return " ".join(sentences)


def _filler(genre: str, rng: random.Random) -> Callable[[], str]:
    """An endless source of filler paragraphs of one genre (shuffled, reshuffled on every pass)."""
    if genre == "report":
        return lambda: _report_paragraph(rng)
    pool = _essay_paragraphs() if genre == "essay" else _contract_paragraphs()
    order: list[str] = []

    def next_paragraph() -> str:
        if not order:
            order.extend(rng.sample(pool, len(pool)))
        return order.pop()
    return next_paragraph


# ---------------------------------------------------------------- cases


def _distinct(rng: random.Random, make: Callable[[random.Random], str], count: int) -> list[str]:
    found: list[str] = []
    for _ in range(count * 50):
        value = make(rng)
        if value not in found:
            found.append(value)
        if len(found) == count:
            return found
    raise ValueError("could not draw enough distinct values")


def _plant(sentence: str, paragraphs: list[str], position: int, rng: random.Random, alone: bool) -> None:
    """Put a fact at paragraph `position`: as a paragraph of its own, or as a sentence inside that paragraph."""
    if alone or position >= len(paragraphs):
        paragraphs.insert(position, sentence)
        return
    sentences = re.split(r"(?<=[.!?])\s+", paragraphs[position])
    sentences.insert(rng.randint(0, len(sentences)), sentence)
    paragraphs[position] = " ".join(sentences)


def build_case(split: str, index: int, count_tokens: Callable[[str], int], *, target_tokens: int, fmt: str,
               depth: float, block_size: int, echoes: bool = True, echo_share: float = ECHO_SHARE) -> Case:
    """One case of `split`; every random choice comes from (split seed, index). Echoes are drawn from a stream of
    their own (the first tuning round was made without them: echoes=False gives its cases back)."""
    rng = random.Random(f"attribution/{SEEDS[split]}/{split}/{index}")
    echo_rng = random.Random(f"attribution/{SEEDS[split]}/{split}/{index}/echo")
    families = TUNE_FAMILIES if split == "tune" else tuple(FAMILIES)
    family = FAMILIES[rng.choice(families)]
    phrasing = rng.choice(PHRASINGS[split])
    genre = rng.choice(("essay", "contract", "report"))
    n_distractors = rng.choice((0, 1, 2, 3))
    keys = _distinct(rng, family.key, 1 + n_distractors)
    values = _distinct(rng, family.value, 1 + n_distractors)
    fact = _sentence(family.facts[phrasing].format(key=keys[0], value=values[0]))
    # Distractors use the same phrasing family but any of the split's phrasings: same shape, other key and value.
    distractors = [(_sentence(family.facts[rng.choice(PHRASINGS[split])].format(key=k, value=v)), v)
                   for k, v in zip(keys[1:], values[1:])]
    question = family.questions[phrasing].format(key=keys[0])
    question = question[0].upper() + question[1:]

    next_paragraph = _filler(genre, rng)
    paragraphs: list[str] = []
    # Leave room for the planted sentences (about 40 tokens each).
    budget = target_tokens - 40 * (1 + n_distractors)
    while count_tokens("\n\n".join(paragraphs)) < budget:
        paragraphs.append(next_paragraph())
    while len(paragraphs) > 1 and count_tokens("\n\n".join(paragraphs)) > budget:
        paragraphs.pop()
    alone = rng.random() < 0.5
    slots = len(paragraphs)
    fact_position = round(depth * slots)
    others = [p for p in range(slots + 1) if abs(p - fact_position) > max(1, slots // 8)] or [0]
    # Insert from the back so earlier positions stay valid.
    planted = [(fact_position, fact, 0)] + [(rng.choice(others), sentence, 1 + i)
                                            for i, (sentence, _) in enumerate(distractors)]
    echo = ""
    if echoes and echo_rng.random() < echo_share:
        echo = echo_rng.choice(ECHOES[family.kind]).format(value=values[0])
        planted.append((echo_rng.choice(others), echo, len(planted)))
    for position, sentence, order in sorted(planted, key=lambda item: (item[0], -item[2]), reverse=True):
        _plant(sentence, paragraphs, position, rng, alone)
    case_id = f"{split}-{index:04d}"
    return Case(case_id=case_id, split=split, family=family.name, kind=family.kind, phrasing=phrasing, fmt=fmt,
                genre=genre, target_tokens=target_tokens, block_size=block_size, depth=depth, question=question,
                answer=values[0], fact=fact, distractors=distractors, echo=echo, paragraphs=paragraphs)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
BLOCK_SIZES = (256, 512, 1024, 2048)


def generate_cases(split: str, lengths: Sequence[int], per_cell: int, count_tokens: Callable[[str], int],
                   formats: Sequence[str] = ("text", "pdf"), *, first_round: int = 0, echoes: bool = True,
                   echo_share: float = ECHO_SHARE) -> list[Case]:
    """`per_cell` cases for every (length, format, depth), rounds first_round.. (a round is one case per cell, so
    more rounds extend a set without changing its earlier cases); block sizes cycle over BLOCK_SIZES (those below
    the length, so a document has several blocks), everything else is drawn per case."""
    cases = []
    index = first_round * len(lengths) * len(formats) * len(DEPTHS)
    for repeat in range(first_round, first_round + per_cell):
        for length in lengths:
            for fmt in formats:
                for depth in DEPTHS:
                    sizes = [size for size in BLOCK_SIZES if size < length] or [BLOCK_SIZES[0]]
                    block_size = sizes[(index + repeat) % len(sizes)]
                    cases.append(build_case(split, index, count_tokens, target_tokens=length, fmt=fmt, depth=depth,
                                            block_size=block_size, echoes=echoes, echo_share=echo_share))
                    index += 1
    return cases


# ---------------------------------------------------------------- documents on disk


def write_document(case: Case, folder: Path) -> Path:
    """The case's document as a file: text with a form feed between pages (about 3,000 characters each), or a
    PDF laid out on A4 pages with a page-number footer."""
    folder.mkdir(parents=True, exist_ok=True)
    if case.fmt == "text":
        path = folder / f"{case.case_id}.txt"
        pages, current = [], []
        for paragraph in case.paragraphs:
            current.append(paragraph)
            if sum(len(p) for p in current) > 3000:
                pages.append("\n\n".join(current))
                current = []
        if current:
            pages.append("\n\n".join(current))
        path.write_text("\n\f\n".join(pages) + "\n", encoding="utf-8")
        return path
    path = folder / f"{case.case_id}.pdf"
    _write_pdf(case.paragraphs, path)
    return path


def _write_pdf(paragraphs: Sequence[str], path: Path) -> None:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfbase.pdfmetrics import stringWidth
    from reportlab.pdfgen.canvas import Canvas

    font, size, leading = "Helvetica", 10.5, 14.5
    width, height = A4
    margin = 64
    usable = width - 2 * margin
    canvas = Canvas(str(path), pagesize=A4)
    page = 1
    y = height - margin

    def footer() -> None:
        canvas.setFont(font, 9)
        canvas.drawCentredString(width / 2, margin / 2, f"Page {page}")
        canvas.setFont(font, size)

    canvas.setFont(font, size)
    for paragraph in paragraphs:
        words, line = paragraph.split(), ""
        lines = []
        for word in words:
            candidate = f"{line} {word}" if line else word
            if stringWidth(candidate, font, size) > usable and line:
                lines.append(line)
                line = word
            else:
                line = candidate
        if line:
            lines.append(line)
        for text in lines:
            if y < margin + leading:
                footer()
                canvas.showPage()
                canvas.setFont(font, size)
                page += 1
                y = height - margin
            canvas.drawString(margin, y, text)
            y -= leading
        y -= leading * 0.8  # space between paragraphs
    footer()
    canvas.save()


def locate(text: str, sentence: str) -> tuple[int, int] | None:
    """[start, end) of `sentence` in the extracted `text` (whitespace may differ: PDF lines were joined)."""
    pattern = r"\s+".join(re.escape(word) for word in sentence.split())
    match = re.search(pattern, text)
    return (match.start(), match.end()) if match else None
