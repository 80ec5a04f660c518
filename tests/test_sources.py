"""Answers cite their pages: the page holding a needle is the first source."""

from __future__ import annotations

import random

import pytest
import torch

from starqa.sources import AttentionShares, block_pages, format_sources, rank_sources, shares_from_parts
from starqa.tokens import context_ids_for, encode_document, prompt_template, query_ids_for
from conftest import REPO, tiny_model


def test_format_sources_joins_page_runs_strongest_first():
    sources = [{"pages": [4, 5], "block": 3, "share": 0.4}, {"pages": [12], "block": 9, "share": 0.3}]
    assert format_sources(sources) == "Sources: pp. 4\u20135, 12"
    assert format_sources([{"pages": [2], "block": 1, "share": 1.0}]) == "Sources: p. 2"


def test_shares_combined_across_ranks_equal_one_process():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 40, 8, generator=generator)
    query = torch.randn(1, 4, 1, 8, generator=generator)
    spans = [(0, 10), (10, 25), (25, 40)]
    whole = AttentionShares(spans, document_offset=3, scale=0.35)
    whole.observe(0, query, keys)
    first, second = AttentionShares(spans[:1], 3, 0.35), AttentionShares(spans[1:], 3, 0.35)
    first.observe(0, query, keys[:, :, :10])
    second.observe(0, query, keys[:, :, 10:])
    together = shares_from_parts([whole.stacked()])
    torch.testing.assert_close(shares_from_parts([first.stacked(), second.stacked()]), together)
    assert float(together.sum()) == pytest.approx(1.0)
    assert rank_sources(together, [[1], [2], [3]])[0]["block"] == int(together.argmax())


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
    from starqa.sources import block_char_spans

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
    from starqa.sources import block_char_spans

    text = "Clause  1.   The fee is due.\n\n" * 20
    ids = _ByteTokenizer().encode(text)
    spans = [(start, min(start + 50, len(ids))) for start in range(0, len(ids), 50)]
    char_spans = block_char_spans(_ByteTokenizer(normalise=True), ids, 0, spans, text)
    assert all(a[1] == b[0] for a, b in zip(char_spans, char_spans[1:]))
    assert all(start <= end <= len(text) for start, end in char_spans)


@pytest.mark.slow
def test_the_needle_page_is_the_first_source_with_the_bundled_model(bundled_engine):
    engine, tokenizer = bundled_engine, bundled_engine.hf_tokenizer
    template = prompt_template(tokenizer)
    paragraphs = (REPO / "samples" / "contract.txt").read_text().split("\n\n")
    rng = random.Random(0)
    hits = 0
    for case in range(10):
        pages = ["\n\n".join(paragraphs[(page * 4 + i) % len(paragraphs)] for i in range(4)) for page in range(8)]
        needle_page = case % 8
        number = rng.randint(1_000_000, 9_999_999)
        chunks = pages[needle_page].split("\n\n")
        chunks.insert(2, f"The special magic number is {number}.")
        pages[needle_page] = "\n\n".join(chunks)
        text = "\n\n".join(pages)
        page_map, offset = [], 0
        for number_on_page, page in enumerate(pages, start=1):
            page_map.append({"number": number_on_page, "start": offset, "end": offset + len(page)})
            offset += len(page) + 2
        document_ids = encode_document(tokenizer, text)
        context = context_ids_for(tokenizer, template, document_ids)
        document_offset = len(context) - len(document_ids)
        ctx = engine.encode_context(context, block_size=256)
        shares = AttentionShares(ctx.spans, document_offset, engine.head_dim ** -0.5)
        engine.generate(ctx, query_ids_for(tokenizer, template, "What is the special magic number?"),
                        max_new_tokens=16, observe_prefix=shares)
        sources = rank_sources(shares_from_parts([shares.stacked()]),
                               block_pages(tokenizer, context, document_offset, ctx.spans, page_map, text))
        hits += needle_page + 1 in sources[0]["pages"]
    assert hits >= 9


def test_scores_stay_on_the_query_device_until_handed_over():
    # Block 0 holds template tokens only (its fill values must be made on the query's device, as on a GPU).
    shares = AttentionShares([(0, 4), (4, 8)], document_offset=4, scale=1.0)
    shares.observe(0, torch.zeros(1, 2, 1, 4, device="meta"), torch.zeros(1, 1, 8, 4, device="meta"))
    assert shares.block_peak[0].device.type == "meta" and shares.document_lse[0].device.type == "meta"
    cpu = AttentionShares([(0, 4), (4, 8)], document_offset=4, scale=1.0)
    cpu.observe(0, torch.randn(1, 2, 1, 4), torch.randn(1, 1, 8, 4))
    lse, peak = cpu.stacked()
    assert lse.device.type == peak.device.type == "cpu" and peak.shape == (1, 2, 2)
    assert peak[0, :, 0].eq(float("-inf")).all()


def test_scores_taken_from_the_attention_equal_a_separate_pass(monkeypatch):
    # On CPU decoding steps the observer gets the scores the decode kernel computed (one read of the stored keys);
    # answers and shares are those of the torch path, which scores the keys in a separate pass.
    from starqa import kernels
    from starqa.engine import StarEngine

    class NoTokenizer:
        eos_token_id = None

    engine = StarEngine(tiny_model("llama"), NoTokenizer())
    engine.stop_ids = set()
    context = torch.randint(3, 49152, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    ctx = engine.encode_context(context, block_size=48)
    plain = engine.generate(ctx, [5, 6, 7], max_new_tokens=6)
    fused = AttentionShares(ctx.spans, 20, engine.head_dim ** -0.5)
    assert engine.generate(ctx, [5, 6, 7], max_new_tokens=6, observe_prefix=fused) == plain
    monkeypatch.setattr(kernels, "available", lambda: False)
    separate = AttentionShares(ctx.spans, 20, engine.head_dim ** -0.5)
    assert engine.generate(ctx, [5, 6, 7], max_new_tokens=6, observe_prefix=separate) == plain
    for ours, theirs in zip(fused.stacked(), separate.stacked()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert len(fused.block_peak) == 6 * engine.num_layers  # the prompt's pass and 5 decoding steps
