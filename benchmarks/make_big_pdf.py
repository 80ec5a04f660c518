"""Make a synthetic long contract PDF for the ingest benchmark (reportlab; seeded, so the same every time).

    python benchmarks/make_big_pdf.py                         # 1,000 pages -> /tmp/starqa-big-1000.pdf
    python benchmarks/make_big_pdf.py --pages 100 -o big.pdf  # another size or place

Every page has a running header and a "Page N of M" footer (the extractor must drop both), justified body text
in numbered articles and clauses (so lines wrap inside paragraphs), and now and then a table-like list and a
planted fact ("The escrow code for Article 12 is 4711-...") to ask about. The file is generated, never committed.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

WORDS = (
    "the supplier shall provide services deliverables customer agreement party parties notice written days "
    "within term termination convenience cause breach cure period fees payment invoice undisputed amounts "
    "confidential information disclose purpose obligations rights assign subcontract consent warranty "
    "liability indemnify damages losses claims reasonable costs insurance audit records compliance law "
    "governed jurisdiction dispute resolution escalation meeting representatives schedule statement work "
    "acceptance criteria milestone change request service levels credits availability maintenance support"
).split()


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 26))]
    if rng.random() < 0.25:
        words.insert(rng.randint(1, len(words)), f"{rng.randint(1, 90)} ({rng.choice(['thirty', 'sixty', 'ninety'])})")
    if rng.random() < 0.15:
        words.insert(rng.randint(1, len(words)), f"${rng.randint(1_000, 9_999_999):,}")
    return " ".join(words).capitalize() + "."


def build(path: Path, pages: int, seed: int = 1000) -> tuple[int, float]:
    """Write about `pages` pages to `path`; returns (pages written, seconds)."""
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
    from reportlab.lib.units import cm
    from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate, Spacer

    started = time.perf_counter()
    rng = random.Random(seed)
    styles = getSampleStyleSheet()
    body = ParagraphStyle("body", parent=styles["BodyText"], fontName="Times-Roman", fontSize=10.5, leading=13,
                          alignment=4, spaceAfter=6)
    heading = ParagraphStyle("heading", parent=styles["Heading2"], fontName="Times-Bold", fontSize=12,
                             spaceBefore=8, spaceAfter=4)
    title = ParagraphStyle("title", parent=styles["Title"], fontName="Times-Bold", fontSize=18)

    story = [Paragraph("MASTER SERVICES AGREEMENT", title),
             Paragraph("between Northwind Analytics Ltd (the \u201cSupplier\u201d) and Contoso Retail plc "
                       "(the \u201cCustomer\u201d)", body), Spacer(1, 12)]
    # About 8 clauses (with their headings and lists) fill a page of A4 at this size.
    article = 0
    target_clauses = pages * 83 // 10
    clauses = 0
    while clauses < target_clauses:
        article += 1
        story.append(Paragraph(f"Article {article}. {' '.join(rng.choice(WORDS) for _ in range(3)).title()}",
                               heading))
        for clause in range(1, rng.randint(4, 12)):
            text = " ".join(sentence(rng) for _ in range(rng.randint(2, 5)))
            if rng.random() < 0.05:
                text += (f" The escrow code for Article {article} is {rng.randint(1000, 9999)}-"
                         f"{rng.randint(100, 999)}-{rng.choice('ABCDEFGH')}.")
            story.append(Paragraph(f"{article}.{clause} {text}", body))
            clauses += 1
        if rng.random() < 0.1:
            rows = [f"({chr(97 + i)}) {rng.choice(WORDS).title()}: {rng.randint(1, 500)} units at "
                    f"${rng.randint(10, 900)}.{rng.randint(0, 99):02d}" for i in range(rng.randint(3, 7))]
            story.extend(Paragraph(row, body) for row in rows)

    def header_footer(canvas, doc):
        canvas.saveState()
        canvas.setFont("Times-Italic", 9)
        canvas.drawString(2 * cm, A4[1] - 1.3 * cm, "Master Services Agreement \u2014 Confidential")
        canvas.drawRightString(A4[0] - 2 * cm, 1.2 * cm, f"Page {doc.page}")
        canvas.restoreState()

    path.parent.mkdir(parents=True, exist_ok=True)
    document = SimpleDocTemplate(str(path), pagesize=A4, leftMargin=2.2 * cm, rightMargin=2.2 * cm,
                                 topMargin=2 * cm, bottomMargin=2 * cm, title="Synthetic MSA", author="starqa")
    document.build(story, onFirstPage=header_footer, onLaterPages=header_footer)
    import pypdf

    written = len(pypdf.PdfReader(str(path)).pages)
    return written, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=1000, help="about this many pages (default 1000)")
    ap.add_argument("-o", "--output", type=Path, help="where to write it (default /tmp/starqa-big-PAGES.pdf)")
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    output = args.output or Path(f"/tmp/starqa-big-{args.pages}.pdf")
    written, seconds = build(output, args.pages, args.seed)
    print(f"{output}: {written} pages, {output.stat().st_size / 2**20:.1f} MiB, made in {seconds:.1f} s")


if __name__ == "__main__":
    main()
