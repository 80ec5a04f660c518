"""The CPU decode kernels (starqa/kernels/cpu_decode.c) against float64 references, in every KV format."""

from __future__ import annotations

import shutil

import pytest
import torch

from starqa import kernels
from starqa.store.context_kv import chunk_starts_for
from starqa.store.kv_quant import KEY_GROUP, dequantize_keys, dequantize_values, quantize_keys, quantize_values


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return False
    return all(flag in flags.split() for flag in ("avx512f", "avx512bw", "avx512vl"))


# On a machine that can build them (our CI's Xeons can), the kernels must build: a silent fallback to torch would
# leave decoding at a fraction of the memory bandwidth with every test still green.
if _cpu_has_avx512() and shutil.which("cc") and not kernels.available():
    pytest.fail(f"the decode kernels should build here but do not: {kernels.unavailable_reason()}",
                pytrace=False)
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"no decode kernels: {kernels.unavailable_reason()}")


def _reference(q, keys, values):
    """float64 attention of q [hk, R, d] (pre-scaled) over keys/values [hk, n, d]: out, lse, scores."""
    scores = torch.einsum("hrd,hnd->hrn", q.double(), keys.double())
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("hrn,hnd->hrd", torch.softmax(scores, dim=-1), values.double())
    return out, lse, scores


def _assert_close_to(reference, got, scale_tol=2e-6, floor=1e-7):
    """Within a fraction of the reference's own scale: an all-zero or partial result fails in every format."""
    tolerance = scale_tol * float(reference.abs().max()) + floor
    assert float((got.double() - reference).abs().max()) <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 7, 24, 70])
def test_decode_attention_equals_float64_attention(dtype, rows):
    generator = torch.Generator().manual_seed(rows)
    spans = [(0, 300), (300, 317), (317, 1000)]  # uneven blocks: chunks never cross one
    keys = torch.randn(3, 1000, 64, generator=generator).to(dtype)
    values = torch.randn(3, 1000, 64, generator=generator).to(dtype)
    q = torch.randn(3, rows, 64, generator=generator) * 0.4
    out, lse, scores = kernels.decode_attention(q, keys, values, chunk_starts_for(spans, 128), want_scores=True)
    ref_out, ref_lse, ref_scores = _reference(q, keys.float(), values.float())
    _assert_close_to(ref_out, out)
    _assert_close_to(ref_scores, scores)
    assert float((lse.double() - ref_lse).abs().max()) < 1e-5


@pytest.mark.parametrize("dim", [64, 128, 48])  # 48: not whole 32-wide steps, the float32 path
@pytest.mark.parametrize("rows", [1, 6, 7])
def test_a_bfloat16_query_over_bfloat16_keys_equals_float64_attention(rows, dim):
    """The decoding case (bfloat16 q and KV, the scale given): q and k meet as they are, the scale on the scores."""
    generator = torch.Generator().manual_seed(rows + dim)
    spans = [(0, 300), (300, 317), (317, 700)]
    keys = torch.randn(2, 700, dim, generator=generator).bfloat16()
    values = torch.randn(2, 700, dim, generator=generator).bfloat16()
    q = (torch.randn(2, rows, dim, generator=generator) * 3).bfloat16()
    scale = dim ** -0.5
    out, lse, scores = kernels.decode_attention(q, keys, values, chunk_starts_for(spans, 128), scale=scale,
                                                want_scores=True)
    ref_out, ref_lse, ref_scores = _reference(q.double() * scale, keys, values)
    _assert_close_to(ref_out, out)
    _assert_close_to(ref_scores, scores)
    assert float((lse.double() - ref_lse).abs().max()) < 1e-5


def test_decode_attention_reads_int8_with_its_scales():
    generator = torch.Generator().manual_seed(0)
    spans = [(0, 100), (100, 227)]
    keys = torch.randn(2, 227, 64, generator=generator) * torch.linspace(0.1, 4, 64)  # channels of unequal size
    values = torch.randn(2, 227, 64, generator=generator)
    blocks = [(quantize_keys(keys[:, s:e]), quantize_values(values[:, s:e])) for s, e in spans]
    key_q = torch.cat([b[0][0] for b in blocks], dim=1)
    key_scales = torch.cat([b[0][1] for b in blocks], dim=1)
    value_q = torch.cat([b[1][0] for b in blocks], dim=1)
    value_scales = torch.cat([b[1][1] for b in blocks], dim=1)
    starts = chunk_starts_for(spans, KEY_GROUP)
    q = torch.randn(2, 5, 64, generator=generator) * 0.2
    out, lse, scores = kernels.decode_attention(q, key_q, value_q, starts, key_scales=key_scales,
                                                value_scales=value_scales, want_scores=True)
    # The reference attends to exactly what the int8 bytes and scales mean, in float64.
    dense_keys = dequantize_keys(key_q, key_scales, starts.long(), torch.float64)
    dense_values = dequantize_values(value_q, value_scales, torch.float64)
    ref_out, ref_lse, ref_scores = _reference(q, dense_keys, dense_values)
    _assert_close_to(ref_out, out)
    _assert_close_to(ref_scores, scores)
    assert float((lse.double() - ref_lse).abs().max()) < 1e-5


def test_decode_attention_with_a_head_stride_reads_views():
    """Full attention decodes over a view of its prompt buffer: heads further apart than their tokens."""
    generator = torch.Generator().manual_seed(1)
    buffer_keys = torch.randn(1, 3, 500, 64, generator=generator)
    buffer_values = torch.randn(1, 3, 500, 64, generator=generator)
    keys, values = buffer_keys[0, :, :300], buffer_values[0, :, :300]
    assert keys.stride(0) == 500 * 64
    q = torch.randn(3, 3, 64, generator=generator) * 0.3
    out, lse, _ = kernels.decode_attention(q, keys, values, chunk_starts_for([(0, 300)], 128))
    ref_out, ref_lse, _ = _reference(q, keys, values)
    _assert_close_to(ref_out, out)


def test_linear_bf16_equals_float64_matmul_rounded_once():
    generator = torch.Generator().manual_seed(0)
    for rows, features, outputs in [(1, 576, 960), (3, 1536, 577), (8, 64, 49152 // 16)]:
        weight = torch.randn(outputs, features, generator=generator).to(torch.bfloat16)
        x = torch.randn(rows, features, generator=generator).to(torch.bfloat16)
        got = kernels.linear_bf16(x, weight)
        exact = x.double() @ weight.double().T
        assert got.dtype == torch.bfloat16 and got.shape == (rows, outputs)
        # float32 accumulation, one rounding to bfloat16: at most one bf16 step (2^-7 relative) from exact
        assert bool(((got.double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-3).all())
        assert not torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("local_tokens", [1, 37, 300])  # 300: the buffer itself spans two chunks
def test_decode_attention_merges_the_decode_buffer_in_exactly(local_tokens):
    """One sequence decoding: prefix and buffer in one call equal attention over both key sets together."""
    generator = torch.Generator().manual_seed(local_tokens)
    keys = torch.randn(3, 700, 64, generator=generator).to(torch.bfloat16)
    values = torch.randn(3, 700, 64, generator=generator).to(torch.bfloat16)
    buffer_keys = torch.randn(1, 3, 320, 64, generator=generator).to(torch.bfloat16)  # capacity beyond what is used
    buffer_values = torch.randn(1, 3, 320, 64, generator=generator).to(torch.bfloat16)
    local_keys, local_values = buffer_keys[0, :, :local_tokens], buffer_values[0, :, :local_tokens]
    q = (torch.randn(3, 3, 64, generator=generator) * 3).to(torch.bfloat16)
    out, lse, scores = kernels.decode_attention(q, keys, values, chunk_starts_for([(0, 700)], 128), scale=0.125,
                                                want_scores=True, local_keys=local_keys, local_values=local_values)
    ref_out, ref_lse, ref_scores = _reference(q.double() * 0.125, torch.cat([keys, local_keys], 1).float(),
                                              torch.cat([values, local_values], 1).float())
    _assert_close_to(ref_out, out)
    assert float((lse.double() - ref_lse).abs().max()) < 1e-5
    _assert_close_to(ref_scores[..., :700], scores)  # scores of the stored prefix only
    assert scores.shape == (3, 3, 700)


def test_weights_far_below_the_largest_are_zero_not_denormal_and_change_nothing():
    """Scores 100 apart: exp(-100) is a denormal float; the kernel takes such weights as 0 (they add nothing)."""
    keys = torch.zeros(1, 64, 64)
    keys[0, 0, 0] = 1.0  # the one key that q matches
    values = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    q = torch.zeros(1, 1, 64)
    q[0, 0, 0] = 100.0
    out, lse, _ = kernels.decode_attention(q, keys, values, chunk_starts_for([(0, 64)], 64))
    torch.testing.assert_close(out[0, 0], values[0, 0], rtol=0, atol=1e-6)
    assert abs(float(lse[0, 0]) - 100.0) < 1e-4


def test_per_token_layer_kernels_round_as_torch_does():
    """RMS norm, rotary embedding, SiLU gate and the residual add: the same bfloat16 bits as the torch ops they
    replace (the roundings of starqa.model.transformer's torch path)."""
    from starqa.model.transformer import Transformer

    generator = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 576, generator=generator) * 4).to(torch.bfloat16)
    weight = torch.randn(576, generator=generator).to(torch.bfloat16)
    normalised = torch.nn.functional.rms_norm(x.float(), (576,), eps=1e-5)
    assert torch.equal(kernels.rms_norm_bf16(x, weight, 1e-5), weight * normalised.to(torch.bfloat16))

    gate_up = (torch.randn(3, 2 * 1536, generator=generator) * 3).to(torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(kernels.silu_mul_bf16(gate_up), torch.nn.functional.silu(gate) * up)

    heads, kv_heads, dim = 9, 3, 64
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=generator).to(torch.bfloat16)
    angles = torch.rand(3, dim // 2, generator=generator) * 50
    cos = torch.cat((angles, angles), dim=-1).cos().to(torch.bfloat16)
    sin = torch.cat((angles, angles), dim=-1).sin().to(torch.bfloat16)
    expected = Transformer._rotate(qkv[:, :(heads + kv_heads) * dim].view(3, heads + kv_heads, dim),
                                   cos[:, None], sin[:, None])
    rotated = qkv.clone()
    kernels.rope_bf16_(rotated, heads + kv_heads, dim, cos, sin)
    assert torch.equal(rotated[:, :(heads + kv_heads) * dim].view(3, heads + kv_heads, dim), expected)
    assert torch.equal(rotated[:, (heads + kv_heads) * dim:], qkv[:, (heads + kv_heads) * dim:])  # values untouched

    w = torch.randn(960, 576, generator=generator).to(torch.bfloat16)
    residual = torch.randn(3, 960, generator=generator).to(torch.bfloat16)
    assert torch.equal(kernels.linear_bf16(x, w, residual), residual + kernels.linear_bf16(x, w))


def test_decoding_with_the_per_token_kernels_equals_the_torch_path(monkeypatch):
    """A bfloat16 model decoding token by token: the per-token kernel path gives the torch path's logits bit for bit
    (a single sequence, and a left-padded batch of two)."""
    from conftest import tiny_model
    from test_engine import _NoTokenizer

    from starqa.engine.star_engine import StarEngine
    from starqa.model.transformer import Transformer

    engine = StarEngine(tiny_model("llama").to(torch.bfloat16), _NoTokenizer())
    engine.stop_ids = set()
    ctx = engine.encode_context(list(range(100, 400)), 128, 128)
    forward = Transformer.forward
    runs = {}
    for fast in (True, False):
        logits: list[torch.Tensor] = []

        def recording(self, *args, **kwargs):
            out = forward(self, *args, **kwargs)
            logits.append(out)
            return out

        monkeypatch.setattr(Transformer, "forward", recording)
        monkeypatch.setattr(Transformer, "_per_token_kernels",
                            lambda self, x, fast=fast: fast and x.shape[0] * x.shape[1] <= 8)
        engine.generate_batch(ctx, [[5, 6, 7], [8, 9]], max_new_tokens=6)
        engine.generate(ctx, [5, 6, 7, 11], max_new_tokens=6)
        runs[fast] = logits
    assert len(runs[True]) == len(runs[False]) >= 10
    assert all(torch.equal(a, b) for a, b in zip(runs[True], runs[False]))
