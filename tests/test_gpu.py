"""GPU checks: the Triton kernels compiled for a real GPU, and the engine on CUDA, against the same references as on
the CPU (the CPU kernel cases mirrored: padded head dims, non-contiguous q, negative q_offset, forced key splits,
float32 through the split/combine path), register spills of the compiled kernels, and Phase 2 on two NCCL ranks.

Plain `pytest` skips this module without CUDA (CI has no GPU and stays green). The device check, `tests/gpu_check.py`
(`make gpu-check-device`), sets STARQA_GPU_CHECK=1: there a missing GPU, or Triton in interpreter mode, is an error at
collection instead, since a run that skips everything exits 0 and proves nothing. Run compiled, in a process of its
own: the CPU tests set TRITON_INTERPRET=1 before Triton is imported, and an interpreted kernel proves nothing about the
compiled one. With GPU_CHECK_OUT set, the module writes the kernels' measured errors and register use there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from attention_reference import (CASES, ERRORS_SEEN, KERNEL_CASES, OUT_TOL, assert_matches_reference, case_id,
                                  make_qkv, reference_attention, reference_errors)

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if os.environ.get("STARQA_GPU_CHECK") == "1" and not ON_GPU:
    raise RuntimeError(
        "STARQA_GPU_CHECK=1 (the device check) but "
        + ("TRITON_INTERPRET=1 is set: the kernels would be interpreted, not compiled"
           if torch.cuda.is_available() else
           f"CUDA is not available to this torch ({torch.__version__}): nothing here would run")
    )

pytestmark = pytest.mark.skipif(
    not ON_GPU, reason="needs CUDA, with Triton compiled rather than interpreted (make gpu-check)"
)
# The only skips the device check accepts (it fails on any other): tests that need more GPUs than the machine has.
MULTI_GPU_REASON = "needs 2 GPUs"
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason=MULTI_GPU_REASON)


@pytest.fixture(scope="module", autouse=True)
def _write_measured_errors():
    """The worst out/lse error per dtype, and every check's, under GPU_CHECK_OUT (one file per pytest worker)."""
    yield
    out_dir = os.environ.get("GPU_CHECK_OUT")
    if not out_dir or not ERRORS_SEEN:
        return
    worst = {}
    for dtype, q_shape, k_len, out_error, lse_error in ERRORS_SEEN:
        name = str(dtype).removeprefix("torch.")
        before = worst.get(name, {"out": 0.0, "lse": 0.0, "checks": 0})
        worst[name] = {"out": max(before["out"], out_error), "lse": max(before["lse"], lse_error),
                       "checks": before["checks"] + 1}
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    Path(out_dir, f"attention-errors.{worker}.json").write_text(json.dumps({
        "worst": worst,
        "checks": [[str(d).removeprefix("torch."), list(s), k, o, e] for d, s, k, o, e in ERRORS_SEEN],
    }) + "\n")


def _attention(q, k, v, **kw):
    from starqa.attention import attention_with_lse

    return attention_with_lse(q, k, v, backend="triton", **kw)


def _kernels(q, k, v, **kw):
    from starqa.attention.triton_kernels import attention_with_lse_triton

    return attention_with_lse_triton(q, k, v, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_compiled_triton_matches_float64_reference(case, dtype):
    b, hq, hk, q_len, k_len, d, causal, q_offset = case
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, d, dtype=dtype, device="cuda")
    out, lse = _attention(q, k, v, causal=causal, q_offset=q_offset)
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


# The CPU interpreter's kernel cases, compiled: each kernel forced, with and without key splits, at head_dim 64.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", ["fwd", "decode"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiled_fwd_and_split_kv_decode_kernels_match_reference(case, kernel, num_splits, dtype):
    b, hq, hk, q_len, k_len, causal, q_offset = case
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, 64, dtype=dtype, seed=q_len, device="cuda")
    out, lse = _kernels(q, k, v, causal=causal, q_offset=q_offset, decode=(kernel == "decode"), num_splits=num_splits)
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [48, 64, 80, 128])
@pytest.mark.parametrize("decode", [False, True])
def test_compiled_kernels_support_padded_head_dims_with_key_splits(head_dim, decode, dtype):
    """48 and 80 are padded to 64 and 128; two key splits put float32 through the combine kernel too."""
    q, k, v = make_qkv(1, 4, 1, 5 if decode else 40, 300, head_dim, dtype=dtype, seed=head_dim, device="cuda")
    out, lse = _kernels(q, k, v, causal=True, q_offset=260, decode=decode, num_splits=2)
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=260)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("q_len", [1, 20, 100])
def test_compiled_kernels_accept_stride0_expanded_kv_batch_and_noncontiguous_q(q_len, dtype):
    q, k, v = make_qkv(3, 8, 2, q_len, 290, 64, dtype=dtype, seed=14, expand_kv=True, device="cuda")
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [b, h, L, d] view of [b, L, h, d]
    q = torch.cat([q, torch.zeros_like(q)], dim=-1)[..., :64]  # and a head_dim slice
    assert k.stride(0) == 0 and not q.is_contiguous()
    out, lse = _attention(q, k, v, causal=True, q_offset=290 - q_len)
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=290 - q_len)


# Real model geometry, long contexts: (q_heads, kv_heads, q_len, k_len, head_dim, q_offset)
LONG_CASES = [
    (32, 8, 2048, 4096, 128, 2048),  # Phase 1: a 2K block after a 2K anchor, Llama-3-8B heads
    (9, 3, 1000, 3001, 64, 2001),  # SmolLM2 heads, lengths off the tile grid
    (32, 8, 1, 32768, 128, 32767),  # decode: one token over 32K cached keys (split-KV kernel)
    (32, 8, 7, 20000, 128, 19993),  # a short question over a long prefix
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", LONG_CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiled_triton_on_long_real_shapes(case, dtype):
    """float32 too: its decode over 32K keys runs the split-KV kernel and the combine (automatic splits)."""
    hq, hk, q_len, k_len, d, q_offset = case
    q, k, v = make_qkv(1, hq, hk, q_len, k_len, d, dtype=dtype, seed=k_len, device="cuda")
    out, lse = _attention(q, k, v, causal=True, q_offset=q_offset)
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=q_offset)
    # The check can fail here: a zero output is far outside it even where every output is small (~0.035 at 32K keys).
    ref_out, ref_lse = reference_attention(q, k, v, causal=True, q_offset=q_offset)
    assert reference_errors(torch.zeros_like(out), lse, ref_out, ref_lse)[0] > 20 * OUT_TOL[dtype]


def test_auto_backend_uses_triton_for_cuda_tensors(monkeypatch):
    from starqa.attention import attention_with_lse, triton_kernels

    calls = []
    real = triton_kernels.attention_with_lse_triton
    monkeypatch.setattr(triton_kernels, "attention_with_lse_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 4, 2, 5, 40, 64, dtype=torch.bfloat16, device="cuda")
    attention_with_lse(q, k, v, causal=True, q_offset=35, backend="auto")
    assert calls, "auto did not pick the Triton kernel for CUDA tensors"


@two_gpus
@pytest.mark.parametrize("decode", [False, True])
def test_kernels_run_on_the_tensors_gpu_not_the_current_one(decode):
    """Triton launches on the current device; the launch guard makes that q's (here cuda:1 while cuda:0 is current)."""
    torch.cuda.set_device(0)
    q, k, v = make_qkv(1, 8, 2, 4 if decode else 100, 3000, 128, dtype=torch.bfloat16, device="cuda:1")
    out, lse = _kernels(q, k, v, causal=True, q_offset=3000 - q.shape[2], decode=decode, num_splits=3)
    torch.cuda.synchronize(1)
    assert out.device == q.device and torch.cuda.current_device() == 0
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=3000 - q.shape[2])


def test_compiled_kernels_spill_no_registers(monkeypatch):
    """ptxas's register report of every configuration the launcher picks for head_dim 64/80/128 (Triton returns the
    compiled kernel from each launch): spills are local-memory traffic in the inner loop. tests/test_attention.py
    checks float32 ahead of time with the CPU's Triton; this is the image's Triton on the real GPU, bf16 included."""
    from starqa.attention import triton_kernels

    launched = []
    real_kernel = triton_kernels._kernel

    def recording_kernel(name, interpret):
        jit = real_kernel(name, interpret)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    compiled = jit[grid](*args, **kwargs)
                    launched.append((name, str(args[2].dtype).removeprefix("torch."), kwargs, compiled))
                    return compiled
                return launch
        return Launcher()

    monkeypatch.setattr(triton_kernels, "_kernel", recording_kernel)
    # (q_heads, kv_heads, q_len): the forward kernel; decode with 4 rows; decode with the most rows (32 in float32)
    shapes = {torch.float32: [(8, 2, 300), (8, 2, 1), (32, 1, 1)], torch.bfloat16: [(8, 2, 300), (8, 2, 1), (16, 1, 4)]}
    for dtype, dtype_shapes in shapes.items():
        for head_dim in (64, 80, 128):
            for hq, hk, q_len in dtype_shapes:
                q, k, v = make_qkv(1, hq, hk, q_len, 4096, head_dim, dtype=dtype, device="cuda")
                _kernels(q, k, v, causal=True, q_offset=4096 - q_len)
    torch.cuda.synchronize()
    report = []
    for name, dtype, kwargs, compiled in launched:  # dtype: of V (fwd, decode), of the output (combine)
        if hasattr(compiled, "_init_handles"):
            compiled._init_handles()  # fills n_regs / n_spills (done at the first launch already)
        config = {key: kwargs[key] for key in ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_R", "num_warps", "num_stages")
                  if key in kwargs}
        report.append({"kernel": name, "dtype": dtype, **config, "registers": compiled.n_regs,
                       "spills": compiled.n_spills})
    out_dir = os.environ.get("GPU_CHECK_OUT")
    if out_dir:
        Path(out_dir, "kernel-registers.json").write_text(json.dumps(report, indent=1) + "\n")
    assert len(report) >= 18 and {row["kernel"] for row in report} == {"fwd", "decode", "combine"}
    spilling = [row for row in report if row["spills"]]
    assert not spilling, "compiled kernels spill registers:\n" + "\n".join(map(json.dumps, spilling))


def _cuda_engines(architecture: str = "llama", dtype: torch.dtype = torch.float32):
    """As test_engine's pair (a StarEngine and an HF sdpa reference with the same weights), on the GPU."""
    import copy

    from conftest import tiny_model
    from starqa.engine.star_engine import StarEngine
    from test_engine import _NoTokenizer

    model = tiny_model(architecture).to("cuda", dtype)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    return StarEngine(model, _NoTokenizer()), reference


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2"])
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
    full = engine.generate_full(context + query, max_new_tokens=16)
    assert full == star


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


@two_gpus
def test_phase2_on_two_nccl_ranks_gives_the_tokens_and_logits_of_one_gpu(tmp_path):
    """test_distributed's gloo check on GPUs: each rank holds its blocks on its own GPU, NCCL merges per layer."""
    import torch.multiprocessing as mp

    from conftest import tiny_model
    from starqa.engine.star_engine import StarEngine
    from test_distributed import _CONTEXT, _phase2_logits, _phase2_worker
    from test_engine import _NoTokenizer

    mp.spawn(_phase2_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result"), "cuda"), nprocs=2,
             join=True)
    engine = StarEngine(tiny_model("llama").to("cuda"), _NoTokenizer())
    tokens, logits = _phase2_logits(engine, engine.encode_context(_CONTEXT, 48, 32))
    logits = logits.cpu()
    for rank in range(2):
        rank_tokens, rank_logits = torch.load(tmp_path / f"result.{rank}")
        assert rank_tokens == tokens
        torch.testing.assert_close(rank_logits, logits, rtol=1e-4, atol=1e-4 * logits.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_source_scores_on_the_gpu_match_float64(dtype):
    # The sources observer's scores on a GPU: in the keys' dtype with float32 accumulation, no float32 key copy.
    from starqa.evidence.scores import prefix_scores

    generator = torch.Generator(device="cuda").manual_seed(0)
    query = torch.randn(1, 32, 1, 128, device="cuda", generator=generator).to(dtype)
    keys = torch.randn(1, 8, 32768, 128, device="cuda", generator=generator).to(dtype)
    scores = prefix_scores(query, keys, 128 ** -0.5, heads=[0, 5, 31])
    expected = torch.einsum("hd,hnd->hn", query[0, [0, 5, 31], -1].double() * 128 ** -0.5,
                            keys[0, [0, 1, 7]].double())
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=1e-2, atol=2e-2)
