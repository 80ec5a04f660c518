"""KV precision (--kv-dtype): the int8 quantizer against a float64 reference, and the engine's answers with each
stored precision, on the kernel path and the torch path alike."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import planted_number_prompts, tiny_model
from starqa import kernels
from starqa.engine.star_engine import StarEngine
from starqa.store.kv_quant import dequantize_keys, dequantize_values, group_starts, quantize_keys, quantize_values


def _reference_keys(keys: torch.Tensor, group: int):
    """float64: per channel, groups of `group` tokens, scale = max|x| / 127, round half to even."""
    x = keys.double()
    heads, n, dim = x.shape
    scales, quantized = [], torch.empty_like(x)
    for start in range(0, n, group):
        piece = x[:, start:start + group]
        scale = piece.abs().amax(dim=1) / 127  # [heads, d]
        scales.append(scale)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        quantized[:, start:start + group] = torch.clamp(torch.round(piece / safe[:, None]), -127, 127)
    return quantized, torch.stack(scales, dim=1)


def test_int8_keys_and_values_equal_the_float64_reference_quantizer():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 150, 64, generator=generator) * torch.logspace(-2, 1, 64)  # outlier channels
    values = torch.randn(3, 150, 64, generator=generator) * torch.logspace(-1, 1, 150)[:, None]
    key_q, key_scales = quantize_keys(keys, group=64)
    ref_q, ref_scales = _reference_keys(keys, 64)
    torch.testing.assert_close(key_scales.double(), ref_scales, rtol=1e-6, atol=0)
    # The same integers, except where float32 and float64 land on the two sides of a .5 boundary.
    ratio = keys.double() / torch.where(ref_scales > 0, ref_scales, 1).repeat_interleave(64, dim=1)[:, :150]
    at_boundary = (ratio - ratio.floor() - 0.5).abs() < 1e-4
    assert bool(((key_q.double() == ref_q) | at_boundary).all())
    # Dequantized, every element is within half a step of its group's scale.
    restored = dequantize_keys(key_q, key_scales, group_starts(150, 64), torch.float64)
    step = key_scales.double().repeat_interleave(64, dim=1)[:, :150]
    assert bool(((restored - keys.double()).abs() <= step / 2 + 1e-7).all())

    value_q, value_scales = quantize_values(values)
    torch.testing.assert_close(value_scales.double(), values.double().abs().amax(-1) / 127, rtol=1e-6, atol=0)
    restored = dequantize_values(value_q, value_scales, torch.float64)
    assert bool(((restored - values.double()).abs() <= value_scales.double()[..., None] / 2 + 1e-7).all())


def test_an_all_zero_group_stays_zero():
    key_q, key_scales = quantize_keys(torch.zeros(1, 10, 8))
    assert torch.equal(key_q, torch.zeros_like(key_q)) and torch.equal(key_scales, torch.zeros_like(key_scales))
    assert torch.equal(dequantize_keys(key_q, key_scales, [0, 10], torch.float32), torch.zeros(1, 10, 8))


class _NoTokenizer:
    eos_token_id = None


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49152, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _phase2_logits(engine, ctx, query):
    cache = engine._new_cache(batch=1, capacity=len(query), prefix=ctx)
    positions = torch.arange(ctx.n_tokens, ctx.n_tokens + len(query))[None]
    return engine._step(cache, torch.tensor([query]), positions)[0]


@pytest.mark.parametrize("kv_dtype,tolerance", [("float32", 1e-5), ("float16", 2e-2), ("bfloat16", 1.5e-1),
                                                 ("int8", 1.5e-1)])
def test_each_kv_precision_gives_the_logits_of_the_compute_dtype_within_its_error(kv_dtype, tolerance):
    engine = StarEngine(tiny_model("llama"), _NoTokenizer())
    context, query = _ids(230, 1), _ids(7, 2)
    exact = _phase2_logits(engine, engine.encode_context(context, 64, 32), query)
    stored = engine.encode_context(context, 64, 32, kv_dtype=kv_dtype)
    assert stored.storage_dtype == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                    "int8": torch.int8}[kv_dtype]
    logits = _phase2_logits(engine, stored, query)
    difference = float((logits - exact).abs().max())
    assert difference <= tolerance * float(exact.abs().max())
    if kv_dtype != "float32":
        assert difference > 0  # the stored precision really is narrower


@pytest.mark.skipif(not kernels.available(), reason="no decode kernels here")
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16", "int8"])
def test_the_kernel_path_and_the_torch_path_decode_alike(kv_dtype, monkeypatch):
    engine = StarEngine(tiny_model("llama"), _NoTokenizer())
    engine.stop_ids = set()
    ctx = engine.encode_context(_ids(300, 3), 64, 64, kv_dtype=kv_dtype)
    query = _ids(6, 4)
    with_kernels = _phase2_logits(engine, ctx, query[:1])  # one row: the kernel path
    tokens = engine.generate(ctx, query, max_new_tokens=12)
    monkeypatch.setattr(kernels, "available", lambda: False)
    torch.testing.assert_close(_phase2_logits(engine, ctx, query[:1]), with_kernels, rtol=1e-4, atol=1e-4)
    assert engine.generate(ctx, query, max_new_tokens=12) == tokens


def test_bfloat16_compute_equals_hf_in_bfloat16():
    """The compact decoder in bfloat16 against transformers' LlamaForCausalLM in bfloat16, same ids."""
    model = tiny_model("llama").to(torch.bfloat16)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    engine = StarEngine(model, _NoTokenizer())
    prompt = _ids(90, 5)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    cache = engine._new_cache(batch=1, capacity=len(prompt))
    logits = engine._step(cache, torch.tensor([prompt]), torch.arange(len(prompt))[None])[0]
    # bf16 rounds at every layer; two correct implementations differ by a few bf16 steps of the largest logit
    assert float((logits - expected).abs().max()) <= 0.05 * float(expected.abs().max())
    assert int(logits.argmax()) == int(expected.argmax())


@pytest.mark.slow
def test_needles_are_found_in_bfloat16_and_every_kv_precision_with_the_bundled_model(bundled_engine, shared_home):
    """Short needle documents: the bundled model's answer holds the planted number in float32 with float32 KV, and
    still in bfloat16 compute with bfloat16, float16 and int8 KV (the same Phase 1 stored each way)."""
    from starqa.engine.star_engine import quantize_block

    bf16 = StarEngine.load("smollm2-135m", device="cpu", dtype="bfloat16", store_root=shared_home)
    for number, context, query in planted_number_prompts(bundled_engine.hf_tokenizer):
        for engine, kv_dtypes in ((bundled_engine, ("float32",)), (bf16, ("bfloat16", "float16", "int8"))):
            blocks = list(engine.encode_blocks(context, 128, 128))
            spans = [(block.start, block.end) for block in blocks]
            for kv_dtype in kv_dtypes:
                ctx = engine.context_from_blocks((quantize_block(block, kv_dtype) for block in blocks), len(context),
                                                 len(context), kv_dtype=kv_dtype, spans=spans)
                answer = engine.tokenizer.decode(engine.generate(ctx, query, max_new_tokens=24))
                assert str(number) in answer, (engine.dtype, kv_dtype, answer)
