"""Tests of starqa.attention: attention_with_lse (torch and Triton backends) and merge_attention.

Every backend is compared with a naive float64 reference (explicit scores and mask). Triton
kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1), on tiny shapes.
"""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when a kernel is decorated; set it before anything imports
# starqa.attention.triton_kernels (the kernels also pick the interpreter for CPU tensors).
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from attention_reference import (CASES, KERNEL_CASES, NEG_INF, TOL, assert_matches_reference, case_id,  # noqa: E402
                                 make_qkv, reference_attention)
from starqa.attention import attention_with_lse, merge_attention  # noqa: E402
from starqa.attention import torch_backend  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that must import this checkout's starqa."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# --------------------------------------------------------------------------- torch backend


@pytest.fixture(params=["dispatch", "chunked"])
def torch_path(request, monkeypatch):
    """'dispatch': the normal torch path (fused CPU kernel where it fits); 'chunked': force the
    online-softmax loop with tiny chunks so that query blocks and key chunks are exercised."""
    if request.param == "chunked":
        monkeypatch.setattr(torch_backend, "_FEW_QUERY_ROWS", 1 << 30)
        monkeypatch.setattr(torch_backend, "_FEW_QUERY_MIN_KEYS", 0)
        monkeypatch.setattr(torch_backend, "_K_BLOCK", 16)
        monkeypatch.setattr(torch_backend, "_SCORE_BUDGET", 512)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_matches_float64_reference(case, torch_path):
    b, hq, hk, q_len, k_len, d, causal, q_offset = case
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, d)
    out, lse = attention_with_lse(q, k, v, causal=causal, q_offset=q_offset, backend="torch")
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal,q_offset", [(False, 0), (True, 0), (True, 20)])
def test_torch_backend_half_precision_inputs_give_half_output_and_float32_lse(
    dtype, causal, q_offset, torch_path
):
    q, k, v = make_qkv(2, 6, 2, 33, 53, 32, dtype=dtype, seed=1)
    out, lse = attention_with_lse(q, k, v, causal=causal, q_offset=q_offset, backend="torch")
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


@pytest.mark.parametrize("q_len", [1, 33])
def test_torch_backend_float64_inputs_give_float64_output(q_len, torch_path):
    q, k, v = make_qkv(1, 6, 2, q_len, 53, 16, dtype=torch.float64, seed=9)
    out, lse = attention_with_lse(q, k, v, causal=True, q_offset=20, backend="torch")
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=20)


@pytest.mark.parametrize(
    "q_len,causal,q_offset", [(1, True, 40), (9, False, 0), (9, True, 32), (33, True, 0)]
)
def test_torch_backend_accepts_stride0_expanded_kv_batch(q_len, causal, q_offset, torch_path):
    q, k, v = make_qkv(3, 6, 2, q_len, 41, 16, seed=2, expand_kv=True)
    assert k.stride(0) == 0
    out, lse = attention_with_lse(q, k, v, causal=causal, q_offset=q_offset, backend="torch")
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_decode_over_a_long_cache_matches_reference(dtype):
    """One token over thousands of keys: the default path (explicit scores for float32)."""
    q, k, v = make_qkv(2, 9, 3, 1, 5000, 64, dtype=dtype, seed=16)
    out, lse = attention_with_lse(q, k, v, causal=True, q_offset=4999, backend="torch")
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=4999)


def test_torch_backend_accepts_batch1_kv_for_a_larger_query_batch():
    q, k, v = make_qkv(3, 4, 2, 5, 17, 16, seed=3)
    out, lse = attention_with_lse(q, k[:1], v[:1], causal=False, backend="torch")
    assert_matches_reference(out, lse, q, k[:1], v[:1], causal=False)


def test_torch_backend_accepts_noncontiguous_query_from_bshd_layout(torch_path):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 9, 6, 16, generator=gen).transpose(1, 2)  # [b, h, L, d] view of [b, L, h, d]
    k = torch.randn(2, 19, 2, 16, generator=gen).transpose(1, 2)
    v = torch.randn(2, 19, 2, 16, generator=gen).transpose(1, 2)
    out, lse = attention_with_lse(q, k, v, causal=True, q_offset=10, backend="torch")
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=10)


def test_custom_scale_is_applied_to_scores_and_lse(torch_path):
    q, k, v = make_qkv(1, 4, 2, 12, 20, 16, seed=5)
    out, lse = attention_with_lse(q, k, v, causal=True, scale=0.3, q_offset=8, backend="torch")
    assert_matches_reference(out, lse, q, k, v, causal=True, scale=0.3, q_offset=8)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 2, 2, 4, 6, 16, seed=6)
    a = attention_with_lse(q, k, v, causal=False, backend="torch")
    b = attention_with_lse(q, k, v, causal=False, scale=1 / math.sqrt(16), backend="torch")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("b,hq,hk,k_len,dtype", [(1, 9, 3, 300, torch.float32), (2, 4, 4, 17, torch.float64),
                                                  (1, 4, 2, 0, torch.float32), (1, 6, 2, 40, torch.bfloat16)])
def test_decode_attention_with_scores_matches_the_reference(b, hq, hk, k_len, dtype):
    from starqa.attention import decode_attention_with_scores

    q, k, v = make_qkv(b, hq, hk, 1, k_len, 16, dtype=dtype, seed=11)
    out, lse, scores = decode_attention_with_scores(q, k, v, scale=0.3)
    ref_out, ref_lse = reference_attention(q, k, v, causal=False, scale=0.3)
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)
    expected = torch.matmul(q.double(), k.double().repeat_interleave(hq // hk, dim=1).transpose(-1, -2)) * 0.3
    torch.testing.assert_close(scores.double(), expected, rtol=tol, atol=tol)
    assert out.dtype == dtype and lse.dtype == torch.float32 and scores.shape == (b, hq, 1, k_len)
    with pytest.raises(ValueError, match="one query row"):
        decode_attention_with_scores(*make_qkv(1, 2, 2, 2, 4, 8))


def test_auto_backend_uses_torch_for_cpu_tensors(monkeypatch):
    if HAS_TRITON:  # the interpreted kernel would give the same numbers: make sure it is not the one called
        import starqa.attention.triton_kernels as triton_kernels

        def not_on_cpu(*args, **kwargs):
            raise AssertionError("the Triton path ran for CPU tensors")

        monkeypatch.setattr(triton_kernels, "attention_with_lse_triton", not_on_cpu)
    q, k, v = make_qkv(1, 2, 1, 3, 5, 16, seed=7)
    torch.testing.assert_close(
        attention_with_lse(q, k, v, causal=True, q_offset=2),
        attention_with_lse(q, k, v, causal=True, q_offset=2, backend="torch"),
    )


@pytest.mark.parametrize(
    "kshape,msg",
    [((1, 3, 5, 16), "multiple of kv heads"), ((1, 2, 5, 8), "head_dim"), ((2, 2, 5, 16), "batch")],
)
def test_bad_shapes_are_rejected_with_a_clear_message(kshape, msg):
    q = torch.randn(3, 4, 2, 16)
    k = torch.randn(*kshape)
    with pytest.raises(ValueError, match=msg):
        attention_with_lse(q, k, k, causal=False, backend="torch")


def test_unknown_backend_is_rejected():
    q = torch.randn(1, 1, 1, 16)
    with pytest.raises(ValueError, match="backend"):
        attention_with_lse(q, q, q, causal=False, backend="cuda")


def test_long_context_chunked_path_never_builds_a_full_score_matrix(monkeypatch):
    """With a small score budget the loop processes bounded tiles and still matches exactly."""
    monkeypatch.setattr(torch_backend, "_FEW_QUERY_ROWS", 1 << 30)
    monkeypatch.setattr(torch_backend, "_FEW_QUERY_MIN_KEYS", 0)
    monkeypatch.setattr(torch_backend, "_K_BLOCK", 64)
    monkeypatch.setattr(torch_backend, "_SCORE_BUDGET", 64 * 64 * 4)
    largest = 0
    real_matmul = torch.matmul

    def spy(a, b_):
        nonlocal largest
        r = real_matmul(a, b_)
        largest = max(largest, r.numel())
        return r

    monkeypatch.setattr(torch, "matmul", spy)
    q, k, v = make_qkv(1, 4, 2, 300, 500, 16, seed=8)
    out, lse = attention_with_lse(q, k, v, causal=True, q_offset=200, backend="torch")
    monkeypatch.undo()
    assert 0 < largest <= 64 * 64 * 4  # the scores went through matmul (the spy saw them), in bounded tiles
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=200)


def test_package_imports_and_torch_backend_runs_where_triton_is_missing():
    code = textwrap.dedent(
        """
        import builtins
        real_import = builtins.__import__
        def no_triton(name, *args, **kwargs):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton hidden by the test")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = no_triton
        import torch
        from starqa.attention import attention_with_lse, triton_available
        assert not triton_available()
        q = torch.randn(1, 2, 3, 16)
        out, lse = attention_with_lse(q, q, q, causal=True)
        assert out.shape == q.shape and lse.shape == (1, 2, 3)
        try:
            attention_with_lse(q, q, q, causal=True, backend="triton")
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("backend='triton' without triton must fail clearly")
        """
    )
    env = subprocess_env()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", [(2, 9, 3, 1, 5000, 64, True, 4999), (1, 6, 2, 33, 70, 16, True, 37)],
                         ids=["decode-over-5000-keys", "causal-over-a-cache"])
def test_the_reference_check_rejects_a_zero_output_and_attention_over_80_percent_of_the_keys(case, dtype):
    """The mutants that passed the old absolute bounds: they must fail in every dtype, on long rows too."""
    b, hq, hk, q_len, k_len, d, causal, q_offset = case
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, d, dtype=dtype, seed=17)
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, q_offset=q_offset)
    kw = dict(causal=causal, q_offset=q_offset)
    assert_matches_reference(ref_out.to(dtype), ref_lse.float(), q, k, v, **kw)  # the exact answer, rounded, passes
    kept = k_len * 4 // 5
    part_out, part_lse = reference_attention(q, k[:, :, :kept], v[:, :, :kept], **kw)
    for out, lse in [(torch.zeros_like(q), ref_lse.float()),  # right lse, zero output
                     (part_out.to(dtype), ref_lse.float()),  # right lse, the output of 80 % of the keys
                     (ref_out.to(dtype), part_lse.float())]:  # right output, the lse of 80 % of the keys
        with pytest.raises(AssertionError, match="off by"):
            assert_matches_reference(out, lse, q, k, v, **kw)


# --------------------------------------------------------------------------- the kernel benchmark


def _attention_benchmark():
    """benchmarks/attention.py as a module (it is a script, not part of the package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    spec = importlib.util.spec_from_file_location("attention_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [False, True])
def test_benchmark_gives_sdpa_no_boolean_mask_on_the_gpu_shapes(quick):
    """A boolean mask with enable_gqa makes SDPA leave flash attention for its math path, which builds the float32
    scores: about 140 GiB for 4 blocks of 8192 queries over a cached 8192-token anchor."""
    bench = _attention_benchmark()
    for shape in bench.cuda_shapes(quick):
        mask = bench.sdpa_mask(shape, "cpu")
        assert not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool), shape.name


@pytest.mark.parametrize("q_len,k_len,q_offset", [(8, 24, 16), (24, 24, 0), (1, 24, 23), (8, 24, 3), (8, 24, 40)])
def test_benchmark_sdpa_rows_compute_the_attention_they_time(q_len, k_len, q_offset):
    bench = _attention_benchmark()
    shape = bench.Shape("t", 2, 4, 2, q_len, k_len, 16, True, q_offset)
    q, k, v = make_qkv(2, 4, 2, q_len, k_len, 16, seed=19)
    out = bench.sdpa(q, k, v, shape, bench.causal_mask(shape, "cpu"))
    expected, _ = reference_attention(q, k, v, causal=True, q_offset=q_offset)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_failing_benchmark_row_is_recorded_and_the_others_still_run(monkeypatch, capsys):
    bench = _attention_benchmark()
    monkeypatch.setattr(bench, "cpu_shapes", lambda quick: [bench.Shape("tiny", 1, 4, 2, 8, 40, 16, True, 32)])

    def refused(*args):
        raise RuntimeError("No available kernel. Aborting execution.\nmore lines")

    monkeypatch.setattr(bench, "sdpa", refused)
    rows = bench.run("cpu", quick=True, dtype=torch.float32)
    assert [(row["impl"], "ms" in row, row.get("error")) for row in rows] == [
        ("torch path", True, None), ("sdpa (no lse)", False, "RuntimeError: No available kernel. Aborting execution."),
        ("eager (HF)", True, None)]
    assert "failed: RuntimeError: No available kernel" in capsys.readouterr().out


# --------------------------------------------------------------------------- merge


def split_points(k_len, n_shards, gen):
    """n_shards - 1 sorted cut points in [0, k_len] (repeats allowed: empty shards)."""
    cuts = torch.randint(0, k_len + 1, (n_shards - 1,), generator=gen).sort().values.tolist()
    return [0, *cuts, k_len]


@pytest.mark.parametrize("n_shards", [1, 2, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_merging_key_shards_equals_attention_over_all_keys(n_shards, causal):
    gen = torch.Generator().manual_seed(10 + n_shards)
    b, hq, hk, q_len, k_len, d = 2, 6, 2, 9, 40, 16
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, d, seed=n_shards)
    q_offset = 15 if causal else 0  # with causal, later shards are fully hidden from early rows
    bounds = split_points(k_len, n_shards, gen)
    if n_shards == 5:
        bounds = [0, 0, 12, 12, 39, 40]  # two empty shards and a one-key shard
    parts = []
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        # Shard [s0, s1) of the keys: query i sees shard key j' when s0 + j' <= i + q_offset.
        parts.append(
            attention_with_lse(q, k[:, :, s0:s1], v[:, :, s0:s1], causal=causal, q_offset=q_offset - s0)
        )
    out, lse = merge_attention(parts)
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)
    full_out, full_lse = attention_with_lse(q, k, v, causal=causal, q_offset=q_offset)
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_merging_parts_that_are_all_empty_gives_zero_and_minus_inf_without_nan():
    out_part = torch.zeros(2, 3, 4, 8)
    lse_part = torch.full((2, 3, 4), NEG_INF)
    out, lse = merge_attention([(out_part, lse_part), (out_part.clone(), lse_part.clone())])
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_merging_with_an_empty_part_changes_nothing():
    q, k, v = make_qkv(1, 4, 2, 6, 10, 16, seed=11)
    part = attention_with_lse(q, k, v, causal=False)
    empty = attention_with_lse(q, k[:, :, :0], v[:, :, :0], causal=False)
    for parts in ([part, empty], [empty, part], [empty, part, empty]):
        out, lse = merge_attention(parts)
        torch.testing.assert_close(out, part[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, part[1], atol=1e-6, rtol=1e-6)


def test_merging_rows_empty_in_some_parts_only_uses_the_parts_that_saw_keys():
    out_a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    lse_a = torch.tensor([0.0, NEG_INF])
    out_b = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    lse_b = torch.tensor([NEG_INF, 1.0])
    out_b[0] = 0  # a row without keys has out = 0 by contract
    out, lse = merge_attention([(out_a, lse_a), (out_b, lse_b)])
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0], [7.0, 8.0]]))
    torch.testing.assert_close(lse, torch.tensor([0.0, 1.0]))


def test_merge_weights_parts_by_their_softmax_mass():
    out_a, out_b = torch.ones(1, 1, 1, 4), -torch.ones(1, 1, 1, 4)
    lse_a, lse_b = torch.full((1, 1, 1), math.log(3.0)), torch.zeros(1, 1, 1)
    out, lse = merge_attention([(out_a, lse_a), (out_b, lse_b)])
    torch.testing.assert_close(out, torch.full((1, 1, 1, 4), 0.5))  # (3*1 + 1*(-1)) / 4
    torch.testing.assert_close(lse, torch.full((1, 1, 1), math.log(4.0)))


def test_merge_accumulates_in_float32_and_returns_the_first_parts_dtype():
    q, k, v = make_qkv(1, 4, 2, 6, 30, 16, dtype=torch.bfloat16, seed=12)
    parts = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], causal=False) for a, b in [(0, 10), (10, 30)]]
    out, lse = merge_attention(parts)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_matches_reference(out, lse, q, k, v, causal=False)


def test_merge_of_large_lse_values_does_not_overflow():
    out_a, out_b = torch.ones(1, 4), torch.zeros(1, 4)
    lse_a, lse_b = torch.tensor([1000.0]), torch.tensor([1000.0])
    out, lse = merge_attention([(out_a, lse_a), (out_b, lse_b)])
    torch.testing.assert_close(out, torch.full((1, 4), 0.5))
    torch.testing.assert_close(lse, torch.tensor([1000.0 + math.log(2.0)]))


def test_merge_rejects_mismatched_parts():
    with pytest.raises(ValueError):
        merge_attention([])
    with pytest.raises(ValueError, match="part 1"):
        merge_attention(
            [(torch.zeros(2, 3, 4), torch.zeros(2, 3)), (torch.zeros(2, 4, 4), torch.zeros(2, 4))]
        )


# --------------------------------------------------------------------------- Triton kernels
# CPU tensors run the kernels in Triton's interpreter: small shapes and 16-wide tiles, so that
# several query blocks, key tiles and key splits are still exercised. The interpreter needs
# TRITON_INTERPRET=1 before `import triton` (set at the top of this module); if something in
# this pytest process imported triton earlier, these tests run in a fresh process instead.


def _triton_interpreter_ready() -> bool:
    if not HAS_TRITON:
        return False
    from starqa.attention.triton_kernels import interpreter_ready

    return interpreter_ready()


TRITON_IN_PROCESS = _triton_interpreter_ready()
triton_only = pytest.mark.skipif(
    not TRITON_IN_PROCESS,
    reason="triton missing, or imported before TRITON_INTERPRET=1 (then a subprocess runs these)",
)


@pytest.mark.skipif(not HAS_TRITON or TRITON_IN_PROCESS, reason="Triton tests run in this process")
def test_triton_kernels_pass_in_a_fresh_interpreter_process():
    env = subprocess_env(TRITON_INTERPRET="1")
    only = "triton and not compile and not missing and not fresh"  # the interpreter tests, nothing else
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k", only]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary, summary  # they ran, none skipped


def triton_attention(q, k, v, **kw):
    from starqa.attention.triton_kernels import attention_with_lse_triton

    return attention_with_lse_triton(q, k, v, **kw)


@triton_only
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_backend_matches_float64_reference(case):
    b, hq, hk, q_len, k_len, d, causal, q_offset = case
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, d)
    out, lse = attention_with_lse(q, k, v, causal=causal, q_offset=q_offset, backend="triton")
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


@triton_only
@pytest.mark.parametrize("kernel", ["fwd", "decode"])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_fwd_and_split_kv_decode_kernels_match_reference(case, kernel, num_splits):
    b, hq, hk, q_len, k_len, causal, q_offset = case
    if kernel == "decode" and (hq // hk) * q_len > 64:
        pytest.skip("the decode kernel holds at most 64 query rows per kv head")
    q, k, v = make_qkv(b, hq, hk, q_len, k_len, 16, seed=q_len)
    out, lse = triton_attention(
        q, k, v, causal=causal, q_offset=q_offset, decode=(kernel == "decode"), num_splits=num_splits
    )
    assert_matches_reference(out, lse, q, k, v, causal=causal, q_offset=q_offset)


@triton_only
@pytest.mark.parametrize("head_dim", [64, 128, 48])
@pytest.mark.parametrize("decode", [False, True])
def test_triton_kernels_support_head_dims_64_128_and_padded(head_dim, decode):
    q, k, v = make_qkv(1, 2, 1, 5 if decode else 20, 37, head_dim, seed=head_dim)
    out, lse = triton_attention(q, k, v, causal=True, q_offset=17, decode=decode, num_splits=2)
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=17)


@triton_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("q_len", [1, 20])
def test_triton_half_precision_inputs_give_half_output_and_float32_lse(dtype, q_len):
    q, k, v = make_qkv(1, 4, 2, q_len, 45, 32, dtype=dtype, seed=13)
    out, lse = attention_with_lse(q, k, v, causal=True, q_offset=25, backend="triton")
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=25)


@triton_only
@pytest.mark.parametrize("q_len", [1, 20])
def test_triton_accepts_stride0_expanded_kv_batch_and_noncontiguous_q(q_len):
    q, k, v = make_qkv(3, 4, 2, q_len, 29, 16, seed=14, expand_kv=True)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [b, h, L, d] view of [b, L, h, d]
    q = torch.cat([q, torch.zeros_like(q)], dim=-1)[..., :16]  # and a head_dim slice
    assert k.stride(0) == 0 and not q.is_contiguous()
    out, lse = attention_with_lse(q, k, v, causal=True, q_offset=9, backend="triton")
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=9)


@triton_only
def test_triton_and_torch_backends_agree_and_merge_across_backends():
    q, k, v = make_qkv(1, 6, 2, 9, 40, 16, seed=15)
    t_part = attention_with_lse(q, k[:, :, :25], v[:, :, :25], causal=False, backend="triton")
    c_part = attention_with_lse(q, k[:, :, 25:], v[:, :, 25:], causal=True, q_offset=6, backend="torch")
    out, lse = merge_attention([t_part, c_part])
    assert_matches_reference(out, lse, q, k, v, causal=True, q_offset=31)


AOT_COMPILE_SCRIPT = """
import contextlib, io, json, re
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from starqa.attention import triton_kernels as tk

def compile_for_sm90(fn, pointers, consts, options):
    fn = triton.jit(fn)
    names = fn.arg_names
    signature = {
        n: "constexpr" if n in consts else pointers.get(n, "fp32" if n == "qk_scale_log2" else "i32")
        for n in names
    }
    constexprs = {(names.index(n),): v for n, v in consts.items()}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    ptxas_log = io.StringIO()  # TRITON_DUMP_PTXAS_LOG=1: Triton prints the log of the ptxas run that made the cubin
    with contextlib.redirect_stdout(ptxas_log):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    assert "cubin" in compiled.asm
    spills = re.search(r"(\\d+) bytes spill stores", ptxas_log.getvalue())
    registers = re.search(r"Used (\\d+) registers", ptxas_log.getvalue())
    assert spills and registers, "no ptxas log: " + ptxas_log.getvalue()[-500:]
    return int(registers.group(1)), int(spills.group(1))

for dtype, tl_name, head_dims in [(torch.float32, "fp32", (64, 80, 128)), (torch.bfloat16, "bf16", (64, 128))]:
    ptrs = {"Q": "*" + tl_name, "K": "*" + tl_name, "V": "*" + tl_name, "Out": "*" + tl_name, "Lse": "*fp32"}
    max_rows = tk._DECODE_MAX_ROWS_FP32 if dtype == torch.float32 else tk._DECODE_MAX_ROWS
    for head_dim in head_dims:
        block_d = tk._pow2_at_least(head_dim)
        base = dict(CAUSAL=True, HEAD_DIM=head_dim, BLOCK_D=block_d, UPCAST=False,
                    DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
        configs = [("fwd", tk._fwd_config(block_d, dtype, interpret=False))]
        configs += [("decode", dict(tk._decode_config(block_d, dtype, interpret=False), BLOCK_R=rows))
                    for rows in (16, max_rows)]
        for name, cfg in configs:
            consts = {**base, **cfg}
            options = {k: consts.pop(k) for k in ("num_warps", "num_stages")}
            registers, spills = compile_for_sm90({"fwd": tk._attn_fwd, "decode": tk._attn_decode}[name], ptrs,
                                                 consts, options)
            print(json.dumps(dict(kernel=name, dtype=tl_name, head_dim=head_dim, **cfg, registers=registers,
                                  spill_stores=spills)))
compile_for_sm90(tk._attn_combine,
                 {"PartOut": "*fp32", "PartLse": "*fp32", "Out": "*bf16", "Lse": "*fp32"},
                 dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_S=64), {"num_warps": 4})
print("compiled combine")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_compile_for_a_hopper_gpu_without_one_and_float32_spills_no_register(tmp_path):
    """Ahead-of-time compile to cubin for sm_90 of the GPU configurations (float32 at head_dim 64/80/128, bf16 at
    64/128; forward, and decode with 16 and the most rows), so compile errors that the CPU interpreter cannot see are
    caught without a GPU; and ptxas's report of each: no float32 configuration may spill registers (the former tiles
    spilled 3-16 KB per thread). bf16 spills are checked on the GPU (tests/test_gpu.py) with the image's Triton: the
    ptxas of Triton 3.9 spills 100-500 B in bf16 tiles that Triton 3.6's does not.
    Runs in a process without TRITON_INTERPRET (the compiler needs un-interpreted triton)."""
    env = subprocess_env(
        TRITON_CACHE_DIR=str(tmp_path),  # really compile, every time
        TRITON_DEFAULT_FP_FUSION="1",  # triton 3.9 warns when unset
        TRITON_DUMP_PTXAS_LOG="1",
    )
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0 and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this triton install has no ptxas")  # pragma: no cover
    assert result.returncode == 0, result.stderr[-4000:]
    assert "compiled combine" in result.stdout
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 15
    spilling = [r for r in reports if r["dtype"] == "fp32" and r["spill_stores"] > 0]
    assert not spilling, "float32 kernels spill registers:\n" + "\n".join(map(json.dumps, spilling))
