"""A held-out contract-like document with its own QA: a commercial lease generated from a seed.

    python benchmarks/heldout_lease.py --seed 7 --out runs/lease        # writes lease.txt and lease-qa.jsonl

Written for hybrid answering's escalation study (docs/hybrid.md): the sample contract chose how the larger model
answers; this document, with facts drawn from the seed (parties, rent, dates, places, periods), reports on data that
choice never saw. Fictional; plain text, one clause per paragraph, about 2,000 tokens with the Qwen2.5 tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FIRST = ("Amara Bruno Celine Dmitri Elena Farid Greta Hiroshi Ingrid Jonas Keiko Lucia Mateo Nadia Oskar Priya "
         "Quentin Rosa Stefan Tamsin").split()
LAST = ("Lindqvist Moreau Petrov Castellano Haddad Novak Tanaka Eriksen Brandt Ishikawa Ferreira Alvarez Kowalski "
        "Strand Raman Delacroix Vogel Pemberton Richter Marchetti").split()
TOWNS = ("Leeds Bristol Norwich Exeter Chester York Bath Durham Lincoln Carlisle Hereford Worcester").split()
STREETS = ("Mill Lane", "Harbour Road", "Station Approach", "Quarry Street", "Foundry Yard", "Canal Wharf",
           "Orchard Row", "Tannery Court")
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 10: "ten", 12: "twelve",
           14: "fourteen", 15: "fifteen", 20: "twenty", 21: "twenty-one", 28: "twenty-eight", 30: "thirty",
           45: "forty-five", 60: "sixty", 90: "ninety"}
FILLER = [
    "The Tenant shall keep the interior of the Premises in good and substantial repair and condition, fair wear and "
    "tear excepted, and shall not make any structural alteration without the Landlord's prior written consent, which "
    "shall not be unreasonably withheld or delayed.",
    "The Tenant shall comply with all statutes, regulations and by-laws relating to the Premises and their use, and "
    "shall indemnify the Landlord against all liabilities arising from any breach of this obligation.",
    "The Landlord shall insure the building of which the Premises form part against the insured risks for its full "
    "reinstatement cost, and the Tenant shall pay a fair proportion of the premium as additional rent.",
    "Any notice under this lease shall be in writing and delivered by hand or sent by recorded delivery to the "
    "address of the recipient set out above or to such other address as the recipient may notify.",
    "The Tenant shall permit the Landlord and its agents to enter the Premises at reasonable times on reasonable "
    "notice to inspect their condition, except in an emergency when no notice is required.",
    "Nothing in this lease shall create a partnership or agency between the parties, and no failure or delay in "
    "exercising any right shall operate as a waiver of it.",
    "If any provision of this lease is found to be invalid or unenforceable, the remaining provisions shall continue "
    "in full force and effect, and the parties shall negotiate in good faith to replace it.",
    "The Tenant shall not display any sign or advertisement on the exterior of the Premises other than a sign of a "
    "size and design approved by the Landlord.",
]


def generate(seed: int) -> tuple[str, list[dict]]:
    rng = random.Random(seed)
    landlord = f"{rng.choice(LAST)} {rng.choice(['Estates', 'Property', 'Holdings'])} Limited"
    tenant = f"{rng.choice(LAST)} & {rng.choice(LAST)} {rng.choice(['Bakeries', 'Joinery', 'Print Works'])} Ltd"
    signatory = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    town = rng.choice(TOWNS)
    unit = rng.randint(2, 19)
    street = rng.choice(STREETS)
    rent = rng.choice(range(24_000, 96_000, 500))
    deposit_months = rng.choice([2, 3, 4, 6])
    term_years = rng.choice([5, 7, 10, 12, 15])
    review_years = rng.choice([3, 4, 5])
    late_days = rng.choice([14, 21, 28])
    interest = rng.choice([3, 4, 5, 6])
    break_notice = rng.choice([3, 6, 12])
    repair_days = rng.choice([30, 45, 60, 90])
    hours = rng.choice(["7 am to 8 pm", "6 am to 10 pm", "8 am to 6 pm"])
    parking = rng.choice([2, 3, 4, 5, 6, 8])
    court_town = rng.choice([t for t in TOWNS if t != town])
    start_day, start_month = rng.randint(1, 28), rng.choice(["March", "June", "September", "December"])
    year = rng.choice([2024, 2025, 2026])
    word = lambda n: NUMBERS.get(n, str(n))  # noqa: E731
    clauses = [
        ("", "COMMERCIAL LEASE"),
        ("", f"This lease is made on {start_day} {start_month} {year} between {landlord} (the Landlord) and {tenant} "
             f"(the Tenant)."),
        ("1.1", f"The Premises are Unit {unit}, {street}, {town}, together with the right to use {word(parking)} "
                "car parking spaces in the estate car park."),
        ("1.2", f"The Term is {word(term_years)} ({term_years}) years from and including the date of this lease."),
        ("2.1", f"The Tenant shall pay a yearly rent of £{rent:,} by equal quarterly payments in advance on the usual "
                "quarter days."),
        ("2.2", f"On the date of this lease the Tenant shall pay a rent deposit equal to {word(deposit_months)} "
                "months' rent, which the Landlord shall hold in a designated account."),
        ("2.3", f"Any rent or other sum not paid within {word(late_days)} days of its due date shall carry interest "
                f"at {interest}% per annum above the base rate from the due date until payment."),
        ("3.1", f"The rent shall be reviewed on every {word(review_years)}th anniversary of the start of the Term "
                "to the open market rent, and shall never be less than the rent payable before the review."),
        ("4.1", f"The Tenant may use the Premises only as a light industrial unit between the hours of {hours}."),
        ("5.1", f"If the Landlord is notified of a defect in the structure or the roof, it shall remedy it within "
                f"{word(repair_days)} days of the notice."),
        ("6.1", f"The Tenant may end this lease on the fifth anniversary of the Term by giving the Landlord not less "
                f"than {word(break_notice)} months' written notice."),
        ("7.1", f"This lease is governed by the law of England and Wales, and the county court sitting at "
                f"{court_town} has jurisdiction over any dispute arising from it."),
    ]
    filler = FILLER[:]
    rng.shuffle(filler)
    paragraphs = []
    for index, (label, text) in enumerate(clauses):
        paragraphs.append(f"{label} {text}".strip())
        if index >= 3 and filler:
            paragraphs.append(filler.pop())
    paragraphs += filler
    paragraphs.append(f"Signed for and on behalf of the Tenant by {signatory}, director.")
    qa = [
        ("What is the yearly rent?", [f"{rent:,}", str(rent)]),
        ("How many months' rent is the rent deposit?", [word(deposit_months), str(deposit_months)]),
        ("How long is the term of the lease?", [f"{term_years} years", f"{word(term_years)} years",
                                                f"{word(term_years)} ({term_years}) years"]),
        ("Within how many days must late rent be paid before interest runs?", [f"{late_days} days",
                                                                               f"{word(late_days)} days"]),
        ("What interest rate applies to late payments?", [f"{interest}%"]),
        ("How often is the rent reviewed?", [f"{word(review_years)}th", f"{review_years} years",
                                             f"{word(review_years)} years"]),
        ("During which hours may the tenant use the premises?", [hours]),
        ("How many car parking spaces may the tenant use?", [word(parking), str(parking)]),
        ("How much notice must the tenant give to end the lease early?", [f"{word(break_notice)} months",
                                                                          f"{break_notice} months"]),
        ("Within how many days must the landlord remedy a structural defect?", [f"{word(repair_days)} days",
                                                                                f"{repair_days} days"]),
        ("Which court has jurisdiction over disputes?", [court_town]),
        ("Who signed the lease for the tenant?", [signatory]),
    ]
    return "\n\n".join(paragraphs) + "\n", [{"question": q, "answers": a} for q, a in qa]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    text, qa = generate(args.seed)
    (args.out / "lease.txt").write_text(text)
    (args.out / "lease-qa.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in qa))
    (args.out / "lease-questions.txt").write_text("".join(pair["question"] + "\n" for pair in qa))


if __name__ == "__main__":
    main()
