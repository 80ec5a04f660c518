"""GPU checks: the Triton kernels compiled for a real GPU, and the engine on CUDA, against the same references as on
the CPU. Skipped without CUDA; run them with `make gpu-check` (a process of their own: the CPU tests set
TRITON_INTERPRET=1 before Triton is imported, and an interpreted kernel proves nothing about the compiled one).
"""

from __future__ import annotations

import os

import pytest
import torch

from attention_reference import CASES, assert_matches_reference, case_id, make_qkv

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA, with Triton compiled rather than interpreted (make gpu-check)",
)


def _attention(q, k, v, **kw):
    from starqa.attention import attention_with_lse

    return attention_with_lse(q, k, v, backend="triton", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compiled_triton_matches_float64_reference(case, dtype):
    b, hq, hk, q_len, k_len, d, causal, q_offset = case
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, d, dtype=dtype, device="cuda")
    out, lse = _attention(q, k, v, causal=causal, q_offset=q_offset)
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


# Real model geometry, long contexts: (q_heads, kv_heads, q_len, k_len, head_dim, q_offset)
LONG_CASES = [
    (32, 8, 2048, 4096, 128, 2048),  # Phase 1: a 2K block after a 2K anchor, Llama-3-8B heads
    (9, 3, 1000, 3001, 64, 2001),  # SmolLM2 heads, lengths off the tile grid
    (32, 8, 1, 32768, 128, 32767),  # decode: one token over 32K cached keys (split-KV kernel)
    (32, 8, 7, 20000, 128, 19993),  # a short question over a long prefix
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiled_triton_on_long_real_shapes(case, dtype):
    hq, hk, q_len, k_len, d, q_offset = case
    q, k, v = make_qkv(1, hq, hk, q_len, k_len, d, dtype=dtype, seed=k_len, device="cuda")
    out, lse = _attention(q, k, v, causal=True, q_offset=q_offset)
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=q_offset)


def test_auto_backend_uses_triton_for_cuda_tensors(monkeypatch):
    from starqa.attention import attention_with_lse, triton_kernels

    calls = []
    real = triton_kernels.attention_with_lse_triton
    monkeypatch.setattr(triton_kernels, "attention_with_lse_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 4, 2, 5, 40, 64, dtype=torch.bfloat16, device="cuda")
    attention_with_lse(q, k, v, causal=True, q_offset=35, backend="auto")
    assert calls, "auto did not pick the Triton kernel for CUDA tensors"


def _cuda_engines(architecture: str = "llama", dtype: torch.dtype = torch.float32):
    """As test_engine's pair (a StarEngine and an HF sdpa reference with the same weights), on the GPU."""
    import copy

    from conftest import tiny_model
    from starqa.engine import StarEngine
    from test_engine import _NoTokenizer

    model = tiny_model(architecture).to("cuda", dtype)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    return StarEngine(model, _NoTokenizer()), reference


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_engine_on_cuda_one_block_equals_hf_greedy(architecture):
    """float32 on the GPU: Star Attention with one block is HF generate, token for token (Triton in both phases)."""
    from test_engine import _random_ids

    engine, reference = _cuda_engines(architecture)
    engine.stop_ids = set()
    context, query = _random_ids(300), _random_ids(9, seed=2)
    ctx = engine.encode_context(context, block_size=512)
    star = engine.generate(ctx, query, max_new_tokens=16)
    output = reference.generate(torch.tensor([context + query], device="cuda"), max_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    assert star == output[0, len(context) + len(query):].tolist()


def test_engine_on_cuda_bf16_block_kv_is_close_to_hf_anchor_plus_block():
    from test_engine import _hf_kv, _random_ids

    engine, reference = _cuda_engines(dtype=torch.bfloat16)
    context = _random_ids(300)
    blocks = list(engine.encode_blocks(context, 96, 64, batch=2))
    assert len(blocks) == 4
    for block in blocks[1:]:
        ids = context[:64] + context[block.start:block.end]
        positions = list(range(64)) + list(range(block.start, block.end))
        keys, values = _hf_kv(reference, ids, positions)
        for layer in range(engine.num_layers):  # bf16 steps are ~0.03 at these magnitudes (~4): a few steps apart
            torch.testing.assert_close(block.keys[layer], keys[layer][:, 64:], rtol=5e-2, atol=1e-1)
            torch.testing.assert_close(block.values[layer], values[layer][:, 64:], rtol=5e-2, atol=1e-1)
