"""The float64 attention reference and the shapes every attention backend is checked on (CPU and GPU tests)."""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def reference_attention(q, k, v, *, causal, scale=None, q_offset=0):
    """Naive float64 attention: explicit scores, explicit mask (key j hidden if j > i + q_offset).

    Returns (out float64 [b, hq, L, d], lse float64 [b, hq, L]); rows without keys: 0 and -inf.
    """
    b, hq, q_len, d = q.shape
    hk, k_len = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    group = hq // hk
    k64 = k.double().expand(b, -1, -1, -1).repeat_interleave(group, dim=1)
    v64 = v.double().expand(b, -1, -1, -1).repeat_interleave(group, dim=1)
    s = torch.matmul(q.double(), k64.transpose(-1, -2)) * scale  # [b, hq, L, S]
    if causal:
        i = torch.arange(q_len, device=q.device).unsqueeze(1)
        j = torch.arange(k_len, device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i + q_offset, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # -inf for empty rows (and k_len = 0)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
    return torch.matmul(p, v64), lse


def make_qkv(b, hq, hk, q_len, k_len, d, dtype=torch.float32, seed=0, expand_kv=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, q_len, d, generator=gen).to(device=device, dtype=dtype)
    kb = 1 if expand_kv else b
    k = torch.randn(kb, hk, k_len, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(kb, hk, k_len, d, generator=gen).to(device=device, dtype=dtype)
    if expand_kv:
        k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)  # stride-0 batch
    return q, k, v


# Error bounds per input dtype, relative to the reference's own scale, so that a wrong answer fails whatever its size:
# a decode over 32K keys has outputs of at most ~0.035, under any fixed absolute bound one would set for short rows.
#   out: |out - ref| <= OUT_TOL * (that row's largest |ref|) + OUT_TOL * 1e-3   (float64 reference, not rounded)
#   lse: |lse - ref_lse| <= LSE_TOL (absolute: an lse error e is a relative error e of the row's softmax mass)
# Worst seen on the CPU backends and the interpreted kernels (tests/test_attention.py), out / lse: float32 2.2e-6 /
# 1.0e-6, bfloat16 6.9e-3 / 6.2e-5, float16 7.7e-4 / 6.2e-5, float64 4.2e-7 / 4.8e-7 (its lse is float32). A zero
# output is off by ~1 on this scale; attention over 80 % of the keys by 0.66-2.0 and by 0.23-0.49 in lse (decodes
# over 5K and 32K keys, a causal block; test_the_reference_check_rejects_* keeps those mutants).
OUT_TOL = {torch.float32: 5e-5, torch.float64: 5e-6, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LSE_TOL = {torch.float32: 5e-5, torch.float64: 5e-6, torch.bfloat16: 2e-3, torch.float16: 2e-3}
# Loose bounds for checks of other outputs (merged parts, scores) in the input dtype.
TOL = {torch.float32: 2e-5, torch.float64: 1e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


# Every check's (dtype, q shape, k_len, out error, lse error): the GPU check writes them to its report.
ERRORS_SEEN: list[tuple] = []


def reference_errors(out, lse, ref_out, ref_lse) -> tuple[float, float]:
    """(largest out error over its row's scale, largest absolute lse error) over the rows that see a key."""
    seen = torch.isfinite(ref_lse)
    if not seen.any():
        return 0.0, 0.0
    ref_rows, out_rows = ref_out[seen], out.double()[seen]  # [rows, d]
    scale = ref_rows.abs().amax(-1)  # [rows]
    out_error = ((out_rows - ref_rows).abs().amax(-1) / (scale + 1e-3)).max().item()
    lse_error = (lse.double()[seen] - ref_lse[seen]).abs().max().item()
    return out_error, lse_error


def assert_matches_reference(out, lse, q, k, v, *, causal, scale=None, q_offset=0):
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, scale=scale, q_offset=q_offset)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows without keys must have lse = -inf, only those"
    assert (lse[empty] < 0).all()
    assert (out.float()[empty] == 0).all(), "rows without keys must have out = 0"
    out_error, lse_error = reference_errors(out, lse, ref_out, ref_lse)
    ERRORS_SEEN.append((q.dtype, tuple(q.shape), k.shape[2], out_error, lse_error))
    assert out_error <= OUT_TOL[q.dtype], (
        f"out is off by {out_error:.3g} of its rows' scale (bound {OUT_TOL[q.dtype]:g} for {q.dtype})")
    assert lse_error <= LSE_TOL[q.dtype], f"lse is off by {lse_error:.3g} (bound {LSE_TOL[q.dtype]:g} for {q.dtype})"


# (batch, q_heads, kv_heads, q_len, k_len, head_dim, causal, q_offset)
CASES = [
    (1, 1, 1, 1, 1, 16, False, 0),  # one query, one key
    (2, 3, 1, 7, 31, 16, False, 0),  # GQA 3, odd lengths
    (1, 8, 1, 33, 70, 32, False, 0),  # GQA 8
    (2, 4, 4, 33, 33, 16, True, 0),  # square causal, GQA 1
    (1, 6, 2, 33, 70, 16, True, 37),  # causal over a cache: q_offset = k_len - q_len
    (1, 6, 2, 7, 70, 16, True, 20),  # causal, keys after the last diagonal are hidden
    (2, 3, 1, 1, 31, 16, True, 30),  # decode: one query over a cache
    (1, 8, 1, 33, 31, 16, True, 0),  # causal, more queries than keys
    (1, 3, 1, 33, 31, 16, True, -5),  # negative offset: the first 5 rows see no key
    (1, 3, 1, 7, 31, 16, True, -7),  # negative offset: every row sees no key
    (2, 3, 1, 7, 0, 16, False, 0),  # empty shard (k_len = 0)
    (2, 3, 1, 7, 0, 16, True, 0),  # empty shard, causal
    (1, 2, 2, 0, 5, 16, False, 0),  # no queries
    (2, 4, 2, 129, 300, 64, True, 171),  # longer, several tiles
]


def case_id(c):
    b, hq, hk, L, S, d, causal, off = c
    return f"b{b}-h{hq}/{hk}-L{L}-S{S}-d{d}-{'causal' if causal else 'full'}{off:+d}"


# The kernels' own cases, run with each kernel forced and with forced key splits (CPU interpreter and GPU):
# (batch, q_heads, kv_heads, q_len, k_len, causal, q_offset)
KERNEL_CASES = [
    (1, 3, 1, 1, 70, True, 69),  # decode over a cache
    (2, 8, 1, 2, 53, True, 51),  # two queries, GQA 8
    (1, 2, 2, 7, 70, True, 20),  # diagonal crosses the key splits
    (1, 3, 1, 21, 50, True, -3),  # negative offset: empty rows
    (1, 2, 1, 19, 64, False, 0),  # non-causal
]
