"""Star Attention's engine against plain HF transformers on the same ids."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny_model
from starqa.engine.star_engine import StarEngine
from starqa.documents.tokens import plan_blocks


class _NoTokenizer:
    eos_token_id = None


def _engines(architecture: str = "llama"):
    """A StarEngine and a reference HF model (sdpa attention) with the same weights."""
    model = tiny_model(architecture)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    return StarEngine(model, _NoTokenizer()), reference


def _random_ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(reference, prompt_ids, max_new_tokens):
    output = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    return output[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
def test_one_block_equals_hf_greedy(architecture):
    engine, reference = _engines(architecture)
    engine.stop_ids = set()
    context, query = _random_ids(150), _random_ids(9, seed=2)
    ctx = engine.encode_context(context, block_size=256)
    assert len(ctx.spans) == 1
    star = engine.generate(ctx, query, max_new_tokens=16)
    assert star == _hf_greedy(reference, context + query, 16)


def test_full_attention_mode_equals_hf_greedy():
    engine, reference = _engines()
    engine.stop_ids = set()
    prompt = _random_ids(120)
    assert engine.generate_full(prompt, max_new_tokens=12) == _hf_greedy(reference, prompt, 12)


def _hf_kv(reference, ids, positions):
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        device = reference.device  # the GPU tests reuse this
        reference.model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                        cache=cache, use_cache=True)
    return [layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers]


@pytest.mark.parametrize("architecture,block_size,anchor_size", [
    ("llama", 64, 64), ("llama", 64, 16), ("llama", 50, 50), ("llama", 48, 7), ("mistral", 64, 16), ("qwen2", 48, 7),
])
def test_block_kv_equals_anchor_plus_block_encoded_directly(architecture, block_size, anchor_size):
    engine, reference = _engines(architecture)  # qwen2: q/k/v projections with bias
    context = _random_ids(205)  # 205 is no multiple of these sizes: the last block is short
    blocks = list(engine.encode_blocks(context, block_size, anchor_size, batch=2))
    assert [(b.start, b.end) for b in blocks] == plan_blocks(205, block_size)
    for block in blocks:
        if block.index == 0:
            ids, positions, keep_from = context[: block.end], list(range(block.end)), 0
        else:
            ids = context[:anchor_size] + context[block.start : block.end]
            positions = list(range(anchor_size)) + list(range(block.start, block.end))
            keep_from = anchor_size  # the anchor's KV is thrown away
        keys, values = _hf_kv(reference, ids, positions)
        for layer in range(engine.num_layers):
            torch.testing.assert_close(block.keys[layer], keys[layer][:, keep_from:], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(block.values[layer], values[layer][:, keep_from:], rtol=1e-4, atol=1e-4)


def test_phase1_on_a_subset_of_blocks_equals_all_blocks():
    engine, _ = _engines()
    context = _random_ids(200)
    everything = {b.index: b for b in engine.encode_blocks(context, 64, 32)}
    subset = list(engine.encode_blocks(context, 64, 32, block_indices=[2, 3]))  # no block 0: encodes the anchor
    assert [block.index for block in subset] == [2, 3]
    for block in subset:  # every layer: past the first, a block's KV depends on the anchor it attended to
        for layer in range(len(block.keys)):
            torch.testing.assert_close(block.keys[layer], everything[block.index].keys[layer], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(block.values[layer], everything[block.index].values[layer], rtol=1e-5,
                                       atol=1e-5)


def _hf_cache_holding(reference, ctx):
    """An HF DynamicCache holding the context KV Phase 1 produced (copies: HF appends to it)."""
    cache = DynamicCache(config=reference.config)
    for layer in range(len(ctx.keys)):
        cache.update(ctx.keys[layer].clone(), ctx.values[layer].clone(), layer)
    return cache


def test_phase2_over_stored_blocks_equals_hf_forward_with_concatenated_cache():
    engine, reference = _engines()
    context, query = _random_ids(230), _random_ids(11, seed=3)
    ctx = engine.encode_context(context, block_size=64, anchor_size=32)
    assert len(ctx.spans) == 4
    cache = _hf_cache_holding(reference, ctx)
    positions = torch.arange(len(context), len(context) + len(query))[None]
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([query]), position_ids=positions, cache=cache).logits[0, -1]
    star_cache = engine._new_cache(batch=1, capacity=len(query), prefix=ctx)
    logits = engine._step(star_cache, torch.tensor([query]), positions)[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_greedy_decode_over_many_blocks_equals_hf_generate_from_the_same_kv():
    """Phase 2 as it decodes (one new token at a time, over 4 stored blocks) against HF generate given the same KV."""
    engine, reference = _engines()
    engine.stop_ids = set()
    context, query = _random_ids(230), _random_ids(9, seed=4)
    ctx = engine.encode_context(context, block_size=64, anchor_size=32)
    assert len(ctx.spans) == 4
    cache = _hf_cache_holding(reference, ctx)
    output = reference.generate(torch.tensor([context + query]), cache=cache, max_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    expected = output[0, len(context) + len(query):].tolist()
    assert len(expected) == 12
    assert engine.generate(ctx, query, max_new_tokens=12) == expected


def test_batched_phase1_equals_one_block_at_a_time():
    engine, _ = _engines()
    context = _random_ids(256)
    one = list(engine.encode_blocks(context, 32, 32, batch=1))
    batched = list(engine.encode_blocks(context, 32, 32, batch=4))
    assert [b.index for b in batched] == [a.index for a in one] == list(range(8))
    for a, b in zip(one, batched):
        for layer in range(engine.num_layers):
            torch.testing.assert_close(a.keys[layer], b.keys[layer], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.values[layer], b.values[layer], rtol=1e-5, atol=1e-5)


def test_sampling_is_reproducible_with_a_seed():
    engine, _ = _engines()
    engine.stop_ids = set()
    ctx = engine.encode_context(_random_ids(100), block_size=32)
    first = engine.generate(ctx, [5, 6, 7], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    again = engine.generate(ctx, [5, 6, 7], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7)
    assert first == again
    # ... and it really samples: other seeds, or greedy decoding, give other tokens
    others = {tuple(engine.generate(ctx, [5, 6, 7], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=seed))
              for seed in range(3)}
    greedy = engine.generate(ctx, [5, 6, 7], max_new_tokens=10, temperature=0.0)
    assert len(others | {tuple(first)}) > 1 and greedy != first


@pytest.mark.slow
def test_bundled_model_one_block_equals_hf_greedy(bundled_engine):
    from transformers import AutoModelForCausalLM

    from starqa.documents.tokens import context_ids_for, encode_document, prompt_template, query_ids_for

    tokenizer = bundled_engine.hf_tokenizer
    template = prompt_template(tokenizer)
    document = "The vault code is 48213. Paris was rainy all week, and the museum closed at six."
    context = context_ids_for(tokenizer, template, encode_document(tokenizer, document))
    query = query_ids_for(tokenizer, template, "What is the vault code?")
    reference = AutoModelForCausalLM.from_pretrained(bundled_engine.model_dir, dtype=torch.float32,
                                                     attn_implementation="sdpa")
    ctx = bundled_engine.encode_context(context, block_size=512)
    star = bundled_engine.generate(ctx, query, max_new_tokens=20)
    expected = reference.generate(torch.tensor([context + query]), max_new_tokens=20, do_sample=False)
    assert star == expected[0, len(context) + len(query):].tolist()
    assert "48213" in tokenizer.decode(star)


def test_phase2_past_a_sliding_window_is_an_error_not_a_silent_difference():
    from starqa.errors import StarqaError

    engine = StarEngine(tiny_model("mistral", sliding_window=48), _NoTokenizer())
    ctx = engine.encode_context(list(range(10, 40)), block_size=16)
    assert len(engine.generate(ctx, [5, 6], max_new_tokens=4)) == 4  # 36 tokens: inside the window
    streamed = []
    with pytest.raises(StarqaError, match="attends to only the last 48 tokens"):
        engine.generate(ctx, [5, 6], max_new_tokens=30, on_token=streamed.append)
    assert streamed == []  # refused before the first token, not part-way through an answer
    with pytest.raises(StarqaError, match="answer budget reach 62 tokens"):
        engine.generate_full(list(range(10, 40)), max_new_tokens=32)


def test_a_ranks_partial_attention_reaches_the_cross_rank_merge_in_float32():
    """bf16 models: each rank's result is merged again across ranks, so it must not be rounded to bf16 first."""
    from starqa.attention import merge_attention
    from starqa.store.context_kv import ContextKV
    from starqa.engine.star_cache import StarCache

    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)

    query, keys, values = tensor(1, 4, 2, 8), tensor(1, 2, 2, 8), tensor(1, 2, 2, 8)
    stored_keys, stored_values = tensor(1, 2, 12, 8), tensor(1, 2, 12, 8)
    partials = []

    def rank(lo, hi, keep_local):
        def gather(out, lse):  # stands in for the all-gather: collect this rank's partial, return it unchanged
            partials.append((out, lse))
            return out, lse
        prefix = ContextKV(n_tokens=12, spans=[(lo, hi)], keys=[stored_keys[:, :, lo:hi].contiguous()],
                           values=[stored_values[:, :, lo:hi].contiguous()])
        cache = StarCache(num_layers=1, batch=1, kv_heads=2, head_dim=8, capacity=2, dtype=torch.bfloat16,
                          device=torch.device("cpu"), prefix=prefix, keep_local=keep_local, merge_across_ranks=gather)
        out = cache.attend(0, query, keys, values, 8 ** -0.5)
        assert out.dtype == torch.bfloat16
    rank(0, 6, keep_local=False)
    rank(6, 12, keep_local=True)
    assert all(out.dtype == torch.float32 for out, _ in partials)
    # The second rank merged two parts (its stored keys and the query's own) into its partial: in float32 that is
    # (almost surely) no bf16 number anywhere; rounded to bf16 and back (a mutant a 2e-2 tolerance below let through),
    # every element would be one.
    own_out = partials[1][0]
    assert (own_out != own_out.to(torch.bfloat16).float()).float().mean() > 0.5, "the partial was rounded to bf16"
    merged, _ = merge_attention(partials)
    # Reference: the same attention in float32 over all stored keys and, causally, the query's own.
    all_keys = torch.cat([stored_keys, keys], dim=2).float().repeat_interleave(2, dim=1)
    all_values = torch.cat([stored_values, values], dim=2).float().repeat_interleave(2, dim=1)
    scores = query.float() @ all_keys.transpose(-1, -2) * 8 ** -0.5
    scores[..., 0, 13] = float("-inf")  # query 0 does not see query 1
    reference = torch.softmax(scores, dim=-1) @ all_values
    torch.testing.assert_close(merged, reference, atol=2e-2, rtol=2e-2)


def test_questions_decoded_together_answer_as_if_asked_one_by_one():
    """Batched Phase 2: left-padded queries of different lengths, each its own KV row, the context KV shared."""
    engine, _ = _engines()
    engine.stop_ids = {_random_ids(1, seed=9)[0]}
    ctx = engine.encode_context(_random_ids(230), block_size=64, anchor_size=32)
    queries = [_random_ids(9, seed=3), _random_ids(4, seed=4), _random_ids(13, seed=5), _random_ids(1, seed=6)]
    alone = [engine.generate(ctx, query, max_new_tokens=14) for query in queries]
    together = engine.generate_batch(ctx, queries, max_new_tokens=14)
    assert together == alone
    assert len({tuple(answer) for answer in alone}) == len(queries)  # different questions, different answers
    # sampling: each question keeps its own generator, seeded as if asked alone
    sampled_alone = [engine.generate(ctx, query, max_new_tokens=8, temperature=0.9, seed=4) for query in queries]
    assert engine.generate_batch(ctx, queries, max_new_tokens=8, temperature=0.9, seed=4) == sampled_alone


def test_batched_logits_equal_single_logits():
    engine, _ = _engines()
    ctx = engine.encode_context(_random_ids(150), block_size=64)
    queries = [_random_ids(5, seed=7), _random_ids(11, seed=8)]
    singles = []
    for query in queries:
        cache = engine._new_cache(batch=1, capacity=len(query), prefix=ctx)
        singles.append(engine._step(cache, torch.tensor([query]), torch.arange(150, 150 + len(query))[None])[0])
    logits = {}

    def recording_step(cache, ids, positions):
        result = step(cache, ids, positions)
        logits.setdefault("first", result)
        return result
    step, engine._step = engine._step, recording_step
    engine.generate_batch(ctx, queries, max_new_tokens=1)
    for row, single in enumerate(singles):
        torch.testing.assert_close(logits["first"][row], single, rtol=1e-5, atol=1e-5)


def test_full_attention_decodes_through_its_prompt_as_a_prefix_exactly():
    """generate_full: one causal pass, then decoding over the prompt's KV as a prefix; HF generate's tokens."""
    engine, reference = _engines("qwen2")
    engine.stop_ids = set()
    prompt = _random_ids(200, seed=11)
    assert engine.generate_full(prompt, max_new_tokens=10) == _hf_greedy(reference, prompt, 10)
