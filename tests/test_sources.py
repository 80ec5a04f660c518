"""Answers cite their sources: the observer follows the retrieval heads exactly, across ranks too, and the first
source holds the planted fact on documents the method was not tuned on."""

from __future__ import annotations

import random

import pytest
import torch

from starqa.evidence.observer import AttentionShares, attended_tokens, deliver, shares_from_parts
from starqa.evidence.quotes import format_sources, rank_sources
from starqa.evidence.scores import prefix_scores
from starqa.documents.text_positions import block_char_spans
from conftest import tiny_model


def test_format_sources_joins_page_runs_strongest_first():
    sources = [{"pages": [4, 5], "block": 3, "share": 0.4}, {"pages": [12], "block": 9, "share": 0.3}]
    assert format_sources(sources) == "Sources: pp. 4\u20135, 12"
    assert format_sources([{"pages": [2], "block": 1, "share": 1.0}]) == "Sources: p. 2"


def _reference_attention(scores, heads, document_offset: int, top: int) -> torch.Tensor:
    """Plain float64 softmax over the whole context per followed head; each step's top document tokens summed."""
    weights = torch.zeros(scores[0][0].shape[-1], dtype=torch.float64)
    for step_scores in scores:
        for layer, layer_scores in enumerate(step_scores):
            for head in heads.get(layer, []):
                probability = torch.softmax(layer_scores[head].double(), dim=-1)
                document = probability[document_offset:]
                top_tokens = document.topk(top).indices + document_offset
                weights[top_tokens] += probability[top_tokens]
    return weights


def test_attention_combined_across_ranks_equals_one_process_and_a_plain_softmax():
    generator = torch.Generator().manual_seed(0)
    spans = [(0, 10), (10, 25), (25, 40)]
    heads = {0: [1, 3], 1: [0]}
    # 3 decoding steps x 2 layers of scores [q_heads=4, 40 context tokens]; one key stands out in block 1.
    scores = [[torch.randn(4, 40, generator=generator) * 2 for _ in range(2)] for _ in range(3)]
    for step in scores:
        step[0][1, 17] += 6.0
    whole = AttentionShares(spans, document_offset=3, scale=1.0, heads=heads, top=4)
    ranks = [AttentionShares(spans[:1], 3, 1.0, heads=heads, top=4), AttentionShares(spans[1:], 3, 1.0, heads=heads,
                                                                                    top=4)]
    for step in scores:
        for layer, layer_scores in enumerate(step):
            deliver(whole, layer, layer_scores)  # each gets its followed heads' rows, as the engine hands them
            deliver(ranks[0], layer, layer_scores[:, :10])
            deliver(ranks[1], layer, layer_scores[:, 10:])
    reference = _reference_attention(scores, heads, 3, top=4)
    one_process = attended_tokens([whole.stacked()], 40, top=4)
    torch.testing.assert_close(one_process, reference, rtol=1e-5, atol=1e-6)  # float32 scores vs float64
    # The ranks' parts, in any order, give what one process gives.
    torch.testing.assert_close(attended_tokens([ranks[1].stacked(), ranks[0].stacked()], 40, top=4), one_process)
    shares = shares_from_parts([ranks[1].stacked(), ranks[0].stacked()])
    expected = torch.stack([reference[start:end].sum() for start, end in spans]).float()
    torch.testing.assert_close(shares, expected / expected.sum(), rtol=1e-5, atol=1e-6)
    assert rank_sources(shares, [[1], [2], [3]])[0]["block"] == 1 == int(shares.argmax())


def test_only_the_layers_with_followed_heads_do_any_work():
    observer = AttentionShares([(0, 30)], document_offset=5, scale=1.0, heads={1: [2]}, top=3)
    for layer in range(3):
        deliver(observer, layer, torch.randn(4, 30))
    assert list(observer.observed) == [1]
    part = observer.stacked()
    assert part.heads == [(1, 2)] and part.top_positions.shape == (1, 1, 3)
    assert bool((part.top_positions >= 5).all())  # the template tokens before the document are never attended to


def test_prefix_scores_match_a_float64_reference():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 6, 3, 8, generator=generator)  # 6 query heads over 2 key heads (groups of 3)
    keys = torch.randn(1, 2, 50, 8, generator=generator)
    expected = torch.einsum("hd,hnd->hn", query[0, :, -1].double(),
                            keys[0].double().repeat_interleave(3, dim=0)) * 0.3
    # float32 scores against the float64 reference with float32's tolerances (a float64 tolerance, 1e-7, is below
    # float32's own rounding of an 8-term dot product: it failed once by 2.7e-7 when the summation order changed)
    torch.testing.assert_close(prefix_scores(query, keys, 0.3), expected.float())
    torch.testing.assert_close(prefix_scores(query, keys, 0.3, heads=[4, 1]), expected[[4, 1]].float())


def test_scores_in_the_key_dtype_stay_close_to_float64_without_a_float32_copy_of_the_keys():
    # What the non-CPU path computes (bfloat16 keys, as a GPU holds them); here on the CPU, where torch has no
    # out_dtype for bmm and the product is rounded to bfloat16 before it becomes float32.
    from starqa.evidence.scores import scores_in_key_dtype

    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(3, 200, 64, generator=generator).bfloat16()
    rows = torch.randn(3, 64, generator=generator)
    scores = scores_in_key_dtype(keys, rows, 0.125)
    expected = torch.einsum("nkd,nd->nk", keys.double(), rows.bfloat16().double()) * 0.125
    assert scores.dtype == torch.float32 and scores.shape == (3, 200)
    torch.testing.assert_close(scores.double(), expected, rtol=2e-2, atol=2e-2)


class _ByteTokenizer:
    """One token per UTF-8 byte, as byte-level BPE can split a character; decodes like HF (replacement chars)."""

    def __init__(self, normalise=False):
        self.normalise = normalise

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=False):
        text = bytes(ids).decode("utf-8", errors="replace")
        return " ".join(text.split()) if self.normalise else text


def test_a_block_ending_inside_a_character_does_not_shift_the_blocks_after_it():
    text = "Prix : 4 200 € — délai 30 jours, 東京 😀 naïve. " * 40
    ids = [0, 0] + _ByteTokenizer().encode(text)  # two template tokens, then the document
    for size in (3, 7, 64):
        spans = [(start, min(start + size, len(ids))) for start in range(0, len(ids), size)]
        char_spans = block_char_spans(_ByteTokenizer(), ids, 2, spans, text)
        # Truth: a block holds the characters whose last byte it holds (a split character counts to the next).
        last_byte = [len(text[:i + 1].encode("utf-8")) - 1 + 2 for i in range(len(text))]
        for (start, end), (char_start, char_end) in zip(spans, char_spans):
            assert char_start <= char_end
            assert [i for i in range(len(text)) if max(start, 2) <= last_byte[i] < end] == \
                list(range(char_start, char_end))
        assert char_spans[-1][1] == len(text)


def test_a_tokenizer_that_normalises_text_gets_approximate_spans_in_order():
    text = "Clause  1.   The fee is due.\n\n" * 20
    ids = _ByteTokenizer().encode(text)
    spans = [(start, min(start + 50, len(ids))) for start in range(0, len(ids), 50)]
    tokenizer = _ByteTokenizer(normalise=True)
    char_spans = block_char_spans(tokenizer, ids, 0, spans, text)
    assert char_spans[0][0] == 0
    assert all(a[1] == b[0] for a, b in zip(char_spans, char_spans[1:]))  # in order, no gaps
    # Each block spans as many characters as its tokens decode to: shorter than its bytes here (runs of spaces
    # and newlines collapse), so the spans drift below the exact offsets but keep every block's length.
    for (start, end), (char_start, char_end) in zip(spans, char_spans):
        assert char_end - char_start == len(tokenizer.decode(ids[start:end]))
    assert 0.7 * len(text) < char_spans[-1][1] < len(text)


def test_scores_stay_on_the_query_device_until_handed_over():
    # Block 0 holds template tokens only; the followed heads' results stay where the scores are (as on a GPU).
    shares = AttentionShares([(0, 4), (4, 8)], document_offset=4, scale=1.0, heads={0: [1]})
    shares.observe(0, torch.zeros(1, 2, 1, 4, device="meta"), torch.zeros(1, 1, 8, 4, device="meta"))
    lse, values, positions = shares.observed[0][0]
    assert lse.device.type == values.device.type == positions.device.type == "meta"
    cpu = AttentionShares([(0, 4), (4, 8)], document_offset=4, scale=1.0, top=2)
    cpu.observe(0, torch.randn(1, 2, 1, 4), torch.randn(1, 1, 8, 4))
    part = cpu.stacked()
    assert part.context_lse.device.type == part.top_scores.device.type == "cpu"
    assert part.top_positions.shape == (1, 2, 2) and bool((part.top_positions >= 4).all())


class _NoTokenizer:
    eos_token_id = None


def _tiny_engine():
    from starqa.engine.star_engine import StarEngine

    engine = StarEngine(tiny_model("llama"), _NoTokenizer())
    engine.stop_ids = set()
    return engine


def _assert_same_observations(ours, theirs, tolerance=1e-5):
    ours, theirs = ours.stacked(), theirs.stacked()
    assert ours.heads == theirs.heads
    torch.testing.assert_close(ours.context_lse, theirs.context_lse, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours.top_scores, theirs.top_scores, rtol=tolerance, atol=tolerance)
    assert torch.equal(ours.top_positions, theirs.top_positions)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_scores_taken_from_the_attention_equal_a_separate_pass(monkeypatch, kv_dtype):
    # On CPU decoding steps the observer gets the scores the decode kernel computed (one read of the stored keys,
    # in their stored precision); the torch path scores the followed heads' rows only, in a separate pass.
    from starqa import kernels

    engine = _tiny_engine()
    context = torch.randint(3, 49152, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    ctx = engine.encode_context(context, block_size=48, kv_dtype=kv_dtype)
    plain = engine.generate(ctx, [5, 6, 7], max_new_tokens=6)
    heads = {0: [1, 3], 1: [2]}
    fused = AttentionShares(ctx.spans, 20, engine.head_dim ** -0.5, heads=heads)
    assert engine.generate(ctx, [5, 6, 7], max_new_tokens=6, observe_prefix=fused) == plain
    monkeypatch.setattr(kernels, "available", lambda: False)
    separate = AttentionShares(ctx.spans, 20, engine.head_dim ** -0.5, heads=heads)
    assert engine.generate(ctx, [5, 6, 7], max_new_tokens=6, observe_prefix=separate) == plain
    _assert_same_observations(fused, separate, 1e-5 if kv_dtype == "float32" else 1e-4)
    ours = fused.stacked()
    assert ours.heads == [(0, 1), (0, 3), (1, 2)] and ours.context_lse.shape == (6, 3)  # prompt + 5 steps


def test_each_row_of_a_batch_is_observed_as_if_asked_alone():
    # Questions of different lengths decoded together (left-padded rows): each row's observer sees what it sees
    # when its question is asked alone.
    engine = _tiny_engine()
    context = torch.randint(3, 49152, (120,), generator=torch.Generator().manual_seed(5)).tolist()
    ctx = engine.encode_context(context, block_size=40)
    heads = {0: [0, 2], 1: [3]}
    queries = [[5, 6, 7], [8, 9, 10, 11, 12]]
    alone = [AttentionShares(ctx.spans, 10, engine.head_dim ** -0.5, heads=heads) for _ in queries]
    answers = [engine.generate(ctx, query, max_new_tokens=5, observe_prefix=observer)
               for query, observer in zip(queries, alone)]
    together = [AttentionShares(ctx.spans, 10, engine.head_dim ** -0.5, heads=heads) for _ in queries]
    assert engine.generate_batch(ctx, queries, max_new_tokens=5, observers=together) == answers
    for ours, theirs in zip(together, alone):
        _assert_same_observations(ours, theirs, 1e-4)
        assert ours.stacked().context_lse.shape == (5, 3)  # the prompt's last row and 4 decoding steps


def test_full_attention_observes_the_context_part_of_the_prompt():
    # One block as long as the context is full attention: the observations of generate_full (scores over the
    # prompt before its last token, of which the observer keeps the context) equal those of Phase 2.
    engine = _tiny_engine()
    context = torch.randint(3, 49152, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    ctx = engine.encode_context(context, block_size=len(context))
    star = AttentionShares(ctx.spans, 10, engine.head_dim ** -0.5, heads={0: [1], 1: [0, 3]})
    full = AttentionShares(ctx.spans, 10, engine.head_dim ** -0.5, heads={0: [1], 1: [0, 3]})
    answer = engine.generate(ctx, [5, 6, 7], max_new_tokens=5, observe_prefix=star)
    assert engine.generate_full(context + [5, 6, 7], max_new_tokens=5, observe_prefix=full) == answer
    _assert_same_observations(full, star, 1e-4)


# ---------------------------------------------------------------- the bundled model on unseen documents

# Written for this test: phrasings, fillers and seed appear in neither the tuning nor the held-out set
# (benchmarks/attribution_set.py) nor the retrieval-head calibration.
_WHEN = ("On calm mornings", "During the spring timetable", "After the autumn refit", "On most weekdays",
         "When the tide is low", "Before the first crossing", "In the summer season", "On stormy evenings")
_WHO = ("the small ferry", "the night boat", "the cargo barge", "the harbour tug", "the island shuttle",
        "the old paddle steamer", "the pilot launch", "the supply vessel")
_DOES = ("leaves from the eastern quay", "waits for the mail van", "carries a few cars and bicycles",
         "stops at the fishing village", "turns back at the sandbank", "loads timber for the sawmill",
         "sounds its horn twice", "takes on fresh water")
_FACTS = [
    ("The locker combination for the {key} changing room is {value}.", "What is the locker combination for the "
     "{key} changing room?", lambda rng: str(rng.randint(100_000, 999_999)), ("north", "harbour", "upper")),
    ("The ticket office of the {key} route has the phone extension {value}.", "What is the phone extension of the "
     "ticket office of the {key} route?", lambda rng: str(rng.randint(2000, 8999)), ("coastal", "river")),
    ("The {key} boathouse is looked after by {value}.", "Who looks after the {key} boathouse?",
     lambda rng: rng.choice(("Ottilie Brandvold", "Marcus Achebe", "Ines Valdemar")), ("west", "lake")),
]


def _unseen_case(rng: random.Random, depth: float, paragraphs_count: int = 6):
    fact, question, value_of, keys = _FACTS[rng.randrange(len(_FACTS))]
    key, value = rng.choice(keys), value_of(rng)
    paragraphs = [" ".join(f"{rng.choice(_WHEN)}, {rng.choice(_WHO)} {rng.choice(_DOES)}." for _ in range(5))
                  for _ in range(paragraphs_count)]
    position = round(depth * (len(paragraphs) - 1))
    planted = fact.format(key=key, value=value)
    paragraphs[position] = planted + " " + paragraphs[position]
    page_texts = ["\n\n".join(paragraphs[i:i + 2]) for i in range(0, len(paragraphs), 2)]
    return "\n\f\n".join(page_texts), question.format(key=key), value, planted


@pytest.mark.slow
def test_the_first_source_holds_the_planted_fact_on_unseen_documents(bundled_engine, bundled_heads, tmp_path):
    from starqa.evidence import collect, quotes
    from starqa.answer.passes import answer_text
    from starqa.documents.extraction import extract_document
    from starqa.documents.text_positions import block_pages
    from starqa.documents.tokens import context_ids_for, prompt_template, query_ids_for

    engine, tokenizer, heads = bundled_engine, bundled_engine.tokenizer, bundled_heads
    template = prompt_template(tokenizer)
    assert heads.heads, heads.reason  # the bundled model has retrieval heads
    rng = random.Random("test-sources-unseen")
    correct = hits = first_block = 0
    for case, depth in enumerate((0.0, 1.0, 0.5, 0.0, 1.0, 0.25)):
        text, question, value, planted = _unseen_case(rng, depth)
        path = tmp_path / f"case{case}.txt"
        path.write_text(text, encoding="utf-8")
        extracted = extract_document(path)
        pages = [{"number": p.number, "start": p.start, "end": p.end} for p in extracted.pages]
        fact_start = extracted.text.index(planted)
        document_ids = engine.encode_document_text(extracted.text)
        context = context_ids_for(tokenizer, template, document_ids)
        offset = len(context) - len(document_ids)
        ctx = engine.encode_context(context, block_size=128)
        observer = collect.observer_for(engine, ctx.spans, offset, heads)
        new_ids = engine.generate(ctx, query_ids_for(tokenizer, template, question), max_new_tokens=24,
                                  observe_prefix=observer)
        answer = answer_text(engine, new_ids)
        view = quotes.DocumentView(extracted.text, pages, context, offset, list(ctx.spans),
                                     block_pages(tokenizer, context, offset, ctx.spans, pages, extracted.text),
                                     tokenizer)
        found = collect.evidence_for_answer(view, [observer.stacked()], answer, question)
        spans = block_char_spans(tokenizer, context, offset, ctx.spans, extracted.text)
        if value.lower() in answer.lower():
            correct += 1
            start, end = spans[found.sources[0]["block"]]
            quote = found.evidence[0]
            hits += start <= fact_start < end and quote["start"] <= fact_start < quote["end"]
            first_block += depth == 0.0 and found.sources[0]["block"] == 0 or depth != 0.0
    assert correct >= 3, f"the model answered only {correct} of 6: the test would prove nothing"
    assert hits == correct and first_block == correct
