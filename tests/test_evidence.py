"""Evidence quotes point into the stored text: token positions, passages, answer content, grounded, the output."""

from __future__ import annotations

import json
import re

import pytest
import torch

from starqa.evidence import quotes
from starqa.documents import text_positions
from clihelp import json_lines, starqa


def test_token_positions_are_exact_for_byte_level_tokens(bundled_tokenizer):
    text = "Prix : 4 200 € — délai 30 jours, 東京 😀 naïve.\n\n18.1 This Agreement is governed by English law. " * 3
    ids = bundled_tokenizer.encode(text, add_special_tokens=False)
    starts = text_positions.token_char_starts(bundled_tokenizer, ids, text)
    assert len(starts) == len(ids) + 1 and starts[0] == 0 and starts[-1] == len(text)
    assert starts == sorted(starts)
    for index in range(len(ids)):  # decoding the ids before a token gives the text before it (whole characters)
        prefix = bundled_tokenizer.decode(ids[:index])
        if "\ufffd" not in prefix:
            assert starts[index] == len(prefix)


def test_token_positions_of_other_tokenizers_follow_their_decoding():
    class ByteTokenizer:  # not a byte-level BPE vocabulary: one id per UTF-8 byte, no convert_ids_to_tokens
        def decode(self, ids, skip_special_tokens=False):
            return bytes(ids).decode("utf-8", errors="replace")

    text = "Fee: 4 200 € per month."
    starts = text_positions.token_char_starts(ByteTokenizer(), list(text.encode("utf-8")), text)
    euro = text.index("€")
    # One byte, one character; the euro sign's three bytes all start at it; then one byte, one character again.
    assert starts == [*range(euro), euro, euro, euro, *range(euro + 1, len(text)), len(text)]


def test_passages_are_sentences_within_paragraphs_and_pages():
    text = ("15. GOVERNING LAW\n\n15.1 This Agreement is governed by the laws of England and Wales. 15.2 Disputes go "
            "to the courts of London.\n\n" + "A clause that runs on, " * 30 + "and ends here.\n\fNext page starts here.")
    pages = [{"number": 1, "start": 0, "end": text.index("\f") + 1},
             {"number": 2, "start": text.index("\f") + 1, "end": len(text)}]
    found = quotes.passages(text, pages)
    quoted = [text[p.start:p.end] for p in found]
    assert quoted[0] == "15. GOVERNING LAW"
    assert "15.1 This Agreement is governed by the laws of England and Wales." in quoted
    assert "15.2 Disputes go to the courts of London." in quoted
    assert quoted[-1] == "Next page starts here."
    for passage, quote in zip(found, quoted):
        assert len(quote) <= quotes.MAX_QUOTE_CHARS and quote == quote.strip() and quote
        assert "\n\n" not in quote and "\f" not in quote  # never across a paragraph or a page
    long_pieces = [quote for quote in quoted if quote.startswith("A clause") or quote.startswith("runs on")
                   or "ends here" in quote]
    assert len(long_pieces) >= 3 and "".join(long_pieces).replace(" ", "") in text.replace(" ", "")
    assert all(a.end <= b.start for a, b in zip(found, found[1:]))


def test_a_colon_before_a_value_keeps_the_label_and_its_value_in_one_passage():
    # Cut at "is:", the label held the question's words and the next passage the number: no passage held both,
    # so every correct needle answer of the RULER-style suite was judged ungrounded.
    needle = "One of the special magic numbers for white-cellar is: 9828391."
    text = ("The rain fell all night over the quiet town. " + needle + " The sun is yellow today.\n\n"
            "The parties agree as follows: The Supplier delivers the goods. Notice period: 30 days.")
    quoted = [text[p.start:p.end] for p in quotes.passages(text)]
    assert needle in quoted
    assert quoted[-3:] == ["The parties agree as follows:", "The Supplier delivers the goods.",
                           "Notice period: 30 days."]  # before a capital a colon still ends a passage
    asked = quotes.content_terms("What are all the special magic numbers for white-cellar?")
    assert quotes.grounded(quotes.content_terms("9828391.", "special magic numbers for white-cellar"), quoted, asked)


def test_content_terms_leave_out_what_the_question_already_said():
    terms = quotes.content_terms("The total of invoice INV-3491 is 779,157 euros.", "What is the total of invoice INV-3491?")
    assert [term.text for term in terms] == ["779157", "euro"]
    assert quotes.content_terms("Yes.", "Is it governed by English law?") == []
    # The words of "how many / how much / how long" ask; they are not what a passage must hold.
    assert [t.text for t in quotes.content_terms("How many days' notice ends the agreement?")] == ["day", "notice", "end",
                                                                                               "agreement"]


@pytest.mark.parametrize("answer, quoted, expected", [
    ("The alarm code is 2042710.", ["The alarm code for the Eastgate warehouse is 2042710."], True),
    ("The alarm code is 2,042,710.", ["The alarm code for the Eastgate warehouse is 2042710."], True),
    ("The alarm code is 5670620.", ["The alarm code for the Eastgate warehouse is 2042710."], False),
    # A number that merely occurs in a passage about something else is not support.
    ("The alarm code is 2042710.", ["Reference 2042710 was printed on the delivery notes."], False),
    # Stitched from two passages, neither of which says it.
    ("The laws of the European Economic Area govern it.",
     ["The Agreement is governed by the laws of England and Wales.",
      "No transfer outside the European Economic Area without consent."], False),
    ("Nothing to check.", [], False),
])
def test_grounded_needs_one_quote_holding_the_answer_and_what_was_asked(answer, quoted, expected):
    question = "What is the alarm code for the Eastgate warehouse?" if "alarm" in answer else "Which law governs it?"
    assert quotes.grounded(quotes.content_terms(answer, question), quoted, quotes.content_terms(question)) is expected


def test_an_answer_copied_from_a_passage_about_another_key_is_not_grounded():
    question = "What is the alarm code for the Eastgate warehouse?"
    answer = "The alarm code is 3324784."
    asked = quotes.content_terms(question)
    quote = ["The alarm code for the Fairview hangar is 3324784."]  # holds "alarm code", not what was asked about
    rare = {"eastgate": 3.0, "warehouse": 2.5, "alarm": 0.4, "code": 0.4}  # as rarity() weighs a document's words
    assert quotes.grounded(quotes.content_terms(answer, question), quote, asked, rare) is False
    right = ["The alarm code for the Eastgate warehouse is 3324784."]
    assert quotes.grounded(quotes.content_terms(answer, question), right, asked, rare) is True


class _WordTokenizer:
    """One token per character: exact and simple (positions are character offsets)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def _view(text: str, block_chars: int, offset: int = 3) -> quotes.DocumentView:
    context = [0] * offset + [ord(c) for c in text]
    spans = [(start, min(start + block_chars, len(context))) for start in range(0, len(context), block_chars)]
    pages = [{"number": 1, "start": 0, "end": len(text)}]
    return quotes.DocumentView(text, pages, context, offset, spans, [[1]] * len(spans), _WordTokenizer())


def test_the_most_attended_passage_is_the_first_quote_and_its_block_the_first_source():
    text = ("The canteen opens at eight. The alarm code for the depot is 4417. Visitors sign in at the desk. "
            "The code 4417 was also on an old poster.")
    view = _view(text, block_chars=40)
    weights = torch.zeros(view.context_tokens, dtype=torch.float64)
    fact = text.index("The alarm code")
    weights[3 + fact + 5: 3 + fact + 12] = 1.0  # the retrieval heads looked at the fact
    found = quotes.evidence_from_weights(view, weights, "The alarm code is 4417.", "What is the alarm code for the depot?")
    first = found.evidence[0]
    assert text[first["start"]:first["end"]] == first["text"] == "The alarm code for the depot is 4417."
    assert found.grounded and first["page"] == 1
    block = found.sources[0]["block"]
    assert view.spans[block][0] - 3 <= fact < view.spans[block][1] - 3
    # Without attention, the answer's content and the question decide: the poster repeats the number only.
    found = quotes.evidence_from_weights(view, torch.zeros_like(weights), "The alarm code is 4417.",
                                     "What is the alarm code for the depot?")
    assert found.evidence[0]["text"] == "The alarm code for the depot is 4417."


def test_an_answer_with_nothing_attended_or_matched_has_no_evidence():
    view = _view("The canteen opens at eight. Visitors sign in at the desk.", block_chars=20)
    found = quotes.evidence_from_weights(view, torch.zeros(view.context_tokens, dtype=torch.float64), "I do not know.")
    assert found.evidence == [] and found.sources == [] and found.grounded is False
    assert quotes.format_evidence(found).startswith("Grounded: no")


def test_format_evidence_quotes_each_passage_with_its_page():
    found = quotes.Evidence(sources=[], evidence=[
        {"page": 6, "text": "15.1 This Agreement is governed\nby the laws of England and Wales.", "start": 0,
         "end": 10, "score": 0.9},
        {"page": 7, "text": "15.3 The courts of England.", "start": 20, "end": 30, "score": 0.5}], grounded=True)
    assert quotes.format_evidence(found).splitlines() == [
        "Evidence: p. 6 \u201c15.1 This Agreement is governed by the laws of England and Wales.\u201d",
        "          p. 7 \u201c15.3 The courts of England.\u201d",
        "Grounded: yes (the answer's content is in the quoted passages)"]


@pytest.mark.slow
def test_evidence_offsets_point_into_the_stored_text_of_that_version(tmp_path, tiny_model_dir):
    from starqa.store.document_store import DocumentStore

    home = tmp_path / "home"
    pages = ["Page one speaks of the canteen. It opens at eight and closes at six.",
             "Page two holds the alarm code. The alarm code for the depot is 4417.",
             "Page three is about visitors. Visitors sign in at the desk."]
    source = tmp_path / "notes.txt"
    source.write_text("\n\f\n".join(pages * 6), encoding="utf-8")
    model = ("--model", str(tiny_model_dir), "--max-new-tokens", "8", "--block-size", "64")
    # No word of the question is in the text: every quote comes from what the model attended (an observer that
    # recorded nothing would leave only the random answer's words to match, and they match nothing here).
    question = "Qui garde quoi ?"
    assert not set(re.findall(r"\w+", question.lower())) & set(re.findall(r"\w+", source.read_text().lower()))
    edited = "Preface. This edition moves every page down by one paragraph.\n\n" + "\n\f\n".join(pages[::-1] * 6)
    for version, text_of_file in ((1, None), (2, edited)):
        if text_of_file is not None:  # a second version: other text, other offsets, other pages
            source.write_text(text_of_file, encoding="utf-8")
            result = starqa("ingest", str(source), "--force", *model[:2], "--block-size", "64", home=home)
            assert result.returncode == 0, result.stderr
        for attention in ("star", "full"):
            result = starqa("ask", "--doc", str(source), question, "--json", "--attention", attention, *model,
                            home=home)
            assert result.returncode == 0, result.stderr
            row = json_lines(result.stdout)[0]
            document = DocumentStore(home).get("notes")
            assert document.manifest.get("version", version) == version
            text, page_map = document.text(), document.pages()
            assert ("Preface." in text) == (version == 2)  # this version's text
            assert row["evidence"], row  # the observer followed every head of the random model: something attended
            for quote in row["evidence"]:
                assert text[quote["start"]:quote["end"]] == quote["text"]
                assert 0 < len(quote["text"]) <= 300
                page = next(p["number"] for p in page_map if p["start"] <= quote["start"] < p["end"])
                assert quote["page"] == page
                assert "Read the document below" not in quote["text"]  # never the prompt template
            assert isinstance(row["grounded"], bool) and row["sources"]
    # The text output puts the quotes and the grounded line under the answer, then the sources.
    plain = starqa("ask", "--doc", "notes", question, *model[:4], "--quiet", home=home)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert any(line.startswith("Evidence: p. ") for line in lines)
    assert sum(line.startswith("Grounded: ") for line in lines) == 1 and lines[-1].startswith("Sources: ")
    # The retrieval-head calibration of the model is recorded in the store's models/ folder.
    record = json.loads((home / "models" / "retrieval-heads.json").read_text())
    assert len(record) == 1 and next(iter(record.values()))["version"] >= 1
